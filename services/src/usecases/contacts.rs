//! A user's contacts: the personas they keep at hand.

use chrono::{DateTime, Utc};
use cmb_domain::contacts::{Contacts, ContactsCommand, ContactsError, RemovalReason};
use cmb_domain::{CommandContext, PersonaId, UserId};

use crate::backbone::store::{CommandError, Committed, EventStore};
use crate::usecases::personas;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Persona(#[from] personas::Error),
    #[error(transparent)]
    Rejected(#[from] CommandError<ContactsError>),
}

/// Adds persona `persona_id` (one the user can see).
pub async fn add(
    store: &EventStore,
    user: UserId,
    persona_id: &PersonaId,
    at: DateTime<Utc>,
    ctx: &CommandContext,
) -> Result<Committed, Error> {
    personas::accessible(store, persona_id, user).await?;
    let command = ContactsCommand::Add {
        persona_id: persona_id.to_string(),
        at,
    };
    Ok(store
        .execute::<Contacts>(&user.to_string(), command, ctx)
        .await?)
}

/// Removes persona `persona_id` from the user's contacts.
pub async fn remove(
    store: &EventStore,
    user: UserId,
    persona_id: PersonaId,
    ctx: &CommandContext,
) -> Result<Committed, Error> {
    let command = ContactsCommand::Remove {
        persona_id: persona_id.into(),
        reason: RemovalReason::ByUser,
    };
    Ok(store
        .execute::<Contacts>(&user.to_string(), command, ctx)
        .await?)
}
