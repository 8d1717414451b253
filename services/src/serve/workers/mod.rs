//! Workers: react to events from JetStream through durable consumers shared by every
//! instance. A handler must be idempotent (a message may come again after a crash); a message
//! is acknowledged only after its handler succeeded, redelivered with backoff when its handler
//! says to retry, and skipped (logged) when it says the message can never be handled
//! (`runner::Failure`).

pub mod contacts_cleanup;
pub mod dialer;
pub mod knowledge;
pub mod memory;
mod runner;
pub mod settlement;

pub use runner::{decode, run, Failure, PoolShare};

use async_nats::jetstream;
use cmb_nats::consume::DurableSpec;
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
        spec.set_aside_after = config.consumer_max_deliveries;
        spec
    };
    // One share of the pool for every worker's handlers together.
    let share = PoolShare::of(config.database_pool_size);
    {
        let store = store.clone();
        let stripe = providers.stripe.clone();
        tasks.spawn(run(
            store.pool().clone(),
            share.clone(),
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
            store.pool().clone(),
            share.clone(),
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
        let worker = knowledge::KnowledgeWorker {
            store: store.clone(),
            embeddings: providers.embeddings.clone(),
        };
        tasks.spawn(run(
            store.pool().clone(),
            share.clone(),
            knowledge::NAME,
            stream.clone(),
            spec(knowledge::NAME, "persona"),
            move |event| {
                let worker = worker.clone();
                async move { worker.handle(event).await }
            },
            shutdown.clone(),
        ));
    }
    {
        let store = store.clone();
        tasks.spawn(run(
            store.pool().clone(),
            share.clone(),
            contacts_cleanup::NAME,
            stream.clone(),
            spec(contacts_cleanup::NAME, "persona"),
            move |event| {
                let store = store.clone();
                async move { contacts_cleanup::handle(store, event).await }
            },
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
            policy: config.limits.calls.clone(),
        };
        tasks.spawn(run(
            store.pool().clone(),
            share.clone(),
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
