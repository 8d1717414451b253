//! The event backbone: the command path into the Postgres event store, the publisher to
//! JetStream, the projectors that feed the read models, and the leases singletons hold.

pub mod db;
pub mod lease;
pub mod outbox;
pub mod projector;
pub mod store;
