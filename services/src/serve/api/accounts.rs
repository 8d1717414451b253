//! Registration, sign-in (with lockout), sign-out (revocation), the current user and profile.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::{DateTime, Duration, Utc};
use cmb_domain::user::{User, UserCommand, UserError, LOCKOUT_MINUTES, LOCKOUT_THRESHOLD};
use cmb_domain::values::{parse_name, Email, Password, PhoneNumber};
use cmb_domain::{Actor, CommandContext};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::{settle, store_error};
use crate::serve::http::auth::{self, AuthUser, ClientIp};
use crate::serve::http::error::{ApiError, ApiResult};
use crate::serve::http::extract::Json;
use crate::serve::http::ratelimit;
use crate::serve::http::AppState;

/// The user as the front end shows it.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct UserView {
    pub id: Uuid,
    pub name: String,
    pub email: String,
    pub phone: String,
    /// Neither is verified yet: there is no verification flow.
    pub email_verified: bool,
    pub phone_verified: bool,
    pub credits: i64,
    pub last_sign_in: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub async fn user_view(pool: &PgPool, id: Uuid) -> Result<Option<UserView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT u.id, u.name, u.email, u.phone, false AS email_verified, false AS phone_verified,
                COALESCE(w.balance, 0) AS credits, u.last_sign_in, u.created_at, u.updated_at
           FROM rm_users u LEFT JOIN rm_wallets w ON w.user_id = u.id
          WHERE u.id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

async fn user_after_write(state: &AppState, id: Uuid) -> ApiResult<UserView> {
    user_view(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::unavailable("your account is being set up; try again in a moment"))
}

fn context(headers: &axum::http::HeaderMap, actor: Actor) -> CommandContext {
    CommandContext::for_request(crate::serve::http::request_id(headers), actor)
}

/// Claims `value` of `kind` ('email' or 'phone') for `user`. False if someone else has it.
async fn claim(
    tx: &mut sqlx::PgConnection,
    kind: &str,
    value: &str,
    user: Uuid,
) -> Result<bool, sqlx::Error> {
    let holder: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO identity_claims (kind, value, user_id) VALUES ($1, $2, $3)
         ON CONFLICT (kind, value) DO UPDATE SET kind = EXCLUDED.kind
         RETURNING user_id",
    )
    .bind(kind)
    .bind(value)
    .bind(user)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(holder == Some(user))
}

async fn release(pool: &PgPool, kind: &str, value: &str, user: Uuid) {
    let released =
        sqlx::query("DELETE FROM identity_claims WHERE kind = $1 AND value = $2 AND user_id = $3")
            .bind(kind)
            .bind(value)
            .bind(user)
            .execute(pool)
            .await;
    if let Err(e) = released {
        tracing::error!(kind, error = %e, "could not release an identity claim");
    }
}

/// Claims an email and/or phone atomically: both or neither.
async fn claim_identity(
    pool: &PgPool,
    user: Uuid,
    email: Option<&Email>,
    phone: Option<&PhoneNumber>,
) -> ApiResult<()> {
    let mut tx = pool.begin().await?;
    if let Some(email) = email {
        if !claim(&mut tx, "email", email.as_str(), user).await? {
            return Err(ApiError::conflict(
                "email_taken",
                "an account with this email already exists",
            )
            .with_field("email"));
        }
    }
    if let Some(phone) = phone {
        if !claim(&mut tx, "phone", phone.as_str(), user).await? {
            return Err(ApiError::conflict(
                "phone_taken",
                "an account with this phone number already exists",
            )
            .with_field("phone"));
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Hashes the password, claims the email and phone, and registers user `id`.
#[allow(clippy::too_many_arguments)]
pub async fn create_account(
    pool: &PgPool,
    store: &crate::backbone::store::EventStore,
    id: Uuid,
    name: String,
    email: &Email,
    phone: &PhoneNumber,
    password: &Password,
    ctx: &CommandContext,
) -> ApiResult<crate::backbone::store::Committed> {
    let password_hash = auth::hash_password(password.expose().to_string()).await?;
    claim_identity(pool, id, Some(email), Some(phone)).await?;
    let command = UserCommand::Register {
        name,
        email: email.clone(),
        phone: phone.clone(),
        password_hash,
    };
    match store.execute::<User>(&id.to_string(), command, ctx).await {
        Ok(c) => Ok(c),
        Err(e) => {
            release(pool, "email", email.as_str(), id).await;
            release(pool, "phone", phone.as_str(), id).await;
            Err(store_error(e, |e| {
                ApiError::conflict("already_registered", e.to_string())
            }))
        }
    }
}

/// The user holding `email`, from the claims (consistent, unlike a read model).
pub async fn user_by_email(pool: &PgPool, email: &Email) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT user_id FROM identity_claims WHERE kind = 'email' AND value = $1")
        .bind(email.as_str())
        .fetch_optional(pool)
        .await
}

#[derive(Deserialize)]
pub struct RegisterBody {
    name: String,
    email: String,
    password: String,
    phone: String,
}

fn token_response(user: UserView, token: String, claims: &auth::Claims) -> serde_json::Value {
    json!({ "user": user, "token": token, "expires_at": claims.expires_at() })
}

pub async fn register(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: axum::http::HeaderMap,
    Json(body): Json<RegisterBody>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(&state.pool, ratelimit::REGISTER, &format!("ip:{ip}")).await?;
    let name = parse_name("name", &body.name, 1, 100)?;
    let email = Email::parse(&body.email)?;
    let password = Password::parse(&body.password)?;
    let phone = PhoneNumber::parse("phone", &body.phone)?;

    let id = Uuid::now_v7();
    let ctx = context(&headers, Actor::User(id));
    let committed = create_account(
        &state.pool,
        &state.store,
        id,
        name,
        &email,
        &phone,
        &password,
        &ctx,
    )
    .await?;
    tracing::info!(user = %id, email = %email.masked(), phone = %phone.masked(), "registered");
    let (token, claims) = auth::issue_token(state.config.jwt_secret.expose(), id)?;
    settle(&state, "users", &committed).await;
    let user = user_after_write(&state, id).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(token_response(user, token, &claims)),
    ))
}

#[derive(Deserialize)]
pub struct LoginBody {
    email: String,
    password: String,
}

fn invalid_credentials() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
        "invalid email or password",
    )
}

fn locked(until: DateTime<Utc>) -> ApiError {
    let secs = (until - Utc::now()).num_seconds().max(1) as u64;
    ApiError::too_many(
        "account_locked",
        format!(
            "too many failed sign-ins: the account is locked for {LOCKOUT_MINUTES} minutes; try again in {secs} s"
        ),
        secs,
    )
}

pub async fn login(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: axum::http::HeaderMap,
    Json(body): Json<LoginBody>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(&state.pool, ratelimit::LOGIN, &format!("ip:{ip}")).await?;
    let email = Email::parse(&body.email)?;
    if body.password.is_empty() {
        return Err(ApiError::validation("password", "password: is required"));
    }
    let now = Utc::now();
    let user_id = user_by_email(&state.pool, &email).await?;
    let user = match user_id {
        Some(id) => {
            let (user, _) = state
                .store
                .load::<User>(&id.to_string())
                .await
                .map_err(|e| store_error(e, ApiError::internal))?;
            user.registered.then_some((id, user))
        }
        None => None,
    };
    // Hash check first, always: an unknown email costs what a wrong password costs.
    let matches = auth::verify_password(
        body.password,
        user.as_ref().map(|(_, u)| u.password_hash.clone()),
    )
    .await;
    let Some((id, _)) = user else {
        // Unknown emails "lock" like real ones, so the lockout reveals nothing either.
        let key = format!("unknown:{}", email.as_str());
        let window = Duration::minutes(LOCKOUT_MINUTES);
        let window_std = window.to_std().unwrap_or_default();
        let (failures, _, _) = ratelimit::count(&state.pool, &key, window_std).await?;
        if failures > LOCKOUT_THRESHOLD as i32 {
            return Err(locked(now + window));
        }
        return Err(invalid_credentials());
    };
    let ctx = context(&headers, Actor::User(id));
    let command = UserCommand::RecordSignIn {
        succeeded: matches,
        at: now,
    };
    let committed = state
        .store
        .execute::<User>(&id.to_string(), command, &ctx)
        .await
        .map_err(|e| {
            store_error(e, |e| match e {
                UserError::Locked { until } => locked(until),
                other => ApiError::internal(other),
            })
        })?;
    if !matches {
        return Err(invalid_credentials());
    }
    let (token, claims) = auth::issue_token(state.config.jwt_secret.expose(), id)?;
    settle(&state, "users", &committed).await;
    let user = user_after_write(&state, id).await?;
    Ok(axum::Json(token_response(user, token, &claims)))
}

pub async fn logout(State(state): State<AppState>, user: AuthUser) -> ApiResult<impl IntoResponse> {
    ratelimit::check(&state.pool, ratelimit::LOGOUT, &format!("user:{}", user.id)).await?;
    let expires_at = user.claims.expires_at();
    // Refused everywhere from this moment; the event makes it part of the user's history.
    sqlx::query(
        "INSERT INTO revoked_tokens (token_id, user_id, expires_at) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(&user.claims.jti)
    .bind(user.id)
    .bind(expires_at)
    .execute(&state.pool)
    .await?;
    let command = UserCommand::RevokeToken {
        token_id: user.claims.jti.clone(),
        expires_at,
    };
    state
        .store
        .execute::<User>(&user.id.to_string(), command, &user.context())
        .await
        .map_err(|e| store_error(e, |_| ApiError::unauthorized("no such account")))?;
    Ok(axum::Json(
        json!({ "message": "signed out; this token no longer works" }),
    ))
}

pub async fn me(State(state): State<AppState>, user: AuthUser) -> ApiResult<impl IntoResponse> {
    ratelimit::check(&state.pool, ratelimit::ME, &format!("user:{}", user.id)).await?;
    let view = user_view(&state.pool, user.id)
        .await?
        .ok_or_else(|| ApiError::unauthorized("no such account"))?;
    Ok(axum::Json(json!({ "user": view })))
}

#[derive(Deserialize)]
pub struct ProfileBody {
    name: Option<String>,
    email: Option<String>,
    phone: Option<String>,
}

pub async fn update_profile(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<ProfileBody>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::PROFILE,
        &format!("user:{}", user.id),
    )
    .await?;
    let name = body
        .name
        .as_deref()
        .map(|n| parse_name("name", n, 1, 100))
        .transpose()?;
    let email = body.email.as_deref().map(Email::parse).transpose()?;
    let phone = body
        .phone
        .as_deref()
        .map(|p| PhoneNumber::parse("phone", p))
        .transpose()?;
    let (current, _) = state
        .store
        .load::<User>(&user.id.to_string())
        .await
        .map_err(|e| store_error(e, ApiError::internal))?;
    if !current.registered {
        return Err(ApiError::unauthorized("no such account"));
    }
    let new_email = email.filter(|e| Some(e) != current.email.as_ref());
    let new_phone = phone.filter(|p| Some(p) != current.phone.as_ref());
    claim_identity(&state.pool, user.id, new_email.as_ref(), new_phone.as_ref()).await?;
    let command = UserCommand::UpdateProfile {
        name,
        email: new_email.clone(),
        phone: new_phone.clone(),
    };
    let result = state
        .store
        .execute::<User>(&user.id.to_string(), command, &user.context())
        .await;
    // Whichever side lost, its claims go: the old ones on success, the new ones on failure.
    let (drop_email, drop_phone) = match &result {
        Ok(_) => (
            new_email.as_ref().and(current.email.as_ref()),
            new_phone.as_ref().and(current.phone.as_ref()),
        ),
        Err(_) => (new_email.as_ref(), new_phone.as_ref()),
    };
    if let Some(e) = drop_email {
        release(&state.pool, "email", e.as_str(), user.id).await;
    }
    if let Some(p) = drop_phone {
        release(&state.pool, "phone", p.as_str(), user.id).await;
    }
    let committed =
        result.map_err(|e| store_error(e, |_| ApiError::unauthorized("no such account")))?;
    settle(&state, "users", &committed).await;
    let view = user_after_write(&state, user.id).await?;
    Ok(axum::Json(json!({ "user": view })))
}
