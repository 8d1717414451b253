//! The `/api` routes the front end uses, one module per resource. Handlers extract, call a use
//! case (`crate::usecases`) or a read-model query (`cmb_projections`), and shape JSON; every
//! failure reaches the client through the one mapping in `errors`. A write the client reads
//! back waits (briefly) for its read model: `AppState::read_your_writes`.

pub mod accounts;
pub mod billing;
pub mod budget;
pub mod calls;
pub mod contacts;
mod errors;
pub mod knowledge;
pub mod memory;
pub mod openapi;
pub mod personas;
pub mod twilio;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post, put};
use axum::Router;

use crate::serve::http::state::AppState;

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
        .route(
            "/personas/{id}/knowledge",
            get(knowledge::list)
                .post(knowledge::add)
                .layer(DefaultBodyLimit::max(knowledge::BODY_LIMIT)),
        )
        .route("/personas/{id}/knowledge/{doc}", delete(knowledge::remove))
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
