//! Calls: trigger now, schedule for later, cancel a scheduled call, history with timelines
//! (usage by month is `super::usage`). The request saga lives in `usecases::calls`; the dialer, the scheduler and the
//! settlement worker take it from there, through the stream.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use cmb_domain::call::Payment;
use cmb_domain::values::{Invalid, PhoneNumber};
use cmb_domain::CallId;
use cmb_projections::calls::{CallView, ListFilter, PaymentView, Sort, UsageLine, STATUSES};
use cmb_projections::timeline::Entry;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::serve::http::answer::Pagination;
use crate::serve::http::auth::AuthUser;
use crate::serve::http::error::{ApiError, ApiResult, ErrorBody};
use crate::serve::http::extract::{Json, Query};
use crate::serve::http::state::AppState;
use crate::serve::transcripts::SavedLine;
use crate::usecases::calls::request::{Hold, PayWith, Request, Requested};
use crate::usecases::calls::{cancel, request, schedule};

/// Pay with a `payment_intent_id` (a hold from `POST /api/user/create-payment-intent`) or
/// with credits (`use_credits: true`).
#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"phone_number": "+14155550123", "persona_id": "brad_001", "payment_intent_id": "pi_3Nxyz"}))]
pub struct CallBody {
    /// E.164 (also accepted as `phone`); your account's number when left out.
    #[serde(alias = "phone")]
    #[schema(pattern = r"^\+[1-9][0-9]{7,14}$")]
    phone_number: Option<String>,
    /// A persona you can see.
    #[schema(min_length = 1, max_length = 100)]
    persona_id: String,
    #[schema(pattern = "^pi_")]
    payment_intent_id: Option<String>,
    #[serde(default)]
    use_credits: bool,
    /// The most the call may last, in minutes (also accepted as `duration_minutes`). Left out:
    /// the minutes the payment intent was created for, or 5 with credits. A duration the hold
    /// does not cover is a 402 that says how much is missing.
    #[serde(alias = "duration_minutes", alias = "max_duration_minutes")]
    #[schema(minimum = 1, maximum = 30)]
    duration: Option<u32>,
}

impl CallBody {
    fn parse(self, user: &AuthUser) -> Result<Request, Invalid> {
        let persona_chars = self.persona_id.chars().count();
        if !(1..=100).contains(&persona_chars) {
            return Err(Invalid::new("persona_id", "1 to 100 characters"));
        }
        if let Some(pi) = &self.payment_intent_id {
            if !pi.starts_with("pi_") {
                return Err(Invalid::new(
                    "payment_intent_id",
                    "a payment intent id (pi_…) from POST /api/user/create-payment-intent",
                ));
            }
        }
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
            persona_id: self.persona_id.into(),
            minutes: self.duration,
            pay_with,
            scheduled: None,
        })
    }
}

#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"persona_id": "sarah_001", "payment_intent_id": "pi_3Nxyz", "scheduled_time": "2026-12-01T09:00", "timezone": "Europe/Paris"}))]
pub struct ScheduleBody {
    #[serde(flatten)]
    call: CallBody,
    /// An ISO 8601 time with an offset, or a local time (`YYYY-MM-DDTHH:MM`) with `timezone`;
    /// at least a minute ahead, at most 30 days.
    #[schema(example = "2026-12-01T09:00:00-05:00")]
    scheduled_time: String,
    /// An IANA zone such as `Europe/Paris`.
    timezone: Option<String>,
}

/// What holds the call's maximum price until it is settled.
#[derive(Serialize, ToSchema)]
pub struct HoldView {
    /// `credits` or `card`.
    method: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    credits: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payment_intent_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    amount_cents: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct CallCreated {
    call: CallView,
    hold: HoldView,
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
        Hold::Credits(credits) => HoldView {
            method: "credits",
            credits: Some(credits),
            payment_intent_id: None,
            amount_cents: None,
        },
        Hold::Card(pi) => HoldView {
            method: "card",
            credits: None,
            payment_intent_id: Some(pi),
            amount_cents: Some(view.max_price_cents),
        },
    };
    let location = format!("/api/calls/{}", requested.call_id);
    Ok((
        StatusCode::CREATED,
        [(axum::http::header::LOCATION, location)],
        axum::Json(CallCreated { call: view, hold }),
    ))
}

/// Call me now: holds the call's maximum price, then dials.
///
/// Only destinations the service may ring (by default the United States and Canada, without
/// premium-rate, shared-cost or satellite ranges): else 400 `destination_not_allowed` naming
/// the rule. A number is rung at most `CALL_NUMBER_DAILY_LIMIT` (10) times per UTC day across
/// every user (429 `number_daily_limit`), and a user places at most `CALL_USER_DAILY_LIMIT`
/// (20) calls per UTC day, answered or not (429 `daily_call_limit`); both with `Retry-After`
/// until midnight UTC. One call at a time (429 `call_in_progress`).
#[utoipa::path(post, path = "/call", tag = "calls", security(("bearer" = [])), request_body = CallBody,
    responses(
        (status = 201, description = "Requested; the phone rings shortly", body = CallCreated),
        (status = 400, description = "Invalid input (`field` names it), or `destination_not_allowed`: the number is outside the destination policy (the message names the rule)", body = ErrorBody),
        (status = 402, description = "The payment intent is unknown or too small (the message says how much is missing), not enough credits, a budget limit, or credits owed after a refunded or disputed purchase (`debt_outstanding`)", body = ErrorBody),
        (status = 403, description = "The persona is not yours to call", body = ErrorBody),
        (status = 404, description = "No persona you can see has this id", body = ErrorBody),
    ))]
pub async fn trigger(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<CallBody>,
) -> ApiResult<impl IntoResponse> {
    let call = body.parse(&user)?;
    let requested = request::request(
        &state.store,
        &state.stripe,
        &state.config.limits.calls,
        state.clock.now(),
        call,
        &user.context(),
    )
    .await?;
    created(&state, &user, requested).await
}

/// Call me later: holds the maximum price now, dials at `scheduled_time`.
///
/// The destination policy applies now (400 `destination_not_allowed`) and again when the call
/// falls due. Then the call also counts toward its number's and its user's daily limits and
/// needs the user's one active-call slot: refused by any of them, it fails without ringing and
/// its hold is released in full.
#[utoipa::path(post, path = "/calls/schedule", tag = "calls", security(("bearer" = [])), request_body = ScheduleBody,
    responses(
        (status = 201, description = "Scheduled", body = CallCreated),
        (status = 400, description = "Invalid input (`field` names it), or `destination_not_allowed`: the number is outside the destination policy (the message names the rule)", body = ErrorBody),
        (status = 402, description = "The payment intent is unknown or too small, not enough credits, a budget limit, or credits owed after a refunded or disputed purchase (`debt_outstanding`)", body = ErrorBody),
        (status = 403, description = "The persona is not yours to call", body = ErrorBody),
        (status = 404, description = "No persona you can see has this id", body = ErrorBody),
    ))]
pub async fn schedule(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<ScheduleBody>,
) -> ApiResult<impl IntoResponse> {
    let at = parse_scheduled_time(&body.scheduled_time, body.timezone.as_deref())?;
    let call = body.call.parse(&user)?;
    let requested = schedule::schedule(
        &state.store,
        &state.stripe,
        &state.config.limits.calls,
        state.clock.now(),
        call,
        at,
        body.timezone.as_deref(),
        &user.context(),
    )
    .await?;
    created(&state, &user, requested).await
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ScheduledParams {
    /// `scheduled` (default) or `cancelled`.
    #[param(pattern = "^(scheduled|cancelled|canceled)$")]
    status: Option<String>,
    /// `time_asc` (default) or `time_desc`.
    #[param(pattern = "^(time_asc|time_desc)$")]
    sort: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ScheduledList {
    calls: Vec<CallView>,
    total: usize,
}

/// Your scheduled (or cancelled) calls, by time.
#[utoipa::path(get, path = "/calls/scheduled", tag = "calls", security(("bearer" = [])), params(ScheduledParams),
    responses((status = 200, description = "Your scheduled calls", body = ScheduledList)))]
pub async fn scheduled(
    State(state): State<AppState>,
    user: AuthUser,
    Query(params): Query<ScheduledParams>,
) -> ApiResult<impl IntoResponse> {
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
    Ok(axum::Json(ScheduledList {
        total: calls.len(),
        calls,
    }))
}

fn parse_call_id(raw: &str) -> ApiResult<CallId> {
    raw.parse().map_err(|_| ApiError::not_found("call"))
}

/// The hold given back when a scheduled call is cancelled.
#[derive(Serialize, ToSchema)]
pub struct Refund {
    /// `credits` or `card`.
    method: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    credits_released: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payment_intent_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    amount_cents: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct Cancelled {
    message: String,
    refund: Option<Refund>,
}

/// Cancel a scheduled call; its hold is released in full.
#[utoipa::path(delete, path = "/calls/schedule/{id}", tag = "calls", security(("bearer" = [])),
    params(("id" = String, Path, description = "The call's id")),
    responses(
        (status = 200, description = "Cancelled", body = Cancelled),
        (status = 400, description = "Not a scheduled call, or too late to cancel", body = ErrorBody),
        (status = 403, description = "Someone else's call", body = ErrorBody),
        (status = 404, description = "No such call", body = ErrorBody),
        (status = 409, description = "The call changed meanwhile", body = ErrorBody),
    ))]
pub async fn cancel(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
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
    let refund = cancelled.payment.map(|payment| match payment {
        Payment::Credits { credits } => Refund {
            method: "credits",
            credits_released: Some(credits),
            payment_intent_id: None,
            amount_cents: None,
        },
        Payment::Card { payment_intent_id } => Refund {
            method: "card",
            credits_released: None,
            payment_intent_id: Some(payment_intent_id),
            amount_cents: Some(cancelled.max_price.0),
        },
    });
    Ok(axum::Json(Cancelled {
        message: "the scheduled call is cancelled; its hold is released in full".into(),
        refund,
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// 1 or more (default 1).
    #[param(minimum = 1)]
    page: Option<i64>,
    /// Calls per page, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
    /// A call status: `scheduled`, `initiated`, `ringing`, `in-progress`, `completed`, …
    #[param(
        pattern = "^(scheduled|initiated|ringing|in-progress|completed|busy|no-answer|failed|canceled)$"
    )]
    status: Option<String>,
    /// `newest` (default), `oldest`, `longest` or `costliest`.
    #[param(pattern = "^(newest|oldest|longest|costliest)$")]
    sort: Option<String>,
    /// Calls made from this date or time (ISO 8601; also accepted as `from`).
    #[serde(alias = "from")]
    #[param(schema_with = date_or_time)]
    from_date: Option<String>,
    /// Calls made up to this date (inclusive) or time (also accepted as `to`).
    #[serde(alias = "to")]
    #[param(schema_with = date_or_time)]
    to_date: Option<String>,
}

/// A date (`2026-11-30`) or a time with an offset (`2026-11-30T09:00:00Z`).
fn date_or_time() -> utoipa::openapi::Schema {
    use utoipa::openapi::schema::{AnyOfBuilder, SchemaFormat, Type};
    use utoipa::openapi::{KnownFormat, ObjectBuilder};
    let with = |format| {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(format)))
    };
    AnyOfBuilder::new()
        .item(with(KnownFormat::Date))
        .item(with(KnownFormat::DateTime))
        .description(Some("A date (YYYY-MM-DD) or an RFC 3339 time"))
        .build()
        .into()
}

#[derive(Serialize, ToSchema)]
pub struct CallList {
    calls: Vec<CallView>,
    pagination: Pagination,
}

/// Your calls, a page at a time.
#[utoipa::path(get, path = "/calls", operation_id = "list_calls", tag = "calls", security(("bearer" = [])), params(ListParams),
    responses((status = 200, description = "A page of calls", body = CallList)))]
pub async fn list(
    State(state): State<AppState>,
    user: AuthUser,
    Query(params): Query<ListParams>,
) -> ApiResult<impl IntoResponse> {
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
        from: bound("from_date", params.from_date.as_deref(), false)?,
        to: bound("to_date", params.to_date.as_deref(), true)?,
        sort,
        page,
        per_page,
    };
    let (calls, total) = cmb_projections::calls::list(&state.pool, &filter).await?;
    Ok(axum::Json(CallList {
        calls,
        pagination: Pagination::new(page, per_page, total),
    }))
}

/// A call's story.
#[derive(Serialize, ToSchema)]
pub struct CallDetail {
    call: CallView,
    payment: PaymentView,
    /// What each provider did for the call (quantity and unit).
    usage: Vec<UsageLine>,
    /// Every event of the call in order, each with what it did.
    timeline: Vec<Entry>,
    transcript: Vec<SavedLine>,
}

/// One of your calls with its story: the timeline, the payment, each provider's usage, the
/// transcript.
#[utoipa::path(get, path = "/calls/{id}", operation_id = "get_call", tag = "calls", security(("bearer" = [])),
    params(("id" = String, Path, description = "The call's id")),
    responses(
        (status = 200, description = "The call", body = CallDetail),
        (status = 404, description = "None of your calls has this id", body = ErrorBody),
    ))]
pub async fn get_one(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let id = parse_call_id(&id)?;
    let call = cmb_projections::calls::view(&state.pool, id, user.id)
        .await?
        .ok_or_else(|| ApiError::not_found("call"))?;
    let timeline = cmb_projections::timeline::of(&state.pool, "call", &id.to_string()).await?;
    let usage = cmb_projections::calls::usage_lines(&state.pool, id, user.id).await?;
    let transcript = crate::serve::transcripts::of(&state.pool, id).await?;
    Ok(axum::Json(CallDetail {
        payment: call.payment(),
        call,
        usage,
        timeline,
        transcript,
    }))
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
