//! Per-endpoint rate limits, shared by every instance: fixed windows counted in Postgres with
//! one upsert per request. Anonymous requests are counted per client IP (`client_ip`: behind
//! `TRUSTED_PROXIES` only, IPv6 per /64), signed-in ones per user.

use std::time::Duration;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use utoipa_axum::router::OpenApiRouter;

use crate::backbone::counters;
use crate::serve::http::auth;
use crate::serve::http::client_ip::ClientIp;
use crate::serve::http::error::ApiError;
use crate::serve::http::state::AppState;

#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub name: &'static str,
    pub max: i32,
    pub window: Duration,
}

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

const fn limit(name: &'static str, max: i32, window: Duration) -> Limit {
    Limit { name, max, window }
}

// The backend PRD's limits (§4).
pub const LOGIN: Limit = limit("login", 5, MINUTE);
pub const REGISTER: Limit = limit("register", 3, HOUR);
pub const LOGOUT: Limit = limit("logout", 10, MINUTE);
pub const ME: Limit = limit("me", 30, MINUTE);
pub const PROFILE: Limit = limit("profile", 10, MINUTE);
pub const PASSWORD_CHANGE: Limit = limit("password_change", 5, Duration::from_secs(900));
pub const PASSWORD_FORGOT: Limit = limit("password_forgot", 5, HOUR);
pub const PASSWORD_RESET: Limit = limit("password_reset", 10, HOUR);
pub const LOGOUT_ALL: Limit = limit("logout_all", 5, MINUTE);
pub const WORKOS_AUTHORIZE: Limit = limit("workos_authorize", 20, MINUTE);
pub const WORKOS_CALLBACK: Limit = limit("workos_callback", 20, MINUTE);
pub const EXPORT: Limit = limit("export", 3, HOUR);
pub const ERASE: Limit = limit("erase", 3, HOUR);
pub const PERSONAS_LIST_ANON: Limit = limit("personas_list_anon", 60, MINUTE);
pub const PERSONAS_LIST: Limit = limit("personas_list", 120, MINUTE);
pub const PERSONA_CREATE: Limit = limit("persona_create", 20, HOUR);
pub const PERSONA_UPDATE: Limit = limit("persona_update", 30, HOUR);
pub const PERSONA_DELETE: Limit = limit("persona_delete", 20, HOUR);
pub const PERSONA_CUSTOMIZE: Limit = limit("persona_customize", 30, MINUTE);
pub const CONTACTS_LIST: Limit = limit("contacts_list", 60, MINUTE);
pub const CONTACTS_ADD: Limit = limit("contacts_add", 30, MINUTE);
pub const CONTACTS_REMOVE: Limit = limit("contacts_remove", 30, MINUTE);
pub const CALL: Limit = limit("call", 5, MINUTE);
pub const CALL_SCHEDULE: Limit = limit("call_schedule", 10, HOUR);
pub const CALL_CANCEL: Limit = limit("call_cancel", 20, MINUTE);
pub const CALLS_LIST: Limit = limit("calls_list", 60, MINUTE);
pub const USAGE: Limit = limit("usage", 60, MINUTE);

/// Counts one request against `limit` for `who`; 429 with `Retry-After` once over.
async fn check(pool: &PgPool, limit: Limit, who: &str) -> Result<(), ApiError> {
    let (count, start, now) =
        counters::count(pool, &format!("{}:{who}", limit.name), limit.window).await?;
    if count == 1 && rand::random::<u8>() < 4 {
        // Now and then, forget windows that ended long ago.
        let _ =
            sqlx::query("DELETE FROM rate_limits WHERE window_start < now() - interval '1 day'")
                .execute(pool)
                .await;
    }
    if count > limit.max {
        let end = start + chrono::Duration::from_std(limit.window).unwrap_or_default();
        let retry_after = (end - now).num_seconds().max(1) as u64;
        metrics::counter!("cmb_rate_limited_total", "limit" => limit.name).increment(1);
        return Err(ApiError::too_many(
            "rate_limited",
            format!(
                "too many requests: at most {} per {} s; try again in {retry_after} s",
                limit.max,
                limit.window.as_secs()
            ),
            retry_after,
        ));
    }
    Ok(())
}

/// The limits of a route: one for signed-in callers (counted per user), one for anonymous
/// callers (counted per client IP).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub signed_in: Limit,
    pub anonymous: Limit,
}

impl From<Limit> for Limits {
    fn from(limit: Limit) -> Self {
        Limits {
            signed_in: limit,
            anonymous: limit,
        }
    }
}

impl Limit {
    fn describe(&self) -> String {
        let window = match self.window.as_secs() {
            60 => "minute".to_string(),
            3600 => "hour".to_string(),
            s => format!("{s} s"),
        };
        format!("{} per {window}", self.max)
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "name": self.name, "max": self.max, "window_seconds": self.window.as_secs() })
    }
}

/// `routes` behind `limits`: the layer that counts every request (before anything else of the
/// route runs) and, in the document, a 429 answer and the limits on each operation, from the
/// same values.
pub fn limited(
    routes: OpenApiRouter<AppState>,
    limits: impl Into<Limits>,
) -> OpenApiRouter<AppState> {
    let limits = limits.into();
    let mut routes = routes.route_layer(axum::middleware::from_fn(move |req, next| {
        enforce(limits, req, next)
    }));
    let text = if limits.signed_in.name == limits.anonymous.name {
        format!(
            "Rate limit: {} per user (per IP when anonymous).",
            limits.signed_in.describe()
        )
    } else {
        format!(
            "Rate limit: {} per user signed in, {} per IP anonymous.",
            limits.signed_in.describe(),
            limits.anonymous.describe()
        )
    };
    let extension = utoipa::openapi::extensions::ExtensionsBuilder::new()
        .add(
            "x-rate-limit",
            serde_json::json!({ "signed_in": limits.signed_in.json(), "anonymous": limits.anonymous.json() }),
        )
        .build();
    for item in routes.get_openapi_mut().paths.paths.values_mut() {
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for op in ops.into_iter().flatten() {
            op.description = Some(match op.description.take() {
                Some(d) => format!("{d}\n\n{text}"),
                None => text.clone(),
            });
            op.responses.responses.insert(
                "429".into(),
                utoipa::openapi::Ref::from_response_name("TooManyRequests").into(),
            );
            op.extensions
                .get_or_insert_with(Default::default)
                .merge(extension.clone());
        }
    }
    routes
}

/// Counts the request against its limit: per user when it carries a valid token, per IP
/// otherwise (revocation is the handler's business; a revoked token still names its user).
async fn enforce(limits: Limits, req: Request, next: Next) -> Response {
    let Some(state) = req.extensions().get::<AppState>().cloned() else {
        return ApiError::internal("the rate limit layer found no state").into_response();
    };
    if !state.config.rate_limits {
        return next.run(req).await;
    }
    let user = auth::bearer_token(req.headers())
        .and_then(|t| auth::decode_token(state.config.jwt_secret.expose(), t));
    let (limit, who) = match user {
        Some(claims) => (limits.signed_in, format!("user:{}", claims.sub)),
        None => {
            let ip = ClientIp::of(&state, req.headers(), req.extensions());
            (limits.anonymous, format!("ip:{}", ip.limit_key()))
        }
    };
    match check(&state.pool, limit, &who).await {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}
