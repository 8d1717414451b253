//! The event pipeline — the publisher and the projectors — on a runtime, a Postgres pool and a
//! NATS connection of its own.
//!
//! Commit → stream → read model is what every read after a write waits for. On the service's
//! runtime its tasks queued behind the API's requests, the voice sessions' frames and the
//! workers for a thread, and behind them again for a connection of the shared pool: at 500
//! calls the projection lag's p99 was seconds, spread over every stage (README "Benchmarks").
//! Here it has its own thread (the kernel gives a thread that mostly sleeps the core soon
//! after it wakes), its own connections and its own NATS socket, driven by that thread.

use async_nats::jetstream;
use sqlx::PgPool;

use super::ConnectError;
use crate::config::Config;

/// Worker threads of the pipeline's runtime: its tasks mostly wait on Postgres and NATS.
const THREADS: usize = 1;

pub struct Pipeline {
    /// Always `Some` until dropped (taken there to shut it down without blocking).
    runtime: Option<tokio::runtime::Runtime>,
    pub pool: PgPool,
    pub js: jetstream::Context,
    pub stream: jetstream::stream::Stream,
}

impl Pipeline {
    /// Starts the runtime and connects its pool (`PIPELINE_POOL_SIZE` connections) and its
    /// NATS client from it, so their sockets are driven by its thread. The database and the
    /// stream exist already ([`crate::backbone::connect`]).
    pub async fn start(config: &Config) -> Result<Pipeline, ConnectError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(THREADS)
            .thread_name("cmb-pipeline")
            .enable_all()
            .build()
            .map_err(ConnectError::PipelineRuntime)?;
        let database_url = config.database_url.clone();
        let pool_size = config.pipeline_pool_size;
        let nats_url = config.nats_url.clone();
        let client_name = format!("callmeback {} pipeline", config.instance_id);
        let stream_name = config.stream.stream.clone();
        let connected = runtime
            .spawn(async move {
                let pool = super::db::connect(&database_url, pool_size)
                    .await
                    .map_err(ConnectError::Postgres)?;
                let nats = cmb_nats::connect(&nats_url, &client_name)
                    .await
                    .map_err(ConnectError::Nats)?;
                let js = jetstream::new(nats);
                let stream = js
                    .get_stream(&stream_name)
                    .await
                    .map_err(|e| ConnectError::Stream(e.into()))?;
                Ok::<_, ConnectError>((pool, js, stream))
            })
            .await
            .map_err(ConnectError::PipelineStopped)
            .and_then(|connected| connected);
        let (pool, js, stream) = match connected {
            Ok(connected) => connected,
            Err(e) => {
                // Dropped here it would block inside the caller's runtime, which panics.
                runtime.shutdown_background();
                return Err(e);
            }
        };
        Ok(Pipeline {
            runtime: Some(runtime),
            pool,
            js,
            stream,
        })
    }

    /// Where the pipeline's tasks are spawned.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime
            .as_ref()
            .expect("the runtime is only taken on drop")
            .handle()
    }
}

impl Drop for Pipeline {
    /// Stops what still runs on it without waiting (dropping a runtime inside another one's
    /// task would panic): a stopped service has waited for its tasks already.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the whole suite: with Postgres out of connections the pipeline's runtime was
    /// dropped inside the caller's, which panicked instead of reporting the error.
    #[tokio::test]
    async fn a_pipeline_that_cannot_connect_says_so_instead_of_panicking() {
        let config = Config::from_lookup(|k| match k {
            // Nothing listens on port 1.
            "DATABASE_URL" => Some("postgres://postgres@127.0.0.1:1/nothing".into()),
            _ => None,
        })
        .expect("a development configuration");
        let err = Pipeline::start(&config)
            .await
            .err()
            .expect("no Postgres, no pipeline");
        assert!(matches!(err, ConnectError::Postgres(_)), "{err:?}");
    }
}
