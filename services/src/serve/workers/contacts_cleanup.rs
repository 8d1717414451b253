//! When a persona is deleted, it leaves every contact list that holds it.
//!
//! Who holds it is read from the event store, not the contacts read model, so a contact added
//! a moment before the deletion is not missed because the read model had not caught up.

use cmb_domain::contacts::{Contacts, ContactsCommand, RemovalReason};
use cmb_domain::persona::PersonaEvent;
use cmb_domain::{Actor, CommandContext, EventEnvelope};

use super::runner::{decode, Failure};
use crate::backbone::store::EventStore;

pub const NAME: &str = "contacts-cleanup";

pub async fn handle(store: EventStore, event: EventEnvelope) -> Result<(), Failure> {
    let Some(PersonaEvent::PersonaDeleted) = decode(&event)? else {
        return Ok(());
    };
    remove_everywhere(&store, &event).await
}

/// Takes the deleted persona of `event` out of every contact list that holds it.
async fn remove_everywhere(store: &EventStore, event: &EventEnvelope) -> Result<(), Failure> {
    let persona_id = &event.aggregate_id;
    let holders: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT aggregate_id FROM events
          WHERE aggregate_type = 'contacts'
            AND payload -> 'ContactAdded' ->> 'persona_id' = $1",
    )
    .bind(persona_id)
    .fetch_all(store.pool())
    .await?;
    let ctx = CommandContext::caused_by(event, Actor::Worker(NAME.into()));
    for user in holders {
        let command = ContactsCommand::Remove {
            persona_id: persona_id.clone(),
            reason: RemovalReason::PersonaDeleted,
        };
        // Idempotent: someone who no longer has it is left alone.
        store
            .execute::<Contacts>(&user, command, &ctx)
            .await
            .map_err(|e| {
                Failure::retry(format!("removing {persona_id} from {user}'s contacts"), e)
            })?;
    }
    Ok(())
}
