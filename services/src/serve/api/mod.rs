//! The `/api` routes the front end uses. Writes are commands through the event store; reads
//! come from read models, after waiting (briefly) for the caller's own write to reach them.

pub mod accounts;
pub mod billing;
pub mod budget;
pub mod calls;
pub mod contacts;
pub mod memory;
pub mod openapi;
pub mod personas;
pub mod twilio;

use axum::routing::{delete, get, post, put};
use axum::Router;

use crate::backbone::store::{CommandError, Committed};
use crate::serve::http::error::ApiError;
use crate::serve::http::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/auth/register", post(accounts::register))
        .route("/auth/login", post(accounts::login))
        .route("/auth/logout", post(accounts::logout))
        .route("/auth/me", get(accounts::me))
        .route("/user/profile", put(accounts::update_profile))
        .route("/personas", get(personas::list).post(personas::create))
        .route(
            "/personas/{id}",
            get(personas::get_one)
                .put(personas::update)
                .delete(personas::remove),
        )
        .route(
            "/personas/{id}/customization",
            get(personas::get_customization).put(personas::customize),
        )
        .route(
            "/personas/{id}/memory",
            get(memory::get).delete(memory::clear),
        )
        .route("/personas/{id}/memory/{item_id}", delete(memory::forget))
        .route("/contacts", get(contacts::list).post(contacts::add))
        .route("/contacts/{persona_id}", delete(contacts::remove))
        .route("/call", post(calls::trigger))
        .route("/calls", get(calls::list))
        .route("/calls/schedule", post(calls::schedule))
        .route("/calls/scheduled", get(calls::scheduled))
        .route("/calls/schedule/{id}", delete(calls::cancel))
        .route("/calls/{id}", get(calls::get_one))
        .route("/user/usage", get(calls::usage))
        .route("/user/budget", get(budget::get).put(budget::put))
        .route("/user/billing", get(billing::billing))
        .route("/user/payment-method", post(billing::attach))
        .route("/user/payment-method/{id}", delete(billing::detach))
        .route(
            "/user/payment-method/{id}/default",
            put(billing::make_default),
        )
        .route(
            "/user/create-payment-intent",
            post(billing::create_payment_intent),
        )
        .route("/user/credits", post(billing::buy_credits))
        .route("/stripe/webhook", post(billing::webhook))
        .route("/twilio/callback", post(twilio::status_callback))
        .route("/twilio/answer", post(twilio::answer))
        .route("/twilio/stream", get(twilio::stream))
        .route("/openapi.json", get(openapi::document))
}

/// A store failure is ours (500); contention is worth a retry (503). Rejections are mapped
/// by each handler, which knows what they mean to the caller.
pub fn store_error<E: std::error::Error>(
    e: CommandError<E>,
    reject: impl FnOnce(E) -> ApiError,
) -> ApiError {
    match e {
        CommandError::Rejected(e) => reject(e),
        CommandError::Contended(what) => ApiError {
            retry_after: Some(1),
            ..ApiError::unavailable(format!("the {what} is busy; try again"))
        },
        CommandError::Store(detail) => ApiError::internal(detail),
    }
}

/// Waits for `projection` to show `committed` (bounded by READ_YOUR_WRITES_MS).
pub async fn settle(state: &AppState, projection: &str, committed: &Committed) {
    if committed.events > 0 {
        state
            .store
            .wait_projected(projection, committed, state.read_your_writes())
            .await;
    }
}
