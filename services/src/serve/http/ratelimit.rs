//! Per-endpoint rate limits, shared by every instance: fixed windows counted in Postgres with
//! one upsert per request. Anonymous requests are counted per client IP, signed-in ones per user.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

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

fn window_start(now: DateTime<Utc>, window: Duration) -> DateTime<Utc> {
    let secs = window.as_secs().max(1) as i64;
    let start = now.timestamp().div_euclid(secs) * secs;
    DateTime::from_timestamp(start, 0).unwrap_or(now)
}

/// Counts one more occurrence of `key` in the current fixed window of `window`; returns the
/// count so far and when the window started.
pub async fn count(
    pool: &PgPool,
    key: &str,
    window: Duration,
) -> Result<(i32, DateTime<Utc>, DateTime<Utc>), sqlx::Error> {
    let now = Utc::now();
    let start = window_start(now, window);
    let count: i32 = sqlx::query_scalar(
        "INSERT INTO rate_limits (key, window_start, count) VALUES ($1, $2, 1)
         ON CONFLICT (key, window_start) DO UPDATE SET count = rate_limits.count + 1
         RETURNING count",
    )
    .bind(key)
    .bind(start)
    .fetch_one(pool)
    .await?;
    Ok((count, start, now))
}

/// Counts one request against `limit` for `who`; 429 with `Retry-After` once over.
pub async fn check(pool: &PgPool, limit: Limit, who: &str) -> Result<(), ApiError> {
    let (count, start, now) = count(pool, &format!("{}:{who}", limit.name), limit.window).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_aligned() {
        let t = DateTime::parse_from_rfc3339("2026-11-29T10:17:42Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            window_start(t, MINUTE).to_rfc3339(),
            "2026-11-29T10:17:00+00:00"
        );
        assert_eq!(
            window_start(t, HOUR).to_rfc3339(),
            "2026-11-29T10:00:00+00:00"
        );
    }
}
