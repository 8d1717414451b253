//! An erased account's personas: each one the user made is deleted, with its knowledge.
//!
//! For each persona the user created (from the log, so a lagging read model misses none):
//! every scheduled call with it still waiting — anyone's — is cancelled (the settlement worker
//! releases its hold), each knowledge document is removed (`KnowledgeDocumentRemoved`), the
//! persona is deleted (`PersonaDeleted`: the read models drop it and its documents; the
//! knowledge worker drops the texts and passages again, after any indexing still under way),
//! and the documents' texts and passages are deleted here too. Then the user's persona names
//! are released. Every step is repeatable: a persona already deleted is only swept of its
//! texts.
//!
//! Other users' calls with such a persona keep what they recorded of it (its id and the name it
//! had when they called: their own history); the persona itself answers 404 like any deleted
//! one, and no new call can be made with it.

use chrono::{DateTime, Utc};
use cmb_domain::call::{Call, CallCommand};
use cmb_domain::persona::{Owner, Persona, PersonaCommand};
use cmb_domain::{CommandContext, PersonaId, UserId};

use super::error::StepError;
use crate::backbone::store::EventStore;
use crate::usecases::calls::ledger;
use crate::usecases::knowledge;
use crate::usecases::personas::names;

/// What was done to the user's personas.
#[derive(Debug, Default, Clone, Copy)]
pub struct Removed {
    /// Personas deleted now.
    pub personas: usize,
    /// Knowledge documents whose texts were deleted now.
    pub documents: u64,
    /// Scheduled calls with them (anyone's) cancelled now.
    pub calls_cancelled: usize,
}

/// The ids of the personas `user` created.
async fn created_by(store: &EventStore, user: UserId) -> Result<Vec<PersonaId>, sqlx::Error> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT aggregate_id FROM events
          WHERE aggregate_type = 'persona' AND event_type = 'PersonaCreated'
            AND payload->'PersonaCreated'->'owner'->>'user_id' = $1
          ORDER BY aggregate_id",
    )
    .bind(user.to_string())
    .fetch_all(store.pool())
    .await?;
    Ok(ids.into_iter().map(PersonaId::from).collect())
}

/// Cancels scheduled calls still waiting (for persona `persona`, or of `user`), on their
/// owners' behalf: the call records `CallCancelled` and ends, its hold released by the
/// settlement worker. Failures (the call fired meanwhile) are logged.
pub async fn cancel_waiting(
    store: &EventStore,
    persona: Option<&PersonaId>,
    user: Option<UserId>,
    now: DateTime<Utc>,
    ctx: &CommandContext,
) -> Result<usize, sqlx::Error> {
    let mut cancelled = 0;
    for (call, owner) in ledger::waiting_calls(store.pool(), persona, user).await? {
        let Ok(owner) = owner.parse::<UserId>() else {
            continue;
        };
        let command = CallCommand::Cancel {
            by: owner,
            at: now,
            min_notice: chrono::TimeDelta::MIN,
        };
        match store.execute::<Call>(&call, command, ctx).await {
            Ok(_) => cancelled += 1,
            Err(e) => tracing::warn!(call = %call, error = %e, "cancelling a call on erasure"),
        }
    }
    Ok(cancelled)
}

/// Deletes every persona `user` made, with its knowledge (see the module's note).
pub async fn remove(
    store: &EventStore,
    user: UserId,
    now: DateTime<Utc>,
    ctx: &CommandContext,
) -> Result<Removed, StepError> {
    let pool = store.pool();
    let mut removed = Removed::default();
    for id in created_by(store, user).await? {
        let (persona, _) = store.load::<Persona>(id.as_str()).await?;
        if persona.exists() && persona.owner == Some(Owner::User(user)) {
            removed.calls_cancelled += cancel_waiting(store, Some(&id), None, now, ctx).await?;
            for document in &persona.knowledge {
                let command = PersonaCommand::RemoveKnowledge {
                    by: user,
                    document_id: document.document.document_id.clone(),
                };
                store.execute::<Persona>(id.as_str(), command, ctx).await?;
            }
            let delete = PersonaCommand::Delete { by: user };
            store.execute::<Persona>(id.as_str(), delete, ctx).await?;
            removed.personas += 1;
        }
        removed.documents += knowledge::forget_persona(pool, id.as_str()).await?;
    }
    names::release_all(pool, user).await?;
    Ok(removed)
}
