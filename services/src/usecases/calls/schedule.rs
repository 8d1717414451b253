//! Schedule a call: a time at least `MIN_NOTICE_MINUTES` and at most `MAX_AHEAD_DAYS` ahead
//! (`MAX_CARD_AHEAD_DAYS` when a card authorisation holds it), at most `MAX_SCHEDULED` waiting
//! per user, then the same request saga as a call now.

use chrono::{DateTime, Duration, Utc};
use cmb_domain::values::Invalid;
use cmb_domain::CommandContext;
use cmb_providers::stripe::Stripe;

use super::dials::CallPolicy;
use super::request::{request, Request, RequestError, Requested};
use crate::backbone::store::EventStore;

/// A scheduled call is at least this far ahead, and can be cancelled until this long before.
pub const MIN_NOTICE_MINUTES: i64 = 5;
pub const MAX_AHEAD_DAYS: i64 = 30;
pub const MAX_SCHEDULED: i64 = 50;
/// A call paid by card is scheduled at most this far ahead: its hold is a card authorisation,
/// and authorisations lapse after about 7 days (Stripe's online card payments), after which
/// the capture would fail and the call would have been free. Later calls are paid with credits.
pub const MAX_CARD_AHEAD_DAYS: i64 = 6;

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("you have {MAX_SCHEDULED} scheduled calls, the most allowed")]
    TooMany,
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("counting scheduled calls: {0}")]
    Db(#[from] sqlx::Error),
}

/// Requests call `call` for `at` (UTC) in the user's `timezone` (an IANA name, checked).
#[allow(clippy::too_many_arguments)]
pub async fn schedule(
    store: &EventStore,
    stripe: &Stripe,
    policy: &CallPolicy,
    now: DateTime<Utc>,
    mut call: Request,
    at: DateTime<Utc>,
    timezone: Option<&str>,
    ctx: &CommandContext,
) -> Result<Requested, ScheduleError> {
    if at < now + Duration::minutes(MIN_NOTICE_MINUTES) {
        return Err(Invalid::new(
            "scheduled_time",
            format!("scheduled_time: at least {MIN_NOTICE_MINUTES} minutes from now"),
        )
        .into());
    }
    if at > now + Duration::days(MAX_AHEAD_DAYS) {
        return Err(Invalid::new(
            "scheduled_time",
            format!("scheduled_time: at most {MAX_AHEAD_DAYS} days from now"),
        )
        .into());
    }
    let by_card = matches!(call.pay_with, super::request::PayWith::Card { .. });
    if by_card && at > now + Duration::days(MAX_CARD_AHEAD_DAYS) {
        return Err(Invalid::new(
            "scheduled_time",
            format!(
                "scheduled_time: a call paid by card is at most {MAX_CARD_AHEAD_DAYS} days ahead \
                 (card authorisations lapse after about 7 days); pay with credits to schedule \
                 further out"
            ),
        )
        .into());
    }
    let timezone = match timezone {
        Some(tz) => Some(
            tz.parse::<chrono_tz::Tz>()
                .map_err(|_| Invalid::new("timezone", "timezone: must be an IANA zone"))?
                .name()
                .to_string(),
        ),
        None => None,
    };
    // At most MAX_SCHEDULED waiting calls; the advisory lock makes count-then-request atomic
    // per user.
    let mut tx = store.pool().begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('schedule:' || $1, 0))")
        .bind(call.user_id.to_string())
        .execute(&mut *tx)
        .await?;
    let waiting = super::ledger::waiting(&mut tx, call.user_id).await?;
    if waiting >= MAX_SCHEDULED {
        return Err(ScheduleError::TooMany);
    }
    call.scheduled = Some((at, timezone));
    let requested = request(store, stripe, policy, now, call, ctx).await?;
    tx.commit().await?;
    Ok(requested)
}
