//! Safe to expose (issue 13): run modes, destination policy, limits behind proxies and under
//! bursts, media-stream authentication, money paths. Black-box: the real binary or the app on
//! a random port, spoken to over HTTP.

use crate::common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};

/// A production configuration that lacks nothing.
const PRODUCTION: [(&str, &str); 11] = [
    ("TWILIO_ACCOUNT_SID", "AC0123456789abcdef0123456789abcdef"),
    ("TWILIO_AUTH_TOKEN", "a-real-twilio-auth-token"),
    ("STRIPE_SECRET_KEY", "sk_live_0123456789"),
    ("STRIPE_WEBHOOK_SECRET", "whsec_0123456789"),
    ("DEEPGRAM_API_KEY", "dg-key"),
    ("CEREBRAS_API_KEY", "csk-key"),
    ("OPENAI_API_KEY", "sk-openai-key"),
    ("ELEVENLABS_API_KEY", "el-key"),
    (
        "JWT_SECRET",
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    ),
    ("PUBLIC_BASE_URL", "https://callmeback.example"),
    // base64 of 32 bytes: the master key the users' data keys are wrapped with.
    (
        "DATA_KEYS_MASTER_KEY",
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    ),
];

/// `callmeback serve` with exactly `vars` (nothing inherited); its exit code and stderr.
async fn serve_exits(vars: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_callmeback"));
    cmd.arg("serve")
        .env_clear()
        .envs(vars.iter().copied())
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        // Were it to start, it would find nothing here.
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("NATS_URL", "nats://127.0.0.1:1")
        .env("HTTP_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("serve decides within a minute")
        .expect("serve runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn production_refuses_to_start_without_each_setting() {
    for (missing, _) in PRODUCTION {
        let vars: Vec<_> = PRODUCTION
            .iter()
            .copied()
            .filter(|(k, _)| *k != missing)
            .collect();
        let (code, stderr) = serve_exits(&vars).await;
        assert_eq!(code, Some(2), "without {missing}: {stderr}");
        let lines: Vec<_> = stderr
            .lines()
            .filter(|l| l.starts_with("configuration error: "))
            .collect();
        assert_eq!(lines.len(), 1, "without {missing}: {stderr}");
        assert!(
            lines[0].starts_with(&format!("configuration error: {missing}: ")),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn production_refuses_weak_secrets_and_plain_http() {
    for (name, bad) in [
        ("JWT_SECRET", "too-short-secret"),
        ("JWT_SECRET", "change-me-in-production"),
        ("JWT_SECRET", callmeback::config::DEVELOPMENT_JWT_SECRET),
        ("PUBLIC_BASE_URL", "http://callmeback.example"),
    ] {
        let mut vars: Vec<_> = PRODUCTION
            .iter()
            .copied()
            .filter(|(k, _)| *k != name)
            .collect();
        vars.push((name, bad));
        let (code, stderr) = serve_exits(&vars).await;
        assert_eq!(code, Some(2), "{name}={bad}: {stderr}");
        assert!(
            stderr.contains(&format!("configuration error: {name}: ")),
            "{name}={bad}: {stderr}"
        );
    }
}

#[tokio::test]
async fn a_real_twilio_key_never_runs_beside_simulated_payments() {
    // The example: real Twilio, no Stripe key, no JWT secret.
    let (code, stderr) = serve_exits(&[
        ("TWILIO_ACCOUNT_SID", "AC0123456789abcdef0123456789abcdef"),
        ("TWILIO_AUTH_TOKEN", "a-real-twilio-auth-token"),
    ])
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    for name in [
        "STRIPE_SECRET_KEY",
        "STRIPE_WEBHOOK_SECRET",
        "JWT_SECRET",
        "PUBLIC_BASE_URL",
        "DEEPGRAM_API_KEY",
    ] {
        assert!(
            stderr.contains(&format!("configuration error: {name}: ")),
            "{name}: {stderr}"
        );
    }
    let (code, stderr) = serve_exits(&[("CMB_ENV", "production")]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("configuration error: TWILIO_ACCOUNT_SID: "));
}

/// Starts `callmeback serve` with `env` (plus `extra`), and waits for a log line containing
/// `wanted` on its stderr.
async fn serve_logs(env: &TestEnv, extra: &[(&str, &str)], wanted: &str) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_callmeback"));
    cmd.arg("serve")
        .env_clear()
        .envs(&env.vars)
        .envs(extra.iter().copied())
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("serve starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(wanted) {
                return true;
            }
        }
        false
    })
    .await;
    let _ = child.kill().await;
    assert_eq!(found, Ok(true), "no log line with {wanted:?}");
}

#[tokio::test]
async fn development_mode_says_so_in_the_log() {
    let env = TestEnv::new();
    serve_logs(&env, &[], "DEVELOPMENT MODE").await;
    env.cleanup().await;
}

#[tokio::test]
async fn production_with_simulated_providers_starts_and_says_so_loudly() {
    let env = TestEnv::new();
    serve_logs(
        &env,
        &[
            ("CMB_ENV", "production"),
            (
                "SIMULATE",
                "twilio,stripe,deepgram,cerebras,openai,elevenlabs",
            ),
            ("JWT_SECRET", PRODUCTION[8].1),
            ("TWILIO_AUTH_TOKEN", "a-real-twilio-auth-token"),
            ("PUBLIC_BASE_URL", "https://callmeback.example"),
            ("DATA_KEYS_MASTER_KEY", PRODUCTION[10].1),
        ],
        "PRODUCTION MODE WITH SIMULATED PROVIDERS",
    )
    .await;
    env.cleanup().await;
}
