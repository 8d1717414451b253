//! The `callmeback` binary: see `callmeback --help`.

/// mimalloc instead of the system allocator: the NATS client allocates for every message it
/// receives (subject, reply subject, headers, read buffers shared with the bodies), and with
/// glibc's allocator that was a third of a replay's CPU — its consolidation of freed chunks on
/// every large request above all (see README "Benchmarks", `bench replay`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    callmeback::cli::main().await
}
