//! `callmeback simulate` with no server running: a backdated history through the real command
//! path, published with `--publish`, that reconciles without anomalies and gives the same
//! answers from JetStream and from Postgres.

mod common;

use common::TestEnv;
use serde_json::Value;

async fn run(env: &TestEnv, args: &[&str]) -> Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_callmeback"))
        .args(args)
        .env_clear()
        .envs(&env.vars)
        .output()
        .await
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_month_reconciles_from_either_source() {
    let env = TestEnv::new();
    let summary = run(
        &env,
        &[
            "simulate",
            "--days",
            "4",
            "--calls-per-day",
            "6",
            "--seed",
            "7",
            "--publish",
        ],
    )
    .await;
    assert_eq!(summary["calls"], 24, "{summary}");
    assert_eq!(
        summary["backdated"], true,
        "no one else held the publisher's lease"
    );
    assert_eq!(summary["published"], true);
    let from_pg = run(
        &env,
        &[
            "replay",
            "--source",
            "postgres",
            "--format",
            "json",
            "reconcile",
        ],
    )
    .await;
    let from_nats = run(
        &env,
        &[
            "replay",
            "--source",
            "nats",
            "--format",
            "json",
            "reconcile",
        ],
    )
    .await;
    assert_eq!(from_pg, from_nats, "the same answers from both sources");
    assert_eq!(from_pg["totals"]["calls"], 24);
    assert_eq!(
        from_pg["anomalies"].as_array().unwrap().len(),
        0,
        "{}",
        from_pg["anomalies"]
    );
    let days = from_pg["per_day"].as_object().unwrap();
    assert_eq!(
        days.len(),
        4,
        "spread over the four days before today: {days:?}"
    );
    let today = chrono::Utc::now().date_naive().to_string();
    assert!(!days.contains_key(&today));
    // Totals are sums of the rounded lines.
    let calls = from_pg["calls"].as_array().unwrap();
    let cost: i64 = calls
        .iter()
        .map(|c| c["total_cost_cents"].as_i64().unwrap())
        .sum();
    assert_eq!(from_pg["totals"]["cost_cents"], cost);
    // A day range picks that day's calls only.
    let first_day = days.keys().next().unwrap().clone();
    let one_day = run(
        &env,
        &[
            "replay",
            "--source",
            "postgres",
            "--format",
            "json",
            "--from",
            &first_day,
            "--to",
            &first_day,
            "reconcile",
        ],
    )
    .await;
    assert_eq!(one_day["per_day"].as_object().unwrap().len(), 1);
    env.cleanup().await;
}
