//! The HTTP layer: the router with its middleware (request ids, tracing, body limit, the
//! concurrency cap and deadline of `guard`), the state handlers share, one error type,
//! extractors, authentication, client addresses and rate limits.
//!
//! Every route is registered through `utoipa_axum` (`routes`), so the router and the OpenAPI
//! document are built together; `tests` checks that neither has what the other lacks.

pub mod answer;
pub mod auth;
pub mod client_ip;
pub mod error;
pub mod extract;
pub mod guard;
mod health;
pub mod mcp;
pub mod ratelimit;
pub mod signed_in;
pub mod state;
#[cfg(test)]
mod tests;

use axum::extract::DefaultBodyLimit;
use std::sync::Arc;

use axum::http::{HeaderName, Request, StatusCode};
use axum::{Extension, Router};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use error::ApiError;
use state::AppState;

/// Bodies larger than this are refused with 413.
pub const BODY_LIMIT: usize = 1024 * 1024;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Counts answers by class (`cmb_http_responses_total{class="5xx"}`: what a load test and an
/// alert watch).
async fn count_response(response: axum::response::Response) -> axum::response::Response {
    let class = match response.status().as_u16() {
        500..=599 => "5xx",
        400..=499 => "4xx",
        _ => "ok",
    };
    metrics::counter!("cmb_http_responses_total", "class" => class).increment(1);
    response
}

/// Every route with its description.
pub fn routes() -> OpenApiRouter<AppState> {
    use crate::serve::api::openapi;
    OpenApiRouter::new()
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(health::metrics))
        .routes(routes!(openapi::docs_page))
        .nest(
            "/api",
            crate::serve::api::routes().routes(routes!(openapi::document)),
        )
}

/// The OpenAPI document of every route.
pub fn document() -> serde_json::Value {
    crate::serve::api::openapi::finish(routes().into_openapi())
}

pub fn router(state: AppState) -> Router {
    let (routes, doc) = routes().split_for_parts();
    let guard = guard::Guard::new(
        state.config.limits.max_concurrent_requests,
        state.config.limits.request_timeout,
    );
    let doc =
        crate::serve::api::openapi::Document(Arc::new(crate::serve::api::openapi::finish(doc)));
    routes
        .merge(mcp::routes(&state))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this endpoint")
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(move |req, next| {
            guard.clone().run(req, next)
        }))
        .layer(axum::middleware::map_response(count_response))
        .layer(Extension(doc))
        .layer(Extension(state.clone()))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                let request_id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id)
            }),
        )
        .layer(PropagateRequestIdLayer::new(X_REQUEST_ID.clone()))
        .layer(SetRequestIdLayer::new(X_REQUEST_ID.clone(), MakeRequestUuid))
        .with_state(state)
}
