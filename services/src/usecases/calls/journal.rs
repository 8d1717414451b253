//! The request saga's journal (`call_requests`, beside the event log): a call request's
//! active-call slot, hold and `CallRequested` are one recoverable unit. The request opens a
//! row before its first step and closes it when the call exists or everything was given back;
//! [`sweep`] (run by a singleton under a lease) finds rows a request left open past the grace
//! period — it died midway — and releases the hold and the slot of a call that never came to
//! exist, recording why on the row.

use std::time::Duration;

use cmb_domain::billing::Billing;
use cmb_domain::call::Call;
use cmb_domain::wallet::{Wallet, WalletCommand, WalletError};
use cmb_domain::{CallId, CommandContext, UserId};
use cmb_providers::stripe::{Stripe, StripeError};
use sqlx::PgPool;
use uuid::Uuid;

use super::active;
use crate::backbone::store::{CommandError, EventStore};

/// What holds a requested call's money, as the journal keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeldBy {
    Credits,
    Card(String),
}

/// Opens the journal row of `call_id`, before any of its steps.
pub async fn open(
    pool: &PgPool,
    call_id: CallId,
    user: UserId,
    held_by: &HeldBy,
    scheduled: bool,
) -> Result<(), sqlx::Error> {
    let (method, pi) = match held_by {
        HeldBy::Credits => ("credits", None),
        HeldBy::Card(pi) => ("card", Some(pi.as_str())),
    };
    sqlx::query(
        "INSERT INTO call_requests (call_id, user_id, method, payment_intent_id, scheduled)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(call_id.uuid())
    .bind(user.uuid())
    .bind(method)
    .bind(pi)
    .bind(scheduled)
    .execute(pool)
    .await?;
    Ok(())
}

/// Closes the row of `call_id` with `outcome` (nothing if it is closed already).
pub async fn close(pool: &PgPool, call_id: CallId, outcome: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE call_requests SET closed_at = now(), outcome = $2
          WHERE call_id = $1 AND closed_at IS NULL",
    )
    .bind(call_id.uuid())
    .bind(outcome)
    .execute(pool)
    .await?;
    Ok(())
}

/// [`close`], logging a failure (the sweeper closes the row later).
pub async fn close_logged(pool: &PgPool, call_id: CallId, outcome: &str) {
    if let Err(e) = close(pool, call_id, outcome).await {
        tracing::warn!(call = %call_id, error = %e, "could not close the request's journal row");
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("the journal: {0}")]
    Db(#[from] sqlx::Error),
    #[error("loading {0}: {1}")]
    Load(String, String),
    #[error("releasing the credits of call {0}: {1}")]
    Wallet(CallId, CommandError<WalletError>),
    #[error("cancelling {pi} of call {call}: {error}")]
    Stripe {
        call: CallId,
        pi: String,
        error: StripeError,
    },
}

/// What a sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Rows whose call exists after all (the request died after `CallRequested`).
    pub completed: usize,
    /// Calls that never came to exist: their hold and slot released.
    pub released: usize,
}

/// Settles every request left open longer than `grace` (at most 100 a sweep).
pub async fn sweep(
    store: &EventStore,
    stripe: &Stripe,
    grace: Duration,
    ctx: &CommandContext,
) -> Result<Swept, SweepError> {
    let pool = store.pool();
    let stale: Vec<(Uuid, Uuid, String, Option<String>)> = sqlx::query_as(
        "SELECT call_id, user_id, method, payment_intent_id FROM call_requests
          WHERE closed_at IS NULL AND started_at < now() - make_interval(secs => $1)
          ORDER BY started_at LIMIT 100",
    )
    .bind(grace.as_secs_f64())
    .fetch_all(pool)
    .await?;
    let mut swept = Swept::default();
    for (call_id, user, method, pi) in stale {
        let (call_id, user) = (CallId::from(call_id), UserId::from(user));
        let id = call_id.to_string();
        let (call, _) = store
            .load::<Call>(&id)
            .await
            .map_err(|e| SweepError::Load(id.clone(), e.to_string()))?;
        if call.exists() {
            close(pool, call_id, "requested").await?;
            swept.completed += 1;
            continue;
        }
        let released = match (method.as_str(), pi) {
            ("card", Some(pi)) => release_card(store, stripe, user, call_id, &pi).await?,
            _ => release_credits(store, user, call_id, ctx).await?,
        };
        active::release(pool, call_id).await?;
        super::dials::release(pool, call_id).await?;
        let why = format!(
            "swept: the call never came to exist within {}s of its request (the request \
             stopped midway); {released}, active-call slot freed",
            grace.as_secs()
        );
        tracing::warn!(call = %call_id, user = %user, %why, "request swept");
        metrics::counter!("cmb_call_requests_swept_total").increment(1);
        close(pool, call_id, &why).await?;
        swept.released += 1;
    }
    Ok(swept)
}

async fn release_credits(
    store: &EventStore,
    user: UserId,
    call_id: CallId,
    ctx: &CommandContext,
) -> Result<String, SweepError> {
    let hold_id = call_id.to_string();
    let (wallet, _) = store
        .load::<Wallet>(&user.to_string())
        .await
        .map_err(|e| SweepError::Load(format!("the wallet of {user}"), e.to_string()))?;
    let Some(credits) = wallet.holds.get(&hold_id).copied() else {
        return Ok("no credits were held".into());
    };
    store
        .execute::<Wallet>(&user.to_string(), WalletCommand::Release { hold_id }, ctx)
        .await
        .map_err(|e| SweepError::Wallet(call_id, e))?;
    Ok(format!("{credits} credits released"))
}

/// Cancels the authorisation only if it was bound to this call: an intent the request never
/// bound may pay for another call.
async fn release_card(
    store: &EventStore,
    stripe: &Stripe,
    user: UserId,
    call_id: CallId,
    pi: &str,
) -> Result<String, SweepError> {
    let (billing, _) = store
        .load::<Billing>(&user.to_string())
        .await
        .map_err(|e| SweepError::Load(format!("the billing of {user}"), e.to_string()))?;
    let id = call_id.to_string();
    let bound = billing
        .authorizations
        .iter()
        .any(|(p, _, used)| p == pi && used.as_deref() == Some(id.as_str()));
    if !bound {
        return Ok(format!("{pi} was never bound to it"));
    }
    stripe
        .cancel_payment_intent(pi, &format!("release-{call_id}"))
        .await
        .map_err(|error| SweepError::Stripe {
            call: call_id,
            pi: pi.to_string(),
            error,
        })?;
    Ok(format!("{pi} cancelled"))
}
