//! Usage: your completed calls, minutes and spend by month (`GET /api/user/usage`), from the
//! calls read model.

use axum::extract::State;
use axum::response::IntoResponse;
use cmb_projections::calls::Month;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::serve::http::auth::AuthUser;
use crate::serve::http::error::{ApiError, ApiResult};
use crate::serve::http::extract::Query;
use crate::serve::http::state::AppState;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageParams {
    /// How many months back, 1 to 24 (default 3).
    #[param(minimum = 1, maximum = 24)]
    months: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct Totals {
    calls: i64,
    minutes: i64,
    spent_cents: i64,
}

#[derive(Serialize, ToSchema)]
pub struct Usage {
    months: i64,
    total: Totals,
    current_month: Option<Month>,
    /// Newest first; months without calls included.
    monthly: Vec<Month>,
}

/// Your completed calls, minutes and spend by month.
#[utoipa::path(get, path = "/user/usage", tag = "calls", security(("bearer" = [])), params(UsageParams),
    responses((status = 200, description = "Your usage", body = Usage)))]
pub async fn usage(
    State(state): State<AppState>,
    user: AuthUser,
    Query(params): Query<UsageParams>,
) -> ApiResult<impl IntoResponse> {
    let months = params.months.unwrap_or(3);
    if !(1..=24).contains(&months) {
        return Err(ApiError::validation("months", "months: 1 to 24"));
    }
    let breakdown =
        cmb_projections::calls::usage(&state.pool, user.id, state.clock.now(), months).await?;
    let total = |f: fn(&cmb_projections::calls::Month) -> i64| breakdown.iter().map(f).sum::<i64>();
    Ok(axum::Json(Usage {
        months,
        total: Totals {
            calls: total(|m| m.calls),
            minutes: total(|m| m.minutes),
            spent_cents: total(|m| m.spent_cents),
        },
        current_month: breakdown.first().cloned(),
        monthly: breakdown,
    }))
}
