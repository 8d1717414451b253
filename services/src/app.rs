//! Startup: connect, migrate, ensure the stream, seed what must exist, then run the API and
//! every worker until shutdown. Tests start the same way, on a random port.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backbone::outbox::Publisher;
use crate::backbone::projector::Projector;
use crate::backbone::store::EventStore;
use crate::backbone::Backbone;
use crate::config::Config;
use crate::serve::http::{self, state::AppState};
use crate::serve::providers::{Providers, Simulators};

/// Why the service did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    RunMode(#[from] crate::config::mode::RunModeError),
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Backbone(#[from] crate::backbone::ConnectError),
    #[error("defining the system personas")]
    SystemPersonas(#[from] crate::usecases::personas::SystemError),
    #[error("defining the system personas' knowledge")]
    SystemLibraries(
        #[from] crate::backbone::store::CommandError<cmb_domain::persona::PersonaError>,
    ),
    #[error(transparent)]
    Providers(#[from] crate::serve::providers::ConnectError),
}

/// A running service.
pub struct Running {
    pub addr: SocketAddr,
    pub state: AppState,
    pub sims: Simulators,
    pub shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Shut down after the tasks, when this is dropped.
    _pipeline: crate::backbone::pipeline::Pipeline,
}

impl Running {
    /// Stops taking requests, lets workers finish what they hold, and waits for them.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Starts the API and all workers.
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_with(config, crate::clock::Clock::system()).await
}

/// Starts the API and all workers on `clock` (tests pass a manual one).
pub async fn start_with(
    mut config: Config,
    clock: crate::clock::Clock,
) -> Result<Running, StartError> {
    // Production without what it needs never starts (`cli` prints the same lines and exits 2).
    config.check_run_mode()?;
    let bind = |source| StartError::Bind {
        addr: config.http_addr,
        source,
    };
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .map_err(bind)?;
    let addr = listener.local_addr().map_err(bind)?;
    if !config.public_base_url_explicit {
        config.public_base_url = format!("http://{addr}");
    }
    let config = Arc::new(config);
    crate::usecases::accounts::password::configure(
        config.limits.password_hashers,
        config.limits.password_queue,
    );
    let Backbone {
        pool,
        nats,
        js,
        stream,
    } = crate::backbone::connect(&config, config.database_pool_size).await?;
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let store = EventStore::new(pool.clone());
    config.log_run_mode();
    if config.mode == crate::config::RunMode::Development || !config.simulate.is_empty() {
        // The banner again every few minutes, so nobody mistakes this for production.
        let config = config.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(crate::config::mode::BANNER_EVERY) => {}
                }
                config.log_run_mode();
            }
        });
    }

    // Commit → stream → read model on a runtime, pool and NATS connection of its own.
    let pipeline = crate::backbone::pipeline::Pipeline::start(&config).await?;
    let publisher = Publisher {
        pool: pipeline.pool.clone(),
        js: pipeline.js.clone(),
        stream: config.stream.clone(),
        settings: config.publisher.clone(),
        instance_id: config.instance_id.clone(),
        lag_samples: None,
        after_wave: None,
    };
    tasks.spawn_on(publisher.run(shutdown.clone()), pipeline.handle());

    let lag = crate::backbone::projector::LagBoard::default();
    let projector = Arc::new(Projector {
        pool: pipeline.pool.clone(),
        keys: crate::backbone::keys::Keyring::new(pipeline.pool.clone()),
        stream: pipeline.stream.clone(),
        settings: config.stream.clone(),
        consumer_prefix: config.consumer_prefix.clone(),
        lag: lag.clone(),
        ack_wait: config.worker_ack_wait,
        max_deliveries: config.consumer_max_deliveries,
    });
    let mut defined = crate::usecases::personas::define_system_personas(&store).await?;
    defined.extend(crate::usecases::knowledge::define_system_libraries(&store).await?);
    projector.spawn_all(
        cmb_projections::all(),
        shutdown.clone(),
        &tasks,
        pipeline.handle(),
    );
    // Serve once the persona list shows them (bounded: a lagging read model is not fatal).
    for c in &defined {
        store
            .wait_projected("personas", c, std::time::Duration::from_secs(10))
            .await;
    }

    let (providers, sims) = Providers::connect(&config, &shutdown, &tasks).await?;
    let voice = Arc::new(crate::serve::voice::Voice {
        store: store.clone(),
        deepgram: providers.deepgram.clone(),
        llm: providers.cerebras.clone(),
        fallback: Some(providers.openai.clone()),
        elevenlabs: providers.elevenlabs.clone(),
        twilio: providers.twilio.clone(),
        clock: clock.clone(),
        settings: crate::serve::voice::VoiceSettings {
            tts_model: config.elevenlabs_model.clone(),
            first_token_timeout: config.llm_first_token_timeout,
            max_reply_tokens: 150,
            warning_before_end: std::time::Duration::from_secs(60),
        },
        tts_cache: Default::default(),
        pacing: Default::default(),
        call_ends: Default::default(),
        memory_prompt_tokens: config.memory_prompt_tokens,
        knowledge: crate::serve::voice::KnowledgeSettings {
            embeddings: providers.embeddings.clone(),
            prompt_tokens: config.knowledge_prompt_tokens,
            session_passages: config.knowledge_session_passages,
            indexes: Default::default(),
        },
        stream_tokens: crate::serve::voice::StreamTokens::new(config.jwt_secret.expose()),
    });
    // Greetings of the system personas are ready before anyone calls.
    {
        let voice = voice.clone();
        tasks.spawn(async move {
            for p in cmb_domain::persona::system::system_personas() {
                // Warmed for every call to come, so no call pays for it: a system cost.
                match voice.phrase(&p.draft.voice_id, &p.draft.greeting).await {
                    Ok((_, chars)) if chars > 0 => {
                        voice
                            .record_system_cost(
                                "greeting-cache",
                                p.id,
                                cmb_domain::cost::CostKind::TtsCharacters,
                                chars as i64,
                            )
                            .await
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(persona = p.id, error = %e, "greeting pre-synthesis failed")
                    }
                }
            }
        });
    }
    // Transcripts older than the retention period are deleted, hourly, by every instance
    // (deleting twice is harmless), and what personas learned from them forgotten.
    {
        let store = store.clone();
        let days = config.transcript_retention_days;
        let stop = shutdown.clone();
        tasks.spawn(async move {
            loop {
                if let Err(e) = crate::serve::transcripts::apply_retention(&store, days).await {
                    tracing::warn!(error = %e, "transcript retention failed");
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
                }
            }
        });
    }

    crate::serve::workers::spawn_all(
        &config, &stream, &store, &providers, &clock, &shutdown, &tasks,
    );
    let scheduler = crate::serve::scheduler::Scheduler {
        pool: pool.clone(),
        store: store.clone(),
        clock: clock.clone(),
        instance_id: config.instance_id.clone(),
        lease_ttl: config.publisher.lease_ttl,
        tick: config.scheduler_tick,
        grace: config.schedule_grace,
        twilio: providers.twilio.clone(),
    };
    tasks.spawn(scheduler.run(shutdown.clone()));
    let sweeper = crate::serve::sweeper::Sweeper {
        store: store.clone(),
        stripe: providers.stripe.clone(),
        instance_id: config.instance_id.clone(),
        lease_ttl: config.publisher.lease_ttl,
        grace: config.call_request_grace,
    };
    tasks.spawn(sweeper.run(shutdown.clone()));
    let erasures = crate::serve::erasures::Erasures {
        store: store.clone(),
        stripe: providers.stripe.clone(),
        instance_id: config.instance_id.clone(),
        lease_ttl: config.publisher.lease_ttl,
        retry: config.erasure_retry,
    };
    tasks.spawn(erasures.run(shutdown.clone()));

    let state = AppState {
        config: config.clone(),
        pool,
        store,
        nats,
        js,
        metrics: crate::telemetry::metrics(),
        projection_lag: lag,
        elevenlabs: providers.elevenlabs.clone(),
        twilio: providers.twilio.clone(),
        stripe: providers.stripe.clone(),
        mailer: providers.mailer.clone(),
        workos: providers.workos.clone(),
        voice,
        clock: clock.clone(),
    };
    let router = http::router(state.clone());
    let stop = shutdown.clone();
    tasks.spawn(async move {
        use axum::serve::ListenerExt as _;
        // No Nagle delay: the media stream sends a 20 ms frame at a time.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
        });
        let served = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    tracing::info!(%addr, instance = %config.instance_id, "callmeback is serving");
    Ok(Running {
        addr,
        state,
        sims,
        shutdown,
        tasks,
        _pipeline: pipeline,
    })
}
