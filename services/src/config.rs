//! Configuration: one typed struct, loaded once from the environment (and `.env`).

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use cmb_nats::StreamSettings;

pub mod limits;
pub mod mode;

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone)]
pub struct PublisherSettings {
    /// Pause between polls of the event table when there is nothing to publish.
    pub idle_poll: Duration,
    /// Events per read.
    pub batch: i64,
    pub lease_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub nats_url: String,
    pub http_addr: SocketAddr,
    pub public_base_url: String,
    pub stream: StreamSettings,
    /// Prefix of durable consumer names, so two deployments can share a NATS cluster.
    pub consumer_prefix: String,
    pub log_format: LogFormat,
    pub instance_id: String,
    pub jwt_secret: Secret,
    pub publisher: PublisherSettings,
    /// How long a write waits for its own read model before answering (read-your-writes).
    pub read_your_writes: Duration,
    /// The abuse limits: destinations and daily dial counts, trusted proxies, password hashing
    /// and request concurrency (`config::limits`).
    pub limits: limits::Limits,
    pub elevenlabs: Provider,
    pub twilio: TwilioSettings,
    pub stripe: StripeSettings,
    pub deepgram: Provider,
    pub cerebras: Provider,
    pub openai: Provider,
    pub cerebras_model: String,
    pub openai_model: String,
    /// `EMBEDDINGS_MODEL`, on the OpenAI-compatible endpoint (`OPENAI_BASE_URL`).
    pub embeddings_model: String,
    /// `MEMORY_PROMPT_TOKENS`: how much of a call's prompt memory may take.
    pub memory_prompt_tokens: usize,
    /// `KNOWLEDGE_PROMPT_TOKENS`: how much of a reply's context persona knowledge may take.
    pub knowledge_prompt_tokens: usize,
    /// `KNOWLEDGE_SESSION_PASSAGES`: the most passages a call loads.
    pub knowledge_session_passages: usize,
    pub elevenlabs_model: String,
    /// A reply whose first LLM token is later than this goes to the fallback LLM.
    pub llm_first_token_timeout: Duration,
    /// Transcripts are deleted after this many days.
    pub transcript_retention_days: u32,
    /// Whether `PUBLIC_BASE_URL` was given; if not, `serve` uses the address it bound.
    pub public_base_url_explicit: bool,
    /// Connections to Postgres per instance.
    pub database_pool_size: u32,
    /// Connections of the event pipeline (publisher and projectors), besides those.
    pub pipeline_pool_size: u32,
    /// How often the scheduler looks for due calls.
    pub scheduler_tick: Duration,
    /// A scheduled call found due later than this (the service was down) expires instead.
    pub schedule_grace: Duration,
    /// A call request still unfinished this long after it started died midway: the sweeper
    /// gives back its hold and active-call slot.
    pub call_request_grace: Duration,
    /// An erasure's clean-up not finished this long after the request (a crash, Stripe
    /// unreachable) is taken up by the `erasures` worker, and retried after this, doubled per
    /// failure up to an hour (`ERASURE_RETRY_MS`).
    pub erasure_retry: Duration,
    /// How long a worker has to acknowledge a message before JetStream redelivers it.
    pub worker_ack_wait: Duration,
    /// Deliveries after which a consumer sets a failing event aside (a dead letter).
    pub consumer_max_deliveries: i64,
    /// `SMTP_URL`: the mail server (password reset links); unset, the SMTP simulator (the
    /// development mailbox) receives them.
    pub smtp_url: Option<Secret>,
    /// `EMAIL_FROM`: the sender of our email.
    pub email_from: String,
    /// `WORKOS_API_KEY`, `WORKOS_BASE_URL`: AuthKit sign-in. Neither set: the WorkOS simulator
    /// in development, WorkOS sign-in switched off in production.
    pub workos: Provider,
    /// `WORKOS_CLIENT_ID` (the simulator's when unset).
    pub workos_client_id: String,
    /// `WORKOS_REDIRECT_URI`: where WorkOS sends the browser back; unset,
    /// `$PUBLIC_BASE_URL/api/auth/workos/callback`.
    pub workos_redirect_uri: Option<String>,
    /// The simulators' settings (`SIM_*` variables).
    pub sim: std::collections::BTreeMap<String, String>,
    /// Development (no real key) or production (`config::mode`).
    pub mode: RunMode,
    /// `SIMULATE`: providers run as simulators in production on purpose.
    pub simulate: std::collections::BTreeSet<String>,
    /// `DATA_KEYS_MASTER_KEY` (base64 of 32 bytes): wraps the per-user data keys
    /// (`backbone::keys`). Unset, a development key derived from a fixed text (logged at start);
    /// production refuses to start without it.
    pub data_keys_master_key: Option<Secret>,
    /// `DATA_KEYS_MASTER_KEY_OLD`: the master key being replaced, read while
    /// `callmeback privacy rewrap` moves the data keys to `DATA_KEYS_MASTER_KEY`.
    pub data_keys_master_key_old: Option<Secret>,
    /// `RATE_LIMITS` (`on`, the default, or `off`): whether the per-route rate limits are
    /// enforced. `off` is for fuzzing a development instance (deploy/schemathesis/run.sh);
    /// production refuses to start with it.
    pub rate_limits: bool,
}

/// Signs the Twilio simulator's callbacks when `TWILIO_AUTH_TOKEN` is not set; anyone can sign
/// a test callback with it using Twilio's own helper libraries.
pub const DEV_TWILIO_AUTH_TOKEN: &str = "callmeback-development-twilio-token";
pub const DEV_TWILIO_ACCOUNT_SID: &str = "AC00000000000000000000000000000000";
/// Twilio's magic "from" number for test credentials.
pub const DEV_TWILIO_PHONE_NUMBER: &str = "+15005550006";

/// The client id the WorkOS simulator accepts when `WORKOS_CLIENT_ID` is not set (the same
/// as `cmb_sims::workos::DEV_CLIENT_ID`).
pub const DEV_WORKOS_CLIENT_ID: &str = "client_callmeback_simulator";
/// The key the WorkOS simulator accepts when `WORKOS_API_KEY` is not set
/// (`cmb_sims::workos::DEV_API_KEY`).
pub const DEV_WORKOS_API_KEY: &str = "sk_test_callmeback_workos_simulator";

/// Test-mode key the Stripe simulator accepts when `STRIPE_SECRET_KEY` is not set.
pub const DEV_STRIPE_SECRET_KEY: &str = "sk_test_callmeback_simulator";
/// Signs the Stripe simulator's webhooks when `STRIPE_WEBHOOK_SECRET` is not set (the same
/// as the simulator's own default, `cmb_sims::stripe::DEV_WEBHOOK_SECRET`).
pub const DEV_STRIPE_WEBHOOK_SECRET: &str = "whsec_callmeback_development";

#[derive(Debug, Clone)]
pub struct StripeSettings {
    pub secret_key: Secret,
    /// Signs (simulator) and verifies (webhook endpoint) Stripe's webhooks.
    pub webhook_secret: Secret,
    pub base_url: Option<String>,
    pub simulated: bool,
}

#[derive(Debug, Clone)]
pub struct TwilioSettings {
    pub account_sid: String,
    pub auth_token: Secret,
    pub phone_number: String,
    pub base_url: Option<String>,
    /// No account SID configured: `serve` runs the simulator (unless a base URL is set).
    pub simulated: bool,
}

/// A provider's key and base URL. With neither set, `serve` starts that provider's simulator on
/// loopback and talks to it; with a base URL set, the real client talks to that URL.
#[derive(Debug, Clone, Default)]
pub struct Provider {
    pub api_key: Option<Secret>,
    pub base_url: Option<String>,
    /// Named in `SIMULATE`: simulated whatever is set.
    pub forced_simulator: bool,
}

impl Provider {
    fn from(
        get: &impl Fn(&str) -> Option<String>,
        key: &str,
        url: &str,
        forced_simulator: bool,
    ) -> Provider {
        Provider {
            api_key: get(key).map(Secret::new),
            base_url: get(url).map(|u| u.trim_end_matches('/').to_string()),
            forced_simulator,
        }
    }

    /// The API key, or `default` when none is configured.
    pub fn key_or(&self, default: &str) -> String {
        self.api_key
            .as_ref()
            .map(|k| k.expose().to_string())
            .unwrap_or_else(|| default.to_string())
    }

    /// Whether `serve` must run a simulator for this provider.
    pub fn simulated(&self) -> bool {
        self.forced_simulator || (self.api_key.is_none() && self.base_url.is_none())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{name}: {message}")]
pub struct ConfigError {
    pub name: &'static str,
    pub message: String,
}

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/callmeback";
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";
/// Signs tokens when `JWT_SECRET` is unset: fine for a laptop, refused by nothing, logged loudly.
pub const DEVELOPMENT_JWT_SECRET: &str = "callmeback-development-jwt-secret-change-me";

impl Config {
    /// Reads `.env` (if present) and the environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        let _ = dotenvy::dotenv();
        let mut config =
            Config::from_lookup(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))?;
        config.sim = std::env::vars()
            .filter(|(k, _)| k.starts_with("SIM_"))
            .collect();
        Ok(config)
    }

    /// Where WorkOS sends the browser back after sign-in.
    pub fn workos_redirect_uri(&self) -> String {
        self.workos_redirect_uri
            .clone()
            .unwrap_or_else(|| format!("{}/api/auth/workos/callback", self.public_base_url))
    }

    /// A simulator's variable.
    pub fn sim_var(&self, name: &str) -> Option<String> {
        self.sim.get(name).cloned()
    }

    /// Builds the configuration from any source of variables (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        fn parse<T: std::str::FromStr>(
            name: &'static str,
            value: Option<String>,
            default: T,
        ) -> Result<T, ConfigError>
        where
            T::Err: fmt::Display,
        {
            match value {
                None => Ok(default),
                Some(v) => v.parse().map_err(|e: T::Err| ConfigError {
                    name,
                    message: e.to_string(),
                }),
            }
        }
        let http_addr: SocketAddr = parse(
            "HTTP_ADDR",
            get("HTTP_ADDR"),
            DEFAULT_HTTP_ADDR
                .parse()
                .expect("the default address parses"),
        )?;
        let nats_url = get("NATS_URL").unwrap_or_else(|| DEFAULT_NATS_URL.into());
        cmb_nats::server_addrs(&nats_url).map_err(|message| ConfigError {
            name: "NATS_URL",
            message,
        })?;
        let defaults = StreamSettings::default();
        let stream = StreamSettings {
            stream: get("NATS_STREAM").unwrap_or(defaults.stream),
            subject_prefix: get("NATS_SUBJECT_PREFIX").unwrap_or(defaults.subject_prefix),
            replicas: parse("NATS_REPLICAS", get("NATS_REPLICAS"), 1)?,
            duplicate_window: Duration::from_secs(parse(
                "NATS_DUPLICATE_WINDOW_SECS",
                get("NATS_DUPLICATE_WINDOW_SECS"),
                defaults.duplicate_window.as_secs(),
            )?),
        };
        if !(1..=5).contains(&stream.replicas) {
            return Err(ConfigError {
                name: "NATS_REPLICAS",
                message: format!("{} replicas: JetStream keeps 1 to 5", stream.replicas),
            });
        }
        let log_format = match get("LOG_FORMAT").as_deref() {
            None | Some("pretty") => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError {
                    name: "LOG_FORMAT",
                    message: format!("{other:?} is neither pretty nor json"),
                })
            }
        };
        let instance_id = get("INSTANCE_ID").unwrap_or_else(|| {
            format!(
                "{}-{}-{}",
                get("HOSTNAME").unwrap_or_else(|| "cmb".into()),
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )
        });
        let simulate = parse_simulate(get("SIMULATE"))?;
        let production = parse_env(get("CMB_ENV"))?;
        let rate_limits = match get("RATE_LIMITS").as_deref().map(str::to_ascii_lowercase) {
            None => true,
            Some(v) if v == "on" => true,
            Some(v) if v == "off" => false,
            Some(other) => {
                return Err(ConfigError {
                    name: "RATE_LIMITS",
                    message: format!("{other:?} is neither on nor off"),
                })
            }
        };
        let sim = |name: &str| simulate.contains(name);
        for name in ["DATA_KEYS_MASTER_KEY", "DATA_KEYS_MASTER_KEY_OLD"] {
            if let Some(v) = get(name) {
                crate::backbone::keys::MasterKey::parse(&v)
                    .map_err(|message| ConfigError { name, message })?;
            }
        }
        let mut config = Config {
            database_url: get("DATABASE_URL").unwrap_or_else(|| DEFAULT_DATABASE_URL.into()),
            nats_url,
            public_base_url: get("PUBLIC_BASE_URL")
                .unwrap_or_else(|| format!("http://{http_addr}"))
                .trim_end_matches('/')
                .to_string(),
            http_addr,
            stream,
            consumer_prefix: get("NATS_CONSUMER_PREFIX").unwrap_or_else(|| "cmb".into()),
            log_format,
            instance_id,
            jwt_secret: Secret::new(
                get("JWT_SECRET").unwrap_or_else(|| DEVELOPMENT_JWT_SECRET.into()),
            ),
            publisher: PublisherSettings {
                idle_poll: Duration::from_millis(parse(
                    "PUBLISHER_IDLE_POLL_MS",
                    get("PUBLISHER_IDLE_POLL_MS"),
                    5,
                )?),
                batch: parse("PUBLISHER_BATCH", get("PUBLISHER_BATCH"), 1000)?,
                lease_ttl: Duration::from_millis(parse(
                    "LEASE_TTL_MS",
                    get("LEASE_TTL_MS"),
                    10_000,
                )?),
            },
            read_your_writes: Duration::from_millis(parse(
                "READ_YOUR_WRITES_MS",
                get("READ_YOUR_WRITES_MS"),
                2_000,
            )?),
            limits: limits::from_lookup(&get).map_err(|e| ConfigError {
                name: e.name,
                message: e.message,
            })?,
            elevenlabs: Provider::from(
                &get,
                "ELEVENLABS_API_KEY",
                "ELEVENLABS_BASE_URL",
                sim("elevenlabs"),
            ),
            twilio: TwilioSettings {
                simulated: sim("twilio")
                    || (get("TWILIO_ACCOUNT_SID").is_none() && get("TWILIO_BASE_URL").is_none()),
                account_sid: get("TWILIO_ACCOUNT_SID")
                    .unwrap_or_else(|| DEV_TWILIO_ACCOUNT_SID.into()),
                auth_token: Secret::new(
                    get("TWILIO_AUTH_TOKEN").unwrap_or_else(|| DEV_TWILIO_AUTH_TOKEN.into()),
                ),
                phone_number: get("TWILIO_PHONE_NUMBER")
                    .unwrap_or_else(|| DEV_TWILIO_PHONE_NUMBER.into()),
                base_url: get("TWILIO_BASE_URL").map(|u| u.trim_end_matches('/').to_string()),
            },
            stripe: StripeSettings {
                simulated: sim("stripe")
                    || (get("STRIPE_SECRET_KEY").is_none() && get("STRIPE_BASE_URL").is_none()),
                secret_key: Secret::new(
                    get("STRIPE_SECRET_KEY").unwrap_or_else(|| DEV_STRIPE_SECRET_KEY.into()),
                ),
                webhook_secret: Secret::new(
                    get("STRIPE_WEBHOOK_SECRET")
                        .unwrap_or_else(|| DEV_STRIPE_WEBHOOK_SECRET.into()),
                ),
                base_url: get("STRIPE_BASE_URL").map(|u| u.trim_end_matches('/').to_string()),
            },
            deepgram: Provider::from(
                &get,
                "DEEPGRAM_API_KEY",
                "DEEPGRAM_BASE_URL",
                sim("deepgram"),
            ),
            cerebras: Provider::from(
                &get,
                "CEREBRAS_API_KEY",
                "CEREBRAS_BASE_URL",
                sim("cerebras"),
            ),
            openai: Provider::from(&get, "OPENAI_API_KEY", "OPENAI_BASE_URL", sim("openai")),
            cerebras_model: get("CEREBRAS_MODEL").unwrap_or_else(|| "llama-3.3-70b".into()),
            openai_model: get("OPENAI_MODEL").unwrap_or_else(|| "gpt-4o-mini".into()),
            embeddings_model: get("EMBEDDINGS_MODEL")
                .unwrap_or_else(|| cmb_providers::embeddings::DEFAULT_MODEL.into()),
            memory_prompt_tokens: parse("MEMORY_PROMPT_TOKENS", get("MEMORY_PROMPT_TOKENS"), 400)?,
            knowledge_prompt_tokens: parse(
                "KNOWLEDGE_PROMPT_TOKENS",
                get("KNOWLEDGE_PROMPT_TOKENS"),
                600,
            )?,
            knowledge_session_passages: parse(
                "KNOWLEDGE_SESSION_PASSAGES",
                get("KNOWLEDGE_SESSION_PASSAGES"),
                500,
            )?,
            elevenlabs_model: get("ELEVENLABS_MODEL").unwrap_or_else(|| "eleven_flash_v2_5".into()),
            llm_first_token_timeout: Duration::from_millis(parse(
                "LLM_FIRST_TOKEN_TIMEOUT_MS",
                get("LLM_FIRST_TOKEN_TIMEOUT_MS"),
                2_000,
            )?),
            transcript_retention_days: parse(
                "TRANSCRIPT_RETENTION_DAYS",
                get("TRANSCRIPT_RETENTION_DAYS"),
                30,
            )?,
            public_base_url_explicit: get("PUBLIC_BASE_URL").is_some(),
            scheduler_tick: Duration::from_millis(parse(
                "SCHEDULER_TICK_MS",
                get("SCHEDULER_TICK_MS"),
                1_000,
            )?),
            database_pool_size: parse("DATABASE_POOL_SIZE", get("DATABASE_POOL_SIZE"), 32)?,
            pipeline_pool_size: parse("PIPELINE_POOL_SIZE", get("PIPELINE_POOL_SIZE"), 10)?,
            schedule_grace: Duration::from_secs(parse(
                "SCHEDULE_GRACE_SECS",
                get("SCHEDULE_GRACE_SECS"),
                900,
            )?),
            call_request_grace: Duration::from_secs(parse(
                "CALL_REQUEST_GRACE_SECS",
                get("CALL_REQUEST_GRACE_SECS"),
                120,
            )?),
            erasure_retry: Duration::from_millis(parse(
                "ERASURE_RETRY_MS",
                get("ERASURE_RETRY_MS"),
                60_000,
            )?),
            worker_ack_wait: Duration::from_millis(parse(
                "WORKER_ACK_WAIT_MS",
                get("WORKER_ACK_WAIT_MS"),
                30_000,
            )?),
            consumer_max_deliveries: parse(
                "CONSUMER_MAX_DELIVERIES",
                get("CONSUMER_MAX_DELIVERIES"),
                crate::backbone::deadletter::MAX_DELIVERIES,
            )?,
            smtp_url: get("SMTP_URL").map(Secret::new),
            email_from: get("EMAIL_FROM")
                .unwrap_or_else(|| "Call Me Back <no-reply@callmeback.local>".into()),
            workos: Provider::from(&get, "WORKOS_API_KEY", "WORKOS_BASE_URL", false),
            workos_client_id: get("WORKOS_CLIENT_ID")
                .unwrap_or_else(|| DEV_WORKOS_CLIENT_ID.into()),
            workos_redirect_uri: get("WORKOS_REDIRECT_URI"),
            sim: Default::default(),
            mode: RunMode::Development,
            simulate: simulate.clone(),
            rate_limits,
            data_keys_master_key: get("DATA_KEYS_MASTER_KEY").map(Secret::new),
            data_keys_master_key_old: get("DATA_KEYS_MASTER_KEY_OLD").map(Secret::new),
        };
        if production || !config.real_keys().is_empty() {
            config.mode = RunMode::Production;
        }
        Ok(config)
    }
}

/// Development (no real key) or production (`config::mode` checks what production needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    Development,
    Production,
}

/// The providers `SIMULATE` may name.
pub const PROVIDERS: [&str; 6] = [
    "twilio",
    "stripe",
    "deepgram",
    "cerebras",
    "openai",
    "elevenlabs",
];

/// `SIMULATE=twilio,stripe,…`: the providers production runs as simulators on purpose.
fn parse_simulate(
    value: Option<String>,
) -> Result<std::collections::BTreeSet<String>, ConfigError> {
    let mut names = std::collections::BTreeSet::new();
    for name in value.iter().flat_map(|v| v.split(',')) {
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() {
            continue;
        }
        if !PROVIDERS.contains(&name.as_str()) {
            return Err(ConfigError {
                name: "SIMULATE",
                message: format!(
                    "{name:?} is not a provider (one of {})",
                    PROVIDERS.join(", ")
                ),
            });
        }
        names.insert(name);
    }
    Ok(names)
}

/// `CMB_ENV`: unset, `development` or `production`.
fn parse_env(value: Option<String>) -> Result<bool, ConfigError> {
    match value.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("development") => Ok(false),
        Some("production") => Ok(true),
        Some(other) => Err(ConfigError {
            name: "CMB_ENV",
            message: format!("{other:?} is neither development nor production"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn defaults_follow_the_fixed_interface() {
        let c = Config::from_lookup(|_| None).unwrap();
        assert_eq!(c.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(c.nats_url, DEFAULT_NATS_URL);
        assert_eq!(c.http_addr.to_string(), DEFAULT_HTTP_ADDR);
        assert_eq!(c.public_base_url, "http://127.0.0.1:8080");
        assert_eq!(format!("{:?}", c.jwt_secret), "Secret(***)");
    }

    #[test]
    fn bad_values_name_their_variable() {
        let env = HashMap::from([("HTTP_ADDR", "nowhere")]);
        let err = Config::from_lookup(|k| env.get(k).map(|v| v.to_string())).unwrap_err();
        assert_eq!(err.name, "HTTP_ADDR");
    }

    #[test]
    fn nats_url_is_one_server_or_a_list() {
        let env = HashMap::from([(
            "NATS_URL",
            "nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224",
        )]);
        let c = Config::from_lookup(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(cmb_nats::server_addrs(&c.nats_url).unwrap().len(), 3);
        for (name, value) in [
            ("NATS_URL", "nats://127.0.0.1:4222,http://[::1"),
            ("NATS_URL", " , "),
            ("NATS_REPLICAS", "0"),
            ("NATS_REPLICAS", "7"),
        ] {
            let env = HashMap::from([(name, value)]);
            let err = Config::from_lookup(|k| env.get(k).map(|v| v.to_string())).unwrap_err();
            assert_eq!(err.name, name, "{value}");
        }
    }
}
