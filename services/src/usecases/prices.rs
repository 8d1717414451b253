//! The price table in force.

use chrono::{DateTime, Utc};
use cmb_domain::pricing::{PriceTable, Pricing, PricingError, PRICING_ID};

use crate::backbone::store::{CommandError, EventStore};

/// The price table in force at `now`.
pub async fn current(
    store: &EventStore,
    now: DateTime<Utc>,
) -> Result<PriceTable, CommandError<PricingError>> {
    let (pricing, _) = store.load::<Pricing>(PRICING_ID).await?;
    Ok(pricing.at(now))
}
