//! Cancel a scheduled call (its owner, at least `MIN_NOTICE_MINUTES` before it); the
//! settlement worker then releases its hold in full.

use chrono::{DateTime, Duration, Utc};
use cmb_domain::call::{Call, CallCommand, CallError, Payment};
use cmb_domain::values::Cents;
use cmb_domain::{CallId, CommandContext, UserId};

use super::schedule::MIN_NOTICE_MINUTES;
use crate::backbone::store::{CommandError, Committed, EventStore};

/// A cancelled call and what held its price.
#[derive(Debug, Clone)]
pub struct Cancelled {
    pub committed: Committed,
    pub payment: Option<Payment>,
    pub max_price: Cents,
}

pub type CancelError = CommandError<CallError>;

pub async fn cancel(
    store: &EventStore,
    user: UserId,
    call_id: CallId,
    now: DateTime<Utc>,
    ctx: &CommandContext,
) -> Result<Cancelled, CancelError> {
    let command = CallCommand::Cancel {
        by: user,
        at: now,
        min_notice: Duration::minutes(MIN_NOTICE_MINUTES),
    };
    let committed = store
        .execute::<Call>(&call_id.to_string(), command, ctx)
        .await?;
    let (call, _) = store.load::<Call>(&call_id.to_string()).await?;
    Ok(Cancelled {
        committed,
        payment: call.payment,
        max_price: Cents(call.max_price_cents),
    })
}
