//! What a persona remembers of a user, as the user controls it: forget one item, or all; and
//! what expires with the transcripts it was learned from.

use chrono::{DateTime, Utc};
use cmb_domain::memory::{memory_id, Memory, MemoryCommand, MemoryError};
use cmb_domain::{CommandContext, PersonaId, UserId};

use crate::backbone::store::{CommandError, Committed, EventStore};
use crate::usecases::personas;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Persona(#[from] personas::Error),
    #[error(transparent)]
    Rejected(#[from] CommandError<MemoryError>),
    #[error("the memory read model")]
    ReadModel(#[from] sqlx::Error),
}

/// Forgets one fact or open item (or the summary, as item `summary`) of persona `persona_id`.
pub async fn forget(
    store: &EventStore,
    user: UserId,
    persona_id: &PersonaId,
    item: String,
    ctx: &CommandContext,
) -> Result<Committed, Error> {
    personas::accessible(store, persona_id, user).await?;
    Ok(store
        .execute::<Memory>(
            &memory_id(user.uuid(), persona_id.as_str()),
            MemoryCommand::Forget { id: item },
            ctx,
        )
        .await?)
}

/// Forgets everything persona `persona_id` remembers about the user.
pub async fn clear(
    store: &EventStore,
    user: UserId,
    persona_id: &PersonaId,
    ctx: &CommandContext,
) -> Result<Committed, Error> {
    personas::accessible(store, persona_id, user).await?;
    Ok(store
        .execute::<Memory>(
            &memory_id(user.uuid(), persona_id.as_str()),
            MemoryCommand::Clear,
            ctx,
        )
        .await?)
}

/// Forgets what calls taught before `before` (facts, open items, a summary they last
/// rewrote), as their transcripts are deleted: memory derived from a transcript lives no
/// longer than the transcript. Returns the items forgotten. Repeatable: the read model only
/// finds the memories to look at, each memory's aggregate decides.
pub async fn expire(store: &EventStore, before: DateTime<Utc>) -> Result<usize, Error> {
    let learned = cmb_projections::memory::learned_before(store.pool(), before).await?;
    let ctx = CommandContext::system("memory-retention");
    let mut forgotten = 0;
    for memory in learned {
        let done = store
            .execute::<Memory>(
                &memory_id(memory.user.uuid(), memory.persona.as_str()),
                MemoryCommand::ForgetCalls {
                    calls: memory.calls.into_iter().collect(),
                },
                &ctx,
            )
            .await?;
        forgotten += done.events;
    }
    Ok(forgotten)
}
