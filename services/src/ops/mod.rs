//! Operators' and analysts' tools: reconciliation, the analysts' MCP server, read-model rebuilds, simulated and
//! synthetic histories, benchmarks and the demo seed.

pub mod bench;
#[cfg(feature = "sims")]
pub mod bench_calls;
pub mod bench_knowledge;
pub mod bench_replay;
#[cfg(feature = "sims")]
pub mod bench_voice;
pub mod bench_voice_twilio;
#[cfg(feature = "sims")]
pub mod child;
pub mod mcp;
pub mod privacy;
pub mod rebuild;
pub mod reconcile;
pub mod seed;
pub mod simulate;
pub mod synthetic;
