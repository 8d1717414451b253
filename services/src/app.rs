//! Startup: connect, migrate, ensure the stream, seed what must exist, then run the API and
//! every worker until shutdown. Tests start the same way, on a random port.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backbone::outbox::Publisher;
use crate::backbone::projector::Projector;
use crate::backbone::store::EventStore;
use crate::config::Config;
use crate::serve::http::{self, AppState};

/// The simulators this instance started (for tests to inspect).
#[derive(Clone, Default)]
pub struct Simulators {
    pub twilio: Option<cmb_sims::twilio::TwilioSim>,
    pub stripe: Option<cmb_sims::stripe::StripeSim>,
    pub deepgram: Option<cmb_sims::deepgram::DeepgramSim>,
    pub cerebras: Option<cmb_sims::llm::LlmSim>,
    pub openai: Option<cmb_sims::llm::LlmSim>,
    pub elevenlabs: Option<cmb_sims::elevenlabs::ElevenLabsSim>,
}

/// A running service.
pub struct Running {
    pub addr: SocketAddr,
    pub state: AppState,
    pub sims: Simulators,
    pub shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Running {
    /// Stops taking requests, lets workers finish what they hold, and waits for them.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Connections and the stream, shared by `serve` and the operators' commands.
pub struct Backbone {
    pub pool: sqlx::PgPool,
    pub nats: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub stream: async_nats::jetstream::stream::Stream,
}

pub async fn backbone(config: &Config, pool_size: u32) -> anyhow::Result<Backbone> {
    let pool = crate::backbone::db::connect(&config.database_url, pool_size)
        .await
        .context("connecting to Postgres")?;
    crate::backbone::db::migrate(&pool)
        .await
        .context("applying migrations")?;
    let nats = cmb_nats::connect(
        &config.nats_url,
        &format!("callmeback {}", config.instance_id),
    )
    .await
    .context("connecting to NATS")?;
    let js = async_nats::jetstream::new(nats.clone());
    let stream = cmb_nats::ensure_stream(&js, &config.stream)
        .await
        .map_err(|e| anyhow::anyhow!("creating the JetStream stream: {e}"))?;
    Ok(Backbone {
        pool,
        nats,
        js,
        stream,
    })
}

/// Brings Brad, Sarah and Alex to their shipped definitions (idempotent; safe from any number
/// of instances at once).
pub async fn define_system_personas(
    store: &EventStore,
) -> anyhow::Result<Vec<crate::backbone::store::Committed>> {
    use cmb_domain::persona::{Persona, PersonaCommand};
    let ctx = cmb_domain::CommandContext::system("define-system-personas");
    let mut committed = Vec::new();
    // The launch prices, as the first version of the price table.
    let launch = cmb_domain::pricing::PricingCommand::Publish {
        table: cmb_domain::pricing::PriceTable::LAUNCH,
        effective_from: chrono::DateTime::UNIX_EPOCH,
    };
    let (pricing, _) = store
        .load::<cmb_domain::pricing::Pricing>(cmb_domain::pricing::PRICING_ID)
        .await
        .map_err(|e| anyhow::anyhow!("loading the prices: {e}"))?;
    if pricing.tables.is_empty() {
        store
            .execute::<cmb_domain::pricing::Pricing>(cmb_domain::pricing::PRICING_ID, launch, &ctx)
            .await
            .map_err(|e| anyhow::anyhow!("publishing the launch prices: {e}"))?;
    }
    for p in cmb_domain::persona::system::system_personas() {
        let c = store
            .execute::<Persona>(
                p.id,
                PersonaCommand::DefineSystemPersona { draft: p.draft },
                &ctx,
            )
            .await
            .map_err(|e| anyhow::anyhow!("defining system persona {}: {e}", p.id))?;
        committed.push(c);
    }
    Ok(committed)
}

/// An LLM provider's base URL and key: the configured ones, or a simulator started here (its
/// URL with `sim_suffix`, e.g. `/v1` for OpenAI's base-URL convention).
async fn llm_endpoint(
    config: &Config,
    p: &crate::config::Provider,
    name: &'static str,
    real_url: &str,
    sim_suffix: &str,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> anyhow::Result<(String, String, Option<cmb_sims::llm::LlmSim>)> {
    Ok(match (&p.base_url, p.simulated()) {
        (Some(url), _) => (url.clone(), p.key_or(""), None),
        (None, true) => {
            let settings = cmb_sims::llm::Settings::from_lookup(name, &|k| config.sim_var(k));
            let sim = cmb_sims::llm::LlmSim::new(settings);
            let url = cmb_sims::serve(name, sim.router(), shutdown.clone(), tasks).await?;
            (
                format!("{url}{sim_suffix}"),
                p.key_or("simulator"),
                Some(sim),
            )
        }
        (None, false) => (real_url.to_string(), p.key_or(""), None),
    })
}

/// Starts the API and all workers.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    start_with(config, crate::clock::Clock::system()).await
}

/// Starts the API and all workers on `clock` (tests pass a manual one).
pub async fn start_with(mut config: Config, clock: crate::clock::Clock) -> anyhow::Result<Running> {
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding {}", config.http_addr))?;
    let addr = listener.local_addr()?;
    if !config.public_base_url_explicit {
        config.public_base_url = format!("http://{addr}");
    }
    let config = Arc::new(config);
    let Backbone {
        pool,
        nats,
        js,
        stream,
    } = backbone(&config, config.database_pool_size).await?;
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let store = EventStore::new(pool.clone());

    let publisher = Publisher {
        pool: pool.clone(),
        js: js.clone(),
        stream: config.stream.clone(),
        settings: config.publisher.clone(),
        instance_id: config.instance_id.clone(),
        lag_samples: None,
    };
    tasks.spawn(publisher.run(shutdown.clone()));

    let lag = crate::backbone::projector::LagBoard::default();
    let projector = Arc::new(Projector {
        pool: pool.clone(),
        stream: stream.clone(),
        settings: config.stream.clone(),
        consumer_prefix: config.consumer_prefix.clone(),
        lag: lag.clone(),
        ack_wait: config.worker_ack_wait,
    });
    let defined = define_system_personas(&store).await?;
    projector.spawn_all(cmb_projections::all(), shutdown.clone(), &tasks);
    // Serve once the persona list shows them (bounded: a lagging read model is not fatal).
    for c in &defined {
        store
            .wait_projected("personas", c, std::time::Duration::from_secs(10))
            .await;
    }

    let http_client = cmb_providers::http_client();
    let mut sims = Simulators::default();
    let elevenlabs = {
        let p = &config.elevenlabs;
        let base_url = match (&p.base_url, p.simulated()) {
            (Some(url), _) => url.clone(),
            (None, true) => {
                let faults = cmb_sims::Faults::from_lookup(&|k| config.sim_var(k), "ELEVENLABS");
                let tts = cmb_sims::elevenlabs::TtsSettings::from_lookup(&|k| config.sim_var(k));
                let sim = cmb_sims::elevenlabs::ElevenLabsSim::new(faults, tts);
                let url =
                    cmb_sims::serve("elevenlabs", sim.router(), shutdown.clone(), &tasks).await?;
                sims.elevenlabs = Some(sim);
                url
            }
            (None, false) => cmb_providers::elevenlabs::DEFAULT_BASE_URL.to_string(),
        };
        let key = p.key_or("simulator");
        cmb_providers::elevenlabs::ElevenLabs::new(http_client.clone(), &base_url, &key)
    };

    let twilio = {
        let t = &config.twilio;
        let base_url = match (&t.base_url, t.simulated) {
            (Some(url), _) => url.clone(),
            (None, true) => {
                let mut settings = cmb_sims::twilio::Settings::from_lookup(&|k| config.sim_var(k));
                settings.account_sid = t.account_sid.clone();
                settings.auth_token = t.auth_token.expose().to_string();
                let sim = cmb_sims::twilio::TwilioSim::new(settings);
                let url = cmb_sims::serve("twilio", sim.router(), shutdown.clone(), &tasks).await?;
                sims.twilio = Some(sim);
                url
            }
            (None, false) => cmb_providers::twilio::DEFAULT_BASE_URL.to_string(),
        };
        cmb_providers::twilio::Twilio::new(
            http_client.clone(),
            &base_url,
            &t.account_sid,
            t.auth_token.expose(),
        )
    };

    let stripe = {
        let st = &config.stripe;
        let base_url = match (&st.base_url, st.simulated) {
            (Some(url), _) => url.clone(),
            (None, true) => {
                let mut settings = cmb_sims::stripe::Settings::from_lookup(&|k| config.sim_var(k));
                settings.webhook_secret = st.webhook_secret.expose().to_string();
                let sim = cmb_sims::stripe::StripeSim::new(settings);
                sim.set_webhook_url(&format!("{}/api/stripe/webhook", config.public_base_url));
                let url = cmb_sims::serve("stripe", sim.router(), shutdown.clone(), &tasks).await?;
                sims.stripe = Some(sim);
                url
            }
            (None, false) => cmb_providers::stripe::DEFAULT_BASE_URL.to_string(),
        };
        cmb_providers::stripe::Stripe::new(http_client.clone(), &base_url, st.secret_key.expose())
    };

    let deepgram = {
        let p = &config.deepgram;
        let base_url = match (&p.base_url, p.simulated()) {
            (Some(url), _) => url.clone(),
            (None, true) => {
                let settings = cmb_sims::deepgram::Settings::from_lookup(&|k| config.sim_var(k));
                let sim = cmb_sims::deepgram::DeepgramSim::new(settings);
                let url =
                    cmb_sims::serve("deepgram", sim.router(), shutdown.clone(), &tasks).await?;
                sims.deepgram = Some(sim);
                url
            }
            (None, false) => cmb_providers::deepgram::DEFAULT_BASE_URL.to_string(),
        };
        let key = p.key_or("simulator");
        cmb_providers::deepgram::Deepgram::new(&base_url, &key)
    };
    let (url, key, sim) = llm_endpoint(
        &config,
        &config.cerebras,
        "CEREBRAS",
        cmb_providers::llm::CEREBRAS_BASE_URL,
        "",
        &shutdown,
        &tasks,
    )
    .await?;
    sims.cerebras = sim;
    let cerebras =
        cmb_providers::llm::Llm::cerebras(http_client.clone(), &url, &key, &config.cerebras_model);
    let (url, key, sim) = llm_endpoint(
        &config,
        &config.openai,
        "OPENAI",
        cmb_providers::llm::OPENAI_BASE_URL,
        "/v1",
        &shutdown,
        &tasks,
    )
    .await?;
    sims.openai = sim;
    let openai =
        cmb_providers::llm::Llm::openai(http_client.clone(), &url, &key, &config.openai_model);
    // Memory's embeddings use the OpenAI-compatible endpoint (or its simulator).
    let embeddings = cmb_providers::embeddings::Embeddings::new(
        http_client.clone(),
        &url,
        &key,
        &config.embeddings_model,
    );
    let voice = Arc::new(crate::serve::voice::Voice {
        store: store.clone(),
        deepgram,
        llm: cerebras,
        fallback: Some(openai),
        elevenlabs: elevenlabs.clone(),
        twilio: twilio.clone(),
        clock: clock.clone(),
        settings: crate::serve::voice::VoiceSettings {
            tts_model: config.elevenlabs_model.clone(),
            first_token_timeout: config.llm_first_token_timeout,
            max_reply_tokens: 150,
            warning_before_end: std::time::Duration::from_secs(60),
        },
        tts_cache: Default::default(),
        pacing: Default::default(),
        memory_prompt_tokens: config.memory_prompt_tokens,
    });
    // Greetings of the system personas are ready before anyone calls.
    {
        let voice = voice.clone();
        tasks.spawn(async move {
            for p in cmb_domain::persona::system::system_personas() {
                // Warmed for every call to come; billed to no call (see the README).
                if let Err(e) = voice.phrase(&p.draft.voice_id, &p.draft.greeting).await {
                    tracing::warn!(persona = p.id, error = %e, "greeting pre-synthesis failed");
                }
            }
        });
    }
    // Transcripts older than the retention period are deleted, hourly, by every instance
    // (deleting twice is harmless).
    {
        let pool = pool.clone();
        let days = config.transcript_retention_days;
        let stop = shutdown.clone();
        tasks.spawn(async move {
            loop {
                if let Err(e) = crate::serve::voice::purge_transcripts(&pool, days).await {
                    tracing::warn!(error = %e, "transcript retention failed");
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
                }
            }
        });
    }

    let worker = |name: &'static str, aggregate_type: &str| {
        let mut spec = cmb_nats::consume::DurableSpec::of_type(
            &config.stream,
            &format!("{}-worker-{name}", config.consumer_prefix),
            aggregate_type,
        );
        spec.ack_wait = config.worker_ack_wait;
        spec
    };
    {
        let store = store.clone();
        let stripe = stripe.clone();
        tasks.spawn(crate::serve::workers::run(
            crate::serve::workers::settlement::NAME,
            stream.clone(),
            worker(crate::serve::workers::settlement::NAME, "call"),
            move |event| {
                crate::serve::workers::settlement::handle(store.clone(), stripe.clone(), event)
            },
            shutdown.clone(),
        ));
    }
    {
        let memory = crate::serve::workers::memory::MemoryWorker {
            store: store.clone(),
            llm: voice.llm.clone(),
            fallback: voice.fallback.clone(),
            embeddings,
        };
        tasks.spawn(crate::serve::workers::run(
            crate::serve::workers::memory::NAME,
            stream.clone(),
            worker(crate::serve::workers::memory::NAME, "call"),
            move |event| {
                let memory = memory.clone();
                async move { memory.handle(event).await }
            },
            shutdown.clone(),
        ));
    }
    {
        let store = store.clone();
        tasks.spawn(crate::serve::workers::run(
            crate::serve::workers::contacts_cleanup::NAME,
            stream.clone(),
            worker(crate::serve::workers::contacts_cleanup::NAME, "persona"),
            move |event| crate::serve::workers::contacts_cleanup::handle(store.clone(), event),
            shutdown.clone(),
        ));
    }
    {
        let dialer = crate::serve::workers::dialer::Dialer {
            store: store.clone(),
            twilio: twilio.clone(),
            from: config.twilio.phone_number.clone(),
            public_base_url: config.public_base_url.clone(),
            clock: clock.clone(),
            exit_after_create: config.fault_dialer_exit_after_create,
        };
        tasks.spawn(crate::serve::workers::run(
            crate::serve::workers::dialer::NAME,
            stream.clone(),
            worker(crate::serve::workers::dialer::NAME, "call"),
            move |event| {
                let dialer = dialer.clone();
                async move { dialer.handle(event).await }
            },
            shutdown.clone(),
        ));
    }
    let scheduler = crate::serve::scheduler::Scheduler {
        pool: pool.clone(),
        store: store.clone(),
        clock: clock.clone(),
        instance_id: config.instance_id.clone(),
        lease_ttl: config.publisher.lease_ttl,
        tick: config.scheduler_tick,
        grace: config.schedule_grace,
    };
    tasks.spawn(scheduler.run(shutdown.clone()));

    let state = AppState {
        config: config.clone(),
        pool,
        store,
        nats,
        js,
        metrics: crate::telemetry::metrics(),
        projection_lag: lag,
        elevenlabs,
        twilio,
        stripe,
        voice,
        clock: clock.clone(),
    };
    let router = http::router(state.clone());
    let stop = shutdown.clone();
    tasks.spawn(async move {
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
    })
}
