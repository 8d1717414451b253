//! The loop every worker runs: a durable consumer's messages, one at a time, acknowledged
//! after their handler succeeded, redelivered with backoff when it may succeed later, skipped
//! (and logged) when it never can.

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
    event.decode().map(Some).map_err(|e| {
        Failure::Skip(
            format!(
                "{} {} does not decode as its type: {e}",
                event.event_type,
                event.event_id()
            )
            .into(),
        )
    })
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Retry(e.into())
    }
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
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

/// Runs `handle` for every message of `spec` until `shutdown`. A message is acknowledged
/// after its handler succeeded, redelivered with backoff after a failure that may pass, and
/// set aside (a dead letter, see [`crate::backbone::deadletter`]) after
/// `spec.set_aside_after` deliveries, or at once when it can never be handled; letters marked
/// for retry are handled again by whichever instance claims them.
pub async fn run<F, Fut>(
    pool: sqlx::PgPool,
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
            let mut last_redrive = Instant::now();
            loop {
                if last_redrive.elapsed() >= deadletter::REDRIVE_EVERY {
                    last_redrive = Instant::now();
                    let handle = handle.clone();
                    deadletter::redrive(&pool, &stream, &consumer_name, |_, event| {
                        let handle = handle.clone();
                        async move {
                            match handle(event).await {
                                Ok(()) => deadletter::Redriven::Done,
                                Err(e) => deadletter::Redriven::Failed(e.to_string()),
                            }
                        }
                    })
                    .await?;
                }
                let message = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
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
                let id = event.event_id();
                match with_progress(&message, spec.ack_wait, handle(event.clone())).await {
                    Ok(()) => {
                        message.ack().await?;
                        metrics::counter!("cmb_worker_events_total", "worker" => name, "outcome" => "ok").increment(1);
                    }
                    Err(failure) => {
                        let (can_pass, e) = match failure {
                            Failure::Retry(e) => (true, e),
                            Failure::Skip(e) => (false, e),
                        };
                        if !can_pass || deliveries >= spec.set_aside_after {
                            metrics::counter!("cmb_worker_events_total", "worker" => name, "outcome" => "dead_letter").increment(1);
                            deadletter::park(
                                &pool,
                                deadletter::Parked {
                                    consumer: &consumer_name,
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
                            continue;
                        }
                        let backoff = Duration::from_millis(200 * 2u64.pow((deliveries as u32).min(8)));
                        tracing::warn!(worker = name, event = %id, deliveries, error = %e, "handler failed; redelivering");
                        metrics::counter!("cmb_worker_events_total", "worker" => name, "outcome" => "retry").increment(1);
                        message.ack_with(AckKind::Nak(Some(backoff))).await?;
                    }
                }
            }
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

/// Runs `work`, telling JetStream the message is still being worked on (`+WPI`) every third of
/// its ack wait, so a slow handler (a provider taking its time) is not redelivered to another
/// handler while it still runs.
async fn with_progress<T>(
    message: &jetstream::Message,
    ack_wait: Duration,
    work: impl Future<Output = T>,
) -> T {
    let every = (ack_wait / 3).max(Duration::from_millis(100));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = ticks.tick() => {
                if let Err(e) = message.ack_with(AckKind::Progress).await {
                    tracing::warn!(error = %e, "could not extend a message's ack deadline");
                }
            }
        }
    }
}
