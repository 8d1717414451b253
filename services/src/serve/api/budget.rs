//! The user's budget: `GET`/`PUT /api/user/budget` (the rules and the checks every call
//! passes are in `usecases::budget`).

use axum::extract::State;
use axum::response::IntoResponse;
use cmb_domain::budget::BudgetSettings;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::serve::http::auth::AuthUser;
use crate::serve::http::error::ApiResult;
use crate::serve::http::extract::Json;
use crate::serve::http::state::AppState;
use crate::usecases::budget;

/// Your spending limits; a call that would pass one is refused before it is placed.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Budget {
    /// The most one call may cost, or none.
    #[schema(minimum = 0, maximum = 100_000_000)]
    max_cost_per_call_cents: Option<i64>,
    #[schema(minimum = 0, maximum = 100_000_000)]
    max_daily_spend_cents: Option<i64>,
    #[schema(minimum = 0, maximum = 100_000_000)]
    max_monthly_spend_cents: Option<i64>,
    /// Warn when spend reaches this share of a daily or monthly limit.
    #[schema(minimum = 1, maximum = 100)]
    warn_at_percent: u8,
}

/// What you spent, or hold for calls not yet settled.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Spent {
    today_cents: i64,
    this_month_cents: i64,
}

#[derive(Serialize, ToSchema)]
pub struct BudgetAnswer {
    #[schema(value_type = Budget)]
    budget: BudgetSettings,
    #[schema(value_type = Option<Spent>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    spent: Option<budget::Spent>,
}

/// Your budget and what you spent today and this month.
#[utoipa::path(get, path = "/user/budget", operation_id = "get_budget", tag = "billing", security(("bearer" = [])),
    responses((status = 200, description = "Your budget", body = BudgetAnswer)))]
pub async fn get(State(state): State<AppState>, user: AuthUser) -> ApiResult<impl IntoResponse> {
    let s = budget::settings(&state.store, user.id).await?;
    let spent = budget::spent(&state.store, user.id, state.clock.now(), None).await?;
    Ok(axum::Json(BudgetAnswer {
        budget: s,
        spent: Some(spent),
    }))
}

/// Every field optional; `null` removes a limit.
#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"max_cost_per_call_cents": 500, "max_monthly_spend_cents": 5000, "warn_at_percent": 80}))]
pub struct BudgetBody {
    #[serde(default, with = "serde_with_null")]
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 100_000_000)]
    max_cost_per_call_cents: Option<Option<i64>>,
    #[serde(default, with = "serde_with_null")]
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 100_000_000)]
    max_daily_spend_cents: Option<Option<i64>>,
    #[serde(default, with = "serde_with_null")]
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 100_000_000)]
    max_monthly_spend_cents: Option<Option<i64>>,
    #[schema(minimum = 1, maximum = 100)]
    warn_at_percent: Option<u8>,
}

/// Tells a field that is absent (keep) from one that is `null` (clear).
mod serde_with_null {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
        Option::<i64>::deserialize(d).map(Some)
    }
}

/// Set your limits.
#[utoipa::path(put, path = "/user/budget", tag = "billing", security(("bearer" = [])), request_body = BudgetBody,
    responses((status = 200, description = "Your budget", body = BudgetAnswer)))]
pub async fn put(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<BudgetBody>,
) -> ApiResult<impl IntoResponse> {
    let mut s = budget::settings(&state.store, user.id).await?;
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
    budget::set(&state.store, user.id, s, &user.context()).await?;
    Ok(axum::Json(BudgetAnswer {
        budget: s,
        spent: None,
    }))
}
