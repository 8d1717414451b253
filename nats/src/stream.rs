//! The events stream: one stream, file storage, no age or size limit (years of history are a
//! few GB), a duplicate window for `Nats-Msg-Id` de-duplication.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

/// Where the events live. Tests give each run its own stream name and subject prefix.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    pub stream: String,
    pub subject_prefix: String,
    pub replicas: usize,
    /// How long JetStream remembers a `Nats-Msg-Id` to drop a republished copy.
    pub duplicate_window: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            stream: "CMB_EVENTS".into(),
            subject_prefix: "cmb.events".into(),
            replicas: 1,
            duplicate_window: Duration::from_secs(10 * 60),
        }
    }
}

impl StreamSettings {
    pub fn subject(&self, aggregate_type: &str, aggregate_id: &str) -> String {
        crate::contract::subject(&self.subject_prefix, aggregate_type, aggregate_id)
    }

    /// Every event's subject.
    pub fn all_subjects(&self) -> String {
        format!("{}.>", self.subject_prefix)
    }

    /// The subjects of one aggregate type.
    pub fn type_subjects(&self, aggregate_type: &str) -> String {
        format!(
            "{}.{}.>",
            self.subject_prefix,
            crate::contract::subject_token(aggregate_type)
        )
    }

    fn config(&self) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            subjects: vec![self.all_subjects()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age: Duration::ZERO,
            max_bytes: -1,
            max_messages: -1,
            num_replicas: self.replicas,
            duplicate_window: self.duplicate_window,
            allow_direct: true,
            deny_delete: true,
            ..Default::default()
        }
    }
}

/// Creates the stream, or brings an existing one to our settings.
pub async fn ensure_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<jetstream::stream::Stream, async_nats::Error> {
    let config = settings.config();
    let stream = js.get_or_create_stream(config.clone()).await?;
    let current = &stream.cached_info().config;
    if current.duplicate_window != config.duplicate_window
        || current.subjects != config.subjects
        || !current.allow_direct
        || current.num_replicas != config.num_replicas
    {
        // A changed replica count is applied in place: JetStream adds (or removes) peers and
        // catches them up from the others.
        js.update_stream(config).await?;
    }
    Ok(js.get_stream(&settings.stream).await?)
}
