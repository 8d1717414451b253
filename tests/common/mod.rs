//! Test harness: each test gets its own database, stream, subject prefix and consumer names,
//! on the machine's real Postgres and NATS, and starts the app in-process (`spawn_app`) or as
//! the real binary (`spawn_process`), like zero2prod's `spawn_app`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use callmeback::app::Running;
use callmeback::config::Config;

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
        let db = callmeback::bench::with_database(&base_database_url(), &format!("cmb_test_{id}"));
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
        ]);
        TestEnv { id, vars }
    }

    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.vars.insert(key.into(), value.into());
        self
    }

    pub fn config(&self) -> Config {
        let vars = self.vars.clone();
        Config::from_lookup(move |k| vars.get(k).cloned()).expect("test configuration")
    }

    /// The app, in this process.
    pub async fn spawn_app(&self) -> Running {
        callmeback::app::start(self.config())
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
    pub async fn backbone(&self) -> callmeback::app::Backbone {
        callmeback::app::backbone(&self.config(), 20)
            .await
            .expect("backbone")
    }

    /// Removes the stream and the database.
    pub async fn cleanup(&self) {
        let config = self.config();
        if let Ok(client) = async_nats::connect(&config.nats_url).await {
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
    let client = async_nats::connect(&config.nats_url).await.expect("nats");
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
