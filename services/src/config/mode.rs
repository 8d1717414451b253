//! Run modes that cannot be confused.
//!
//! - **Development**: no real provider key at all. Every provider is simulated, secrets may be
//!   development values, and a banner in the log says so at start-up and every few minutes.
//! - **Production**: any real provider key (a key aimed at the provider itself, not at a
//!   loopback simulator), or `CMB_ENV=production`. Every provider must be real unless named in
//!   `SIMULATE` (then logged loudly), and the settings a public deployment needs must be set:
//!   `serve` refuses to start otherwise, with one line per missing setting.

use super::{
    Config, Provider, RunMode, DEVELOPMENT_JWT_SECRET, DEV_STRIPE_SECRET_KEY,
    DEV_STRIPE_WEBHOOK_SECRET, DEV_TWILIO_ACCOUNT_SID, DEV_TWILIO_AUTH_TOKEN, DEV_WORKOS_CLIENT_ID,
};

/// Shortest `JWT_SECRET` production accepts (HS256 wants at least the hash's 32 bytes).
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// Secrets found in this repository, its examples and the usual tutorials: never production's.
const KNOWN_DEVELOPMENT_SECRETS: [&str; 8] = [
    DEVELOPMENT_JWT_SECRET,
    "change-me-in-production",
    "change-me",
    "changeme",
    "secret",
    "jwt-secret",
    "your-256-bit-secret",
    "please-change-this-secret-in-production",
];

/// How often development mode repeats its banner.
pub const BANNER_EVERY: std::time::Duration = std::time::Duration::from_secs(300);

pub const DEVELOPMENT_BANNER: &str = "DEVELOPMENT MODE: no provider key is set, so every provider \
     is simulated and secrets may be development values; do not expose this instance (any real \
     key or CMB_ENV=production switches to production mode)";

/// Whether a base URL points at this machine (a simulator or a test double, never the
/// provider itself).
pub fn is_loopback_url(url: &str) -> bool {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return false;
    };
    let host = parsed.host_str().unwrap_or("").trim_matches(['[', ']']);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn real_key(key_set: bool, base_url: &Option<String>) -> bool {
    key_set && !base_url.as_deref().is_some_and(is_loopback_url)
}

impl Config {
    /// The providers holding a real key: a key with no base URL, or one aimed off this machine.
    pub fn real_keys(&self) -> Vec<&'static str> {
        let p = |p: &Provider| real_key(p.api_key.is_some(), &p.base_url);
        let mut keys = Vec::new();
        if real_key(
            self.twilio.account_sid != DEV_TWILIO_ACCOUNT_SID,
            &self.twilio.base_url,
        ) {
            keys.push("TWILIO_ACCOUNT_SID");
        }
        if real_key(
            self.stripe.secret_key.expose() != DEV_STRIPE_SECRET_KEY,
            &self.stripe.base_url,
        ) {
            keys.push("STRIPE_SECRET_KEY");
        }
        for (name, provider) in [
            ("DEEPGRAM_API_KEY", &self.deepgram),
            ("CEREBRAS_API_KEY", &self.cerebras),
            ("OPENAI_API_KEY", &self.openai),
            ("ELEVENLABS_API_KEY", &self.elevenlabs),
            ("WORKOS_API_KEY", &self.workos),
        ] {
            if p(provider) {
                keys.push(name);
            }
        }
        keys
    }

    /// Whether `SIMULATE` names the provider.
    pub fn simulates(&self, provider: &str) -> bool {
        self.simulate.contains(provider)
    }

    /// What production lacks, one line per setting (`NAME: why`); empty in development mode.
    pub fn production_problems(&self) -> Vec<String> {
        if self.mode != RunMode::Production {
            return Vec::new();
        }
        let mut problems = Vec::new();
        let mut need = |name: &str, why: &str| problems.push(format!("{name}: {why}"));
        let missing_key = |provider: &str, what: &str| {
            format!(
                "not set; production talks to the real {what} (or name `{provider}` in SIMULATE \
                 to run its simulator on purpose)"
            )
        };
        if !self.simulates("twilio") && self.twilio.account_sid == DEV_TWILIO_ACCOUNT_SID {
            need("TWILIO_ACCOUNT_SID", &missing_key("twilio", "Twilio"));
        }
        if !self.simulates("stripe") && self.stripe.secret_key.expose() == DEV_STRIPE_SECRET_KEY {
            need("STRIPE_SECRET_KEY", &missing_key("stripe", "Stripe"));
        }
        for (name, provider, what, p) in [
            ("DEEPGRAM_API_KEY", "deepgram", "Deepgram", &self.deepgram),
            ("CEREBRAS_API_KEY", "cerebras", "Cerebras", &self.cerebras),
            ("OPENAI_API_KEY", "openai", "OpenAI", &self.openai),
            (
                "ELEVENLABS_API_KEY",
                "elevenlabs",
                "ElevenLabs",
                &self.elevenlabs,
            ),
        ] {
            if !self.simulates(provider) && p.api_key.is_none() {
                need(name, &missing_key(provider, what));
            }
        }
        if self.workos.api_key.is_some() && self.workos_client_id == DEV_WORKOS_CLIENT_ID {
            need(
                "WORKOS_CLIENT_ID",
                "not set; WorkOS sign-in needs the client id beside WORKOS_API_KEY",
            );
        }
        let jwt = self.jwt_secret.expose();
        if jwt == DEVELOPMENT_JWT_SECRET {
            need(
                "JWT_SECRET",
                "not set; tokens would be signed with the development secret from the source \
                 (generate one: openssl rand -hex 32)",
            );
        } else if KNOWN_DEVELOPMENT_SECRETS
            .iter()
            .any(|k| jwt.eq_ignore_ascii_case(k))
            || jwt.to_ascii_lowercase().contains("change-me")
            || jwt.to_ascii_lowercase().contains("changeme")
        {
            need(
                "JWT_SECRET",
                "is a known development value (generate one: openssl rand -hex 32)",
            );
        } else if jwt.len() < MIN_JWT_SECRET_BYTES {
            need(
                "JWT_SECRET",
                &format!(
                    "{} bytes; at least {MIN_JWT_SECRET_BYTES} are needed (openssl rand -hex 32)",
                    jwt.len()
                ),
            );
        }
        if !self.simulates("stripe")
            && self.stripe.webhook_secret.expose() == DEV_STRIPE_WEBHOOK_SECRET
        {
            need(
                "STRIPE_WEBHOOK_SECRET",
                "not set; without it anyone could forge Stripe's webhooks (the signing secret of \
                 the endpoint, whsec_…)",
            );
        }
        if self.data_keys_master_key.is_none() {
            need(
                "DATA_KEYS_MASTER_KEY",
                "not set; the users' data keys would be wrapped by the development master key \
                 from the source (generate one: openssl rand -base64 32)",
            );
        }
        if !self.rate_limits {
            need(
                "RATE_LIMITS",
                "off is for fuzzing a development instance only; production enforces the rate \
                 limits (remove RATE_LIMITS or set it to on)",
            );
        }
        if self.twilio.auth_token.expose() == DEV_TWILIO_AUTH_TOKEN {
            need(
                "TWILIO_AUTH_TOKEN",
                "not set; Twilio's callbacks and media streams are verified with it",
            );
        }
        if !self.public_base_url_explicit {
            need(
                "PUBLIC_BASE_URL",
                "not set; the https:// address Twilio and Stripe call back",
            );
        } else if !self.public_base_url.starts_with("https://") {
            need(
                "PUBLIC_BASE_URL",
                &format!(
                    "{} is not https://; providers' callbacks must be encrypted",
                    self.public_base_url
                ),
            );
        }
        problems
    }

    /// Refuses a production configuration that lacks something, with every line at once.
    pub fn check_run_mode(&self) -> Result<(), RunModeError> {
        let problems = self.production_problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(RunModeError(problems))
        }
    }

    /// Says in the log which mode this is and what is simulated.
    pub fn log_run_mode(&self) {
        if !self.rate_limits {
            tracing::warn!("RATE_LIMITS=off: no route is rate limited (for fuzzing only)");
        }
        match self.mode {
            RunMode::Development => {
                tracing::warn!("{DEVELOPMENT_BANNER}");
                if self.data_keys_master_key.is_none() {
                    tracing::warn!(
                        "DATA_KEYS_MASTER_KEY is not set: the users' data keys are wrapped by \
                         the development master key, derived from a fixed text in the source"
                    );
                }
            }
            RunMode::Production if self.simulate.is_empty() => {
                tracing::info!("production mode: every provider is real")
            }
            RunMode::Production => tracing::error!(
                simulated = ?self.simulate,
                "PRODUCTION MODE WITH SIMULATED PROVIDERS ({}): what they do is not real \
                 (SIMULATE)",
                self.simulate.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

/// A production configuration that lacks settings: one line each.
#[derive(Debug)]
pub struct RunModeError(pub Vec<String>);

impl std::fmt::Display for RunModeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "production mode is missing settings:")?;
        for line in &self.0 {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RunModeError {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Config {
        let env: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| env.get(k).cloned()).unwrap()
    }

    const GOOD: [(&str, &str); 12] = [
        ("TWILIO_ACCOUNT_SID", "AC0123456789abcdef0123456789abcdef"),
        ("TWILIO_AUTH_TOKEN", "a-real-auth-token"),
        ("STRIPE_SECRET_KEY", "sk_live_x"),
        ("STRIPE_WEBHOOK_SECRET", "whsec_real"),
        ("DEEPGRAM_API_KEY", "dg"),
        ("CEREBRAS_API_KEY", "cb"),
        ("OPENAI_API_KEY", "oa"),
        ("ELEVENLABS_API_KEY", "el"),
        ("JWT_SECRET", "0123456789abcdef0123456789abcdef-long"),
        ("PUBLIC_BASE_URL", "https://callmeback.example"),
        (
            "DATA_KEYS_MASTER_KEY",
            "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=",
        ),
        ("HTTP_ADDR", "127.0.0.1:0"),
    ];

    #[test]
    fn no_key_is_development_and_needs_nothing() {
        let c = config(&[]);
        assert_eq!(c.mode, RunMode::Development);
        assert!(c.production_problems().is_empty());
    }

    #[test]
    fn a_key_aimed_at_a_loopback_simulator_stays_development() {
        let c = config(&[
            ("TWILIO_ACCOUNT_SID", "ACdeadbeef"),
            ("TWILIO_BASE_URL", "http://127.0.0.1:4000"),
        ]);
        assert_eq!(c.mode, RunMode::Development);
        let c = config(&[
            ("TWILIO_ACCOUNT_SID", "ACdeadbeef"),
            ("TWILIO_BASE_URL", "https://api.twilio.com"),
        ]);
        assert_eq!(c.mode, RunMode::Production);
    }

    #[test]
    fn any_real_key_is_production() {
        // Provider keys (a master key is ours, not a provider's: it says nothing of the mode).
        let providers = GOOD
            .iter()
            .filter(|(k, _)| k.ends_with("_KEY") && !k.starts_with("DATA_KEYS"));
        for (k, v) in providers {
            assert_eq!(config(&[(k, v)]).mode, RunMode::Production, "{k}");
        }
        assert_eq!(
            config(&[("CMB_ENV", "production")]).mode,
            RunMode::Production
        );
    }

    #[test]
    fn a_complete_production_configuration_passes() {
        assert_eq!(config(&GOOD).production_problems(), Vec::<String>::new());
    }

    #[test]
    fn each_missing_setting_is_named() {
        for (name, _) in GOOD.iter().filter(|(k, _)| *k != "HTTP_ADDR") {
            let vars: Vec<_> = GOOD.iter().filter(|(k, _)| k != name).cloned().collect();
            let problems = config(&vars).production_problems();
            assert_eq!(problems.len(), 1, "{name}: {problems:?}");
            assert!(
                problems[0].starts_with(&format!("{name}: ")),
                "{problems:?}"
            );
        }
    }

    #[test]
    fn rate_limits_off_is_development_only() {
        assert!(config(&[]).rate_limits);
        let dev = config(&[("RATE_LIMITS", "off")]);
        assert_eq!(dev.mode, RunMode::Development);
        assert!(!dev.rate_limits);
        assert!(dev.check_run_mode().is_ok());
        let mut vars = GOOD.to_vec();
        vars.push(("RATE_LIMITS", "off"));
        let problems = config(&vars).production_problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("RATE_LIMITS: "), "{problems:?}");
        vars.pop();
        vars.push(("RATE_LIMITS", "ON"));
        assert!(config(&vars).production_problems().is_empty());
        let env: std::collections::HashMap<_, _> =
            [("RATE_LIMITS".to_string(), "maybe".to_string())].into();
        let err = Config::from_lookup(|k| env.get(k).cloned()).unwrap_err();
        assert_eq!(err.name, "RATE_LIMITS");
    }

    #[test]
    fn weak_secrets_and_plain_http_are_refused() {
        for bad in ["short", "change-me-in-production", DEVELOPMENT_JWT_SECRET] {
            let mut vars = GOOD.to_vec();
            vars.push(("JWT_SECRET", bad));
            let c = config(&vars);
            assert!(
                c.production_problems()[0].starts_with("JWT_SECRET"),
                "{bad}"
            );
        }
        let mut vars = GOOD.to_vec();
        vars.push(("PUBLIC_BASE_URL", "http://callmeback.example"));
        assert!(config(&vars).production_problems()[0].starts_with("PUBLIC_BASE_URL"));
    }

    #[test]
    fn a_master_key_that_is_not_32_bytes_of_base64_is_refused() {
        for bad in ["not base64!", "c2hvcnQ="] {
            let env: std::collections::HashMap<_, _> =
                [("DATA_KEYS_MASTER_KEY".to_string(), bad.to_string())].into();
            let err = Config::from_lookup(|k| env.get(k).cloned()).unwrap_err();
            assert_eq!(err.name, "DATA_KEYS_MASTER_KEY", "{bad}");
        }
        let env: std::collections::HashMap<_, _> = [(
            "DATA_KEYS_MASTER_KEY_OLD".to_string(),
            "c2hvcnQ=".to_string(),
        )]
        .into();
        let err = Config::from_lookup(|k| env.get(k).cloned()).unwrap_err();
        assert_eq!(err.name, "DATA_KEYS_MASTER_KEY_OLD");
    }

    #[test]
    fn simulate_names_providers_run_as_simulators() {
        let vars: Vec<_> = GOOD
            .iter()
            .filter(|(k, _)| !k.starts_with("STRIPE"))
            .cloned()
            .chain([("SIMULATE", "Stripe, deepgram")])
            .collect();
        let c = config(&vars);
        assert!(c.production_problems().is_empty());
        assert!(c.stripe.simulated && c.deepgram.simulated());
        let err = Config::from_lookup(|k| (k == "SIMULATE").then(|| "paypal".to_string()));
        assert_eq!(err.unwrap_err().name, "SIMULATE");
    }
}
