//! The active-call claim (`active_calls`, beside the event log): one call under way per user,
//! claimed before its hold and released when it is settled or never came to be.

use sqlx::PgPool;
use uuid::Uuid;

/// Claims the user's one active-call slot for `call_id`. False when another call holds it.
pub async fn claim(pool: &PgPool, user: Uuid, call_id: Uuid) -> Result<bool, sqlx::Error> {
    let claimed = sqlx::query(
        "INSERT INTO active_calls (user_id, call_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(user)
    .bind(call_id)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(claimed > 0)
}

/// Frees the slot `call_id` holds (nothing if it holds none).
pub async fn release(pool: &PgPool, call_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM active_calls WHERE call_id = $1")
        .bind(call_id)
        .execute(pool)
        .await?;
    Ok(())
}

/// [`release`], logging a failure instead of returning it (on paths already failing).
pub async fn release_logged(pool: &PgPool, call_id: Uuid) {
    if let Err(e) = release(pool, call_id).await {
        tracing::error!(call = %call_id, error = %e, "could not release the active-call claim");
    }
}
