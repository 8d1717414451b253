//! The call ledger (`call_ledger`): per call, who asked for it and when, its held maximum, when
//! it is scheduled and whether it still waits, and its price once ended. A trigger on the event
//! store writes it in the very transaction that appends the call's `CallRequested`,
//! `ScheduledCallFired` and `CallEnded`, so it is never behind the log: the budget's spend, the
//! waiting-calls limit, the scheduler's due search and a persona's deletion (refused while a
//! scheduled call with it waits) decide on it, not on the `calls` read model, which a busy
//! projector may leave behind.

use chrono::{DateTime, Utc};
use cmb_domain::{CallId, PersonaId, UserId};
use sqlx::{PgConnection, PgPool};

/// What `user` spent (or holds) on calls requested since `since`, leaving out call `except`:
/// ended calls at their price, open ones (scheduled or under way) at their held maximum.
pub async fn spent_since(
    pool: &PgPool,
    user: UserId,
    since: DateTime<Utc>,
    except: Option<CallId>,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COALESCE(sum(CASE WHEN ended THEN price_cents ELSE max_price_cents END), 0)::bigint
           FROM call_ledger
          WHERE user_id = $1 AND requested_at >= $2 AND call_id IS DISTINCT FROM $3",
    )
    .bind(user.to_string())
    .bind(since)
    .bind(except.map(|c| c.to_string()))
    .fetch_one(pool)
    .await
}

/// How many of `user`'s scheduled calls still wait for their time.
pub async fn waiting(db: &mut PgConnection, user: UserId) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM call_ledger WHERE user_id = $1 AND waiting")
        .bind(user.to_string())
        .fetch_one(db)
        .await
}

/// How many of anyone's scheduled calls with persona `persona_id` still wait for their time.
pub async fn waiting_with_persona(
    pool: &PgPool,
    persona_id: &PersonaId,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM call_ledger WHERE persona_id = $1 AND waiting")
        .bind(persona_id.as_str())
        .fetch_one(pool)
        .await
}

/// The scheduled calls still waiting for their time with persona `persona_id` (anyone's), or
/// of `user` (any persona): (call id, its owner).
pub async fn waiting_calls(
    pool: &PgPool,
    persona_id: Option<&PersonaId>,
    user: Option<UserId>,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT call_id, user_id FROM call_ledger
          WHERE waiting AND (persona_id = $1 OR user_id = $2)
          ORDER BY call_id",
    )
    .bind(persona_id.map(|p| p.as_str().to_string()))
    .bind(user.map(|u| u.to_string()))
    .fetch_all(pool)
    .await
}

/// Scheduled calls whose time has come by `now`, earliest first, at most `limit`: (call id,
/// its time).
pub async fn due(
    pool: &PgPool,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<(String, DateTime<Utc>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT call_id, scheduled_for FROM call_ledger
          WHERE waiting AND scheduled_for <= $1
          ORDER BY scheduled_for LIMIT $2",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(pool)
    .await
}
