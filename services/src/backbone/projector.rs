//! Runs projections from the stream: a durable consumer per projection, shared by every
//! instance, each message applied with its offset in one transaction (see
//! `cmb_projections::apply`) and acknowledged after the commit.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use cmb_nats::consume::{self, DurableSpec};
use cmb_nats::StreamSettings;
use cmb_projections::{Outcome, Projection};
use futures::StreamExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Messages waiting per projection, as last measured (for `/readyz` and the metric).
pub type LagBoard = Arc<RwLock<BTreeMap<String, u64>>>;

pub struct Projector {
    pub pool: PgPool,
    pub stream: jetstream::stream::Stream,
    pub settings: StreamSettings,
    pub consumer_prefix: String,
    pub lag: LagBoard,
    /// How long a delivered message may go unacknowledged (a dead instance's messages come
    /// back after this).
    pub ack_wait: Duration,
}

impl Projector {
    fn durable_name(&self, projection: &dyn Projection) -> String {
        format!("{}-proj-{}", self.consumer_prefix, projection.name())
    }

    /// Spawns one consumer loop per projection, plus a lag monitor.
    pub fn spawn_all(
        self: Arc<Self>,
        projections: Vec<Arc<dyn Projection>>,
        shutdown: CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
    ) {
        for projection in projections {
            let me = self.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move { me.run(projection, shutdown).await });
        }
    }

    async fn run(self: Arc<Self>, projection: Arc<dyn Projection>, shutdown: CancellationToken) {
        let name = projection.name();
        let mut spec =
            DurableSpec::all_events(&self.settings, &self.durable_name(projection.as_ref()));
        spec.ack_wait = self.ack_wait;
        while !shutdown.is_cancelled() {
            if let Err(e) = self.consume(projection.as_ref(), &spec, &shutdown).await {
                tracing::warn!(projection = name, error = %e, "projector stopped; restarting");
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }

    async fn consume(
        &self,
        projection: &dyn Projection,
        spec: &DurableSpec,
        shutdown: &CancellationToken,
    ) -> Result<(), async_nats::Error> {
        let name = projection.name();
        let mut consumer = consume::durable(&self.stream, spec).await?;
        let mut messages = consumer.messages().await?;
        let mut last_lag_check = Instant::now() - Duration::from_secs(60);
        loop {
            if last_lag_check.elapsed() > Duration::from_secs(2) {
                last_lag_check = Instant::now();
                if let Ok(lag) = consume::lag(&mut consumer).await {
                    self.lag
                        .write()
                        .expect("lag board")
                        .insert(name.to_string(), lag);
                    metrics::gauge!("cmb_projection_lag_messages", "projection" => name)
                        .set(lag as f64);
                }
            }
            let message = tokio::select! {
                // Stop taking messages; what was applied has been acknowledged already.
                _ = shutdown.cancelled() => return Ok(()),
                m = tokio::time::timeout(Duration::from_secs(2), messages.next()) => m,
            };
            let message = match message {
                Err(_) => continue, // idle: loop to refresh the lag
                Ok(None) => return Err("message stream ended".into()),
                Ok(Some(m)) => m?,
            };
            let stream_sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
            let event = match cmb_nats::contract::decode_body(&message.payload) {
                Ok(e) => e,
                Err(e) => {
                    // Not ours to read; acknowledging it keeps the consumer moving.
                    tracing::error!(projection = name, stream_sequence, error = %e, "undecodable message skipped");
                    message.ack().await?;
                    continue;
                }
            };
            match cmb_projections::apply(&self.pool, projection, &event, stream_sequence).await {
                Ok(Outcome::Gap { expected }) => {
                    tracing::debug!(projection = name, event = %event.event_id(), expected, "out of order; redeliver later");
                    message
                        .ack_with(AckKind::Nak(Some(Duration::from_millis(200))))
                        .await?;
                }
                Ok(outcome) => {
                    message.ack().await?;
                    metrics::counter!("cmb_projection_events_total", "projection" => name, "outcome" => outcome_label(outcome)).increment(1);
                }
                Err(e) => {
                    tracing::warn!(projection = name, event = %event.event_id(), error = %e, "apply failed; redeliver later");
                    message
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await?;
                }
            }
        }
    }
}

fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Applied => "applied",
        Outcome::AlreadyApplied => "duplicate",
        Outcome::Gap { .. } => "gap",
        Outcome::Ignored => "ignored",
    }
}

/// Progress on a terminal: `n/total, events/s, ETA`, at most a few times a second.
pub struct Progress {
    total: u64,
    done: u64,
    started: Instant,
    last_print: Instant,
    enabled: bool,
    label: String,
}

impl Progress {
    pub fn new(label: &str, total: u64) -> Self {
        use std::io::IsTerminal;
        Progress {
            total,
            done: 0,
            started: Instant::now(),
            last_print: Instant::now(),
            enabled: std::io::stderr().is_terminal(),
            label: label.to_string(),
        }
    }

    pub fn force(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    pub fn tick(&mut self, n: u64) {
        self.done += n;
        if self.enabled && self.last_print.elapsed() > Duration::from_millis(250) {
            self.last_print = Instant::now();
            self.print(false);
        }
    }

    pub fn rate(&self) -> f64 {
        self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    fn print(&self, last: bool) {
        let rate = self.rate();
        let left = self.total.saturating_sub(self.done);
        let eta = if rate > 0.0 { left as f64 / rate } else { 0.0 };
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r{}: {}/{} events, {:.0} events/s, ETA {:.0}s   {}",
            self.label,
            self.done,
            self.total,
            rate,
            eta,
            if last { "\n" } else { "" }
        );
        let _ = err.flush();
    }

    pub fn finish(&self) {
        if self.enabled {
            self.print(true);
        }
    }
}

/// Rebuilds `projection` from scratch: empties its tables and offsets, then applies the
/// stream from the first event up to the last one now. A live projector keeps running; the
/// per-aggregate offsets make the two agree (whichever applies an event first wins, the
/// other sees it applied).
pub async fn rebuild(
    pool: &PgPool,
    js: &jetstream::Context,
    settings: &StreamSettings,
    projection: &dyn Projection,
    show_progress: bool,
) -> Result<u64, async_nats::Error> {
    cmb_projections::reset(pool, projection).await?;
    let until = cmb_nats::replay::last_sequence(js, settings).await?;
    let mut progress =
        Progress::new(&format!("rebuild {}", projection.name()), until).force(show_progress);
    let mut rx = cmb_nats::replay::open(
        js,
        settings,
        &settings.all_subjects(),
        cmb_nats::replay::Start::Beginning,
        until,
    )
    .await?;
    let mut applied = 0;
    while let Some(item) = rx.recv().await {
        let r = item.map_err(|e| async_nats::Error::from(e.to_string()))?;
        // A gap here means the live projector holds the predecessor's transaction: retry a
        // while. One that lasts means the stream lost an event: `events verify` repairs it.
        let mut waited = 0;
        loop {
            match cmb_projections::apply(pool, projection, &r.event, r.stream_sequence).await? {
                Outcome::Gap { expected } if waited >= 250 => {
                    return Err(format!(
                        "{} arrived but its sequence {expected} never did; run `callmeback events verify`",
                        r.event.event_id()
                    )
                    .into())
                }
                Outcome::Gap { .. } => {
                    waited += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Outcome::Applied => {
                    applied += 1;
                    break;
                }
                _ => break,
            }
        }
        progress.tick(1);
    }
    progress.finish();
    Ok(applied)
}
