//! Calls: trigger now, schedule for later, cancel a scheduled call, history with timelines,
//! and usage. Every call holds its maximum price before it exists; the dialer, the scheduler
//! and the settlement worker take it from there, through the stream.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, TimeZone, Utc};
use cmb_domain::call::{
    Call, CallCommand, CallError, CallRequest, Payment, DEFAULT_MINUTES, MAX_MINUTES, MIN_MINUTES,
};
use cmb_domain::pricing::{credits_for, PriceTable, Pricing, PRICING_ID};
use cmb_domain::user::User;
use cmb_domain::values::PhoneNumber;
use cmb_domain::wallet::{Wallet, WalletCommand, WalletError};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

use super::personas::accessible;
use super::{settle, store_error};
use crate::serve::http::auth::AuthUser;
use crate::serve::http::error::{ApiError, ApiResult};
use crate::serve::http::extract::{Json, Query};
use crate::serve::http::ratelimit;
use crate::serve::http::AppState;

/// A scheduled call is at least this far ahead, and can be cancelled until this long before.
pub const MIN_NOTICE_MINUTES: i64 = 5;
pub const MAX_AHEAD_DAYS: i64 = 30;
pub const MAX_SCHEDULED: i64 = 50;

/// A call as the front end shows it.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct CallView {
    pub id: Uuid,
    pub persona_id: String,
    pub persona_name: String,
    pub phone_number: String,
    pub status: String,
    pub duration_minutes: i32,
    pub max_price_cents: i64,
    pub payment_method: String,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub timezone: Option<String>,
    pub call_sid: Option<String>,
    pub answered_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub duration_secs: i32,
    pub billed_minutes: i32,
    /// What the call costs the user.
    pub cost_cents: i64,
    pub charged_cents: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const CALL_COLUMNS: &str = "id, persona_id, persona_name, phone AS phone_number, status,
    max_minutes AS duration_minutes, max_price_cents, payment_method, scheduled_for, timezone,
    call_sid, answered_at, ended_at, duration_secs, billed_minutes, price_cents AS cost_cents,
    charged_cents, created_at, updated_at";

async fn call_view(pool: &PgPool, id: Uuid, user: Uuid) -> Result<Option<CallView>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {CALL_COLUMNS} FROM rm_calls WHERE id = $1 AND user_id = $2"
    ))
    .bind(id)
    .bind(user)
    .fetch_optional(pool)
    .await
}

fn call_rejected(e: CallError) -> ApiError {
    match e {
        CallError::NotFound => ApiError::not_found("call"),
        CallError::NotOwner => ApiError::forbidden("this call is someone else's"),
        CallError::TooLate(_) => ApiError::new(StatusCode::BAD_REQUEST, "too_late", e.to_string()),
        CallError::NotScheduled => {
            ApiError::new(StatusCode::BAD_REQUEST, "not_scheduled", e.to_string())
        }
        other => ApiError::conflict("call_conflict", other.to_string()),
    }
}

/// The price table in force now.
pub async fn current_prices(state: &AppState) -> ApiResult<PriceTable> {
    let (pricing, _) = state
        .store
        .load::<Pricing>(PRICING_ID)
        .await
        .map_err(|e| store_error(e, ApiError::internal))?;
    Ok(pricing.at(state.clock.now()))
}

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

struct Requested {
    call_id: Uuid,
    hold: Hold,
}

enum Hold {
    Credits(i64),
    Card(String),
}

async fn release_hold(state: &AppState, user: &AuthUser, call_id: Uuid, hold: &Hold) {
    match hold {
        Hold::Card(pi) => {
            // The call never existed: give the money back at once.
            if let Err(e) = state
                .stripe
                .cancel_payment_intent(pi, &format!("release-{call_id}"))
                .await
            {
                tracing::error!(call = %call_id, error = %e, "could not cancel a payment intent");
            }
        }
        Hold::Credits(_) => {
            let release = WalletCommand::Release {
                hold_id: call_id.to_string(),
            };
            if let Err(e) = state
                .store
                .execute::<Wallet>(&user.id.to_string(), release, &user.context())
                .await
            {
                tracing::error!(call = %call_id, error = %e, "could not release a hold");
            }
        }
    }
}

async fn release_active(pool: &PgPool, call_id: Uuid) {
    if let Err(e) = sqlx::query("DELETE FROM active_calls WHERE call_id = $1")
        .bind(call_id)
        .execute(pool)
        .await
    {
        tracing::error!(call = %call_id, error = %e, "could not release the active-call claim");
    }
}

/// Validates, holds the maximum price, and requests the call. `scheduled` is the UTC time and
/// zone of a scheduled call.
async fn request(
    state: &AppState,
    user: &AuthUser,
    body: CallBody,
    scheduled: Option<(DateTime<Utc>, Option<String>)>,
) -> ApiResult<Requested> {
    let minutes = body.duration.unwrap_or(DEFAULT_MINUTES);
    if !(MIN_MINUTES..=MAX_MINUTES).contains(&minutes) {
        return Err(ApiError::validation(
            "duration",
            format!("duration: {MIN_MINUTES} to {MAX_MINUTES} minutes"),
        ));
    }
    let phone = match body.phone_number.as_deref() {
        Some(p) => PhoneNumber::parse("phone_number", p)?,
        None => {
            let (me, _) = state
                .store
                .load::<User>(&user.id.to_string())
                .await
                .map_err(|e| store_error(e, ApiError::internal))?;
            me.phone
                .ok_or_else(|| ApiError::unauthorized("no such account"))?
        }
    };
    let persona = accessible(state, body.persona_id.trim(), user.id).await?;
    let prices = current_prices(state).await?;
    let max_price = prices.max_price(minutes);
    super::budget::check(state, user.id, max_price.0).await?;
    let payment = match (&body.payment_intent_id, body.use_credits) {
        (Some(_), true) => {
            return Err(ApiError::validation(
                "payment_intent_id",
                "pay with either a payment_intent_id or use_credits, not both",
            ))
        }
        (None, false) => {
            return Err(ApiError::validation(
                "payment_intent_id",
                "payment_intent_id: required, or pay with credits (use_credits: true)",
            ))
        }
        (None, true) => Payment::Credits {
            credits: credits_for(max_price),
        },
        (Some(pi), false) => {
            let pi = pi.trim().to_string();
            // The intent must be ours, authorised, and cover the call's maximum price.
            let intent = state
                .stripe
                .retrieve_payment_intent(&pi)
                .await
                .map_err(|e| match e {
                    cmb_providers::stripe::StripeError::InvalidRequest { .. } => ApiError::new(
                        StatusCode::PAYMENT_REQUIRED,
                        "payment_intent_invalid",
                        "no such payment intent",
                    )
                    .with_field("payment_intent_id"),
                    other => super::billing::stripe_error(other),
                })?;
            if intent.status != "requires_capture" || intent.amount_capturable < max_price.0 {
                return Err(ApiError::new(
                    StatusCode::PAYMENT_REQUIRED,
                    "payment_intent_insufficient",
                    format!(
                        "the payment intent is {} with {} cents capturable; the call can cost up to {} cents",
                        intent.status, intent.amount_capturable, max_price.0
                    ),
                )
                .with_field("payment_intent_id"));
            }
            Payment::Card {
                payment_intent_id: pi,
            }
        }
    };

    let call_id = Uuid::now_v7();
    if scheduled.is_none() {
        let claimed = sqlx::query(
            "INSERT INTO active_calls (user_id, call_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(user.id)
        .bind(call_id)
        .execute(&state.pool)
        .await?
        .rows_affected();
        if claimed == 0 {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "call_in_progress",
                "you already have a call in progress; one at a time",
            ));
        }
    }
    let hold = match &payment {
        Payment::Credits { credits } => {
            let reserve = WalletCommand::Reserve {
                hold_id: call_id.to_string(),
                credits: *credits,
            };
            let reserved = state
                .store
                .execute::<Wallet>(&user.id.to_string(), reserve, &user.context())
                .await;
            if let Err(e) = reserved {
                release_active(&state.pool, call_id).await;
                return Err(store_error(e, |e| {
                    match e {
                    WalletError::Insufficient { needed, available } => ApiError::new(
                        StatusCode::PAYMENT_REQUIRED,
                        "insufficient_credits",
                        format!(
                            "this call can cost up to {max_price} ({needed} credits); you have {available} credits available"
                        ),
                    ),
                    other => ApiError::internal(other),
                }
                }));
            }
            Hold::Credits(*credits)
        }
        Payment::Card { payment_intent_id } => {
            let used = super::billing::record(
                state,
                user,
                cmb_domain::billing::BillingCommand::UseAuthorization {
                    payment_intent_id: payment_intent_id.clone(),
                    call_id: call_id.to_string(),
                    needed_cents: max_price.0,
                },
            )
            .await;
            if let Err(e) = used {
                release_active(&state.pool, call_id).await;
                return Err(e);
            }
            Hold::Card(payment_intent_id.clone())
        }
    };
    let (scheduled_for, timezone) = match scheduled {
        Some((at, tz)) => (Some(at), tz),
        None => (None, None),
    };
    let command = CallCommand::Request(CallRequest {
        user_id: user.id,
        persona_id: body.persona_id.trim().to_string(),
        persona_name: persona.name.clone(),
        phone,
        max_minutes: minutes,
        payment,
        prices,
        scheduled_for,
        timezone,
    });
    match state
        .store
        .execute::<Call>(&call_id.to_string(), command, &user.context())
        .await
    {
        Ok(committed) => {
            settle(state, "calls", &committed).await;
            Ok(Requested { call_id, hold })
        }
        Err(e) => {
            release_hold(state, user, call_id, &hold).await;
            release_active(&state.pool, call_id).await;
            Err(store_error(e, call_rejected))
        }
    }
}

async fn answer(
    state: &AppState,
    user: &AuthUser,
    requested: Requested,
) -> ApiResult<impl IntoResponse> {
    let view = call_view(&state.pool, requested.call_id, user.id)
        .await?
        .ok_or_else(|| ApiError::unavailable("the call is being set up; look it up in a moment"))?;
    let hold = match requested.hold {
        Hold::Credits(credits) => json!({ "method": "credits", "credits": credits }),
        Hold::Card(pi) => {
            json!({ "method": "card", "payment_intent_id": pi, "amount_cents": view.max_price_cents })
        }
    };
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "call": view, "hold": hold })),
    ))
}

pub async fn trigger(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<CallBody>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(&state.pool, ratelimit::CALL, &format!("user:{}", user.id)).await?;
    let requested = request(&state, &user, body, None).await?;
    answer(&state, &user, requested).await
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
    let now = state.clock.now();
    if at < now + Duration::minutes(MIN_NOTICE_MINUTES) {
        return Err(ApiError::validation(
            "scheduled_time",
            format!("scheduled_time: at least {MIN_NOTICE_MINUTES} minutes from now"),
        ));
    }
    if at > now + Duration::days(MAX_AHEAD_DAYS) {
        return Err(ApiError::validation(
            "scheduled_time",
            format!("scheduled_time: at most {MAX_AHEAD_DAYS} days from now"),
        ));
    }
    let timezone = match body.timezone.as_deref() {
        Some(tz) => Some(
            tz.parse::<chrono_tz::Tz>()
                .map_err(|_| ApiError::validation("timezone", "timezone: must be an IANA zone"))?
                .name()
                .to_string(),
        ),
        None => None,
    };
    // At most 50 waiting calls; the advisory lock makes count-then-request atomic per user.
    let mut tx = state.pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('schedule:' || $1, 0))")
        .bind(user.id.to_string())
        .execute(&mut *tx)
        .await?;
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM rm_calls WHERE user_id = $1 AND status = 'scheduled'",
    )
    .bind(user.id)
    .fetch_one(&mut *tx)
    .await?;
    if waiting >= MAX_SCHEDULED {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_scheduled",
            format!("you have {MAX_SCHEDULED} scheduled calls, the most allowed"),
        ));
    }
    let requested = request(&state, &user, body.call, Some((at, timezone))).await?;
    tx.commit().await?;
    answer(&state, &user, requested).await
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
    let status = match params.status.as_deref().unwrap_or("scheduled") {
        "scheduled" => "scheduled",
        "cancelled" | "canceled" => "canceled",
        _ => {
            return Err(ApiError::validation(
                "status",
                "status: scheduled or cancelled",
            ))
        }
    };
    let order = match params.sort.as_deref().unwrap_or("time_asc") {
        "time_asc" => "ASC",
        "time_desc" => "DESC",
        _ => return Err(ApiError::validation("sort", "sort: time_asc or time_desc")),
    };
    let calls: Vec<CallView> = sqlx::query_as(&format!(
        "SELECT {CALL_COLUMNS} FROM rm_calls
          WHERE user_id = $1 AND status = $2 AND scheduled_for IS NOT NULL
          ORDER BY scheduled_for {order}, id"
    ))
    .bind(user.id)
    .bind(status)
    .fetch_all(&state.pool)
    .await?;
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
    let command = CallCommand::Cancel {
        by: user.id,
        at: state.clock.now(),
        min_notice: Duration::minutes(MIN_NOTICE_MINUTES),
    };
    let committed = state
        .store
        .execute::<Call>(&id.to_string(), command, &user.context())
        .await
        .map_err(|e| store_error(e, call_rejected))?;
    settle(&state, "calls", &committed).await;
    let (call, _) = state
        .store
        .load::<Call>(&id.to_string())
        .await
        .map_err(|e| store_error(e, call_rejected))?;
    let refund = match call.payment {
        Some(Payment::Credits { credits }) => {
            json!({ "method": "credits", "credits_released": credits })
        }
        Some(Payment::Card { payment_intent_id }) => {
            json!({ "method": "card", "payment_intent_id": payment_intent_id, "amount_cents": call.max_price_cents })
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

/// A date (`2026-11-29`, the whole day in UTC) or a time with an offset.
fn parse_bound(field: &'static str, raw: &str, end: bool) -> ApiResult<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Ok(t.with_timezone(&Utc));
    }
    let day = NaiveDate::parse_from_str(raw, "%Y-%m-%d").map_err(|_| {
        ApiError::validation(
            field,
            format!("{field}: a date (YYYY-MM-DD) or an ISO 8601 time"),
        )
    })?;
    let day = if end {
        day.succ_opt().unwrap_or(day)
    } else {
        day
    };
    Ok(Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).expect("midnight")))
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
    const STATUSES: &[&str] = &[
        "scheduled",
        "initiated",
        "ringing",
        "in-progress",
        "completed",
        "busy",
        "no-answer",
        "failed",
        "canceled",
    ];
    if let Some(s) = params.status.as_deref() {
        if !STATUSES.contains(&s) {
            return Err(ApiError::validation(
                "status",
                format!("status: one of {}", STATUSES.join(", ")),
            ));
        }
    }
    let order = match params.sort.as_deref().unwrap_or("newest") {
        "newest" => "created_at DESC, id DESC",
        "oldest" => "created_at ASC, id ASC",
        "longest" => "duration_secs DESC, created_at DESC",
        "costliest" => "price_cents DESC, created_at DESC",
        _ => {
            return Err(ApiError::validation(
                "sort",
                "sort: newest, oldest, longest or costliest",
            ))
        }
    };
    let from = params
        .from
        .as_deref()
        .map(|f| parse_bound("from", f, false))
        .transpose()?;
    let to = params
        .to
        .as_deref()
        .map(|t| parse_bound("to", t, true))
        .transpose()?;
    let build = |select: &str| {
        let mut q: QueryBuilder<Postgres> = QueryBuilder::new(select);
        q.push(" FROM rm_calls WHERE user_id = ").push_bind(user.id);
        if let Some(s) = params.status.clone() {
            q.push(" AND status = ").push_bind(s);
        }
        if let Some(f) = from {
            q.push(" AND created_at >= ").push_bind(f);
        }
        if let Some(t) = to {
            q.push(" AND created_at < ").push_bind(t);
        }
        q
    };
    let total: i64 = build("SELECT count(*)")
        .build_query_scalar()
        .fetch_one(&state.pool)
        .await?;
    let mut rows = build(&format!("SELECT {CALL_COLUMNS}"));
    rows.push(format!(
        " ORDER BY {order} LIMIT {per_page} OFFSET {}",
        (page - 1) * per_page
    ));
    let calls: Vec<CallView> = rows.build_query_as().fetch_all(&state.pool).await?;
    Ok(axum::Json(json!({
        "calls": calls,
        "pagination": { "page": page, "limit": per_page, "total": total,
                        "total_pages": (total + per_page - 1) / per_page }
    })))
}

#[derive(Serialize, sqlx::FromRow)]
struct TranscriptLine {
    speaker: String,
    text: String,
    cut_off: bool,
    at: DateTime<Utc>,
}

#[derive(Serialize, sqlx::FromRow)]
struct TimelineEntry {
    sequence: i64,
    event_type: String,
    occurred_at: DateTime<Utc>,
    actor: String,
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
    let call = call_view(&state.pool, id, user.id)
        .await?
        .ok_or_else(|| ApiError::not_found("call"))?;
    let timeline: Vec<TimelineEntry> = sqlx::query_as(
        "SELECT sequence, event_type, occurred_at, actor FROM rm_timeline
          WHERE aggregate_type = 'call' AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(id.to_string())
    .fetch_all(&state.pool)
    .await?;
    let transcript: Vec<TranscriptLine> = sqlx::query_as(
        "SELECT speaker, text, cut_off, at FROM call_transcripts WHERE call_id = $1 ORDER BY seq",
    )
    .bind(id)
    .fetch_all(&state.pool)
    .await?;
    Ok(axum::Json(
        json!({ "call": call, "timeline": timeline, "transcript": transcript }),
    ))
}

#[derive(Deserialize)]
pub struct UsageParams {
    months: Option<i64>,
}

#[derive(Serialize, sqlx::FromRow)]
struct Month {
    month: String,
    calls: i64,
    minutes: i64,
    spent_cents: i64,
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
    let now = state.clock.now();
    // Calls that were answered or ended, by the month they were made (UTC).
    let breakdown: Vec<Month> = sqlx::query_as(
        "WITH months AS (
             SELECT generate_series(date_trunc('month', $2::timestamptz) - make_interval(months => ($3 - 1)::int),
                                    date_trunc('month', $2::timestamptz), interval '1 month') AS m)
         SELECT to_char(m, 'YYYY-MM') AS month,
                count(c.id) AS calls,
                COALESCE(sum(c.billed_minutes), 0)::bigint AS minutes,
                COALESCE(sum(COALESCE(c.charged_cents, c.price_cents)), 0)::bigint AS spent_cents
           FROM months
           LEFT JOIN rm_calls c ON c.user_id = $1 AND c.status = 'completed'
                AND c.created_at >= m AND c.created_at < m + interval '1 month'
          GROUP BY m ORDER BY m DESC",
    )
    .bind(user.id)
    .bind(now)
    .bind(months)
    .fetch_all(&state.pool)
    .await?;
    let total = |f: fn(&Month) -> i64| breakdown.iter().map(f).sum::<i64>();
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
