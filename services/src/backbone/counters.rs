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

/// Counts one more occurrence of `key` over a sliding `window`; returns the count so far, when
/// the current fixed window started, and now. The count is the current window's plus the
/// previous window's weighted by how much of it still lies within `window` of now (the
/// sliding-window estimate), so a burst straddling a window boundary is still counted whole
/// rather than starting again from zero at the boundary.
pub async fn count(
    pool: &PgPool,
    key: &str,
    window: Duration,
) -> Result<(i32, DateTime<Utc>, DateTime<Utc>), sqlx::Error> {
    let now = Utc::now();
    let start = window_start(now, window);
    let previous = start - chrono::Duration::from_std(window).unwrap_or_default();
    let (current, before): (i32, i32) = sqlx::query_as(
        "WITH cur AS (
             INSERT INTO rate_limits (key, window_start, count) VALUES ($1, $2, 1)
             ON CONFLICT (key, window_start) DO UPDATE SET count = rate_limits.count + 1
             RETURNING count)
         SELECT cur.count,
                COALESCE((SELECT count FROM rate_limits WHERE key = $1 AND window_start = $3), 0)
           FROM cur",
    )
    .bind(key)
    .bind(start)
    .bind(previous)
    .fetch_one(pool)
    .await?;
    Ok((sliding(current, before, now, start, window), start, now))
}

/// The sliding-window estimate: `current` plus `before` scaled by the share of the previous
/// window still within `window` of `now`, rounded up (a limit errs on the side of counting).
fn sliding(
    current: i32,
    before: i32,
    now: DateTime<Utc>,
    start: DateTime<Utc>,
    window: Duration,
) -> i32 {
    let elapsed = (now - start).num_milliseconds().max(0) as f64;
    let window_ms = window.as_millis().max(1) as f64;
    let weight = (1.0 - elapsed / window_ms).clamp(0.0, 1.0);
    current + (before as f64 * weight).ceil() as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_across_a_boundary_is_counted_whole() {
        let start = DateTime::parse_from_rfc3339("2026-11-29T10:18:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let minute = Duration::from_secs(60);
        // Five just before the boundary, one just after: six.
        let just_after = start + chrono::Duration::milliseconds(300);
        assert_eq!(sliding(1, 5, just_after, start, minute), 6);
        // Half a window later, half of the previous window still counts.
        let half = start + chrono::Duration::seconds(30);
        assert_eq!(sliding(1, 6, half, start, minute), 4);
        // A window later, nothing of it.
        assert_eq!(
            sliding(0, 6, start + chrono::Duration::seconds(60), start, minute),
            0
        );
    }

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
