//! Test harness: each test gets its own database, stream, subject prefix and consumer names,
//! on the machine's real Postgres and NATS, and starts the app in-process (`spawn_app`) or as
//! the real binary (`spawn_process`), like zero2prod's `spawn_app`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use callmeback::app::Running;
use callmeback::config::Config;

mod accounts;
mod calls;
mod voice;
pub use accounts::{
    add_document, create_persona, erase, transcript_lines, user_with_credits, wait_for_transcript,
};
pub use calls::{
    call_body, count_events, request_call, schedule_call, wait_for_event, wait_for_settlement,
    wait_for_status,
};
pub use voice::{voice, Voice};

pub struct TestEnv {
    pub id: String,
    pub vars: HashMap<String, String>,
}

pub fn base_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| callmeback::config::DEFAULT_DATABASE_URL.into())
}

impl TestEnv {
    pub fn new() -> TestEnv {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let db =
            callmeback::ops::bench::with_database(&base_database_url(), &format!("cmb_test_{id}"));
        let vars = HashMap::from([
            ("DATABASE_URL".to_string(), db),
            (
                "NATS_URL".to_string(),
                std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
            ),
            ("NATS_STREAM".to_string(), format!("T_{id}")),
            ("NATS_SUBJECT_PREFIX".to_string(), format!("t{id}.ev")),
            ("NATS_CONSUMER_PREFIX".to_string(), format!("t{id}")),
            ("HTTP_ADDR".to_string(), "127.0.0.1:0".to_string()),
            ("JWT_SECRET".to_string(), format!("test-secret-{id}")),
            ("LEASE_TTL_MS".to_string(), "1500".to_string()),
            ("RUST_LOG".to_string(), "warn".to_string()),
            // The tests' client stands in for a proxy on loopback, so each `Api` is a client
            // address of its own (X-Forwarded-For).
            ("TRUSTED_PROXIES".to_string(), "127.0.0.1,::1".to_string()),
            // Several apps run at once against one Postgres (max_connections 100).
            // The pipeline's pool (the publisher and projectors) comes on top: 22 an app, as the
            // one pool of 20 before the pipeline had its own.
            ("DATABASE_POOL_SIZE".to_string(), "14".to_string()),
            ("PIPELINE_POOL_SIZE".to_string(), "8".to_string()),
        ]);
        TestEnv { id, vars }
    }

    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.vars.insert(key.into(), value.into());
        self
    }

    pub fn config(&self) -> Config {
        let vars = self.vars.clone();
        let mut config =
            Config::from_lookup(move |k| vars.get(k).cloned()).expect("test configuration");
        config.sim = self
            .vars
            .iter()
            .filter(|(k, _)| k.starts_with("SIM_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        config
    }

    /// The app, in this process.
    pub async fn spawn_app(&self) -> Running {
        callmeback::app::start(self.config())
            .await
            .expect("app starts")
    }

    /// The app, in this process, on `clock`.
    pub async fn spawn_app_with(&self, clock: callmeback::clock::Clock) -> Running {
        callmeback::app::start_with(self.config(), clock)
            .await
            .expect("app starts")
    }

    /// The real binary, `callmeback serve`, with this environment.
    pub fn spawn_process(&self, extra: &[(&str, &str)]) -> tokio::process::Child {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_callmeback"));
        cmd.arg("serve")
            .env_clear()
            .envs(&self.vars)
            .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        cmd.spawn().expect("callmeback serve starts")
    }

    /// The database, migrated, and the stream, created.
    pub async fn backbone(&self) -> callmeback::backbone::Backbone {
        callmeback::backbone::connect(&self.config(), 20)
            .await
            .expect("backbone")
    }

    /// Removes the stream and the database (both kept when `CMB_TEST_KEEP_DATABASES` is set,
    /// e.g. to collect the events a run wrote).
    pub async fn cleanup(&self) {
        if std::env::var_os("CMB_TEST_KEEP_DATABASES").is_some() {
            return;
        }
        let config = self.config();
        if let Ok(client) = cmb_nats::connect(&config.nats_url, "callmeback tests").await {
            let js = async_nats::jetstream::new(client);
            let _ = js.delete_stream(&config.stream.stream).await;
        }
        use sqlx::migrate::MigrateDatabase;
        // Connections from a killed process may linger for a moment.
        for _ in 0..20 {
            if sqlx::Postgres::force_drop_database(&config.database_url)
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Polls `check` until it returns Some or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Every message of the test's stream, in stream order.
pub async fn read_stream(env: &TestEnv) -> Vec<cmb_domain::EventEnvelope> {
    let config = env.config();
    let client = cmb_nats::connect(&config.nats_url, "callmeback tests")
        .await
        .expect("nats");
    let js = async_nats::jetstream::new(client);
    let until = cmb_nats::replay::last_sequence(&js, &config.stream)
        .await
        .expect("stream");
    let mut rx = cmb_nats::replay::open(
        &js,
        &config.stream,
        &config.stream.all_subjects(),
        cmb_nats::replay::Start::Beginning,
        until,
    )
    .await
    .expect("replay");
    let mut out = Vec::new();
    while let Some(item) = rx.recv().await {
        out.push(item.expect("decodable").event);
    }
    out
}

/// A valid persona definition for commands issued straight through the event store.
pub fn persona_draft(name: &str) -> cmb_domain::persona::PersonaDraft {
    cmb_domain::persona::PersonaDraft::parse(
        name,
        "A persona made by the tests.",
        "pNInz6obpgDQGcFmaJgB",
        "You are a persona in a test. Keep it short.",
        None,
        true,
        &["test".to_string()],
        cmb_domain::persona::TurnTaking::default(),
    )
    .expect("valid draft")
}

/// An HTTP client of the API that comes from its own address (the app trusts loopback as a
/// proxy in tests, `TRUSTED_PROXIES`, so per-IP limits apply per `Api`).
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub ip: String,
    pub token: Option<String>,
    client: reqwest::Client,
}

pub struct Reply {
    pub status: u16,
    pub body: serde_json::Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Reply {
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    pub fn field(&self) -> &str {
        self.body["error"]["field"].as_str().unwrap_or("")
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.body)
    }
}

impl Api {
    pub fn new(addr: std::net::SocketAddr) -> Api {
        let n: u32 = rand::random();
        Api {
            base: format!("http://{addr}"),
            ip: format!("10.{}.{}.{}", n >> 16 & 255, n >> 8 & 255, n & 255),
            token: None,
            client: reqwest::Client::new(),
        }
    }

    /// The same client from another address.
    pub fn elsewhere(&self) -> Api {
        let mut other = Api::new("127.0.0.1:1".parse().unwrap());
        other.base = self.base.clone();
        other.token = self.token.clone();
        other
    }

    pub fn with_token(&self, token: &str) -> Api {
        let mut other = self.clone();
        other.token = Some(token.to_string());
        other
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("x-forwarded-for", &self.ip);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        req
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        let response = req.send().await.expect("the API answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        Reply {
            status,
            body,
            headers,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.request(reqwest::Method::GET, path)).await
    }
    pub async fn delete(&self, path: &str) -> Reply {
        self.send(self.request(reqwest::Method::DELETE, path)).await
    }
    pub async fn post(&self, path: &str, body: serde_json::Value) -> Reply {
        self.send(self.request(reqwest::Method::POST, path).json(&body))
            .await
    }
    pub async fn delete_json(&self, path: &str, body: serde_json::Value) -> Reply {
        self.send(self.request(reqwest::Method::DELETE, path).json(&body))
            .await
    }
    pub async fn put(&self, path: &str, body: serde_json::Value) -> Reply {
        self.send(self.request(reqwest::Method::PUT, path).json(&body))
            .await
    }

    /// Registers a fresh user (from a fresh address) and returns a client signed in as them.
    pub async fn register(&self, password: &str) -> (Api, serde_json::Value) {
        let who = self.elsewhere();
        let n: u64 = rand::random::<u64>() % 10_000_000_000;
        // A United States number (the destination policy allows it), never one of the Twilio
        // simulator's unanswered numbers (ending 0001-0003).
        const AREAS: [u32; 10] = [555, 212, 415, 617, 312, 206, 303, 512, 702, 919];
        let line = match n % 10_000_000 {
            l if l % 10_000 <= 3 => l + 10,
            l => l,
        };
        let phone = format!("+1{}{line:07}", AREAS[(n / 10_000_000 % 10) as usize]);
        let reply = who
            .post(
                "/api/auth/register",
                serde_json::json!({
                    "name": "Test User",
                    "email": format!("user{n}@example.com"),
                    "password": password,
                    "phone": phone,
                }),
            )
            .await;
        assert_eq!(reply.status, 201, "register: {reply:?}");
        let token = reply.body["token"].as_str().expect("a token").to_string();
        (who.with_token(&token), reply.body["user"].clone())
    }
}

pub const PASSWORD: &str = "Corr3ct!horse";

/// A persona body the API accepts.
pub fn persona_body(name: &str, is_public: bool) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "description": "A persona made by the tests.",
        "voice": "21m00Tcm4TlvDq8ikWAM",
        "system_prompt": "You are a persona in a test. Keep it short.",
        "is_public": is_public,
        "tags": ["test"],
    })
}

/// Grants `credits` to the user (as `register` returns it), straight through the event store.
/// `callmeback ARGS` with the test's environment (nothing inherited): its standard output,
/// once it has exited successfully (its standard error otherwise).
pub async fn callmeback_ok(env: &TestEnv, args: &[&str]) -> Vec<u8> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_callmeback"))
        .args(args)
        .env_clear()
        .envs(&env.vars)
        .output()
        .await
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "callmeback {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// [`callmeback_ok`]'s output read as JSON.
pub async fn callmeback_json(env: &TestEnv, args: &[&str]) -> serde_json::Value {
    let out = callmeback_ok(env, args).await;
    serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)))
}

pub async fn grant(app: &Running, user: &serde_json::Value, credits: i64) {
    use cmb_domain::wallet::{Wallet, WalletCommand};
    app.state
        .store
        .execute::<Wallet>(
            user["id"].as_str().expect("a user id"),
            WalletCommand::Grant {
                credits,
                reason: "test".into(),
                reference: format!("test-{}", uuid::Uuid::new_v4()),
            },
            &cmb_domain::CommandContext::for_request("test", cmb_domain::Actor::System),
        )
        .await
        .expect("credits granted");
}

/// Embedding tokens billed for persona knowledge (the system personas' libraries, indexed at
/// startup, and any document since), once the system libraries are indexed: what the
/// embeddings simulator counted beside memory's.
pub async fn knowledge_embedding_tokens(app: &Running) -> i64 {
    let documents: usize = cmb_domain::persona::system::system_personas()
        .iter()
        .map(|p| cmb_domain::knowledge::library::library(p.id).len())
        .sum();
    eventually(Duration::from_secs(60), || async {
        let (indexed, tokens): (i64, i64) = sqlx::query_as(
            "SELECT count(*), COALESCE(sum((c->>'quantity')::bigint), 0)::bigint
               FROM events e
               LEFT JOIN LATERAL jsonb_array_elements(e.payload->'KnowledgeDocumentIndexed'->'costs') c ON true
              WHERE e.aggregate_type = 'persona' AND e.event_type = 'KnowledgeDocumentIndexed'",
        )
        .fetch_one(&app.state.pool)
        .await
        .unwrap();
        (indexed >= documents as i64).then_some(tokens)
    })
    .await
    .expect("the system personas' libraries are indexed")
}
