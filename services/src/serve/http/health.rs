//! Liveness, readiness and metrics.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;

use super::state::AppState;

/// Readiness fails when a projection is this many messages behind.
const MAX_READY_LAG: u64 = 10_000;

/// The process is up.
pub async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

/// Postgres and NATS answer, and the read models are not far behind.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let postgres = sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(&state.pool)
        .await
        .is_ok();
    let nats = state.nats.connection_state() == async_nats::connection::State::Connected
        && state
            .js
            .get_stream(&state.config.stream.stream)
            .await
            .is_ok();
    let lag = state.projection_lag.read().expect("lag board").clone();
    // Not a readiness condition (publication does not wait for it), but an operator's clue.
    let oldest_transaction = crate::backbone::outbox::oldest_transaction(&state.pool)
        .await
        .ok()
        .flatten();
    // Events set aside per consumer: not a readiness condition, but someone must look.
    let dead_letters = crate::backbone::deadletter::open_counts(&state.pool)
        .await
        .unwrap_or_default();
    let lag_ok = lag.values().all(|&l| l <= MAX_READY_LAG);
    let ready = postgres && nats && lag_ok;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(json!({
            "status": if ready { "ready" } else { "not_ready" },
            "checks": {
                "postgres": if postgres { "ok" } else { "down" },
                "nats": if nats { "ok" } else { "down" },
                "projection_lag": lag,
                "oldest_transaction": oldest_transaction,
                "dead_letters": dead_letters,
            }
        })),
    )
}

/// Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    // Sets `cmb_oldest_transaction_age_seconds`.
    let _ = crate::backbone::outbox::oldest_transaction(&state.pool).await;
    let _ = crate::backbone::deadletter::open_counts(&state.pool).await;
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
