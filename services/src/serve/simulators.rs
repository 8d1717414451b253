//! The providers' simulators, built from the configuration: inside `serve` (one per provider
//! with neither a key nor a base URL, see `providers`), or all together as one shared service
//! for several instances (`callmeback sim all`), since a simulator holds state — Stripe's
//! payment intents, Twilio's calls — that only the instance which started it could see.

use std::net::SocketAddr;

use cmb_sims::{deepgram, elevenlabs, llm, smtp, stripe, twilio, workos, Faults};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;

pub fn elevenlabs(config: &Config) -> elevenlabs::ElevenLabsSim {
    let get = |k: &str| config.sim_var(k);
    elevenlabs::ElevenLabsSim::new(
        Faults::from_lookup(&get, "ELEVENLABS"),
        elevenlabs::TtsSettings::from_lookup(&get),
    )
}

/// Accepts the account and token the instances use (`TWILIO_ACCOUNT_SID`,
/// `TWILIO_AUTH_TOKEN`, or the development ones) and signs its callbacks with the token.
/// The development mailbox (`SIM_SMTP_*`).
pub fn smtp(config: &Config) -> smtp::SmtpSim {
    smtp::SmtpSim::new(Faults::from_lookup(&|k: &str| config.sim_var(k), "SMTP"))
}

/// Accepts the instances' `WORKOS_API_KEY` and `WORKOS_CLIENT_ID` (or the development ones);
/// `SIM_WORKOS_*`.
pub fn workos(config: &Config) -> workos::WorkosSim {
    let mut settings = workos::Settings::from_lookup(&|k: &str| config.sim_var(k));
    settings.api_key = config.workos.key_or(crate::config::DEV_WORKOS_API_KEY);
    settings.client_id = config.workos_client_id.clone();
    workos::WorkosSim::new(settings)
}

pub fn twilio(config: &Config) -> twilio::TwilioSim {
    let mut settings = twilio::Settings::from_lookup(&|k: &str| config.sim_var(k));
    settings.account_sid = config.twilio.account_sid.clone();
    settings.auth_token = config.twilio.auth_token.expose().to_string();
    twilio::TwilioSim::new(settings)
}

/// Signs webhooks with `STRIPE_WEBHOOK_SECRET` (or the development one) and posts them to
/// `webhook_url`.
pub fn stripe(config: &Config, webhook_url: &str) -> stripe::StripeSim {
    let mut settings = stripe::Settings::from_lookup(&|k: &str| config.sim_var(k));
    settings.webhook_secret = config.stripe.webhook_secret.expose().to_string();
    let sim = stripe::StripeSim::new(settings);
    sim.set_webhook_url(webhook_url);
    sim
}

pub fn deepgram(config: &Config) -> deepgram::DeepgramSim {
    deepgram::DeepgramSim::new(deepgram::Settings::from_lookup(&|k: &str| {
        config.sim_var(k)
    }))
}

/// `name` is `CEREBRAS` or `OPENAI` (their `SIM_<NAME>_*` variables).
pub fn llm(config: &Config, name: &'static str) -> llm::LlmSim {
    llm::LlmSim::new(llm::Settings::from_lookup(name, &|k: &str| {
        config.sim_var(k)
    }))
}

/// The simulators `callmeback sim` can run, in the order they take ports.
pub const ALL: [&str; 7] = [
    "twilio",
    "stripe",
    "deepgram",
    "cerebras",
    "openai",
    "elevenlabs",
    "workos",
];

/// One simulator serving on its own port, and the setting that points an instance at it.
pub struct Served {
    pub name: &'static str,
    /// `TWILIO_BASE_URL`, …
    pub variable: &'static str,
    pub url: String,
}

/// Serves the simulators in `which` (names of [`ALL`]) until `shutdown`: the first on `addr`,
/// the next ones on the following ports (each on a free port of its own when `addr`'s port is
/// 0). Stripe posts its webhooks to `stripe_webhook_url`.
pub async fn serve_shared(
    config: &Config,
    which: &[&'static str],
    addr: SocketAddr,
    stripe_webhook_url: &str,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> std::io::Result<Vec<Served>> {
    let mut served = Vec::new();
    for (i, name) in ALL.iter().enumerate() {
        if !which.contains(name) {
            continue;
        }
        let (router, variable, suffix) = match *name {
            "twilio" => (twilio(config).router(), "TWILIO_BASE_URL", ""),
            "stripe" => (
                stripe(config, stripe_webhook_url).router(),
                "STRIPE_BASE_URL",
                "",
            ),
            "deepgram" => (deepgram(config).router(), "DEEPGRAM_BASE_URL", ""),
            "cerebras" => (llm(config, "CEREBRAS").router(), "CEREBRAS_BASE_URL", ""),
            // The OpenAI SDKs' base URL ends in /v1.
            "openai" => (llm(config, "OPENAI").router(), "OPENAI_BASE_URL", "/v1"),
            "workos" => (workos(config).router(), "WORKOS_BASE_URL", ""),
            _ => (elevenlabs(config).router(), "ELEVENLABS_BASE_URL", ""),
        };
        let mut at = addr;
        if addr.port() != 0 {
            at.set_port(addr.port() + i as u16);
        }
        let listener = tokio::net::TcpListener::bind(at).await?;
        let local = listener.local_addr()?;
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(simulator = name, error = %e, "simulator stopped");
            }
        });
        served.push(Served {
            name,
            variable,
            url: format!("http://{local}{suffix}"),
        });
    }
    Ok(served)
}
