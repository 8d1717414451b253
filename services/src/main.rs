//! The `callmeback` binary: see `callmeback --help`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    callmeback::cli::main().await
}
