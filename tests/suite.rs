//! The black-box suite, one test binary: each module is one area of the product, driven from
//! outside through `spawn_app` (HTTP, webhooks, media streams) against real Postgres and NATS.
//! One binary rather than one per area: every test binary links the whole service, and 21 of
//! them took 2 GB of disk and a link each per build.

mod common;

mod abuse;
mod accounts;
mod architecture;
mod backbone;
mod calls;
mod cluster;
mod contract;
mod crashes;
mod deadletters;
mod knowledge;
mod mcp;
mod memory;
mod money;
mod payments;
mod personas;
mod projections;
mod replay;
mod security;
mod simulate;
mod streams;
mod voice;
