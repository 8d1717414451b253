//! The active-call claim (`active_calls`, beside the event log): one call under way per user,
//! claimed before its hold and released when it is settled or never came to be.

use cmb_domain::{CallId, UserId};
use sqlx::PgPool;
use uuid::Uuid;

/// Claims the user's one active-call slot for `call_id`. False when another call holds it;
/// true again when `call_id` holds it already (a redelivered scheduled call claims it twice).
pub async fn claim(pool: &PgPool, user: UserId, call_id: CallId) -> Result<bool, sqlx::Error> {
    // A claim committed by someone else while this statement waited is not in its snapshot:
    // the second statement sees it.
    for _ in 0..2 {
        let holder: Option<Uuid> = sqlx::query_scalar(
            "WITH claimed AS (
                 INSERT INTO active_calls (user_id, call_id) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING RETURNING call_id)
             SELECT call_id FROM claimed
             UNION ALL SELECT call_id FROM active_calls WHERE user_id = $1 OR call_id = $2
             LIMIT 1",
        )
        .bind(user.uuid())
        .bind(call_id.uuid())
        .fetch_optional(pool)
        .await?;
        if let Some(holder) = holder {
            return Ok(holder == call_id.uuid());
        }
    }
    Ok(false)
}

/// Frees the slot `call_id` holds (nothing if it holds none).
pub async fn release(pool: &PgPool, call_id: CallId) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM active_calls WHERE call_id = $1")
        .bind(call_id.uuid())
        .execute(pool)
        .await?;
    Ok(())
}

/// [`release`], logging a failure instead of returning it (on paths already failing).
pub async fn release_logged(pool: &PgPool, call_id: CallId) {
    if let Err(e) = release(pool, call_id).await {
        tracing::error!(call = %call_id, error = %e, "could not release the active-call claim");
    }
}
