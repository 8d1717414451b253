//! Workers: react to events from JetStream through durable consumers shared by every
//! instance. A handler must be idempotent (a message may come again after a crash); a message
//! is acknowledged only after its handler succeeded, and redelivered with backoff otherwise.

pub mod contacts_cleanup;
pub mod dialer;
pub mod memory;
pub mod settlement;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use cmb_domain::EventEnvelope;
use cmb_nats::consume::{self, DurableSpec};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// Runs `handle` for every message of `spec` until `shutdown`.
pub async fn run<F, Fut>(
    name: &'static str,
    stream: jetstream::stream::Stream,
    spec: DurableSpec,
    handle: F,
    shutdown: CancellationToken,
) where
    F: Fn(EventEnvelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
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
                    Err(e) => {
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
