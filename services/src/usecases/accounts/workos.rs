//! WorkOS AuthKit sign-in. [`start`] keeps a sign-in under way (`workos_logins`: the hash of a
//! random `state` and the PKCE verifier whose challenge goes to WorkOS) and gives the hosted
//! page's URL; [`finish`] spends the state once, exchanges the code with the verifier, and
//! finds the account: by WorkOS user id (`identity_claims`, kind `workos`); else by email, but
//! only when WorkOS says the email is verified (an unverified address proves nothing, so it
//! must not take over the account holding it); else a new account. The sign-in is recorded
//! on the `user` aggregate.

use base64::Engine as _;
use chrono::{DateTime, Duration, Utc};
use cmb_domain::user::{User, UserCommand, UserError};
use cmb_domain::values::{parse_name, Email};
use cmb_domain::CommandContext;
use cmb_domain::UserId;
use cmb_providers::workos::{Authentication, Connection, Workos, WorkosError};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use super::claims::{self, ClaimError};
use crate::backbone::store::{CommandError, Committed, EventStore};

/// How long a sign-in may take at WorkOS (the state's life; WorkOS's codes live 10 minutes).
pub const LOGIN_MINUTES: i64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    #[error("the sign-in state is unknown, already used, expired, or not this browser's: start the sign-in again")]
    BadState,
    #[error("WorkOS refused the code, which is invalid, already used or expired ({0}): start the sign-in again")]
    InvalidCode(String),
    #[error("an account with this email already exists, and WorkOS has not verified that the email is yours: verify it with WorkOS, or sign in with your password")]
    UnverifiedEmail,
    #[error("this account already signs in with another WorkOS user")]
    OtherWorkosUser,
    #[error("WorkOS gave an email we cannot use: {0}")]
    BadEmail(String),
    #[error("WorkOS is unavailable: {0}")]
    Unavailable(String),
    #[error("WorkOS refused our request: {0}")]
    Refused(String),
    #[error(transparent)]
    Claim(#[from] ClaimError),
    #[error(transparent)]
    Store(#[from] CommandError<UserError>),
    #[error("workos sign-in: {0}")]
    Db(#[from] sqlx::Error),
}

impl From<WorkosError> for SignInError {
    fn from(e: WorkosError) -> Self {
        match e {
            WorkosError::InvalidGrant(d) => SignInError::InvalidCode(d),
            WorkosError::Unreachable(d) => SignInError::Unavailable(d),
            WorkosError::Refused { status, detail } => {
                SignInError::Refused(format!("{status}: {detail}"))
            }
        }
    }
}

/// A sign-in begun: send the browser to `url`; `state` must come back with it.
#[derive(Debug)]
pub struct Started {
    pub url: String,
    pub state: String,
}

fn random_token() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Begins a sign-in at `connection`, returning to `redirect_uri`.
pub async fn start(
    pool: &PgPool,
    workos: &Workos,
    connection: &Connection,
    redirect_uri: &str,
    now: DateTime<Utc>,
) -> Result<Started, sqlx::Error> {
    let state = random_token();
    let verifier = random_token();
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(Sha256::digest(verifier.as_bytes()));
    // Sign-ins left unfinished a day ago are of no use to anyone.
    sqlx::query("DELETE FROM workos_logins WHERE expires_at < $1")
        .bind(now - Duration::days(1))
        .execute(pool)
        .await?;
    sqlx::query(
        "INSERT INTO workos_logins (state_hash, code_verifier, expires_at) VALUES ($1, $2, $3)",
    )
    .bind(sha256_hex(&state))
    .bind(&verifier)
    .bind(now + Duration::minutes(LOGIN_MINUTES))
    .execute(pool)
    .await?;
    let url = workos.authorization_url(connection, redirect_uri, &state, &challenge);
    Ok(Started { url, state })
}

/// A finished sign-in.
#[derive(Debug)]
pub struct SignedIn {
    pub user: UserId,
    /// The account was made by this sign-in.
    pub created: bool,
    /// The WorkOS session, for its logout URL.
    pub session_id: Option<String>,
    pub committed: Committed,
}

/// Spends `state` (once, unexpired) and returns its PKCE verifier.
async fn spend_state(
    pool: &PgPool,
    state: &str,
    now: DateTime<Utc>,
) -> Result<String, SignInError> {
    sqlx::query_scalar(
        "UPDATE workos_logins SET used_at = $2
          WHERE state_hash = $1 AND used_at IS NULL AND expires_at > $2
          RETURNING code_verifier",
    )
    .bind(sha256_hex(state))
    .bind(now)
    .fetch_optional(pool)
    .await?
    .ok_or(SignInError::BadState)
}

/// The name a new account gets: WorkOS's first and last name, else the email's local part.
fn name_of(auth: &Authentication, email: &Email) -> String {
    let full = [&auth.user.first_name, &auth.user.last_name]
        .into_iter()
        .flatten()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let local = email.as_str().split('@').next().unwrap_or("user");
    let name = parse_name("name", &full, 1, 100).or_else(|_| parse_name("name", local, 1, 100));
    name.unwrap_or_else(|_| "WorkOS user".to_string())
}

/// Finishes a sign-in: `state` and `code` as WorkOS sent the browser back with them.
pub async fn finish(
    store: &EventStore,
    workos: &Workos,
    state: &str,
    code: &str,
    now: DateTime<Utc>,
    ctx_for: impl Fn(UserId) -> CommandContext,
) -> Result<SignedIn, SignInError> {
    let pool = store.pool();
    let verifier = spend_state(pool, state, now).await?;
    let auth = workos.authenticate_with_code(code, &verifier).await?;
    let workos_id = auth.user.id.clone();
    let email = Email::parse(&auth.user.email).map_err(|e| SignInError::BadEmail(e.message))?;
    let verified = auth.user.email_verified;
    let mut created = false;
    let user = match claims::user_by_workos(pool, &workos_id).await? {
        Some(user) => user,
        None => match claims::user_by_email(pool, &email).await? {
            Some(_) if !verified => return Err(SignInError::UnverifiedEmail),
            Some(user) => {
                link(store, user, &workos_id, verified, &ctx_for(user)).await?;
                user
            }
            None => {
                let user = UserId::generate();
                let command = UserCommand::RegisterWithWorkos {
                    name: name_of(&auth, &email),
                    email: email.clone(),
                    workos_user_id: workos_id.clone(),
                    email_verified: verified,
                };
                claims::claim_workos(pool, user, &workos_id, Some(&email)).await?;
                let registered = store
                    .execute::<User>(&user.to_string(), command, &ctx_for(user))
                    .await;
                if let Err(e) = registered {
                    claims::release(pool, "workos", &workos_id, user).await;
                    claims::release(pool, "email", email.as_str(), user).await;
                    return Err(e.into());
                }
                created = true;
                user
            }
        },
    };
    let command = UserCommand::RecordWorkosSignIn {
        workos_user_id: workos_id,
        organization_id: auth.organization_id.clone(),
        method: auth
            .authentication_method
            .clone()
            .unwrap_or_else(|| "unknown".into()),
        at: now,
    };
    let committed = store
        .execute::<User>(&user.to_string(), command, &ctx_for(user))
        .await
        .map_err(other_workos_user)?;
    Ok(SignedIn {
        user,
        created,
        session_id: auth.session_id(),
        committed,
    })
}

fn other_workos_user(e: CommandError<UserError>) -> SignInError {
    match e {
        CommandError::Rejected(UserError::OtherWorkosUser) => SignInError::OtherWorkosUser,
        other => SignInError::Store(other),
    }
}

/// Links WorkOS user `workos_id` to the existing account `user` (its email verified by WorkOS).
async fn link(
    store: &EventStore,
    user: UserId,
    workos_id: &str,
    verified: bool,
    ctx: &CommandContext,
) -> Result<(), SignInError> {
    let pool = store.pool();
    claims::claim_workos(pool, user, workos_id, None).await?;
    let command = UserCommand::LinkWorkos {
        workos_user_id: workos_id.to_string(),
        email_verified: verified,
    };
    if let Err(e) = store.execute::<User>(&user.to_string(), command, ctx).await {
        claims::release(pool, "workos", workos_id, user).await;
        return Err(other_workos_user(e));
    }
    Ok(())
}
