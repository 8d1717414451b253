//! Registration, sign-in (with lockout), sign-out (one session or everywhere), password change
//! and reset, the current user and profile (the rules are in `usecases::accounts`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::Utc;
use cmb_domain::user::User;
use cmb_domain::values::{parse_name, Email, Password, PhoneNumber};
use cmb_domain::{Actor, CommandContext, UserId};
use cmb_projections::accounts::UserView;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use crate::serve::http::answer::Done;
use crate::serve::http::auth::{self, AuthUser};
use crate::serve::http::client_ip::ClientIp;
use crate::serve::http::error::{ApiError, ApiResult, ErrorBody};
use crate::serve::http::extract::{request_id, Json};
use crate::serve::http::signed_in::{user_after_write, TokenAnswer};
use crate::serve::http::state::AppState;
use crate::usecases::accounts::{self, ProfileChange};

fn context(headers: &axum::http::HeaderMap, actor: Actor) -> CommandContext {
    CommandContext::for_request(request_id(headers), actor)
}

#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"name": "Ada Lovelace", "email": "ada@example.com", "password": "Correct-horse-1", "phone": "+14155550123"}))]
pub struct RegisterBody {
    /// Not blank; no control characters or angle brackets.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^<>\x00-\x1f\x7f-\x9f]*[^\s<>\x00-\x1f\x7f-\x9f][^<>\x00-\x1f\x7f-\x9f]*$"
    )]
    name: String,
    /// Stored lower-case; unique.
    #[schema(format = "email", max_length = 254)]
    email: String,
    /// 8 to 128 characters with an upper-case letter, a lower-case letter, a digit and a symbol
    /// (any script: the pattern shows the ASCII case), no control characters.
    #[schema(
        min_length = 8,
        max_length = 128,
        pattern = r"^(?=.*[A-Z])(?=.*[a-z])(?=.*[0-9])(?=.*[^A-Za-z0-9])[^\x00-\x1f\x7f-\x9f]{8,128}$"
    )]
    password: String,
    /// E.164.
    #[schema(pattern = r"^\+[1-9][0-9]{7,14}$", example = "+14155550123")]
    phone: String,
}

/// The user.
#[derive(Serialize, ToSchema)]
pub struct UserAnswer {
    user: UserView,
}

/// Create an account; answers the user and a token.
#[utoipa::path(post, path = "/auth/register", tag = "auth", request_body = RegisterBody,
    responses(
        (status = 201, description = "Registered and signed in", body = TokenAnswer),
        (status = 409, description = "The email or phone is already registered", body = ErrorBody),
    ))]
pub async fn register(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    Json(body): Json<RegisterBody>,
) -> ApiResult<impl IntoResponse> {
    let name = parse_name("name", &body.name, 1, 100)?;
    let email = Email::parse(&body.email)?;
    let password = Password::parse(&body.password)?;
    let phone = PhoneNumber::parse("phone", &body.phone)?;

    let id = UserId::generate();
    let ctx = context(&headers, Actor::User(id));
    let committed =
        accounts::create(&state.store, id, name, &email, &phone, &password, &ctx).await?;
    tracing::info!(user = %id, email = %email.masked(), phone = %phone.masked(), "registered");
    let (token, claims) = auth::issue_token(state.config.jwt_secret.expose(), id, 0)?;
    let caught_up = state.read_your_writes("users", &committed).await;
    let user = user_after_write(&state, id, None, caught_up).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(TokenAnswer::new(user, token, &claims)),
    ))
}

#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"email": "ada@example.com", "password": "Correct-horse-1"}))]
pub struct LoginBody {
    #[schema(format = "email")]
    email: String,
    #[schema(min_length = 1)]
    password: String,
}

/// Sign in. Ten failures in a row from one client address lock the account for that address
/// for 30 minutes (a 429 with `account_locked` and `Retry-After`); the owner still signs in
/// from an address that has not failed.
#[utoipa::path(post, path = "/auth/login", tag = "auth", request_body = LoginBody,
    responses(
        (status = 200, description = "Signed in", body = TokenAnswer),
        (status = 401, description = "Wrong email or password", body = ErrorBody),
    ))]
pub async fn login(
    State(state): State<AppState>,
    client: ClientIp,
    headers: axum::http::HeaderMap,
    Json(body): Json<LoginBody>,
) -> ApiResult<impl IntoResponse> {
    let email = Email::parse(&body.email)?;
    if body.password.is_empty() {
        return Err(ApiError::validation("password", "password: is required"));
    }
    let client = client.pseudonym(state.config.jwt_secret.expose());
    let (id, committed) = accounts::sign_in(
        &state.store,
        &email,
        body.password,
        &client,
        Utc::now(),
        |id| context(&headers, Actor::User(id)),
    )
    .await?;
    let epoch = accounts::sessions::epoch(&state.pool, id).await?;
    let (token, claims) = auth::issue_token(state.config.jwt_secret.expose(), id, epoch)?;
    let caught_up = state.read_your_writes("users", &committed).await;
    let user = user_after_write(&state, id, Some(state.clock.now()), caught_up).await?;
    Ok(axum::Json(TokenAnswer::new(user, token, &claims)))
}

/// Signed out; for a WorkOS sign-in, where to end the WorkOS session too.
#[derive(Serialize, ToSchema)]
pub struct LogoutAnswer {
    message: String,
    /// Send the browser here to end the WorkOS session this token came from (WorkOS
    /// sign-ins only).
    #[serde(skip_serializing_if = "Option::is_none")]
    workos_logout_url: Option<String>,
}

/// Revoke the token used, at once and on every instance. A token from a WorkOS sign-in also
/// gets WorkOS's logout URL for its session.
#[utoipa::path(post, path = "/auth/logout", tag = "auth", security(("bearer" = [])),
    responses((status = 200, description = "Signed out", body = LogoutAnswer)))]
pub async fn logout(State(state): State<AppState>, user: AuthUser) -> ApiResult<impl IntoResponse> {
    // Refused everywhere from this moment; the event makes it part of the user's history.
    accounts::sign_out(
        &state.store,
        user.id,
        &user.claims.jti,
        user.claims.expires_at(),
        &user.context(),
    )
    .await?;
    let workos_logout_url = user
        .claims
        .wos_sid
        .as_deref()
        .zip(state.workos.as_ref())
        .map(|(sid, workos)| workos.logout_url(sid, None));
    Ok(axum::Json(LogoutAnswer {
        message: "signed out; this token no longer works".into(),
        workos_logout_url,
    }))
}

/// The signed-in user.
#[utoipa::path(get, path = "/auth/me", tag = "auth", security(("bearer" = [])),
    responses((status = 200, description = "The user", body = UserAnswer)))]
pub async fn me(State(state): State<AppState>, user: AuthUser) -> ApiResult<impl IntoResponse> {
    // Right after registering, the read model may not have the account yet.
    let view = user_after_write(&state, user.id, None, true).await?;
    Ok(axum::Json(UserAnswer { user: view }))
}

/// Fields left out keep their value.
#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"name": "Ada King"}))]
pub struct ProfileBody {
    /// Not blank; no control characters or angle brackets.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^<>\x00-\x1f\x7f-\x9f]*[^\s<>\x00-\x1f\x7f-\x9f][^<>\x00-\x1f\x7f-\x9f]*$"
    )]
    name: Option<String>,
    #[schema(format = "email", max_length = 254)]
    email: Option<String>,
    /// E.164.
    #[schema(pattern = r"^\+[1-9][0-9]{7,14}$")]
    phone: Option<String>,
    /// Your password: needed to change the email or phone when you signed in more than 15
    /// minutes ago.
    #[schema(max_length = 128)]
    password: Option<String>,
}

/// Change name, email or phone. A new email or phone needs a sign-in from the last 15 minutes
/// or `password`.
#[utoipa::path(put, path = "/user/profile", tag = "auth", security(("bearer" = [])), request_body = ProfileBody,
    responses(
        (status = 200, description = "The changed user", body = UserAnswer),
        (status = 403, description = "A new email or phone with an older sign-in and no password (`reauthentication_required`), or a wrong password (`wrong_password`)", body = ErrorBody),
        (status = 409, description = "The email or phone belongs to another account", body = ErrorBody),
    ))]
pub async fn update_profile(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<ProfileBody>,
) -> ApiResult<impl IntoResponse> {
    if body
        .password
        .as_deref()
        .is_some_and(|p| p.chars().count() > 128)
    {
        return Err(ApiError::validation(
            "password",
            "password: at most 128 characters",
        ));
    }
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
    if change.email.is_some() || change.phone.is_some() {
        let (me, _) = state.store.load::<User>(&user.id.to_string()).await?;
        let new_email = change
            .email
            .as_ref()
            .is_some_and(|e| Some(e) != me.email.as_ref());
        let new_phone = change
            .phone
            .as_ref()
            .is_some_and(|p| Some(p) != me.phone.as_ref());
        if new_email || new_phone {
            user.reauthenticate(&state, body.password.as_deref())
                .await?;
        }
    }
    let committed =
        accounts::update_profile(&state.store, user.id, change, &user.context()).await?;
    let caught_up = state.read_your_writes("users", &committed).await;
    let view = user_after_write(&state, user.id, None, caught_up).await?;
    Ok(axum::Json(UserAnswer { user: view }))
}

/// Sign out of every session: every token of the account, this one included, stops working.
#[utoipa::path(post, path = "/auth/logout-all", tag = "auth", security(("bearer" = [])),
    responses((status = 200, description = "Signed out everywhere", body = Done)))]
pub async fn logout_all(
    State(state): State<AppState>,
    user: AuthUser,
) -> ApiResult<impl IntoResponse> {
    accounts::sign_out_everywhere(&state.store, user.id, Utc::now(), &user.context()).await?;
    Ok(axum::Json(json!({
        "message": "signed out everywhere: every token of this account, this one included, no longer works"
    })))
}

#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"current_password": "Correct-horse-1", "new_password": "Battery-staple-2"}))]
pub struct ChangePasswordBody {
    #[schema(min_length = 1)]
    current_password: String,
    /// As at registration, and not the current one.
    #[schema(
        min_length = 8,
        max_length = 128,
        pattern = r"^(?=.*[A-Z])(?=.*[a-z])(?=.*[0-9])(?=.*[^A-Za-z0-9])[^\x00-\x1f\x7f-\x9f]{8,128}$"
    )]
    new_password: String,
}

/// A new password; every session ends, and this one continues with the token returned.
#[utoipa::path(post, path = "/auth/password", tag = "auth", security(("bearer" = [])),
    request_body = ChangePasswordBody,
    responses(
        (status = 200, description = "Changed; `{message, token, expires_at}`"),
        (status = 403, description = "The current password is wrong", body = ErrorBody),
    ))]
pub async fn change_password(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<ChangePasswordBody>,
) -> ApiResult<impl IntoResponse> {
    let new = Password::parse(&body.new_password).map_err(|e| {
        ApiError::validation("new_password", format!("new_password: {}", e.message))
    })?;
    if body.current_password.is_empty() {
        return Err(ApiError::validation(
            "current_password",
            "current_password: is required",
        ));
    }
    if body.current_password == body.new_password {
        return Err(ApiError::validation(
            "new_password",
            "new_password: must differ from the current password",
        ));
    }
    let epoch = accounts::change_password(
        &state.store,
        user.id,
        body.current_password,
        &new,
        Utc::now(),
        &user.context(),
    )
    .await?;
    tracing::info!(user = %user.id, "password changed; every session revoked");
    let (token, claims) = auth::issue_token(state.config.jwt_secret.expose(), user.id, epoch)?;
    Ok(axum::Json(json!({
        "message": "password changed; every other session is signed out, this one continues with the new token",
        "token": token,
        "expires_at": claims.expires_at(),
    })))
}

#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"email": "ada@example.com"}))]
pub struct ForgotBody {
    #[schema(format = "email", min_length = 3, max_length = 254)]
    email: String,
}

/// Emails a reset link if the address has an account; answers the same, at once, either way.
#[utoipa::path(post, path = "/auth/password/forgot", tag = "auth", request_body = ForgotBody,
    responses((status = 202, description = "A link is on its way if the email has an account", body = Done)))]
pub async fn forgot_password(
    State(state): State<AppState>,
    Json(body): Json<ForgotBody>,
) -> ApiResult<impl IntoResponse> {
    let email = Email::parse(&body.email)?;
    // Off the request: how long it takes must not tell whether the account exists.
    let (store, mailer) = (state.store.clone(), state.mailer.clone());
    let base = state.config.public_base_url.clone();
    tokio::spawn(async move {
        let sent =
            accounts::recovery::send_reset_link(&store, &mailer, &base, &email, Utc::now()).await;
        if let Err(e) = sent {
            tracing::error!(error = %e, "password reset link");
        }
    });
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({
            "message": "if an account uses this email, a reset link is on its way; it works once, for 30 minutes"
        })),
    ))
}

#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"token": "the code from the email", "new_password": "Battery-staple-2"}))]
pub struct ResetBody {
    /// The code from the email.
    #[schema(min_length = 1, max_length = 128, pattern = r"\S")]
    token: String,
    /// As at registration.
    #[schema(
        min_length = 8,
        max_length = 128,
        pattern = r"^(?=.*[A-Z])(?=.*[a-z])(?=.*[0-9])(?=.*[^A-Za-z0-9])[^\x00-\x1f\x7f-\x9f]{8,128}$"
    )]
    new_password: String,
}

/// Sets a new password with an emailed token; every session ends. Sign in afterwards.
#[utoipa::path(post, path = "/auth/password/reset", tag = "auth", request_body = ResetBody,
    responses(
        (status = 200, description = "Reset; sign in with the new password", body = Done),
        (status = 400, description = "The token is invalid, used or expired", body = ErrorBody),
    ))]
pub async fn reset_password(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    Json(body): Json<ResetBody>,
) -> ApiResult<impl IntoResponse> {
    let token = body.token.trim();
    if token.is_empty() || token.len() > 128 {
        return Err(ApiError::validation(
            "token",
            "token: the code from the email is required",
        ));
    }
    let new = Password::parse(&body.new_password).map_err(|e| {
        ApiError::validation("new_password", format!("new_password: {}", e.message))
    })?;
    let user = accounts::recovery::reset_password(&state.store, token, &new, Utc::now(), |id| {
        context(&headers, Actor::User(id))
    })
    .await?;
    tracing::info!(user = %user, "password reset; every session revoked");
    Ok(axum::Json(json!({
        "message": "password reset: sign in with the new password; every session was signed out"
    })))
}
