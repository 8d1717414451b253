//! Per-endpoint rate limits, shared by every instance: fixed windows counted in Postgres with
//! one upsert per request. Anonymous requests are counted per client IP, signed-in ones per user.

use std::time::Duration;

use sqlx::PgPool;

use crate::backbone::counters;
use crate::serve::http::error::ApiError;

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
pub async fn check(pool: &PgPool, limit: Limit, who: &str) -> Result<(), ApiError> {
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

/// The key a request is counted under: its user when signed in, its IP otherwise.
pub fn subject(user: Option<&crate::serve::http::auth::AuthUser>, ip: std::net::IpAddr) -> String {
    match user {
        Some(u) => format!("user:{}", u.id),
        None => format!("ip:{ip}"),
    }
}
