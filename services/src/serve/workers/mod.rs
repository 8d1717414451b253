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
use tokio_util::task::TaskTracker;

use crate::backbone::store::EventStore;
use crate::clock::Clock;
use crate::config::Config;
use crate::serve::providers::Providers;

/// Starts every worker on `stream` until `shutdown`, tracked by `tasks`.
pub fn spawn_all(
    config: &Config,
    stream: &jetstream::stream::Stream,
    store: &EventStore,
    providers: &Providers,
    clock: &Clock,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) {
    let spec = |name: &'static str, aggregate_type: &str| {
        let mut spec = DurableSpec::of_type(
            &config.stream,
            &format!("{}-worker-{name}", config.consumer_prefix),
            aggregate_type,
        );
        spec.ack_wait = config.worker_ack_wait;
        spec
    };
    {
        let store = store.clone();
        let stripe = providers.stripe.clone();
        tasks.spawn(run(
            settlement::NAME,
            stream.clone(),
            spec(settlement::NAME, "call"),
            move |event| settlement::handle(store.clone(), stripe.clone(), event),
            shutdown.clone(),
        ));
    }
    {
        let memory = memory::MemoryWorker {
            store: store.clone(),
            llm: providers.cerebras.clone(),
            fallback: Some(providers.openai.clone()),
            embeddings: providers.embeddings.clone(),
        };
        tasks.spawn(run(
            memory::NAME,
            stream.clone(),
            spec(memory::NAME, "call"),
            move |event| {
                let memory = memory.clone();
                async move { memory.handle(event).await }
            },
            shutdown.clone(),
        ));
    }
    {
        let store = store.clone();
        tasks.spawn(run(
            contacts_cleanup::NAME,
            stream.clone(),
            spec(contacts_cleanup::NAME, "persona"),
            move |event| contacts_cleanup::handle(store.clone(), event),
            shutdown.clone(),
        ));
    }
    {
        let dialer = dialer::Dialer {
            store: store.clone(),
            twilio: providers.twilio.clone(),
            from: config.twilio.phone_number.clone(),
            public_base_url: config.public_base_url.clone(),
            clock: clock.clone(),
        };
        tasks.spawn(run(
            dialer::NAME,
            stream.clone(),
            spec(dialer::NAME, "call"),
            move |event| {
                let dialer = dialer.clone();
                async move { dialer.handle(event).await }
            },
            shutdown.clone(),
        ));
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
