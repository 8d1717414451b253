//! The event backbone: the command path into the Postgres event store, the publisher to
//! JetStream, the projectors that feed the read models, and the leases singletons hold.

pub mod counters;
pub mod db;
pub mod deadletter;
pub mod keys;
pub mod lease;
pub mod outbox;
pub mod pipeline;
pub mod projector;
pub mod store;
pub mod verify;

use crate::config::Config;

/// Connections and the stream, shared by `serve` and the operators' commands.
pub struct Backbone {
    pub pool: sqlx::PgPool,
    pub nats: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub stream: async_nats::jetstream::stream::Stream,
}

/// Why the backbone could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the data keys' master keys: {0}")]
    MasterKeys(String),
    #[error("connecting to Postgres")]
    Postgres(#[source] sqlx::Error),
    #[error("applying migrations")]
    Migrations(#[source] sqlx::migrate::MigrateError),
    #[error("connecting to NATS")]
    Nats(#[source] async_nats::ConnectError),
    #[error("creating the JetStream stream")]
    Stream(#[source] async_nats::Error),
    #[error("starting the event pipeline's runtime")]
    PipelineRuntime(#[source] std::io::Error),
    #[error("the event pipeline's runtime stopped while connecting")]
    PipelineStopped(#[source] tokio::task::JoinError),
}

/// Connects to Postgres (creating the database and applying migrations) and NATS, and
/// ensures the stream.
pub async fn connect(config: &Config, pool_size: u32) -> Result<Backbone, ConnectError> {
    // The master keys every data key is wrapped by, before anything reads or writes one.
    keys::install(
        keys::Masters::from_settings(
            config.data_keys_master_key.as_ref().map(|s| s.expose()),
            config.data_keys_master_key_old.as_ref().map(|s| s.expose()),
        )
        .map_err(ConnectError::MasterKeys)?,
    );
    let pool = db::connect(&config.database_url, pool_size)
        .await
        .map_err(ConnectError::Postgres)?;
    db::migrate(&pool).await.map_err(ConnectError::Migrations)?;
    let nats = cmb_nats::connect(
        &config.nats_url,
        &format!("callmeback {}", config.instance_id),
    )
    .await
    .map_err(ConnectError::Nats)?;
    let js = async_nats::jetstream::new(nats.clone());
    let stream = cmb_nats::ensure_stream(&js, &config.stream)
        .await
        .map_err(ConnectError::Stream)?;
    Ok(Backbone {
        pool,
        nats,
        js,
        stream,
    })
}
