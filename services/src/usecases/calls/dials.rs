//! Toll-fraud and harassment limits on dialling (`call_dials`, beside the event log): where the
//! service may ring (`cmb_domain::destination`), how often one number is rung per UTC day
//! across every user, and how many calls one user places per UTC day, answered or not (an
//! unanswered call costs nothing, so no budget would stop someone ringing a stranger around
//! the clock).
//!
//! A call is counted when it is requested to ring now, or when a scheduled one fires (the
//! dialer claims it then): one row per call, written with the request or by the dialer before
//! it asks Twilio, never from a read model. Claiming is idempotent per call, so a redelivered
//! message claims nothing twice, and serialised per user and per number by advisory locks, so
//! two instances cannot both take the last slot.

use chrono::{DateTime, Duration, Utc};
use cmb_domain::destination::{DestinationPolicy, Refusal};
use cmb_domain::values::PhoneNumber;
use cmb_domain::{CallId, UserId};
use sqlx::PgPool;

/// `CALL_NUMBER_DAILY_LIMIT` when unset.
pub const DEFAULT_NUMBER_PER_DAY: u32 = 10;
/// `CALL_USER_DAILY_LIMIT` when unset.
pub const DEFAULT_USER_PER_DAY: u32 = 20;

/// Where and how often the service rings (`CALL_ALLOWED_COUNTRIES`, `CALL_BLOCKED_PREFIXES`,
/// `CALL_NUMBER_DAILY_LIMIT`, `CALL_USER_DAILY_LIMIT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallPolicy {
    pub destinations: DestinationPolicy,
    /// Calls to one number per UTC day, across every user.
    pub number_per_day: u32,
    /// Calls one user places per UTC day, answered or not.
    pub user_per_day: u32,
}

impl Default for CallPolicy {
    fn default() -> Self {
        CallPolicy {
            destinations: DestinationPolicy::default(),
            number_per_day: DEFAULT_NUMBER_PER_DAY,
            user_per_day: DEFAULT_USER_PER_DAY,
        }
    }
}

/// Why a call may not be dialled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialRefusal {
    #[error("this destination is not allowed: {0}")]
    Destination(Refusal),
    #[error(
        "this number has been called {limit} times today, the most allowed per number \
         (CALL_NUMBER_DAILY_LIMIT); try again tomorrow (UTC)"
    )]
    NumberDaily { limit: u32, retry_after_secs: u64 },
    #[error(
        "you have placed {limit} calls today, answered or not, the most allowed per user \
         (CALL_USER_DAILY_LIMIT); try again tomorrow (UTC)"
    )]
    UserDaily { limit: u32, retry_after_secs: u64 },
}

/// Seconds from `now` to the next UTC midnight (when the daily counts start again).
fn until_tomorrow(now: DateTime<Utc>) -> u64 {
    let tomorrow = now.date_naive() + Duration::days(1);
    let midnight = tomorrow.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
    (midnight - now).num_seconds().max(1) as u64
}

impl CallPolicy {
    /// Whether the service may ring `phone` at all.
    pub fn destination(&self, phone: &PhoneNumber) -> Result<(), DialRefusal> {
        self.destinations
            .check(phone)
            .map_err(DialRefusal::Destination)
    }

    /// Counts call `call_id` of `user` to `phone` for the UTC day of `now`, if the number and
    /// the user are both under their daily limits; a call already counted is allowed again.
    pub async fn claim(
        &self,
        pool: &PgPool,
        call_id: CallId,
        user: UserId,
        phone: &PhoneNumber,
        now: DateTime<Utc>,
    ) -> Result<Result<(), DialRefusal>, sqlx::Error> {
        let day = now.date_naive();
        let mut tx = pool.begin().await?;
        // Always the user's lock first, then the number's: two claims never wait on each other
        // in opposite orders.
        for key in [format!("dials:user:{user}"), format!("dials:phone:{phone}")] {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                .bind(key)
                .execute(&mut *tx)
                .await?;
        }
        let (mine, to_number, by_user): (bool, i64, i64) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM call_dials WHERE call_id = $1),
                    (SELECT count(*) FROM call_dials WHERE phone = $2 AND day = $4),
                    (SELECT count(*) FROM call_dials WHERE user_id = $3 AND day = $4)",
        )
        .bind(call_id.uuid())
        .bind(phone.as_str())
        .bind(user.uuid())
        .bind(day)
        .fetch_one(&mut *tx)
        .await?;
        if mine {
            return Ok(Ok(()));
        }
        let retry_after_secs = until_tomorrow(now);
        if to_number >= i64::from(self.number_per_day) {
            metrics::counter!("cmb_calls_refused_total", "rule" => "number_daily").increment(1);
            return Ok(Err(DialRefusal::NumberDaily {
                limit: self.number_per_day,
                retry_after_secs,
            }));
        }
        if by_user >= i64::from(self.user_per_day) {
            metrics::counter!("cmb_calls_refused_total", "rule" => "user_daily").increment(1);
            return Ok(Err(DialRefusal::UserDaily {
                limit: self.user_per_day,
                retry_after_secs,
            }));
        }
        sqlx::query(
            "INSERT INTO call_dials (call_id, user_id, phone, day, claimed_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(call_id.uuid())
        .bind(user.uuid())
        .bind(phone.as_str())
        .bind(day)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }
}

/// Gives back the count of a call that never came to exist (its request failed after the
/// claim).
pub async fn release(pool: &PgPool, call_id: CallId) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM call_dials WHERE call_id = $1")
        .bind(call_id.uuid())
        .execute(pool)
        .await?;
    Ok(())
}

/// Forgets the numbers an erased user called: their counts go (so the numbers' counts of
/// today drop by theirs: their destinations are not kept, even for the day).
pub async fn forget_user(pool: &PgPool, user: UserId) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("DELETE FROM call_dials WHERE user_id = $1")
        .bind(user.uuid())
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

/// [`release`], logging a failure instead of returning it (on paths already failing).
pub async fn release_logged(pool: &PgPool, call_id: CallId) {
    if let Err(e) = release(pool, call_id).await {
        tracing::error!(call = %call_id, error = %e, "could not release the call's daily count");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daily_counts_start_again_at_utc_midnight() {
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        assert_eq!(until_tomorrow(at("2027-01-10T23:59:00Z")), 60);
        assert_eq!(until_tomorrow(at("2027-01-10T00:00:00Z")), 86_400);
    }
}
