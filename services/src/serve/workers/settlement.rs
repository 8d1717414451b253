//! Settles a call's hold when it ends (`usecases::calls::settle`): exactly its price is taken,
//! the rest released, the budget observed, the user's active-call slot freed.

use cmb_domain::call::CallEvent;
use cmb_domain::{Actor, CallId, CommandContext, EventEnvelope};
use cmb_providers::stripe::Stripe;

use super::runner::{decode, Failure};
use crate::backbone::store::EventStore;
use crate::usecases::calls::settle::settle;

pub const NAME: &str = "settlement";

pub async fn handle(
    store: EventStore,
    stripe: Stripe,
    event: EventEnvelope,
) -> Result<(), Failure> {
    let Some(CallEvent::CallEnded { .. }) = decode(&event)? else {
        return Ok(());
    };
    let ctx = CommandContext::caused_by(&event, Actor::Worker(NAME.into()));
    let call_id: CallId = event
        .aggregate_id
        .parse()
        .map_err(|e| Failure::Skip(Box::new(e)))?;
    Ok(settle(&store, &stripe, call_id, event.occurred_at, &ctx).await?)
}
