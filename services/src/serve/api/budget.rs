//! The user's budget: `GET`/`PUT /api/user/budget` (the rules and the checks every call
//! passes are in `usecases::budget`).

use axum::extract::State;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

use crate::serve::http::auth::AuthUser;
use crate::serve::http::error::ApiResult;
use crate::serve::http::extract::Json;
use crate::serve::http::ratelimit;
use crate::serve::http::state::AppState;
use crate::usecases::budget;

pub async fn get(State(state): State<AppState>, user: AuthUser) -> ApiResult<impl IntoResponse> {
    ratelimit::check(&state.pool, ratelimit::USAGE, &format!("user:{}", user.id)).await?;
    let s = budget::settings(&state.store, user.id).await?;
    let spent = budget::spent(&state.store, user.id, state.clock.now(), None).await?;
    Ok(axum::Json(json!({ "budget": s, "spent": spent })))
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
    Ok(axum::Json(json!({ "budget": s })))
}
