//! Windowed counters in Postgres (`rate_limits`, beside the event log), shared by every
//! instance: one upsert per occurrence. Rate limits and the sign-in lockout of unknown emails
//! count here.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_aligned() {
        let t = DateTime::parse_from_rfc3339("2026-11-29T10:17:42Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            window_start(t, Duration::from_secs(60)).to_rfc3339(),
            "2026-11-29T10:17:00+00:00"
        );
        assert_eq!(
            window_start(t, Duration::from_secs(3600)).to_rfc3339(),
            "2026-11-29T10:00:00+00:00"
        );
    }
}
