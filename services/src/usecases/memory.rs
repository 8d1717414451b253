//! What a persona remembers of a user, as the user controls it: forget one item, or all; and
//! what expires with the transcripts it was learned from.

use chrono::{DateTime, Utc};
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

/// Forgets what calls taught before `before` (facts, open items, a summary they last
/// rewrote), as their transcripts are deleted: memory derived from a transcript lives no
/// longer than the transcript. Returns the items forgotten. Repeatable: the read model only
/// finds the memories to look at, each memory's aggregate decides.
pub async fn expire(store: &EventStore, before: DateTime<Utc>) -> Result<usize, Error> {
    let learned = cmb_projections::memory::learned_before(store.pool(), before)
        .await
        .map_err(|e| CommandError::Store(e.to_string()))?;
    let ctx = CommandContext::system("memory-retention");
    let mut forgotten = 0;
    for (user, persona_id, calls) in learned {
        let done = store
            .execute::<Memory>(
                &memory_id(user, &persona_id),
                MemoryCommand::ForgetCalls {
                    calls: calls.into_iter().collect(),
                },
                &ctx,
            )
            .await?;
        forgotten += done.events;
    }
    Ok(forgotten)
}
