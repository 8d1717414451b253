//! Accounts: register, sign in (with lockout), sign out (one session or all of them), change
//! or reset the password, update the profile. Emails and phone numbers are claimed beside the
//! event log before the `user` aggregate records them ([`claims`]); passwords are hashed with
//! argon2id ([`password`]); which tokens still work is [`sessions`]' to say; reset links are
//! [`recovery`]'s.

pub mod claims;
pub mod erasure;
pub mod password;
pub mod reauth;
pub mod recovery;
pub mod sessions;
pub mod workos;

use chrono::{DateTime, Duration, Utc};
use cmb_domain::user::{User, UserCommand, UserError, LOCKOUT_MINUTES, LOCKOUT_THRESHOLD};
use cmb_domain::values::{Email, Password, PhoneNumber};
use cmb_domain::CommandContext;
use cmb_domain::UserId;
use sqlx::PgPool;

use crate::backbone::counters;
use crate::backbone::store::{CommandError, Committed, EventStore};
use claims::ClaimError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Claim(#[from] ClaimError),
    #[error(transparent)]
    Hash(#[from] password::HashError),
    #[error("this account is already registered")]
    AlreadyRegistered(CommandError<UserError>),
    #[error("invalid email or password")]
    InvalidCredentials,
    /// Too many failed sign-ins: locked until then.
    #[error("too many failed sign-ins: the account is locked for {LOCKOUT_MINUTES} minutes")]
    Locked(DateTime<Utc>),
    #[error("no such account")]
    NoAccount,
    #[error("the current password is wrong")]
    WrongPassword,
    #[error("this account has no password yet: set one with a reset link (forgot password)")]
    NoPassword,
    #[error(transparent)]
    Store(#[from] CommandError<UserError>),
    #[error("accounts: {0}")]
    Db(#[from] sqlx::Error),
}

/// Hashes the password, claims the email and phone, and registers user `id`.
#[allow(clippy::too_many_arguments)]
pub async fn create(
    store: &EventStore,
    id: UserId,
    name: String,
    email: &Email,
    phone: &PhoneNumber,
    password: &Password,
    ctx: &CommandContext,
) -> Result<Committed, Error> {
    let pool = store.pool();
    let password_hash = password::hash(password.expose().to_string()).await?;
    claims::claim_identity(pool, id, Some(email), Some(phone)).await?;
    let command = UserCommand::Register {
        name,
        email: email.clone(),
        phone: phone.clone(),
        password_hash,
    };
    match store.execute::<User>(&id.to_string(), command, ctx).await {
        Ok(c) => Ok(c),
        Err(e) => {
            claims::release(pool, "email", email.as_str(), id).await;
            claims::release(pool, "phone", phone.as_str(), id).await;
            Err(Error::AlreadyRegistered(e))
        }
    }
}

/// Checks `password` for `email` and records the attempt from `client` (a key for the client's
/// address: failures and lockout count per account and client); the user's id when it matched.
/// `ctx_for` gives the command context of the user found.
pub async fn sign_in(
    store: &EventStore,
    email: &Email,
    password: String,
    client: &str,
    now: DateTime<Utc>,
    ctx_for: impl FnOnce(UserId) -> CommandContext,
) -> Result<(UserId, Committed), Error> {
    let pool = store.pool();
    let user_id = claims::user_by_email(pool, email).await?;
    let user = match user_id {
        Some(id) => {
            let (user, _) = store.load::<User>(&id.to_string()).await?;
            user.registered.then_some((id, user))
        }
        None => None,
    };
    // Hash check first, always: an unknown email costs what a wrong password costs.
    // An account without a password (made by a WorkOS sign-in) is checked against the
    // dummy hash too: no password matches it, and the time taken is the same.
    let matches = password::verify(
        password,
        user.as_ref()
            .map(|(_, u)| u.password_hash.clone())
            .filter(|h| !h.is_empty()),
    )
    .await
    .map_err(password::HashError::from)?;
    let Some((id, _)) = user else {
        // Unknown emails "lock" like real ones, so the lockout reveals nothing either.
        let key = format!("unknown:{}:{client}", email.as_str());
        let window = Duration::minutes(LOCKOUT_MINUTES);
        let window_std = window.to_std().unwrap_or_default();
        let (failures, _, _) = counters::count(pool, &key, window_std).await?;
        if failures > LOCKOUT_THRESHOLD as i32 {
            return Err(Error::Locked(now + window));
        }
        return Err(Error::InvalidCredentials);
    };
    let command = UserCommand::RecordSignIn {
        succeeded: matches,
        at: now,
        client: client.to_string(),
    };
    let committed = store
        .execute::<User>(&id.to_string(), command, &ctx_for(id))
        .await
        .map_err(|e| match e {
            CommandError::Rejected(UserError::Locked { until }) => Error::Locked(until),
            other => Error::Store(other),
        })?;
    if !matches {
        return Err(Error::InvalidCredentials);
    }
    Ok((id, committed))
}

/// Revokes token `token_id` of `user` everywhere from now on, and records it.
pub async fn sign_out(
    store: &EventStore,
    user: UserId,
    token_id: &str,
    expires_at: DateTime<Utc>,
    ctx: &CommandContext,
) -> Result<(), Error> {
    sessions::revoke(store.pool(), user, token_id, expires_at).await?;
    let command = UserCommand::RevokeToken {
        token_id: token_id.to_string(),
        expires_at,
    };
    store
        .execute::<User>(&user.to_string(), command, ctx)
        .await
        .map_err(|_| Error::NoAccount)?;
    Ok(())
}

/// Whether a token is refused (see [`sessions`]).
pub async fn revoked(
    pool: &PgPool,
    token_id: &str,
    user: UserId,
    epoch: u32,
) -> Result<bool, sqlx::Error> {
    sessions::refused(pool, token_id, user, epoch).await
}

/// Signs `user` out of every session: every token issued so far is refused from now on.
/// Returns the epoch new tokens carry.
pub async fn sign_out_everywhere(
    store: &EventStore,
    user: UserId,
    now: DateTime<Utc>,
    ctx: &CommandContext,
) -> Result<u32, Error> {
    let command = UserCommand::RevokeAllSessions { at: now };
    sessions::run_revoking(store, user, command, ctx)
        .await
        .map_err(|_| Error::NoAccount)
}

/// Changes the password after checking the current one; every session is revoked. Returns
/// the epoch of the token the caller gets instead of theirs.
pub async fn change_password(
    store: &EventStore,
    user: UserId,
    current: String,
    new: &Password,
    now: DateTime<Utc>,
    ctx: &CommandContext,
) -> Result<u32, Error> {
    let (account, _) = store.load::<User>(&user.to_string()).await?;
    if !account.registered {
        return Err(Error::NoAccount);
    }
    if account.password_hash.is_empty() {
        return Err(Error::NoPassword);
    }
    if !password::verify(current, Some(account.password_hash.clone()))
        .await
        .map_err(password::HashError::from)?
    {
        return Err(Error::WrongPassword);
    }
    let password_hash = password::hash(new.expose().to_string()).await?;
    let command = UserCommand::ChangePassword {
        password_hash,
        at: now,
        reset: false,
    };
    Ok(sessions::run_revoking(store, user, command, ctx).await?)
}

/// A profile change; `None` keeps a value.
#[derive(Debug, Clone, Default)]
pub struct ProfileChange {
    pub name: Option<String>,
    pub email: Option<Email>,
    pub phone: Option<PhoneNumber>,
}

/// Changes the profile; a new email or phone is claimed first, and whichever side loses gives
/// its claims back (the old ones on success, the new ones on failure).
pub async fn update_profile(
    store: &EventStore,
    user: UserId,
    change: ProfileChange,
    ctx: &CommandContext,
) -> Result<Committed, Error> {
    let pool = store.pool();
    let (current, _) = store.load::<User>(&user.to_string()).await?;
    if !current.registered {
        return Err(Error::NoAccount);
    }
    let new_email = change.email.filter(|e| Some(e) != current.email.as_ref());
    let new_phone = change.phone.filter(|p| Some(p) != current.phone.as_ref());
    claims::claim_identity(pool, user, new_email.as_ref(), new_phone.as_ref()).await?;
    let command = UserCommand::UpdateProfile {
        name: change.name,
        email: new_email.clone(),
        phone: new_phone.clone(),
    };
    let result = store.execute::<User>(&user.to_string(), command, ctx).await;
    let (drop_email, drop_phone) = match &result {
        Ok(_) => (
            new_email.as_ref().and(current.email.as_ref()),
            new_phone.as_ref().and(current.phone.as_ref()),
        ),
        Err(_) => (new_email.as_ref(), new_phone.as_ref()),
    };
    if let Some(e) = drop_email {
        claims::release(pool, "email", e.as_str(), user).await;
    }
    if let Some(p) = drop_phone {
        claims::release(pool, "phone", p.as_str(), user).await;
    }
    result.map_err(|_| Error::NoAccount)
}
