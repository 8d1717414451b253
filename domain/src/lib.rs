//! The Call Me Back domain: aggregates, commands, events, value types and rules.
//!
//! Invariant of this crate: it does no I/O. No tokio, sqlx, axum or NATS here; everything is
//! plain data and pure decisions, tested with cqrs-es's `TestFramework`. Side effects live in
//! `services`, read models in `projections`, the message log in `nats`.

pub mod billing;
pub mod budget;
pub mod call;
pub mod contacts;
pub mod cost;
pub mod destination;
pub mod envelope;
pub mod events;
pub mod ids;
pub mod knowledge;
pub mod memory;
pub mod persona;
pub mod pricing;
pub mod privacy;
pub mod system_cost;
pub mod user;
pub mod values;
pub mod wallet;

pub use envelope::{Actor, CommandContext, EventEnvelope, EventMetadata};
pub use ids::{CallId, DocumentId, PersonaId, UserId};
