//! The providers an instance talks to: for each, the real client at the configured base URL,
//! at the provider's own URL when a key is set, or — with neither, in a build with the `sims`
//! feature — at a simulator started here on loopback. The rest of the code holds clients and
//! does not know which of the three it has.

use cmb_providers::deepgram::Deepgram;
use cmb_providers::elevenlabs::ElevenLabs;
use cmb_providers::email::Mailer;
use cmb_providers::embeddings::Embeddings;
use cmb_providers::llm::Llm;
use cmb_providers::stripe::Stripe;
use cmb_providers::twilio::Twilio;
use cmb_providers::workos::Workos;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
#[cfg(feature = "sims")]
use crate::serve::simulators;

/// The connected clients.
#[derive(Clone)]
pub struct Providers {
    pub twilio: Twilio,
    pub stripe: Stripe,
    pub deepgram: Deepgram,
    pub cerebras: Llm,
    pub openai: Llm,
    /// Memory's embeddings, on the OpenAI-compatible endpoint (or its simulator).
    pub embeddings: Embeddings,
    pub elevenlabs: ElevenLabs,
    /// Email (password reset links), over SMTP.
    pub mailer: Mailer,
    /// AuthKit sign-in; None when WorkOS is not configured in production (switched off).
    pub workos: Option<Workos>,
}

/// The simulators this instance started (for tests to inspect).
#[derive(Clone, Default)]
pub struct Simulators {
    #[cfg(feature = "sims")]
    pub twilio: Option<cmb_sims::twilio::TwilioSim>,
    #[cfg(feature = "sims")]
    pub stripe: Option<cmb_sims::stripe::StripeSim>,
    #[cfg(feature = "sims")]
    pub deepgram: Option<cmb_sims::deepgram::DeepgramSim>,
    #[cfg(feature = "sims")]
    pub cerebras: Option<cmb_sims::llm::LlmSim>,
    #[cfg(feature = "sims")]
    pub openai: Option<cmb_sims::llm::LlmSim>,
    #[cfg(feature = "sims")]
    pub elevenlabs: Option<cmb_sims::elevenlabs::ElevenLabsSim>,
    /// The development mailbox.
    #[cfg(feature = "sims")]
    pub smtp: Option<cmb_sims::smtp::SmtpSim>,
    /// AuthKit's hosted page, code exchange, users and the SSO organisation.
    #[cfg(feature = "sims")]
    pub workos: Option<cmb_sims::workos::WorkosSim>,
}

/// A provider has no key and no base URL, and this build cannot simulate it.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "{0}: no key and no base URL are set, and this build has no simulators (build with the \
         `sims` feature, or configure the provider)"
    )]
    NotConfigured(&'static str),
    #[error("starting the {0} simulator: {1}")]
    Simulator(&'static str, std::io::Error),
    #[error(transparent)]
    Email(#[from] cmb_providers::email::EmailError),
}

/// Where a provider's client points.
enum Endpoint {
    /// A configured base URL, or the provider's own.
    Url(String),
    /// Neither a key nor a base URL: a simulator (if this build has them).
    Simulated,
}

fn endpoint(base_url: &Option<String>, simulated: bool, real_url: &str) -> Endpoint {
    // `simulated` is true without a key and base URL, or when `SIMULATE` names the provider.
    match (base_url, simulated) {
        (_, true) => Endpoint::Simulated,
        (Some(url), false) => Endpoint::Url(url.clone()),
        (None, false) => Endpoint::Url(real_url.to_string()),
    }
}

#[cfg(feature = "sims")]
async fn serve_sim(
    name: &'static str,
    router: axum::Router,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> Result<String, ConnectError> {
    cmb_sims::serve(name, router, shutdown.clone(), tasks)
        .await
        .map_err(|e| ConnectError::Simulator(name, e))
}

impl Providers {
    /// Connects every provider; simulators run until `shutdown`, tracked by `tasks`.
    #[cfg_attr(not(feature = "sims"), allow(unused_variables))]
    pub async fn connect(
        config: &Config,
        shutdown: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<(Providers, Simulators), ConnectError> {
        let http = cmb_providers::http_client();
        #[cfg_attr(not(feature = "sims"), allow(unused_mut))]
        let mut sims = Simulators::default();

        let p = &config.elevenlabs;
        let base_url = match endpoint(
            &p.base_url,
            p.simulated(),
            cmb_providers::elevenlabs::DEFAULT_BASE_URL,
        ) {
            Endpoint::Url(url) => url,
            #[cfg(feature = "sims")]
            Endpoint::Simulated => {
                let sim = simulators::elevenlabs(config);
                let url = serve_sim("elevenlabs", sim.router(), shutdown, tasks).await?;
                sims.elevenlabs = Some(sim);
                url
            }
            #[cfg(not(feature = "sims"))]
            Endpoint::Simulated => return Err(ConnectError::NotConfigured("ElevenLabs")),
        };
        let elevenlabs = ElevenLabs::new(http.clone(), &base_url, &p.key_or("simulator"));

        let t = &config.twilio;
        let base_url = match endpoint(
            &t.base_url,
            t.simulated,
            cmb_providers::twilio::DEFAULT_BASE_URL,
        ) {
            Endpoint::Url(url) => url,
            #[cfg(feature = "sims")]
            Endpoint::Simulated => {
                let sim = simulators::twilio(config);
                let url = serve_sim("twilio", sim.router(), shutdown, tasks).await?;
                sims.twilio = Some(sim);
                url
            }
            #[cfg(not(feature = "sims"))]
            Endpoint::Simulated => return Err(ConnectError::NotConfigured("Twilio")),
        };
        let twilio = Twilio::new(
            http.clone(),
            &base_url,
            &t.account_sid,
            t.auth_token.expose(),
        );

        let st = &config.stripe;
        let base_url = match endpoint(
            &st.base_url,
            st.simulated,
            cmb_providers::stripe::DEFAULT_BASE_URL,
        ) {
            Endpoint::Url(url) => url,
            #[cfg(feature = "sims")]
            Endpoint::Simulated => {
                let sim = simulators::stripe(
                    config,
                    &format!("{}/api/stripe/webhook", config.public_base_url),
                );
                let url = serve_sim("stripe", sim.router(), shutdown, tasks).await?;
                sims.stripe = Some(sim);
                url
            }
            #[cfg(not(feature = "sims"))]
            Endpoint::Simulated => return Err(ConnectError::NotConfigured("Stripe")),
        };
        // The simulator takes test-mode keys only (`SIMULATE=stripe` beside a live key).
        let key = if st.simulated {
            crate::config::DEV_STRIPE_SECRET_KEY
        } else {
            st.secret_key.expose()
        };
        let stripe = Stripe::new(http.clone(), &base_url, key);

        let p = &config.deepgram;
        let base_url = match endpoint(
            &p.base_url,
            p.simulated(),
            cmb_providers::deepgram::DEFAULT_BASE_URL,
        ) {
            Endpoint::Url(url) => url,
            #[cfg(feature = "sims")]
            Endpoint::Simulated => {
                let sim = simulators::deepgram(config);
                let url = serve_sim("deepgram", sim.router(), shutdown, tasks).await?;
                sims.deepgram = Some(sim);
                url
            }
            #[cfg(not(feature = "sims"))]
            Endpoint::Simulated => return Err(ConnectError::NotConfigured("Deepgram")),
        };
        let deepgram = Deepgram::new(&base_url, &p.key_or("simulator"));

        // LLMs: a simulator's URL gets the suffix of the provider's base-URL convention
        // (`/v1` for OpenAI).
        let p = &config.cerebras;
        let (url, key) = match endpoint(
            &p.base_url,
            p.simulated(),
            cmb_providers::llm::CEREBRAS_BASE_URL,
        ) {
            // A base URL without a key (a simulator shared by several instances, a local
            // gateway): a placeholder key, as Deepgram and ElevenLabs get, since an
            // OpenAI-style API refuses a request with none.
            Endpoint::Url(url) => (url, p.key_or("simulator")),
            #[cfg(feature = "sims")]
            Endpoint::Simulated => {
                let sim = simulators::llm(config, "CEREBRAS");
                let url = serve_sim("CEREBRAS", sim.router(), shutdown, tasks).await?;
                sims.cerebras = Some(sim);
                (url, p.key_or("simulator"))
            }
            #[cfg(not(feature = "sims"))]
            Endpoint::Simulated => return Err(ConnectError::NotConfigured("Cerebras")),
        };
        let cerebras = Llm::cerebras(http.clone(), &url, &key, &config.cerebras_model);

        let p = &config.openai;
        let (url, key) = match endpoint(
            &p.base_url,
            p.simulated(),
            cmb_providers::llm::OPENAI_BASE_URL,
        ) {
            Endpoint::Url(url) => (url, p.key_or("simulator")),
            #[cfg(feature = "sims")]
            Endpoint::Simulated => {
                let sim = simulators::llm(config, "OPENAI");
                let url = serve_sim("OPENAI", sim.router(), shutdown, tasks).await?;
                sims.openai = Some(sim);
                (format!("{url}/v1"), p.key_or("simulator"))
            }
            #[cfg(not(feature = "sims"))]
            Endpoint::Simulated => return Err(ConnectError::NotConfigured("OpenAI")),
        };
        let openai = Llm::openai(http.clone(), &url, &key, &config.openai_model);
        let embeddings = Embeddings::new(http.clone(), &url, &key, &config.embeddings_model);

        let smtp_url = match &config.smtp_url {
            Some(url) => url.expose().to_string(),
            #[cfg(feature = "sims")]
            None => {
                let sim = simulators::smtp(config);
                let url = sim
                    .serve(shutdown.clone(), tasks)
                    .await
                    .map_err(|e| ConnectError::Simulator("smtp", e))?;
                sims.smtp = Some(sim);
                url
            }
            #[cfg(not(feature = "sims"))]
            None => return Err(ConnectError::NotConfigured("SMTP")),
        };
        let mailer = Mailer::new(&smtp_url, &config.email_from)?;

        let w = &config.workos;
        let client_id = &config.workos_client_id;
        let workos = if w.api_key.is_some() || w.base_url.is_some() {
            let url = w
                .base_url
                .clone()
                .unwrap_or_else(|| cmb_providers::workos::DEFAULT_BASE_URL.into());
            let key = w.key_or(crate::config::DEV_WORKOS_API_KEY);
            Some(Workos::new(http.clone(), &url, &key, client_id))
        } else if config.mode == crate::config::RunMode::Production {
            tracing::warn!("WorkOS sign-in is off: WORKOS_API_KEY is not set");
            None
        } else {
            #[cfg(feature = "sims")]
            {
                let sim = simulators::workos(config);
                let url = serve_sim("workos", sim.router(), shutdown, tasks).await?;
                sims.workos = Some(sim);
                let key = crate::config::DEV_WORKOS_API_KEY;
                Some(Workos::new(http.clone(), &url, key, client_id))
            }
            #[cfg(not(feature = "sims"))]
            None
        };

        Ok((
            Providers {
                twilio,
                stripe,
                deepgram,
                cerebras,
                openai,
                embeddings,
                elevenlabs,
                mailer,
                workos,
            },
            sims,
        ))
    }
}
