//! Logs (pretty or JSON, filtered by `RUST_LOG`) and Prometheus metrics.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;

pub fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,async_nats=warn,tower_http=info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Seconds from an event's commit to its projection's read model having it (recorded by the
/// live projectors, with fine buckets up to 1 s).
pub const PROJECTION_LAG: &str = "cmb_projection_lag_seconds";

/// Seconds from an event's commit to JetStream's acknowledgement of it (the publisher's
/// share of [`PROJECTION_LAG`]), with the same buckets.
pub const PUBLICATION_LAG: &str = "cmb_publication_lag_seconds";

/// Seconds an event spent in one stage on its way to a read model, with the lags' buckets:
/// `stage="publish_read"` (commit to the publisher reading it), `"publish_ack"` (read to
/// JetStream's acknowledgement), and per projection `"queue"` (stored in the stream to the
/// projector taking it: delivery plus waiting behind the batch before) and `"apply"` (taken to
/// its batch committed). Where [`PROJECTION_LAG`] comes from.
pub const LAG_STAGE: &str = "cmb_lag_stage_seconds";

/// Events a projector took in one batch (`projection` label): what it had received when the
/// batch started, up to `cmb_projections::MAX_BATCH`.
pub const PROJECTION_BATCH: &str = "cmb_projection_batch_events";

/// Buckets of [`PROJECTION_BATCH`].
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Buckets of the lags, finely enough to read a p99 against 200 ms.
const LAG_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0,
];

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's metrics recorder (installed once; later calls return the same handle).
pub fn metrics() -> PrometheusHandle {
    METRICS
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
                .expect("the bucket list is not empty")
                // Projection lag, finely enough to read a p99 against 200 ms.
                .set_buckets_for_metric(Matcher::Full(PROJECTION_LAG.into()), LAG_BUCKETS)
                .expect("the bucket list is not empty")
                .set_buckets_for_metric(Matcher::Full(PUBLICATION_LAG.into()), LAG_BUCKETS)
                .expect("the bucket list is not empty")
                .set_buckets_for_metric(Matcher::Full(LAG_STAGE.into()), LAG_BUCKETS)
                .expect("the bucket list is not empty")
                .set_buckets_for_metric(Matcher::Full(PROJECTION_BATCH.into()), BATCH_BUCKETS)
                .expect("the bucket list is not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (tests run several apps in one
            // process); then ours only renders what it records, which is nothing.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Masks a phone number or email for logs.
pub fn mask(s: &str) -> String {
    if let Some((local, domain)) = s.split_once('@') {
        let first: String = local.chars().take(1).collect();
        return format!("{first}***@{domain}");
    }
    let n = s.chars().count();
    s.chars()
        .enumerate()
        .map(|(i, c)| if i >= 5 && i + 2 < n { '*' } else { c })
        .collect()
}

/// CPU time the calling thread has run, in nanoseconds (`CLOCK_THREAD_CPUTIME_ID`): set
/// beside a wall-clock time, it tells work from waiting (the thread preempted on a busy
/// machine). 0 where the clock cannot be read.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill in.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An error and each of its causes, outermost first (`reading the event store: pool timed
/// out …`), for a log line or an operator's message: a typed error's Display says only its own
/// part, and the causes it keeps (`#[source]`) are the rest.
pub struct Causes<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}
