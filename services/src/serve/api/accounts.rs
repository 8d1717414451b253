//! Registration, sign-in (with lockout), sign-out (revocation), the current user and profile
//! (the rules are in `usecases::accounts`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use cmb_domain::user::User;
use cmb_domain::values::{parse_name, Email, Password, PhoneNumber};
use cmb_domain::wallet::Wallet;
use cmb_domain::{Actor, CommandContext};
use cmb_projections::accounts::UserView;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::serve::http::auth::{self, AuthUser, ClientIp};
use crate::serve::http::error::{ApiError, ApiResult};
use crate::serve::http::extract::{request_id, Json};
use crate::serve::http::ratelimit;
use crate::serve::http::state::AppState;
use crate::usecases::accounts::{self, ProfileChange};

/// The user right after a command of theirs committed: from the read model, or, when it has
/// not caught up in time, from the `user` and `wallet` aggregates (never an error for a
/// command that went through).
async fn user_after_write(
    state: &AppState,
    id: Uuid,
    signed_in: Option<DateTime<Utc>>,
    caught_up: bool,
) -> ApiResult<UserView> {
    if caught_up {
        match cmb_projections::accounts::user_view(&state.pool, id).await {
            Ok(Some(view)) => return Ok(view),
            Ok(None) => {}
            Err(e) => tracing::warn!(user = %id, error = %e, "reading the user back"),
        }
    }
    let (user, _) = state.store.load::<User>(&id.to_string()).await?;
    if !user.registered {
        return Err(ApiError::unauthorized("no such account"));
    }
    metrics::counter!("cmb_answered_before_read_model_total", "resource" => "user").increment(1);
    let (wallet, _) = state.store.load::<Wallet>(&id.to_string()).await?;
    let since = user.registered_at.unwrap_or_else(|| state.clock.now());
    Ok(UserView {
        id,
        name: user.name,
        email: user
            .email
            .map(|e| e.as_str().to_string())
            .unwrap_or_default(),
        phone: user
            .phone
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
        email_verified: false,
        phone_verified: false,
        credits: wallet.balance,
        last_sign_in: signed_in,
        created_at: since,
        updated_at: signed_in.unwrap_or(since),
    })
}

fn context(headers: &axum::http::HeaderMap, actor: Actor) -> CommandContext {
    CommandContext::for_request(request_id(headers), actor)
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
    let committed =
        accounts::create(&state.store, id, name, &email, &phone, &password, &ctx).await?;
    tracing::info!(user = %id, email = %email.masked(), phone = %phone.masked(), "registered");
    let (token, claims) = auth::issue_token(state.config.jwt_secret.expose(), id)?;
    let caught_up = state.read_your_writes("users", &committed).await;
    let user = user_after_write(&state, id, None, caught_up).await?;
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
    let (id, committed) =
        accounts::sign_in(&state.store, &email, body.password, Utc::now(), |id| {
            context(&headers, Actor::User(id))
        })
        .await?;
    let (token, claims) = auth::issue_token(state.config.jwt_secret.expose(), id)?;
    let caught_up = state.read_your_writes("users", &committed).await;
    let user = user_after_write(&state, id, Some(state.clock.now()), caught_up).await?;
    Ok(axum::Json(token_response(user, token, &claims)))
}

pub async fn logout(State(state): State<AppState>, user: AuthUser) -> ApiResult<impl IntoResponse> {
    ratelimit::check(&state.pool, ratelimit::LOGOUT, &format!("user:{}", user.id)).await?;
    // Refused everywhere from this moment; the event makes it part of the user's history.
    accounts::sign_out(
        &state.store,
        user.id,
        &user.claims.jti,
        user.claims.expires_at(),
        &user.context(),
    )
    .await?;
    Ok(axum::Json(
        json!({ "message": "signed out; this token no longer works" }),
    ))
}

pub async fn me(State(state): State<AppState>, user: AuthUser) -> ApiResult<impl IntoResponse> {
    ratelimit::check(&state.pool, ratelimit::ME, &format!("user:{}", user.id)).await?;
    // Right after registering, the read model may not have the account yet.
    let view = user_after_write(&state, user.id, None, true).await?;
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
    let change = ProfileChange {
        name: body
            .name
            .as_deref()
            .map(|n| parse_name("name", n, 1, 100))
            .transpose()?,
        email: body.email.as_deref().map(Email::parse).transpose()?,
        phone: body
            .phone
            .as_deref()
            .map(|p| PhoneNumber::parse("phone", p))
            .transpose()?,
    };
    let committed =
        accounts::update_profile(&state.store, user.id, change, &user.context()).await?;
    let caught_up = state.read_your_writes("users", &committed).await;
    let view = user_after_write(&state, user.id, None, caught_up).await?;
    Ok(axum::Json(json!({ "user": view })))
}
