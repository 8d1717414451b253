//! Runs projections from the stream: a durable consumer per projection, shared by every
//! instance, filtered to the projection's aggregate type when it reads only one. The messages that have arrived are applied together with their offsets in one
//! transaction (`cmb_projections::apply_batch`: one commit for up to `MAX_BATCH` events
//! instead of one each, which is what keeps a projection up with a burst of calls), each
//! acknowledged after the commit; a batch that fails is applied again one event at a time
//! (`cmb_projections::apply`), so a poison event is retried and set aside alone.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use cmb_nats::consume::{self, DurableSpec};
use cmb_nats::StreamSettings;
use cmb_projections::{Outcome, Projection};
use futures::{FutureExt, StreamExt};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::backbone::deadletter;
use crate::backbone::keys::Keyring;

/// Messages waiting per projection, as last measured (for `/readyz` and the metric).
pub type LagBoard = Arc<RwLock<BTreeMap<String, u64>>>;

pub struct Projector {
    pub pool: PgPool,
    /// Opens the personal fields of the events it applies.
    pub keys: Keyring,
    pub stream: jetstream::stream::Stream,
    pub settings: StreamSettings,
    pub consumer_prefix: String,
    pub lag: LagBoard,
    /// How long a delivered message may go unacknowledged (a dead instance's messages come
    /// back after this).
    pub ack_wait: Duration,
    /// Deliveries after which an event that keeps failing is set aside.
    pub max_deliveries: i64,
}

impl Projector {
    fn durable_name(&self, projection: &dyn Projection) -> String {
        format!("{}-proj-{}", self.consumer_prefix, projection.name())
    }

    /// Spawns one consumer loop per projection on `runtime` (the pipeline's).
    pub fn spawn_all(
        self: Arc<Self>,
        projections: Vec<Arc<dyn Projection>>,
        shutdown: CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
        runtime: &tokio::runtime::Handle,
    ) {
        for projection in projections {
            let me = self.clone();
            let shutdown = shutdown.clone();
            tasks.spawn_on(async move { me.run(projection, shutdown).await }, runtime);
        }
    }

    async fn run(self: Arc<Self>, projection: Arc<dyn Projection>, shutdown: CancellationToken) {
        let name = projection.name();
        let durable = self.durable_name(projection.as_ref());
        // A projection of one aggregate type is sent only that type's events: the others would
        // each be delivered, looked at and acknowledged for nothing (every call event to the
        // six projections that read none).
        let mut spec = match projection.aggregate_types() {
            [only] => DurableSpec::of_type(&self.settings, &durable, only),
            _ => DurableSpec::all_events(&self.settings, &durable),
        };
        spec.ack_wait = self.ack_wait;
        spec.set_aside_after = self.max_deliveries;
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
        let consumer_name = format!("projection:{name}");
        let mut consumer = consume::durable(&self.stream, spec).await?;
        let mut messages = consumer.messages().await?;
        let mut last_lag_check = Instant::now() - Duration::from_secs(60);
        let mut last_redrive = Instant::now();
        loop {
            if last_redrive.elapsed() >= deadletter::REDRIVE_EVERY {
                last_redrive = Instant::now();
                self.redrive(projection, &consumer_name).await?;
            }
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
            let first = tokio::select! {
                // Stop taking messages; what was applied has been acknowledged already.
                _ = shutdown.cancelled() => return Ok(()),
                m = tokio::time::timeout(Duration::from_secs(2), messages.next()) => m,
            };
            let first = match first {
                Err(_) => continue, // idle: loop to refresh the lag
                Ok(None) => return Err("message stream ended".into()),
                Ok(Some(m)) => m?,
            };
            // And whatever else has arrived meanwhile: applied together, committed once.
            let mut batch = vec![first];
            let mut stopped = None;
            while batch.len() < cmb_projections::MAX_BATCH {
                match messages.next().now_or_never() {
                    Some(Some(Ok(m))) => batch.push(m),
                    Some(Some(Err(e))) => {
                        stopped = Some(async_nats::Error::from(e));
                        break;
                    }
                    Some(None) => {
                        stopped = Some("message stream ended".into());
                        break;
                    }
                    None => break,
                }
            }
            self.handle_batch(projection, spec, &consumer_name, batch, chrono::Utc::now())
                .await?;
            if let Some(e) = stopped {
                return Err(e);
            }
        }
    }

    /// Applies a batch of delivered messages in one transaction ([`cmb_projections::apply_batch`])
    /// and settles each; when that fails, applies them one by one, so that only an event that
    /// fails by itself is retried or set aside.
    async fn handle_batch(
        &self,
        projection: &dyn Projection,
        spec: &DurableSpec,
        consumer_name: &str,
        batch: Vec<jetstream::Message>,
        taken_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), async_nats::Error> {
        metrics::histogram!(crate::telemetry::PROJECTION_BATCH, "projection" => projection.name())
            .record(batch.len() as f64);
        let mut delivered = Vec::with_capacity(batch.len());
        for message in batch {
            let (stream_sequence, deliveries, stored_at) = message
                .info()
                .map(|i| {
                    let nanos = i.published.unix_timestamp_nanos();
                    let stored_at = chrono::DateTime::from_timestamp(
                        (nanos / 1_000_000_000) as i64,
                        (nanos % 1_000_000_000) as u32,
                    );
                    (i.stream_sequence, i.delivered, stored_at)
                })
                .unwrap_or((0, 1, None));
            match cmb_nats::contract::decode_body(&message.payload) {
                Ok(event) => delivered.push(Delivered {
                    message,
                    event,
                    stream_sequence,
                    deliveries,
                    stored_at,
                    taken_at,
                }),
                Err(e) => {
                    // Never acknowledged and forgotten: kept, body and all.
                    deadletter::park(
                        &self.pool,
                        deadletter::Parked {
                            consumer: consumer_name,
                            stream_sequence,
                            event: None,
                            headers: message.headers.as_ref(),
                            body: Some(&message.payload),
                            deliveries,
                            error: &format!("cannot be decoded: {e}"),
                            retry: false,
                        },
                    )
                    .await?;
                    message.ack().await?;
                }
            }
        }
        let outcomes = if delivered.len() > 1 {
            // Opened for the read model only: a letter set aside keeps the sealed event.
            let mut opened = Vec::with_capacity(delivered.len());
            for d in &delivered {
                match self.keys.opened(&d.event).await {
                    Ok(event) => opened.push((event, d.stream_sequence)),
                    // Left to the one-by-one path, which retries or sets aside that one.
                    Err(_) => break,
                }
            }
            let events: Vec<(&cmb_domain::EventEnvelope, u64)> =
                opened.iter().map(|(e, s)| (e.as_ref(), *s)).collect();
            if events.len() < delivered.len() {
                None
            } else {
                match cmb_projections::apply_batch(&self.pool, projection, &events).await {
                    Ok(outcomes) => Some(outcomes),
                    Err(e) => {
                        tracing::debug!(projection = projection.name(), error = %e, events = delivered.len(), "batch failed; applying one by one");
                        None
                    }
                }
            }
        } else {
            None
        };
        match outcomes {
            Some(outcomes) => {
                for (d, outcome) in delivered.into_iter().zip(outcomes) {
                    self.settle(projection, spec, consumer_name, d, Ok(outcome))
                        .await?;
                }
            }
            None => {
                for d in delivered {
                    let applied = match self.keys.opened(&d.event).await {
                        Ok(opened) => {
                            cmb_projections::apply(
                                &self.pool,
                                projection,
                                &opened,
                                d.stream_sequence,
                            )
                            .await
                        }
                        Err(e) => Err(e.into()),
                    };
                    self.settle(projection, spec, consumer_name, d, applied)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Acknowledges, redelivers later or sets aside one delivered message, by what applying it
    /// gave.
    async fn settle(
        &self,
        projection: &dyn Projection,
        spec: &DurableSpec,
        consumer_name: &str,
        d: Delivered,
        applied: Result<Outcome, sqlx::Error>,
    ) -> Result<(), async_nats::Error> {
        let name = projection.name();
        let Delivered {
            message,
            event,
            stream_sequence,
            deliveries,
            stored_at,
            taken_at,
        } = d;
        match applied {
            Ok(Outcome::Gap { expected }) => {
                match deadletter::blocker(&self.pool, consumer_name, &event).await? {
                    // Its predecessor was set aside: it waits there too, in order.
                    Some(blocker) => {
                        deadletter::park(
                            &self.pool,
                            deadletter::Parked {
                                consumer: consumer_name,
                                stream_sequence,
                                event: Some(&event),
                                headers: None,
                                body: None,
                                deliveries,
                                error: &blocker.reason,
                                retry: blocker.retrying,
                            },
                        )
                        .await?;
                        message.ack().await?;
                    }
                    None => {
                        tracing::debug!(projection = name, event = %event.event_id(), expected, "out of order; redeliver later");
                        metrics::counter!("cmb_projection_events_total", "projection" => name, "outcome" => "gap").increment(1);
                        message
                            .ack_with(AckKind::Nak(Some(Duration::from_millis(200))))
                            .await?;
                    }
                }
            }
            Ok(outcome) => {
                message.ack().await?;
                if outcome == Outcome::Applied {
                    // Commit to read model: what a reader waits for after a write.
                    let lag = (chrono::Utc::now() - event.occurred_at)
                        .to_std()
                        .unwrap_or_default();
                    metrics::histogram!(crate::telemetry::PROJECTION_LAG, "projection" => name)
                        .record(lag.as_secs_f64());
                    // Where it went after publication: waiting for the projector, applying.
                    let secs = |d: chrono::TimeDelta| d.to_std().unwrap_or_default().as_secs_f64();
                    if let Some(stored_at) = stored_at {
                        metrics::histogram!(crate::telemetry::LAG_STAGE, "stage" => "queue", "projection" => name)
                            .record(secs(taken_at - stored_at));
                    }
                    metrics::histogram!(crate::telemetry::LAG_STAGE, "stage" => "apply", "projection" => name)
                        .record(secs(chrono::Utc::now() - taken_at));
                }
                metrics::counter!("cmb_projection_events_total", "projection" => name, "outcome" => outcome_label(outcome)).increment(1);
            }
            Err(e) if !deadletter::is_transient(&e) && deliveries >= spec.set_aside_after => {
                deadletter::park(
                    &self.pool,
                    deadletter::Parked {
                        consumer: consumer_name,
                        stream_sequence,
                        event: Some(&event),
                        headers: None,
                        body: None,
                        deliveries,
                        error: &e.to_string(),
                        retry: false,
                    },
                )
                .await?;
                message.ack().await?;
                metrics::counter!("cmb_projection_events_total", "projection" => name, "outcome" => "dead_letter").increment(1);
            }
            Err(e) => {
                let backoff = Duration::from_millis(500 * 2u64.pow((deliveries as u32).min(6)));
                tracing::warn!(projection = name, event = %event.event_id(), deliveries, error = %e, ?backoff, "apply failed; redeliver later");
                message.ack_with(AckKind::Nak(Some(backoff))).await?;
            }
        }
        Ok(())
    }

    /// Applies what is marked for retry among this projection's dead letters.
    async fn redrive(
        &self,
        projection: &dyn Projection,
        consumer_name: &str,
    ) -> Result<u64, async_nats::Error> {
        deadletter::redrive(
            &self.pool,
            &self.stream,
            consumer_name,
            |seq, event| async move {
                let applied = match self.keys.opened(&event).await {
                    Ok(opened) => {
                        cmb_projections::apply(&self.pool, projection, &opened, seq).await
                    }
                    Err(e) => Err(e.into()),
                };
                match applied {
                    Ok(Outcome::Gap { expected }) => deadletter::Redriven::Failed(format!(
                        "still waiting for sequence {expected}"
                    )),
                    Ok(_) => deadletter::Redriven::Done,
                    Err(e) => deadletter::Redriven::Failed(e.to_string()),
                }
            },
        )
        .await
    }
}

/// A delivered message and the event it carries.
struct Delivered {
    message: jetstream::Message,
    event: cmb_domain::EventEnvelope,
    stream_sequence: u64,
    deliveries: i64,
    /// When JetStream stored it, and when this projector took it (for [`crate::telemetry::LAG_STAGE`]).
    stored_at: Option<chrono::DateTime<chrono::Utc>>,
    taken_at: chrono::DateTime<chrono::Utc>,
}

fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Applied => "applied",
        Outcome::AlreadyApplied => "duplicate",
        Outcome::Gap { .. } => "gap",
        Outcome::Ignored => "ignored",
        Outcome::Unknown => "unknown_type",
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
    let keys = Keyring::new(pool.clone());
    let mut applied = 0;
    while let Some(item) = rx.recv().await {
        let r = item.map_err(|e| async_nats::Error::from(e.to_string()))?;
        let event = keys.opened(&r.event).await?;
        // A gap here means the live projector holds the predecessor's transaction: retry a
        // while. One that lasts means the stream lost an event: `events verify` repairs it.
        let mut waited = 0;
        loop {
            match cmb_projections::apply(pool, projection, &event, r.stream_sequence).await? {
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
