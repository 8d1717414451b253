//! Back-pressure for the whole API: at most `HTTP_MAX_CONCURRENT_REQUESTS` requests handled at
//! once per instance (beyond, 503 `overloaded` at once with `Retry-After`), and a deadline for
//! every request (`REQUEST_TIMEOUT_MS`, 15 s: then 503 `timeout`).
//!
//! A request past its deadline is answered, but its handler is not dropped midway: it runs on
//! in its own task to the end (a command half-done by cancellation would leave claims or holds
//! behind), still holding its place under the cap, so the server never takes on more work
//! than the cap however slow it gets. A WebSocket holds its place only until it is upgraded.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::serve::http::error::ApiError;

/// The cap and the deadline, shared by every request.
#[derive(Clone)]
pub struct Guard {
    slots: Arc<Semaphore>,
    deadline: Duration,
}

impl Guard {
    pub fn new(max_concurrent: usize, deadline: Duration) -> Guard {
        Guard {
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            deadline,
        }
    }

    /// The middleware: a place under the cap, then the handler in a task of its own, raced
    /// against the deadline.
    pub async fn run(self, req: Request, next: Next) -> Response {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            metrics::counter!("cmb_http_shed_total", "why" => "overloaded").increment(1);
            return ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "the server is handling as many requests as it takes at once; try again in a moment",
                )
            }
            .into_response();
        };
        let handler = tokio::spawn(
            async move {
                let response = next.run(req).await;
                drop(slot);
                response
            }
            .instrument(tracing::Span::current()),
        );
        match tokio::time::timeout(self.deadline, handler).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => ApiError::internal(format!("a handler panicked: {e}")).into_response(),
            Err(_) => {
                metrics::counter!("cmb_http_shed_total", "why" => "timeout").increment(1);
                tracing::warn!(
                    deadline_ms = self.deadline.as_millis() as u64,
                    "request over its deadline"
                );
                ApiError {
                    retry_after: Some(1),
                    ..ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "timeout",
                        format!(
                            "no answer within {} s; it may still complete: check before repeating a write",
                            self.deadline.as_secs_f32()
                        ),
                    )
                }
                .into_response()
            }
        }
    }
}
