//! What `callmeback serve` runs: the HTTP API, the voice session, the workers and the
//! scheduler.

pub mod api;
pub mod erasures;
pub mod export;
pub mod http;
pub mod providers;
pub mod scheduler;
#[cfg(feature = "sims")]
pub mod simulators;
pub mod sweeper;
pub mod transcripts;
pub mod voice;
pub mod workers;
