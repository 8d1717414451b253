//! Call Me Back's service: the HTTP API, the workers and the operators' commands, in one
//! binary. See ARCHITECTURE.md for the map.

pub mod api;
pub mod app;
pub mod auth;
pub mod bench;
pub mod bench_voice;
pub mod cli;
pub mod clock;
pub mod config;
pub mod db;
pub mod deadletter;
pub mod http;
pub mod lease;
pub mod outbox;
pub mod projector;
pub mod providers;
pub mod ratelimit;
pub mod rebuild;
pub mod replay;
pub mod scheduler;
pub mod seed;
pub mod sim;
pub mod simulate;
pub mod store;
pub mod synthetic;
pub mod telemetry;
pub mod voice;
pub mod workers;
