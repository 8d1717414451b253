//! WorkOS AuthKit sign-in (the rules are in `usecases::accounts::workos`).
//!
//! `GET /auth/workos/authorize` sends the browser to WorkOS's hosted page with a fresh `state`
//! and a PKCE challenge, and sets the `state` in an HttpOnly cookie scoped to these routes;
//! `GET /auth/workos/callback` accepts only a `state` equal to that cookie (so a callback link
//! someone else started cannot sign this browser in to their account), spends it once,
//! exchanges the code, and answers our token as password sign-in does.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use cmb_domain::Actor;
use cmb_providers::workos::{Connection, Workos};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::serve::http::auth;
use crate::serve::http::error::{ApiError, ApiResult, ErrorBody};
use crate::serve::http::extract::{request_id, Query};
use crate::serve::http::signed_in::{user_after_write, TokenAnswer};
use crate::serve::http::state::AppState;
use crate::usecases::accounts::{sessions, workos};

/// The cookie holding the state of this browser's sign-in under way.
const STATE_COOKIE: &str = "cmb_workos_state";

fn client(state: &AppState) -> ApiResult<&Workos> {
    state.workos.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "workos_not_configured",
            "WorkOS sign-in is not configured on this server",
        )
    })
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuthorizeQuery {
    /// Sign in through this organisation's SSO connection (`org_…`).
    #[param(pattern = "^org_[A-Za-z0-9]{1,60}$")]
    organization_id: Option<String>,
    /// A provider by WorkOS's name (`authkit`, the default, `GoogleOAuth`, `MicrosoftOAuth`, …).
    #[param(pattern = "^[A-Za-z]{1,40}$")]
    provider: Option<String>,
}

fn connection(q: &AuthorizeQuery) -> ApiResult<Connection> {
    match (&q.organization_id, &q.provider) {
        (Some(_), Some(_)) => Err(ApiError::validation(
            "provider",
            "provider: give either organization_id or provider, not both",
        )),
        (Some(org), None) => {
            let ok = org.len() <= 64
                && org
                    .strip_prefix("org_")
                    .is_some_and(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_alphanumeric()));
            if !ok {
                return Err(ApiError::validation(
                    "organization_id",
                    "organization_id: a WorkOS organisation id (org_…)",
                ));
            }
            Ok(Connection::Organization(org.clone()))
        }
        (None, Some(p)) if p.eq_ignore_ascii_case("authkit") => Ok(Connection::AuthKit),
        (None, Some(p)) => {
            if p.is_empty() || p.len() > 40 || !p.chars().all(|c| c.is_ascii_alphabetic()) {
                return Err(ApiError::validation(
                    "provider",
                    "provider: a WorkOS provider name such as GoogleOAuth",
                ));
            }
            Ok(Connection::Provider(p.clone()))
        }
        (None, None) => Ok(Connection::AuthKit),
    }
}

/// Start a WorkOS sign-in: a redirect to WorkOS's hosted page (AuthKit, a provider, or an
/// organisation's SSO), with `state` and PKCE; the `state` is also set as an HttpOnly cookie
/// the callback checks.
#[utoipa::path(get, path = "/auth/workos/authorize", tag = "auth", params(AuthorizeQuery),
    responses(
        (status = 302, description = "To WorkOS's hosted sign-in",
            headers(("location" = String, description = "WorkOS's authorize URL"),
                    ("set-cookie" = String, description = "cmb_workos_state, HttpOnly, 10 minutes"))),
        (status = 404, description = "WorkOS sign-in is not configured", body = ErrorBody),
    ))]
pub async fn authorize(
    State(state): State<AppState>,
    Query(q): Query<AuthorizeQuery>,
) -> ApiResult<Response> {
    let workos = client(&state)?;
    let connection = connection(&q)?;
    let redirect_uri = state.config.workos_redirect_uri();
    let started =
        workos::start(&state.pool, workos, &connection, &redirect_uri, Utc::now()).await?;
    let secure = if state.config.public_base_url.starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{STATE_COOKIE}={}; Path=/api/auth/workos; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
        started.state,
        workos::LOGIN_MINUTES * 60
    );
    let mut response = StatusCode::FOUND.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(&started.url).map_err(ApiError::internal)?,
    );
    headers.insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(ApiError::internal)?,
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CallbackQuery {
    /// The authorization code from WorkOS.
    code: Option<String>,
    /// The state we sent; must equal this browser's `cmb_workos_state` cookie.
    state: Option<String>,
    /// WorkOS's error when the sign-in did not happen (e.g. `access_denied`).
    error: Option<String>,
    error_description: Option<String>,
}

/// Signed in through WorkOS.
#[derive(Serialize, ToSchema)]
pub struct WorkosSignIn {
    #[serde(flatten)]
    signed_in: TokenAnswer,
    /// The account was made by this sign-in.
    new_account: bool,
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Where WorkOS sends the browser back: checks the state (once, unexpired, this browser's),
/// exchanges the code, links or creates the account, and answers our token.
#[utoipa::path(get, path = "/auth/workos/callback", tag = "auth", params(CallbackQuery),
    responses(
        (status = 200, description = "Signed in (the account linked or created)", body = WorkosSignIn),
        (status = 400, description = "Bad or reused state, or a code WorkOS refused (invalid, used, expired)", body = ErrorBody),
        (status = 404, description = "WorkOS sign-in is not configured", body = ErrorBody),
        (status = 409, description = "An account has this email and WorkOS did not verify it", body = ErrorBody),
        (status = 502, description = "WorkOS refused our request (configuration)", body = ErrorBody),
    ))]
pub async fn callback(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> ApiResult<Response> {
    let workos = client(&state)?;
    if let Some(error) = q.error {
        let detail = q.error_description.unwrap_or_default();
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "workos_sign_in_failed",
            format!("WorkOS did not sign you in ({error}): {detail}"),
        ));
    }
    let given = q.state.filter(|s| !s.is_empty() && s.len() <= 128);
    let code = q.code.filter(|c| !c.is_empty() && c.len() <= 512);
    let Some(code) = code else {
        return Err(ApiError::validation("code", "code: is required"));
    };
    let Some(given) = given.filter(|s| cookie(&headers, STATE_COOKIE) == Some(s.as_str())) else {
        return Err(workos::SignInError::BadState.into());
    };
    let request = request_id(&headers);
    let done = workos::finish(&state.store, workos, &given, &code, Utc::now(), |id| {
        cmb_domain::CommandContext::for_request(request.clone(), Actor::User(id))
    })
    .await?;
    tracing::info!(user = %done.user, new_account = done.created, "signed in with WorkOS");
    let epoch = sessions::epoch(&state.pool, done.user).await?;
    let (token, claims) = auth::issue_token_for_session(
        state.config.jwt_secret.expose(),
        done.user,
        epoch,
        done.session_id,
    )?;
    let caught_up = state.read_your_writes("users", &done.committed).await;
    let user = user_after_write(&state, done.user, Some(state.clock.now()), caught_up).await?;
    let mut response = axum::Json(WorkosSignIn {
        signed_in: TokenAnswer::new(user, token, &claims),
        new_account: done.created,
    })
    .into_response();
    // The state is spent: the browser can forget it.
    let clear =
        format!("{STATE_COOKIE}=; Path=/api/auth/workos; Max-Age=0; HttpOnly; SameSite=Lax");
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&clear).map_err(ApiError::internal)?,
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
