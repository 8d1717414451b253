//! Which tokens still work. A token is refused when its id was revoked (`revoked_tokens`:
//! sign-out of one session) or when it was issued in an older session epoch than the user's
//! (`session_epochs`: sign-out everywhere, a password change or reset). Both tables are written
//! before the request answers, so every instance refuses at once, and by the users projection
//! from `TokenRevoked` / `SessionsRevoked`, so they can be rebuilt (never lowered).

use chrono::{DateTime, Utc};
use cmb_domain::user::{User, UserCommand, UserError};
use cmb_domain::CommandContext;
use cmb_domain::UserId;
use sqlx::PgPool;

use crate::backbone::store::{CommandError, EventStore};

/// Adds a token to `revoked_tokens`.
pub async fn revoke(
    pool: &PgPool,
    user: UserId,
    token_id: &str,
    expires_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO revoked_tokens (token_id, user_id, expires_at) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(token_id)
    .bind(user.uuid())
    .bind(expires_at)
    .execute(pool)
    .await?;
    Ok(())
}

/// Raises `user`'s session epoch to `epoch` (never lowers it).
pub async fn raise_epoch(pool: &PgPool, user: UserId, epoch: u32) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO session_epochs (user_id, epoch) VALUES ($1, $2)
         ON CONFLICT (user_id) DO UPDATE SET epoch = GREATEST(session_epochs.epoch, EXCLUDED.epoch)",
    )
    .bind(user.uuid())
    .bind(epoch as i32)
    .execute(pool)
    .await?;
    Ok(())
}

/// The epoch a token issued now for `user` carries.
pub async fn epoch(pool: &PgPool, user: UserId) -> Result<u32, sqlx::Error> {
    let epoch: Option<i32> =
        sqlx::query_scalar("SELECT epoch FROM session_epochs WHERE user_id = $1")
            .bind(user.uuid())
            .fetch_optional(pool)
            .await?;
    Ok(epoch.unwrap_or(0).max(0) as u32)
}

/// Whether the token `token_id` of `user`, issued in `token_epoch`, is refused.
pub async fn refused(
    pool: &PgPool,
    token_id: &str,
    user: UserId,
    token_epoch: u32,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM revoked_tokens WHERE token_id = $1)
             OR COALESCE((SELECT epoch FROM session_epochs WHERE user_id = $2), 0) > $3",
    )
    .bind(token_id)
    .bind(user.uuid())
    .bind(token_epoch as i64)
    .fetch_one(pool)
    .await
}

/// Runs `command` (which moves the user to a new session epoch) and makes the new epoch
/// effective before returning: the epoch tokens issued from now on carry.
pub async fn run_revoking(
    store: &EventStore,
    user: UserId,
    command: UserCommand,
    ctx: &CommandContext,
) -> Result<u32, CommandError<UserError>> {
    store
        .execute::<User>(&user.to_string(), command, ctx)
        .await?;
    let (current, _) = store.load::<User>(&user.to_string()).await?;
    raise_epoch(store.pool(), user, current.session_epoch)
        .await
        .map_err(|e| CommandError::Store(e.into()))?;
    Ok(current.session_epoch)
}
