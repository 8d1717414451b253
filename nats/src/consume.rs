//! Durable pull consumers, shared by every instance: JetStream hands each message to one of
//! them, and redelivers what is not acknowledged in time.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};

use crate::stream::StreamSettings;

/// How a durable consumer behaves.
#[derive(Debug, Clone)]
pub struct DurableSpec {
    pub name: String,
    pub filter_subject: String,
    pub ack_wait: Duration,
    pub max_ack_pending: i64,
    /// Deliveries after which the consumer's owner sets a message it keeps failing on aside
    /// (JetStream itself never drops one: `max_deliver` is unlimited).
    pub set_aside_after: i64,
    /// Copies of the consumer's state in the cluster: the stream's (`NATS_REPLICAS`), so a
    /// consumer survives the loss of any node its stream survives.
    pub replicas: usize,
}

impl DurableSpec {
    /// A consumer of every event of the stream.
    pub fn all_events(settings: &StreamSettings, name: &str) -> Self {
        DurableSpec {
            name: name.to_string(),
            filter_subject: settings.all_subjects(),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1_000,
            set_aside_after: 6,
            replicas: settings.replicas,
        }
    }

    /// A consumer of one aggregate type's events.
    pub fn of_type(settings: &StreamSettings, name: &str, aggregate_type: &str) -> Self {
        DurableSpec {
            filter_subject: settings.type_subjects(aggregate_type),
            ..Self::all_events(settings, name)
        }
    }
}

/// Gets or creates the durable consumer `spec.name` on the events stream.
pub async fn durable(
    stream: &jetstream::stream::Stream,
    spec: &DurableSpec,
) -> Result<consumer::PullConsumer, async_nats::Error> {
    let config = consumer::pull::Config {
        durable_name: Some(spec.name.clone()),
        filter_subject: spec.filter_subject.clone(),
        ack_policy: consumer::AckPolicy::Explicit,
        deliver_policy: consumer::DeliverPolicy::All,
        ack_wait: spec.ack_wait,
        max_ack_pending: spec.max_ack_pending,
        max_deliver: -1,
        num_replicas: spec.replicas,
        ..Default::default()
    };
    let mut consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(&spec.name, config.clone())
        .await?;
    // A consumer made under other settings (fewer replicas before the cluster grew, another
    // ack wait, a filter) follows the configured ones: JetStream updates these in place (a new
    // filter applies from the consumer's position on).
    let current = consumer.info().await?.config.clone();
    if current.num_replicas.max(1) != config.num_replicas.max(1)
        || current.ack_wait != config.ack_wait
        || current.max_ack_pending != config.max_ack_pending
        || current.filter_subject != config.filter_subject
    {
        tracing::info!(
            consumer = %spec.name,
            replicas = config.num_replicas,
            was = current.num_replicas,
            "updating the durable consumer to the configured settings"
        );
        // NATS 2.9 has no separate update call: creating a durable that exists with editable
        // fields changed updates it.
        consumer = stream.create_consumer(config).await?;
    }
    Ok(consumer)
}

/// Messages a durable consumer has not yet had acknowledged (pending plus in flight).
pub async fn lag(consumer: &mut consumer::PullConsumer) -> Result<u64, async_nats::Error> {
    let info = consumer.info().await?;
    Ok(info.num_pending + info.num_ack_pending as u64)
}
