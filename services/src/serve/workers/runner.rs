//! The loop every worker runs: a durable consumer's messages, one at a time, acknowledged
//! after their handler succeeded, redelivered with backoff when it may succeed later, skipped
//! (and logged) when it never can.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use cmb_domain::EventEnvelope;
use cmb_nats::consume::{self, DurableSpec};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

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

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Retry(e.into())
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

/// Runs `handle` for every message of `spec` until `shutdown`.
pub async fn run<F, Fut>(
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
    while !shutdown.is_cancelled() {
        let result: Result<(), async_nats::Error> = async {
            let consumer = consume::durable(&stream, &spec).await?;
            let mut messages = consumer.messages().await?;
            loop {
                let message = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    m = messages.next() => m,
                };
                let message = match message {
                    None => return Err("message stream ended".into()),
                    Some(m) => m?,
                };
                let event = match cmb_nats::contract::decode_body(&message.payload) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!(worker = name, error = %e, "undecodable message skipped");
                        message.ack().await?;
                        continue;
                    }
                };
                let id = event.event_id();
                let deliveries = message.info().map(|i| i.delivered).unwrap_or(1);
                match handle(event).await {
                    Ok(()) => {
                        message.ack().await?;
                        metrics::counter!("cmb_worker_events_total", "worker" => name, "outcome" => "ok").increment(1);
                    }
                    Err(Failure::Skip(e)) => {
                        tracing::error!(worker = name, event = %id, error = %e, "message cannot be handled; skipped");
                        metrics::counter!("cmb_worker_events_total", "worker" => name, "outcome" => "skipped").increment(1);
                        message.ack().await?;
                    }
                    Err(Failure::Retry(e)) => {
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
