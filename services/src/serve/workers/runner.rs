//! The loop every worker runs: a durable consumer's messages, handled in [`LANES`] lanes (an
//! aggregate's messages one at a time, in order, in its lane; different aggregates' at once),
//! each acknowledged after its handler succeeded, redelivered with backoff when it may succeed
//! later, set aside when it never can. Every worker's lanes together run at most
//! [`PoolShare`]'s handlers at once, so the workers can never take the whole database pool
//! from the API, the projectors, the publisher and the voice sessions.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use cmb_domain::EventEnvelope;
use cmb_nats::consume::{self, DurableSpec};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::backbone::deadletter;

/// Why a handler did not finish with a message.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Trying again later may succeed (a provider or the store was unavailable, a race):
    /// the message is redelivered with backoff.
    #[error(transparent)]
    Retry(Box<dyn std::error::Error + Send + Sync>),
    /// The message can never be handled (it refers to nothing usable): it is acknowledged and
    /// logged for an operator, instead of being redelivered forever.
    #[error(transparent)]
    Skip(Box<dyn std::error::Error + Send + Sync>),
}

/// `event` as its aggregate's typed event (`CallEvent`, `PersonaEvent`, …), for a worker to
/// `match` on its variants: a renamed or removed event is then a compile error in the worker,
/// not a message it silently stops reacting to. `None` for a type this build does not know
/// (written by a newer build: nothing here reacts to it); a known type that does not decode
/// can never be handled, so it is skipped (set aside).
pub fn decode<E: serde::de::DeserializeOwned>(event: &EventEnvelope) -> Result<Option<E>, Failure> {
    if !event.is_known() {
        return Ok(None);
    }
    event.decode().map(Some).map_err(|source| {
        Failure::Skip(Box::new(Undecodable {
            event_type: event.event_type.clone(),
            event_id: event.event_id(),
            source,
        }))
    })
}

/// A known event type whose body does not decode as it: it can never be handled.
#[derive(Debug, thiserror::Error)]
#[error("{event_type} {event_id} does not decode as its type")]
pub struct Undecodable {
    event_type: String,
    event_id: String,
    #[source]
    source: serde_json::Error,
}

/// A message naming a call by something that is not a call id: it can never be handled.
#[derive(Debug, thiserror::Error)]
#[error("{id} is not a call id")]
pub struct NotACallId {
    pub id: String,
    #[source]
    pub source: uuid::Error,
}

impl From<NotACallId> for Failure {
    fn from(e: NotACallId) -> Self {
        Failure::Skip(Box::new(e))
    }
}

impl Failure {
    /// A step that may pass later: `doing` says which (`"loading call c-…"`), and `cause`
    /// stays the error's source, so the log keeps the whole chain.
    pub fn retry(
        doing: impl Into<String>,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Failure::Retry(Box::new(Step {
            doing: doing.into(),
            cause: cause.into(),
        }))
    }

    /// A message that can never be handled, and why.
    pub fn skip(why: impl Into<String>) -> Self {
        Failure::Skip(why.into().into())
    }
}

/// What a handler was doing when `cause` stopped it (said after it by the log line and the
/// dead letter, which print the whole chain).
#[derive(Debug, thiserror::Error)]
#[error("{doing}")]
pub struct Step {
    doing: String,
    #[source]
    cause: Box<dyn std::error::Error + Send + Sync>,
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Failure::Retry(Box::new(e))
    }
}

impl From<crate::usecases::knowledge::IndexError> for Failure {
    fn from(e: crate::usecases::knowledge::IndexError) -> Self {
        Failure::Retry(Box::new(e))
    }
}

impl From<crate::usecases::calls::settle::SettleError> for Failure {
    fn from(e: crate::usecases::calls::settle::SettleError) -> Self {
        if e.retryable() {
            Failure::Retry(Box::new(e))
        } else {
            Failure::Skip(Box::new(e))
        }
    }
}

/// The workers' share of the database pool: a handler (of any worker) runs only while it holds
/// one of these permits. A handler uses one connection at a time, so the workers together hold
/// at most [`PoolShare::permits`] connections, whatever their lanes; the rest of the pool stays
/// for the API, the projectors, the publisher, the scheduler and the voice sessions, which would
/// otherwise wait behind 5 workers × [`LANES`] lanes and time out (`pool timed out while
/// waiting for an open connection` at 500 concurrent calls).
#[derive(Clone)]
pub struct PoolShare(Arc<tokio::sync::Semaphore>);

impl PoolShare {
    /// A third of a pool of `pool_size` connections (at least 2).
    pub fn of(pool_size: u32) -> Self {
        PoolShare(Arc::new(tokio::sync::Semaphore::new(Self::permits(
            pool_size,
        ))))
    }

    /// How many handlers may run at once with a pool of `pool_size`.
    pub fn permits(pool_size: u32) -> usize {
        (pool_size as usize / 3).max(2)
    }

    async fn acquire(&self) -> tokio::sync::SemaphorePermit<'_> {
        let waited = Instant::now();
        let permit = self.0.acquire().await.expect("the share is never closed");
        metrics::histogram!("cmb_worker_permit_wait_seconds")
            .record(waited.elapsed().as_secs_f64());
        permit
    }
}

/// Runs `handle` for every message of `spec` until `shutdown`. A message is acknowledged
/// after its handler succeeded, redelivered with backoff after a failure that may pass, and
/// set aside (a dead letter, see [`crate::backbone::deadletter`]) after
/// `spec.set_aside_after` deliveries, or at once when it can never be handled; letters marked
/// for retry are handled again by whichever instance claims them. A handler runs only while it
/// holds a permit of `share`.
#[allow(clippy::too_many_arguments)]
pub async fn run<F, Fut>(
    pool: sqlx::PgPool,
    share: PoolShare,
    name: &'static str,
    stream: jetstream::stream::Stream,
    spec: DurableSpec,
    handle: F,
    shutdown: CancellationToken,
) where
    F: Fn(EventEnvelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Failure>> + Send,
{
    let handle = Arc::new(handle);
    let consumer_name = format!("worker:{name}");
    while !shutdown.is_cancelled() {
        let result: Result<(), async_nats::Error> = async {
            let consumer = consume::durable(&stream, &spec).await?;
            let mut messages = consumer.messages().await?;
            // The lanes: an aggregate's messages always go to the same one, in order. Unbounded
            // (JetStream's `max_ack_pending` bounds what is in flight): a slow handler holds up
            // its own lane only, never the dispatch to the others, and every message taken is
            // kept alive (below) from the moment it is taken.
            let (lanes, queues): (Vec<_>, Vec<_>) = (0..LANES)
                .map(|_| tokio::sync::mpsc::unbounded_channel::<Job>())
                .unzip();
            let workers = futures::future::join_all(queues.into_iter().map(|mut queue| {
                let (pool, share, handle, consumer_name, spec, shutdown) = (
                    pool.clone(),
                    share.clone(),
                    handle.clone(),
                    consumer_name.clone(),
                    spec.clone(),
                    shutdown.clone(),
                );
                async move {
                    loop {
                        let job = tokio::select! {
                            // What is queued and not begun is redelivered (never acknowledged).
                            _ = shutdown.cancelled() => break,
                            job = queue.recv() => match job {
                                Some(job) => job,
                                None => break,
                            },
                        };
                        if let Err(e) =
                            settle(&pool, &share, name, &consumer_name, &spec, handle.as_ref(), job).await
                        {
                            tracing::warn!(worker = name, error = %e, "could not settle a message; it comes back after its ack wait");
                        }
                    }
                }
            }));
            let dispatch = async {
                let lanes = lanes; // dropped at the end, so the lanes finish too
                let mut last_redrive = Instant::now();
                loop {
                    if last_redrive.elapsed() >= deadletter::REDRIVE_EVERY {
                        last_redrive = Instant::now();
                        let handle = handle.clone();
                        deadletter::redrive(&pool, &stream, &consumer_name, |_, event| {
                            let (handle, share) = (handle.clone(), share.clone());
                            async move {
                                let _permit = share.acquire().await;
                                match handle(event).await {
                                    Ok(()) => deadletter::Redriven::Done,
                                    Err(e) => deadletter::Redriven::Failed(e.to_string()),
                                }
                            }
                        })
                        .await?;
                    }
                    let message = tokio::select! {
                        _ = shutdown.cancelled() => return Ok::<(), async_nats::Error>(()),
                        m = tokio::time::timeout(deadletter::REDRIVE_EVERY, messages.next()) => m,
                    };
                    let message = match message {
                        Err(_) => continue, // idle: loop to look for letters to retry
                        Ok(None) => return Err("message stream ended".into()),
                        Ok(Some(m)) => m?,
                    };
                    let (stream_sequence, deliveries) = message
                        .info()
                        .map(|i| (i.stream_sequence, i.delivered))
                        .unwrap_or((0, 1));
                    let event = match cmb_nats::contract::decode_body(&message.payload) {
                        Ok(e) => e,
                        Err(e) => {
                            // Never acknowledged and forgotten: kept, body and all.
                            deadletter::park(
                                &pool,
                                deadletter::Parked {
                                    consumer: &consumer_name,
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
                            continue;
                        }
                    };
                    let lane = lane_of(&event);
                    let job = Job {
                        alive: keep_alive(&message, spec.ack_wait),
                        message,
                        event,
                        stream_sequence,
                        deliveries,
                    };
                    if lanes[lane].send(job).is_err() {
                        return Ok(()); // the lanes stopped: shutting down
                    }
                }
            };
            let (dispatched, _) = tokio::join!(dispatch, workers);
            dispatched
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(worker = name, error = %e, "worker stopped; restarting");
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// How many messages of different aggregates a worker handles at once. An aggregate's own
/// messages go to one lane and are handled one after another, in order; a slow provider
/// (Twilio placing a call, Stripe capturing, the LLM reading a transcript) holds up only its
/// lane, not every call behind it.
pub const LANES: usize = 16;

/// A delivered message and its event, for a lane.
struct Job {
    /// Extends the message's ack deadline until dropped (see [`keep_alive`]).
    alive: tokio_util::sync::DropGuard,
    message: jetstream::Message,
    event: EventEnvelope,
    stream_sequence: u64,
    deliveries: i64,
}

/// The lane of `event`'s aggregate.
fn lane_of(event: &EventEnvelope) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (&event.aggregate_type, &event.aggregate_id).hash(&mut hasher);
    (hasher.finish() % LANES as u64) as usize
}

/// Handles one message and acknowledges it, redelivers it with backoff, or sets it aside.
async fn settle<F, Fut>(
    pool: &sqlx::PgPool,
    share: &PoolShare,
    name: &'static str,
    consumer_name: &str,
    spec: &DurableSpec,
    handle: &F,
    job: Job,
) -> Result<(), async_nats::Error>
where
    F: Fn(EventEnvelope) -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
{
    let Job {
        alive,
        message,
        event,
        stream_sequence,
        deliveries,
    } = job;
    let id = event.event_id();
    // The message is kept alive while it waits for a permit and while it is handled.
    let handled = {
        let _permit = share.acquire().await;
        handle(event.clone()).await
    };
    drop(alive);
    match handled {
        Ok(()) => {
            message.ack().await?;
            metrics::counter!("cmb_worker_events_total", "worker" => name, "outcome" => "ok")
                .increment(1);
        }
        Err(failure) => {
            let (can_pass, e) = match failure {
                Failure::Retry(e) => (true, e),
                Failure::Skip(e) => (false, e),
            };
            let said = crate::telemetry::Causes(&*e).to_string();
            if !can_pass || deliveries >= spec.set_aside_after {
                metrics::counter!("cmb_worker_events_total", "worker" => name, "outcome" => "dead_letter").increment(1);
                deadletter::park(
                    pool,
                    deadletter::Parked {
                        consumer: consumer_name,
                        stream_sequence,
                        event: Some(&event),
                        headers: None,
                        body: None,
                        deliveries,
                        error: &said,
                        retry: false,
                    },
                )
                .await?;
                message.ack().await?;
                return Ok(());
            }
            let backoff = Duration::from_millis(200 * 2u64.pow((deliveries as u32).min(8)));
            tracing::warn!(worker = name, event = %id, deliveries, error = %said, "handler failed; redelivering");
            metrics::counter!("cmb_worker_events_total", "worker" => name, "outcome" => "retry")
                .increment(1);
            message.ack_with(AckKind::Nak(Some(backoff))).await?;
        }
    }
    Ok(())
}

/// Tells JetStream that `message` is still being worked on (`+WPI`) every third of its ack
/// wait until the guard is dropped: from the moment the dispatcher takes it, through its wait
/// in its lane behind its aggregate's earlier messages and for a permit, to the end of its
/// handler. So neither a slow handler (a provider taking its time) nor the messages queued
/// behind it are redelivered to another handler meanwhile.
fn keep_alive(message: &jetstream::Message, ack_wait: Duration) -> tokio_util::sync::DropGuard {
    let stop = CancellationToken::new();
    let (message, stopped) = (message.clone(), stop.clone());
    let every = (ack_wait / 3).max(Duration::from_millis(100));
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                _ = stopped.cancelled() => break,
                _ = ticks.tick() => {
                    if let Err(e) = message.ack_with(AckKind::Progress).await {
                        tracing::warn!(error = %e, "could not extend a message's ack deadline");
                    }
                }
            }
        }
    });
    stop.drop_guard()
}
