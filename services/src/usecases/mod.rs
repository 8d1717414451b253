//! Use cases: the application services between the edges (HTTP handlers, workers, the voice
//! session, operators' tools) and the domain. Each loads the aggregates it decides on, runs
//! their commands through the event store, talks to providers, and says what went wrong in an
//! error type of its own; the edges only translate (to JSON, to a retry, to an exit code).
//! Nothing here knows HTTP.

pub mod accounts;
pub mod analysts;
pub mod billing;
pub mod budget;
pub mod calls;
pub mod contacts;
pub mod knowledge;
pub mod memory;
pub mod personas;
pub mod prices;
