//! Erasing an account at its owner's request (`DELETE /api/user`, README "Privacy").
//!
//! [`erase`] writes an `erasures` row (what is left to do), then the account records
//! `UserErased` (no personal data in it; the aggregate forgets its own) and every session ends:
//! from there the account is gone. The clean-up follows ([`finish`]), each step repeatable, so
//! that an erasure interrupted anywhere — a crash, Stripe unreachable — is finished later by the
//! `erasures` worker ([`resume`], `serve::erasures`), driven by the row and the recorded
//! `UserErased`:
//!
//! 1. the user's data key is destroyed (crypto-shredding: the personal fields of their events,
//!    in Postgres and on the stream, read as `[erased]` from then on; `backbone::keys`);
//! 2. email, phone and WorkOS claims released, reset links deleted;
//! 3. every persona's memory of the user cleared (`MemoryCleared`);
//! 4. the user's scheduled calls still waiting cancelled; the personas they made deleted with
//!    their knowledge ([`personas`]);
//! 5. the daily dial counts deleted, the calls' numbers blanked in the calls read model, the
//!    calls' transcripts deleted;
//! 6. the Stripe customer deleted (Stripe detaches its cards and forgets its email and name; a
//!    customer Stripe no longer knows counts as deleted);
//! 7. the row marked finished.

pub mod error;
pub mod personas;

pub use error::StepError;

use std::time::Duration;

use chrono::{DateTime, Utc};
use cmb_domain::billing::Billing;
use cmb_domain::memory::{Memory, MemoryCommand};
use cmb_domain::user::{User, UserCommand};
use cmb_domain::{CommandContext, UserId};
use cmb_providers::stripe::{Stripe, StripeError};
use uuid::Uuid;

use super::{sessions, Error};
use crate::backbone::store::EventStore;
use crate::faults::crash_point;

/// What an erasure's clean-up did (this run of it).
#[derive(Debug, Default)]
pub struct Erased {
    /// Transcript lines deleted.
    pub transcript_lines: u64,
    /// Memories cleared.
    pub memories: usize,
    /// Personas the user made, deleted.
    pub personas: usize,
    /// Knowledge documents (texts and passages) deleted.
    pub documents: u64,
    /// Scheduled calls cancelled (the user's, and anyone's with their personas).
    pub calls_cancelled: usize,
    /// Whether the Stripe customer is deleted (or there was none).
    pub stripe_customer_deleted: bool,
    /// Whether every step is done; if not, `error` says what failed and the `erasures` worker
    /// tries again.
    pub finished: bool,
    pub error: Option<String>,
}

/// Erases account `user`: recorded, then cleaned up as far as it goes now (the rest is the
/// worker's). Errors only when nothing was erased.
pub async fn erase(
    store: &EventStore,
    stripe: &Stripe,
    user: UserId,
    now: DateTime<Utc>,
    retry: Duration,
    ctx: &CommandContext,
) -> Result<Erased, Error> {
    let pool = store.pool();
    let (account, _) = store.load::<User>(&user.to_string()).await?;
    if !account.registered {
        return Err(Error::NoAccount);
    }
    // The worker leaves it to this request for `retry`.
    sqlx::query(
        "INSERT INTO erasures (user_id, requested_at, next_attempt_at)
         VALUES ($1, $2, $2 + $3::interval)
         ON CONFLICT (user_id) DO UPDATE SET next_attempt_at = EXCLUDED.next_attempt_at",
    )
    .bind(user.uuid())
    .bind(now)
    .bind(interval(retry))
    .execute(pool)
    .await?;
    sessions::run_revoking(store, user, UserCommand::Erase { at: now }, ctx)
        .await
        .map_err(|_| Error::NoAccount)?;
    crash_point("erasure.after_recorded");
    Ok(attempt(store, stripe, user, now, retry, ctx).await?)
}

/// Runs [`finish`] and records its outcome on the `erasures` row: finished, or the error and
/// when to try again (`retry` doubled per failed attempt, at most an hour).
async fn attempt(
    store: &EventStore,
    stripe: &Stripe,
    user: UserId,
    now: DateTime<Utc>,
    retry: Duration,
    ctx: &CommandContext,
) -> Result<Erased, sqlx::Error> {
    let pool = store.pool();
    // The row again, should the worker have dropped it while this request was slow to record.
    sqlx::query(
        "INSERT INTO erasures (user_id, next_attempt_at) VALUES ($1, now()) ON CONFLICT DO NOTHING",
    )
    .bind(user.uuid())
    .execute(pool)
    .await?;
    let mut erased = Erased::default();
    let outcome = finish(store, stripe, user, now, ctx, &mut erased).await;
    match outcome {
        Ok(()) => {
            erased.finished = true;
            sqlx::query(
                "UPDATE erasures SET finished_at = now(), last_error = NULL, attempts = attempts + 1
                  WHERE user_id = $1",
            )
            .bind(user.uuid())
            .execute(pool)
            .await?;
        }
        Err(e) => {
            tracing::warn!(user = %user, error = %e, "erasure not finished; the erasures worker will try again");
            let error = e.to_string();
            sqlx::query(
                "UPDATE erasures SET attempts = attempts + 1, last_error = $2,
                        next_attempt_at = now() + LEAST($3::interval * power(2, attempts), interval '1 hour')
                  WHERE user_id = $1",
            )
            .bind(user.uuid())
            .bind(&error)
            .bind(interval(retry))
            .execute(pool)
            .await?;
            erased.error = Some(error);
        }
    }
    Ok(erased)
}

fn interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}

/// The clean-up of erased account `user`, every step repeatable (see the module's note);
/// `erased` counts what this run did.
pub async fn finish(
    store: &EventStore,
    stripe: &Stripe,
    user: UserId,
    now: DateTime<Utc>,
    ctx: &CommandContext,
    erased: &mut Erased,
) -> Result<(), StepError> {
    let pool = store.pool();
    store.keys().destroy(user.uuid()).await?;
    crash_point("erasure.after_key");
    sqlx::query("DELETE FROM identity_claims WHERE user_id = $1")
        .bind(user.uuid())
        .execute(pool)
        .await?;
    sqlx::query("DELETE FROM password_resets WHERE user_id = $1")
        .bind(user.uuid())
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
        store
            .execute::<Memory>(id, MemoryCommand::Clear, ctx)
            .await?;
    }
    erased.memories = memories.len();
    erased.calls_cancelled = personas::cancel_waiting(store, None, Some(user), now, ctx).await?;
    let removed = personas::remove(store, user, now, ctx).await?;
    erased.personas = removed.personas;
    erased.documents = removed.documents;
    erased.calls_cancelled += removed.calls_cancelled;
    crash_point("erasure.after_personas");
    let calls: Vec<Uuid> = sqlx::query_scalar(
        "SELECT aggregate_id::uuid FROM events
          WHERE aggregate_type = 'call' AND event_type = 'CallRequested'
            AND payload->'CallRequested'->>'user_id' = $1",
    )
    .bind(user.to_string())
    .fetch_all(pool)
    .await?;
    crate::usecases::calls::dials::forget_user(pool, user).await?;
    cmb_projections::calls::forget_phones(pool, user).await?;
    let lines = sqlx::query("DELETE FROM call_transcripts WHERE call_id = ANY($1)")
        .bind(&calls)
        .execute(pool)
        .await?;
    erased.transcript_lines = lines.rows_affected();
    let (billing, _) = store.load::<Billing>(&user.to_string()).await?;
    if let Some(customer) = &billing.customer_id {
        match stripe.delete_customer(customer).await {
            Ok(()) => {}
            // Deleted already (by an attempt whose answer was lost).
            Err(StripeError::InvalidRequest {
                status: 404,
                code: Some(code),
                ..
            }) if code == "resource_missing" => {}
            Err(e) => return Err(e.into()),
        }
    }
    erased.stripe_customer_deleted = true;
    Ok(())
}

/// Erasures whose clean-up is due again (interrupted, or failed and waited out): at most
/// `limit`, each finished as far as it goes. A row whose account never recorded `UserErased`
/// (the request died before it) is dropped once `retry` has passed: nothing was erased, and the
/// user may ask again. Returns (finished, still failing).
pub async fn resume(
    store: &EventStore,
    stripe: &Stripe,
    retry: Duration,
    limit: i64,
    ctx: &CommandContext,
) -> Result<(usize, usize), StepError> {
    let pool = store.pool();
    let due: Vec<Uuid> = sqlx::query_scalar(
        "SELECT user_id FROM erasures
          WHERE finished_at IS NULL AND next_attempt_at <= now()
          ORDER BY next_attempt_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let (mut finished, mut failing) = (0, 0);
    for user in due.into_iter().map(UserId::from) {
        let (account, _) = store.load::<User>(&user.to_string()).await?;
        if !account.erased {
            sqlx::query("DELETE FROM erasures WHERE user_id = $1 AND finished_at IS NULL")
                .bind(user.uuid())
                .execute(pool)
                .await?;
            tracing::info!(user = %user, "an erasure request that recorded nothing was dropped");
            continue;
        }
        let erased = attempt(store, stripe, user, Utc::now(), retry, ctx).await?;
        if erased.finished {
            tracing::info!(user = %user, "erasure finished by the erasures worker");
            finished += 1;
        } else {
            failing += 1;
        }
    }
    Ok((finished, failing))
}
