//! What a persona remembers of a user, as the user controls it: forget one item, or all.

use cmb_domain::memory::{memory_id, Memory, MemoryCommand, MemoryError};
use cmb_domain::CommandContext;
use uuid::Uuid;

use crate::backbone::store::{CommandError, Committed, EventStore};
use crate::usecases::personas;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Persona(#[from] personas::Error),
    #[error(transparent)]
    Rejected(#[from] CommandError<MemoryError>),
}

/// Forgets one fact or open item (or the summary, as item `summary`) of persona `persona_id`.
pub async fn forget(
    store: &EventStore,
    user: Uuid,
    persona_id: &str,
    item: String,
    ctx: &CommandContext,
) -> Result<Committed, Error> {
    personas::accessible(store, persona_id, user).await?;
    Ok(store
        .execute::<Memory>(
            &memory_id(user, persona_id),
            MemoryCommand::Forget { id: item },
            ctx,
        )
        .await?)
}

/// Forgets everything persona `persona_id` remembers about the user.
pub async fn clear(
    store: &EventStore,
    user: Uuid,
    persona_id: &str,
    ctx: &CommandContext,
) -> Result<Committed, Error> {
    personas::accessible(store, persona_id, user).await?;
    Ok(store
        .execute::<Memory>(&memory_id(user, persona_id), MemoryCommand::Clear, ctx)
        .await?)
}
