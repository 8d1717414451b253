//! The `/api` routes the front end uses, one module per resource. Handlers extract, call a use
//! case (`crate::usecases`) or a read-model query (`cmb_projections`), and shape JSON; every
//! failure reaches the client through the one mapping in `errors`. A write the client reads
//! back waits (briefly) for its read model: `AppState::read_your_writes`.
//!
//! A route is one entry here: `routes!(handler)` takes its method and path from the handler's
//! `#[utoipa::path]`, and `limited` puts its rate limit in front of it and in the document.

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
pub mod usage;
pub mod user;
pub mod workos;

use axum::extract::DefaultBodyLimit;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;

use crate::serve::http::ratelimit::{self as limit, limited, Limits};
use crate::serve::http::state::AppState;

/// Handlers of one path (`routes!` registers every handler it is given on every path it
/// names) behind a rate limit.
fn at(
    handlers: UtoipaMethodRouter<AppState>,
    limits: impl Into<Limits>,
) -> OpenApiRouter<AppState> {
    limited(OpenApiRouter::new().routes(handlers), limits)
}

pub fn routes() -> OpenApiRouter<AppState> {
    let browse = Limits {
        signed_in: limit::PERSONAS_LIST,
        anonymous: limit::PERSONAS_LIST_ANON,
    };
    OpenApiRouter::new()
        // Accounts.
        .merge(at(routes!(accounts::register), limit::REGISTER))
        .merge(at(routes!(accounts::login), limit::LOGIN))
        .merge(at(routes!(accounts::logout), limit::LOGOUT))
        .merge(at(routes!(accounts::logout_all), limit::LOGOUT_ALL))
        .merge(at(
            routes!(accounts::change_password),
            limit::PASSWORD_CHANGE,
        ))
        .merge(at(
            routes!(accounts::forgot_password),
            limit::PASSWORD_FORGOT,
        ))
        .merge(at(routes!(accounts::reset_password), limit::PASSWORD_RESET))
        .merge(at(routes!(accounts::me), limit::ME))
        .merge(at(routes!(workos::authorize), limit::WORKOS_AUTHORIZE))
        .merge(at(routes!(workos::callback), limit::WORKOS_CALLBACK))
        .merge(at(routes!(accounts::update_profile), limit::PROFILE))
        .merge(at(routes!(user::export), limit::EXPORT))
        .merge(at(routes!(user::erase), limit::ERASE))
        // Personas, customisation and memory.
        .merge(at(routes!(personas::list), browse))
        .merge(at(routes!(personas::get_one), browse))
        .merge(at(routes!(personas::create), limit::PERSONA_CREATE))
        .merge(at(routes!(personas::update), limit::PERSONA_UPDATE))
        .merge(at(routes!(personas::remove), limit::PERSONA_DELETE))
        .merge(at(
            routes!(personas::get_customization, personas::customize),
            limit::PERSONA_CUSTOMIZE,
        ))
        .merge(at(
            routes!(memory::get, memory::clear),
            limit::PERSONA_CUSTOMIZE,
        ))
        .merge(at(routes!(memory::forget), limit::PERSONA_CUSTOMIZE))
        .merge(at(routes!(knowledge::list), limit::PERSONAS_LIST))
        .merge(
            at(routes!(knowledge::add), limit::PERSONA_UPDATE)
                .layer(DefaultBodyLimit::max(knowledge::BODY_LIMIT)),
        )
        .merge(at(routes!(knowledge::remove), limit::PERSONA_UPDATE))
        // Contacts.
        .merge(at(routes!(contacts::list), limit::CONTACTS_LIST))
        .merge(at(routes!(contacts::add), limit::CONTACTS_ADD))
        .merge(at(routes!(contacts::remove), limit::CONTACTS_REMOVE))
        // Calls.
        .merge(at(routes!(calls::trigger), limit::CALL))
        .merge(at(routes!(calls::schedule), limit::CALL_SCHEDULE))
        .merge(at(routes!(calls::cancel), limit::CALL_CANCEL))
        .merge(at(routes!(calls::list), limit::CALLS_LIST))
        .merge(at(routes!(calls::scheduled), limit::CALLS_LIST))
        .merge(at(routes!(calls::get_one), limit::CALLS_LIST))
        .merge(at(routes!(usage::usage), limit::USAGE))
        // Money.
        .merge(at(routes!(budget::get), limit::USAGE))
        .merge(at(routes!(budget::put), limit::PROFILE))
        .merge(at(routes!(billing::billing), limit::USAGE))
        .merge(at(routes!(billing::attach), limit::PROFILE))
        .merge(at(routes!(billing::detach), limit::PROFILE))
        .merge(at(routes!(billing::make_default), limit::PROFILE))
        .merge(at(routes!(billing::create_payment_intent), limit::PROFILE))
        .merge(at(routes!(billing::buy_credits), limit::PROFILE))
        // Webhooks: signed by their senders, not rate limited.
        .routes(routes!(billing::webhook))
        .routes(routes!(twilio::status_callback))
        .routes(routes!(twilio::answer))
        .routes(routes!(twilio::stream))
}
