//! Forgotten passwords: a reset link sent by email, single-use, valid for
//! [`RESET_MINUTES`]. Only a SHA-256 of the token is kept (`password_resets`), so the table
//! alone cannot reset anyone's password. Using a link sets the new password, unlocks the
//! account, revokes every session, and voids the user's other links.

use base64::Engine as _;
use chrono::{DateTime, Duration, Utc};
use cmb_domain::user::{User, UserCommand};
use cmb_domain::values::{Email, Password};
use cmb_domain::CommandContext;
use cmb_domain::UserId;
use cmb_providers::email::Mailer;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{claims, password, sessions, Error};
use crate::backbone::counters;
use crate::backbone::store::EventStore;

/// How long a reset link works.
pub const RESET_MINUTES: i64 = 30;
/// Reset emails per address per hour; more requests are answered alike but send nothing.
pub const EMAILS_PER_HOUR: i32 = 3;

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Creates a reset link for the account of `email`, if there is one, and emails it. Says
/// nothing about whether there was: the caller answers the same either way (and should not
/// wait for this, so the time taken does not tell either).
pub async fn send_reset_link(
    store: &EventStore,
    mailer: &Mailer,
    public_base_url: &str,
    email: &Email,
    now: DateTime<Utc>,
) -> Result<(), Error> {
    let pool = store.pool();
    let key = format!("reset-email:{}", email.as_str());
    let (sent, _, _) = counters::count(pool, &key, std::time::Duration::from_secs(3600)).await?;
    if sent > EMAILS_PER_HOUR {
        tracing::info!(email = %email.masked(), "reset link not sent: hourly limit reached");
        return Ok(());
    }
    let Some(user) = claims::user_by_email(pool, email).await? else {
        tracing::info!(email = %email.masked(), "reset link asked for an unknown email");
        return Ok(());
    };
    let (account, _) = store.load::<User>(&user.to_string()).await?;
    if !account.registered {
        return Ok(());
    }
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    sqlx::query(
        "INSERT INTO password_resets (token_hash, user_id, created_at, expires_at)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(digest(&token))
    .bind(user.uuid())
    .bind(now)
    .bind(now + Duration::minutes(RESET_MINUTES))
    .execute(pool)
    .await?;
    let text = format!(
        "Hello {name},\n\nSomeone (we hope you) asked to reset the password of your Call Me Back\n\
         account. Open this link within {RESET_MINUTES} minutes to choose a new one:\n\n\
         {public_base_url}/reset-password?token={token}\n\n\
         Or paste this code into the app:\n\n{token}\n\n\
         If it was not you, ignore this email: your password stays as it is.\n",
        name = account.name,
    );
    if let Err(e) = mailer
        .send(email.as_str(), "Reset your Call Me Back password", &text)
        .await
    {
        tracing::error!(email = %email.masked(), error = %e, "reset link not sent");
    }
    Ok(())
}

/// Why a reset was refused.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("this reset link is invalid, already used or expired; ask for a new one")]
    InvalidToken,
    #[error(transparent)]
    Accounts(#[from] Error),
}

impl From<sqlx::Error> for ResetError {
    fn from(e: sqlx::Error) -> Self {
        ResetError::Accounts(e.into())
    }
}

/// Sets `new` as the password of the account `token` was sent for, once. Returns the user.
pub async fn reset_password(
    store: &EventStore,
    token: &str,
    new: &Password,
    now: DateTime<Utc>,
    ctx_for: impl FnOnce(UserId) -> CommandContext,
) -> Result<UserId, ResetError> {
    let pool = store.pool();
    // Hashed before the link is spent, so a failure here leaves the link usable.
    let password_hash = password::hash(new.expose().to_string())
        .await
        .map_err(Error::from)?;
    let user: Option<Uuid> = sqlx::query_scalar(
        "UPDATE password_resets SET used_at = $2
          WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2
          RETURNING user_id",
    )
    .bind(digest(token))
    .bind(now)
    .fetch_optional(pool)
    .await?;
    let user = UserId::from(user.ok_or(ResetError::InvalidToken)?);
    // The other links of this user are void from now on.
    sqlx::query("UPDATE password_resets SET used_at = $2 WHERE user_id = $1 AND used_at IS NULL")
        .bind(user.uuid())
        .bind(now)
        .execute(pool)
        .await?;
    let command = UserCommand::ChangePassword {
        password_hash,
        at: now,
        reset: true,
    };
    sessions::run_revoking(store, user, command, &ctx_for(user))
        .await
        .map_err(|_| Error::NoAccount)?;
    Ok(user)
}
