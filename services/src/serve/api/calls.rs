//! Calls: trigger now, schedule for later, cancel a scheduled call, history with timelines,
//! and usage. The request saga lives in `usecases::calls`; the dialer, the scheduler and the
//! settlement worker take it from there, through the stream.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use cmb_domain::call::Payment;
use cmb_domain::values::{Invalid, PhoneNumber};
use cmb_projections::calls::{CallView, ListFilter, Sort, STATUSES};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::serve::http::auth::AuthUser;
use crate::serve::http::error::{ApiError, ApiResult};
use crate::serve::http::extract::{Json, Query};
use crate::serve::http::ratelimit;
use crate::serve::http::state::AppState;
use crate::usecases::calls::request::{Hold, PayWith, Request, Requested};
use crate::usecases::calls::{cancel, request, schedule};

#[derive(Deserialize)]
pub struct CallBody {
    #[serde(alias = "phone")]
    phone_number: Option<String>,
    persona_id: String,
    payment_intent_id: Option<String>,
    #[serde(default)]
    use_credits: bool,
    #[serde(alias = "duration_minutes", alias = "max_duration_minutes")]
    duration: Option<u32>,
}

impl CallBody {
    fn parse(self, user: &AuthUser) -> Result<Request, Invalid> {
        let phone = self
            .phone_number
            .as_deref()
            .map(|p| PhoneNumber::parse("phone_number", p))
            .transpose()?;
        let pay_with = match (self.payment_intent_id, self.use_credits) {
            (Some(_), true) => {
                return Err(Invalid::new(
                    "payment_intent_id",
                    "pay with either a payment_intent_id or use_credits, not both",
                ))
            }
            (None, false) => {
                return Err(Invalid::new(
                    "payment_intent_id",
                    "payment_intent_id: required, or pay with credits (use_credits: true)",
                ))
            }
            (None, true) => PayWith::Credits,
            (Some(pi), false) => PayWith::Card {
                payment_intent_id: pi,
            },
        };
        Ok(Request {
            user_id: user.id,
            phone,
            persona_id: self.persona_id,
            minutes: self.duration,
            pay_with,
            scheduled: None,
        })
    }
}

#[derive(Deserialize)]
pub struct ScheduleBody {
    #[serde(flatten)]
    call: CallBody,
    scheduled_time: String,
    timezone: Option<String>,
}

/// `scheduled_time` with an offset (`2026-12-01T09:00:00-05:00`), or a local time with an
/// IANA `timezone`. A local time that a daylight-saving change skips is refused; one that it
/// repeats means its first occurrence.
pub fn parse_scheduled_time(raw: &str, timezone: Option<&str>) -> ApiResult<DateTime<Utc>> {
    let field = "scheduled_time";
    if let Ok(t) = DateTime::parse_from_rfc3339(raw.trim()) {
        return Ok(t.with_timezone(&Utc));
    }
    let Some(tz) = timezone else {
        return Err(ApiError::validation(
            field,
            "scheduled_time: give an ISO 8601 time with an offset, or a local time and a timezone",
        ));
    };
    let tz: chrono_tz::Tz = tz.parse().map_err(|_| {
        ApiError::validation(
            "timezone",
            "timezone: must be an IANA zone such as Europe/Paris",
        )
    })?;
    let naive = [
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d %H:%M",
    ]
    .iter()
    .find_map(|f| NaiveDateTime::parse_from_str(raw.trim(), f).ok())
    .ok_or_else(|| ApiError::validation(field, "scheduled_time: expected YYYY-MM-DDTHH:MM[:SS]"))?;
    match tz.from_local_datetime(&naive) {
        chrono::LocalResult::Single(t) => Ok(t.with_timezone(&Utc)),
        chrono::LocalResult::Ambiguous(first, _) => Ok(first.with_timezone(&Utc)),
        chrono::LocalResult::None => Err(ApiError::validation(
            field,
            format!("scheduled_time: {naive} does not exist in {tz} (the clocks skip it)"),
        )),
    }
}

/// 201 with the call, its hold and its `Location`. The command has committed: if the read
/// model is not there in time, the answer is the call as the command recorded it, never an
/// error.
async fn created(
    state: &AppState,
    user: &AuthUser,
    requested: Requested,
) -> ApiResult<impl IntoResponse> {
    let caught_up = state.read_your_writes("calls", &requested.committed).await;
    let found = match caught_up {
        true => cmb_projections::calls::view(&state.pool, requested.call_id, user.id).await,
        false => Ok(None),
    };
    let view = match found {
        Ok(Some(view)) => view,
        found => {
            if let Err(e) = found {
                tracing::warn!(call = %requested.call_id, error = %e, "reading the call back");
            }
            metrics::counter!("cmb_answered_before_read_model_total", "resource" => "call")
                .increment(1);
            CallView::requested(requested.call_id, &requested.request, requested.at)
        }
    };
    let hold = match requested.hold {
        Hold::Credits(credits) => json!({ "method": "credits", "credits": credits }),
        Hold::Card(pi) => {
            json!({ "method": "card", "payment_intent_id": pi, "amount_cents": view.max_price_cents })
        }
    };
    let location = format!("/api/calls/{}", requested.call_id);
    Ok((
        StatusCode::CREATED,
        [(axum::http::header::LOCATION, location)],
        axum::Json(json!({ "call": view, "hold": hold })),
    ))
}

pub async fn trigger(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<CallBody>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(&state.pool, ratelimit::CALL, &format!("user:{}", user.id)).await?;
    let call = body.parse(&user)?;
    let requested = request::request(
        &state.store,
        &state.stripe,
        state.clock.now(),
        call,
        &user.context(),
    )
    .await?;
    created(&state, &user, requested).await
}

pub async fn schedule(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<ScheduleBody>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::CALL_SCHEDULE,
        &format!("user:{}", user.id),
    )
    .await?;
    let at = parse_scheduled_time(&body.scheduled_time, body.timezone.as_deref())?;
    let call = body.call.parse(&user)?;
    let requested = schedule::schedule(
        &state.store,
        &state.stripe,
        state.clock.now(),
        call,
        at,
        body.timezone.as_deref(),
        &user.context(),
    )
    .await?;
    created(&state, &user, requested).await
}

#[derive(Deserialize)]
pub struct ScheduledParams {
    status: Option<String>,
    sort: Option<String>,
}

pub async fn scheduled(
    State(state): State<AppState>,
    user: AuthUser,
    Query(params): Query<ScheduledParams>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::CALLS_LIST,
        &format!("user:{}", user.id),
    )
    .await?;
    let cancelled = match params.status.as_deref().unwrap_or("scheduled") {
        "scheduled" => false,
        "cancelled" | "canceled" => true,
        _ => {
            return Err(ApiError::validation(
                "status",
                "status: scheduled or cancelled",
            ))
        }
    };
    let ascending = match params.sort.as_deref().unwrap_or("time_asc") {
        "time_asc" => true,
        "time_desc" => false,
        _ => return Err(ApiError::validation("sort", "sort: time_asc or time_desc")),
    };
    let calls =
        cmb_projections::calls::scheduled(&state.pool, user.id, cancelled, ascending).await?;
    Ok(axum::Json(json!({ "calls": calls })))
}

fn parse_call_id(raw: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found("call"))
}

pub async fn cancel(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::CALL_CANCEL,
        &format!("user:{}", user.id),
    )
    .await?;
    let id = parse_call_id(&id)?;
    let cancelled = cancel::cancel(
        &state.store,
        user.id,
        id,
        state.clock.now(),
        &user.context(),
    )
    .await?;
    state.read_your_writes("calls", &cancelled.committed).await;
    let refund = match cancelled.payment {
        Some(Payment::Credits { credits }) => {
            json!({ "method": "credits", "credits_released": credits })
        }
        Some(Payment::Card { payment_intent_id }) => {
            json!({ "method": "card", "payment_intent_id": payment_intent_id, "amount_cents": cancelled.max_price_cents })
        }
        None => json!(null),
    };
    Ok(axum::Json(json!({
        "message": "the scheduled call is cancelled; its hold is released in full",
        "refund": refund,
    })))
}

#[derive(Deserialize)]
pub struct ListParams {
    page: Option<i64>,
    limit: Option<i64>,
    status: Option<String>,
    sort: Option<String>,
    #[serde(alias = "from_date")]
    from: Option<String>,
    #[serde(alias = "to_date")]
    to: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    user: AuthUser,
    Query(params): Query<ListParams>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::CALLS_LIST,
        &format!("user:{}", user.id),
    )
    .await?;
    let page = params.page.unwrap_or(1);
    if page < 1 {
        return Err(ApiError::validation("page", "page: must be 1 or more"));
    }
    let per_page = params.limit.unwrap_or(20);
    if !(1..=100).contains(&per_page) {
        return Err(ApiError::validation("limit", "limit: must be 1 to 100"));
    }
    if let Some(s) = params.status.as_deref() {
        if !STATUSES.contains(&s) {
            return Err(ApiError::validation(
                "status",
                format!("status: one of {}", STATUSES.join(", ")),
            ));
        }
    }
    let sort = match params.sort.as_deref().unwrap_or("newest") {
        "newest" => Sort::Newest,
        "oldest" => Sort::Oldest,
        "longest" => Sort::Longest,
        "costliest" => Sort::Costliest,
        _ => {
            return Err(ApiError::validation(
                "sort",
                "sort: newest, oldest, longest or costliest",
            ))
        }
    };
    let bound = |field: &'static str, raw: Option<&str>, end: bool| {
        raw.map(|r| cmb_domain::values::parse_time_bound(field, r, end))
            .transpose()
    };
    let filter = ListFilter {
        user: user.id,
        status: params.status.clone(),
        from: bound("from", params.from.as_deref(), false)?,
        to: bound("to", params.to.as_deref(), true)?,
        sort,
        page,
        per_page,
    };
    let (calls, total) = cmb_projections::calls::list(&state.pool, &filter).await?;
    Ok(axum::Json(json!({
        "calls": calls,
        "pagination": { "page": page, "limit": per_page, "total": total,
                        "total_pages": (total + per_page - 1) / per_page }
    })))
}

pub async fn get_one(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::CALLS_LIST,
        &format!("user:{}", user.id),
    )
    .await?;
    let id = parse_call_id(&id)?;
    let call = cmb_projections::calls::view(&state.pool, id, user.id)
        .await?
        .ok_or_else(|| ApiError::not_found("call"))?;
    let timeline: Vec<_> = cmb_projections::timeline::of(&state.pool, "call", &id.to_string())
        .await?
        .into_iter()
        .map(|e| {
            json!({ "sequence": e.sequence, "event_type": e.event_type,
                    "occurred_at": e.occurred_at, "actor": e.actor })
        })
        .collect();
    let transcript = crate::serve::transcripts::of(&state.pool, id).await?;
    Ok(axum::Json(
        json!({ "call": call, "timeline": timeline, "transcript": transcript }),
    ))
}

#[derive(Deserialize)]
pub struct UsageParams {
    months: Option<i64>,
}

pub async fn usage(
    State(state): State<AppState>,
    user: AuthUser,
    Query(params): Query<UsageParams>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(&state.pool, ratelimit::USAGE, &format!("user:{}", user.id)).await?;
    let months = params.months.unwrap_or(3);
    if !(1..=24).contains(&months) {
        return Err(ApiError::validation("months", "months: 1 to 24"));
    }
    let breakdown =
        cmb_projections::calls::usage(&state.pool, user.id, state.clock.now(), months).await?;
    let total = |f: fn(&cmb_projections::calls::Month) -> i64| breakdown.iter().map(f).sum::<i64>();
    let current = breakdown.first();
    Ok(axum::Json(json!({
        "months": months,
        "total": { "calls": total(|m| m.calls), "minutes": total(|m| m.minutes), "spent_cents": total(|m| m.spent_cents) },
        "current_month": current,
        "monthly": breakdown,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_times_follow_the_zone_across_daylight_saving() {
        // New York: EST (-5) in January, EDT (-4) in July.
        let winter = parse_scheduled_time("2027-01-15T09:00", Some("America/New_York")).unwrap();
        assert_eq!(winter.to_rfc3339(), "2027-01-15T14:00:00+00:00");
        let summer = parse_scheduled_time("2027-07-15T09:00", Some("America/New_York")).unwrap();
        assert_eq!(summer.to_rfc3339(), "2027-07-15T13:00:00+00:00");
        // 02:30 on 14 March 2027 does not exist in New York; 01:30 on 7 November happens twice.
        assert!(parse_scheduled_time("2027-03-14T02:30", Some("America/New_York")).is_err());
        let twice = parse_scheduled_time("2027-11-07T01:30", Some("America/New_York")).unwrap();
        assert_eq!(
            twice.to_rfc3339(),
            "2027-11-07T05:30:00+00:00",
            "the first 01:30 (EDT)"
        );
        let offset = parse_scheduled_time("2027-01-15T09:00:00+01:00", None).unwrap();
        assert_eq!(offset.to_rfc3339(), "2027-01-15T08:00:00+00:00");
        assert!(parse_scheduled_time("2027-01-15T09:00", None).is_err());
        assert!(parse_scheduled_time("2027-01-15T09:00", Some("Mars/Olympus")).is_err());
    }
}
