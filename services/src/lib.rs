//! Call Me Back's service: the HTTP API, the workers and the operators' commands, in one
//! binary. See ARCHITECTURE.md for the map.

pub mod app;
pub mod backbone;
pub mod cli;
pub mod clock;
pub mod config;
pub mod faults;
pub mod ops;
pub mod serve;
pub mod telemetry;
pub mod usecases;
