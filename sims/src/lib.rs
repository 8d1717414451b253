//! Simulators of the providers, on loopback, speaking the same wire protocols as the real
//! services. `serve` starts one for each provider with neither a key nor a base URL set; the
//! tests start them directly. Each takes a latency and can be told to fail (see the README's
//! "Simulators" table for the variables).

pub mod deepgram;
pub mod elevenlabs;
pub mod llm;
pub mod smtp;
pub mod stripe;
pub mod twilio;
pub mod workos;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Latency and injected failures of a simulator.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Added before every answer.
    pub latency: Duration,
    /// Answer every n-th request with a 503 (0: never).
    pub fail_every: u64,
    counter: Arc<AtomicU64>,
    /// An outage a test started ([`Faults::set_down`]): every request fails meanwhile.
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Faults {
    pub fn new(latency: Duration, fail_every: u64) -> Self {
        Faults {
            latency,
            fail_every,
            counter: Arc::default(),
            down: Arc::default(),
        }
    }

    /// Starts (`true`) or ends an outage: every request fails while it lasts.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// `SIM_<NAME>_LATENCY_MS` and `SIM_<NAME>_FAIL_EVERY`.
    pub fn from_lookup(get: &impl Fn(&str) -> Option<String>, name: &str) -> Self {
        let number = |var: String| get(&var).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        Faults::new(
            Duration::from_millis(number(format!("SIM_{name}_LATENCY_MS"))),
            number(format!("SIM_{name}_FAIL_EVERY")),
        )
    }

    /// Waits the latency; says whether this request must fail.
    pub async fn apply(&self) -> bool {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        self.down.load(Ordering::SeqCst)
            || (self.fail_every > 0 && n.is_multiple_of(self.fail_every))
    }
}

/// Serves `router` on a random loopback port until `shutdown`; returns its base URL.
pub async fn serve(
    name: &'static str,
    router: axum::Router,
    shutdown: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> std::io::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    tasks.spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(simulator = name, error = %e, "simulator stopped");
        }
    });
    tracing::info!(simulator = name, %addr, "simulator listening");
    Ok(format!("http://{addr}"))
}
