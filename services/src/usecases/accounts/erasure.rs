//! Erasing an account at its owner's request (`DELETE /api/user`): every session ends, the
//! account records `UserErased` (no personal data in it; the aggregate forgets its own), the
//! user's data key is destroyed (crypto-shredding: the personal fields of their events, in
//! Postgres and on the stream, read as `[erased]` from then on; `backbone::keys`), its email,
//! phone and WorkOS claims are released, its reset links and daily dial counts deleted, its
//! calls' numbers blanked in the calls read model, and every persona's memory of the user
//! cleared (`MemoryCleared`, which empties the memory read models), and the Stripe customer
//! deleted (Stripe detaches its cards and forgets its email and name). The user's calls are
//! returned so the caller can delete what it keeps of them (transcripts).

use chrono::{DateTime, Utc};
use cmb_domain::billing::Billing;
use cmb_domain::memory::{Memory, MemoryCommand};
use cmb_domain::user::{User, UserCommand};
use cmb_domain::CommandContext;
use cmb_providers::stripe::Stripe;
use uuid::Uuid;

use super::{sessions, Error};
use crate::backbone::store::{CommandError, EventStore};

/// What an erasure touched.
#[derive(Debug)]
pub struct Erased {
    /// The user's calls (from the log): their transcripts are the caller's to delete.
    pub calls: Vec<Uuid>,
    /// Memories cleared.
    pub memories: usize,
    /// Whether a Stripe customer was deleted (`false`: there was none, or Stripe failed; that
    /// is logged).
    pub stripe_customer_deleted: bool,
}

/// Erases account `user`.
pub async fn erase(
    store: &EventStore,
    stripe: &Stripe,
    user: Uuid,
    now: DateTime<Utc>,
    ctx: &CommandContext,
) -> Result<Erased, Error> {
    let pool = store.pool();
    let (account, _) = store.load::<User>(&user.to_string()).await?;
    if !account.registered {
        return Err(Error::NoAccount);
    }
    sessions::run_revoking(store, user, UserCommand::Erase { at: now }, ctx)
        .await
        .map_err(|_| Error::NoAccount)?;
    // From here on the account is gone: what follows is clean-up, each step repeatable.
    store
        .keys()
        .destroy(user)
        .await
        .map_err(sqlx::Error::from)?;
    sqlx::query("DELETE FROM identity_claims WHERE user_id = $1")
        .bind(user)
        .execute(pool)
        .await?;
    sqlx::query("DELETE FROM password_resets WHERE user_id = $1")
        .bind(user)
        .execute(pool)
        .await?;
    let memories: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT aggregate_id FROM events
          WHERE aggregate_type = 'memory' AND aggregate_id LIKE $1 || ':%'",
    )
    .bind(user.to_string())
    .fetch_all(pool)
    .await?;
    for id in &memories {
        if let Err(e) = store.execute::<Memory>(id, MemoryCommand::Clear, ctx).await {
            tracing::error!(user = %user, memory = %id, error = %e, "clearing memory on erasure");
        }
    }
    let calls: Vec<String> = sqlx::query_scalar(
        "SELECT aggregate_id FROM events
          WHERE aggregate_type = 'call' AND event_type = 'CallRequested'
            AND payload->'CallRequested'->>'user_id' = $1",
    )
    .bind(user.to_string())
    .fetch_all(pool)
    .await?;
    let (billing, _) = store
        .load::<Billing>(&user.to_string())
        .await
        .map_err(|e| Error::Store(CommandError::Store(e.to_string())))?;
    let stripe_customer_deleted = match &billing.customer_id {
        Some(customer) => match stripe.delete_customer(customer).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(user = %user, customer, error = %e, "deleting the Stripe customer on erasure");
                false
            }
        },
        None => false,
    };
    crate::usecases::calls::dials::forget_user(pool, user.into()).await?;
    cmb_projections::calls::forget_phones(pool, user).await?;
    Ok(Erased {
        calls: calls
            .iter()
            .filter_map(|c| Uuid::parse_str(c).ok())
            .collect(),
        memories: memories.len(),
        stripe_customer_deleted,
    })
}
