//! The user's budget: `GET`/`PUT /api/user/budget`, and the check every call passes before
//! its hold. Spend counts completed calls at their price and open calls (scheduled or under
//! way) at their held maximum, by the UTC day and month they were requested.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::{DateTime, Datelike, TimeZone, Utc};
use cmb_domain::budget::{Budget, BudgetCommand, BudgetSettings};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::store_error;
use crate::serve::http::auth::AuthUser;
use crate::serve::http::error::{ApiError, ApiResult};
use crate::serve::http::extract::Json;
use crate::serve::http::ratelimit;
use crate::serve::http::AppState;

pub async fn settings(state: &AppState, user: Uuid) -> ApiResult<BudgetSettings> {
    let (budget, _) = state
        .store
        .load::<Budget>(&user.to_string())
        .await
        .map_err(|e| store_error(e, |e| match e {}))?;
    Ok(budget.settings())
}

pub fn day_start(now: DateTime<Utc>) -> DateTime<Utc> {
    Utc.from_utc_datetime(&now.date_naive().and_hms_opt(0, 0, 0).expect("midnight"))
}

pub fn month_start(now: DateTime<Utc>) -> DateTime<Utc> {
    let first = now
        .date_naive()
        .with_day(1)
        .expect("the first of the month");
    Utc.from_utc_datetime(&first.and_hms_opt(0, 0, 0).expect("midnight"))
}

/// What `user` spent (or holds) since `since`, leaving out call `except`.
pub async fn spent_since(
    pool: &PgPool,
    user: Uuid,
    since: DateTime<Utc>,
    except: Option<Uuid>,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COALESCE(sum(CASE WHEN status IN ('scheduled', 'initiated', 'ringing', 'in-progress')
                                  THEN max_price_cents ELSE price_cents END), 0)::bigint
           FROM rm_calls WHERE user_id = $1 AND created_at >= $2 AND id IS DISTINCT FROM $3",
    )
    .bind(user)
    .bind(since)
    .bind(except)
    .fetch_one(pool)
    .await
}

/// Refuses (402, naming the limit) a call of at most `max_price` that would break a limit.
pub async fn check(state: &AppState, user: Uuid, max_price: i64) -> ApiResult<()> {
    let settings = settings(state, user).await?;
    if settings.max_cost_per_call_cents.is_none()
        && settings.max_daily_spend_cents.is_none()
        && settings.max_monthly_spend_cents.is_none()
    {
        return Ok(());
    }
    let now = state.clock.now();
    let today = spent_since(&state.pool, user, day_start(now), None).await?;
    let month = spent_since(&state.pool, user, month_start(now), None).await?;
    if let Some(b) = settings.refusal(max_price, today, month) {
        return Err(ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "budget_exceeded",
            format!(
                "this call could cost up to {max_price} cents, which would take you to {} cents against your {} of {} cents",
                b.would_be_cents, b.limit, b.limit_cents
            ),
        )
        .with_field(b.limit));
    }
    Ok(())
}

pub async fn get(State(state): State<AppState>, user: AuthUser) -> ApiResult<impl IntoResponse> {
    ratelimit::check(&state.pool, ratelimit::USAGE, &format!("user:{}", user.id)).await?;
    let s = settings(&state, user.id).await?;
    let now = state.clock.now();
    let today = spent_since(&state.pool, user.id, day_start(now), None).await?;
    let month = spent_since(&state.pool, user.id, month_start(now), None).await?;
    Ok(axum::Json(json!({
        "budget": s,
        "spent": { "today_cents": today, "this_month_cents": month },
    })))
}

/// Every field optional; `null` removes a limit.
#[derive(Deserialize)]
pub struct BudgetBody {
    #[serde(default, with = "serde_with_null")]
    max_cost_per_call_cents: Option<Option<i64>>,
    #[serde(default, with = "serde_with_null")]
    max_daily_spend_cents: Option<Option<i64>>,
    #[serde(default, with = "serde_with_null")]
    max_monthly_spend_cents: Option<Option<i64>>,
    warn_at_percent: Option<u8>,
}

/// Tells a field that is absent (keep) from one that is `null` (clear).
mod serde_with_null {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
        Option::<i64>::deserialize(d).map(Some)
    }
}

pub async fn put(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<BudgetBody>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::PROFILE,
        &format!("user:{}", user.id),
    )
    .await?;
    let mut s = settings(&state, user.id).await?;
    if let Some(v) = body.max_cost_per_call_cents {
        s.max_cost_per_call_cents = v;
    }
    if let Some(v) = body.max_daily_spend_cents {
        s.max_daily_spend_cents = v;
    }
    if let Some(v) = body.max_monthly_spend_cents {
        s.max_monthly_spend_cents = v;
    }
    if let Some(v) = body.warn_at_percent {
        s.warn_at_percent = v;
    }
    let s = s.validate()?;
    state
        .store
        .execute::<Budget>(&user.id.to_string(), BudgetCommand::Set(s), &user.context())
        .await
        .map_err(|e| store_error(e, |e| match e {}))?;
    Ok(axum::Json(json!({ "budget": s })))
}
