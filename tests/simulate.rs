//! `callmeback simulate` with no server running: a backdated history through the real command
//! path, published with `--publish`, that reconciles without anomalies and gives the same
//! answers from JetStream and from Postgres.

use crate::common;

use common::TestEnv;
use serde_json::Value;

/// `callmeback` with the test environment's settings and nothing else of ours.
fn callmeback(env: &TestEnv) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_callmeback"));
    command.env_clear().envs(&env.vars);
    command
}

async fn run(env: &TestEnv, args: &[&str]) -> Value {
    common::callmeback_json(env, args).await
}

/// Rebuilds two projections and swaps them in.
const PROJECTIONS: [&str; 6] = [
    "replay",
    "--format",
    "json",
    "projections",
    "wallets",
    "calls",
];

/// `replay --source <source> --format json [--from day --to day] reconcile <extra…>`.
async fn reconcile(env: &TestEnv, source: &str, day: Option<&str>, extra: &[&str]) -> Value {
    let mut args = vec!["replay", "--source", source, "--format", "json"];
    if let Some(day) = day {
        args.extend(["--from", day, "--to", day]);
    }
    args.push("reconcile");
    args.extend(extra);
    run(env, &args).await
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
    let from_pg = reconcile(&env, "postgres", None, &[]).await;
    let from_nats = reconcile(&env, "nats", None, &[]).await;
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
    let one_day = reconcile(&env, "postgres", Some(&first_day), &[]).await;
    assert_eq!(one_day["per_day"].as_object().unwrap().len(), 1);

    // A bill recorded today for a call of that first day still counts in that day's report.
    let call = one_day["calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["outcome"] == "completed" && c["call_sid"].is_string())
        .expect("a completed call on the first day")
        .clone();
    let bill = std::env::temp_dir().join(format!("cmb-sim-bill-{}.csv", env.id));
    std::fs::write(
        &bill,
        format!(
            "Sid,From,To,Status,Duration,Price,PriceUnit\n{},+15005550006,+15550000000,completed,60,-0.50000,USD\n",
            call["call_sid"].as_str().unwrap()
        ),
    )
    .unwrap();
    let recorded = reconcile(
        &env,
        "postgres",
        None,
        &["--record", "--billed", bill.to_str().unwrap()],
    )
    .await;
    assert_eq!(recorded["recorded"], 1, "{recorded}");
    let one_day = reconcile(&env, "postgres", Some(&first_day), &[]).await;
    let same = one_day["calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["call_id"] == call["call_id"])
        .unwrap()
        .clone();
    assert_eq!(same["cost_cents"]["twilio"], 50, "{same}");
    assert_eq!(one_day["anomalies"].as_array().unwrap().len(), 0);
    let _ = std::fs::remove_file(&bill);
    env.cleanup().await;
}

/// Every row of `table`, in a stable order, as one JSON text.
async fn rows(pool: &sqlx::PgPool, table: &str) -> String {
    sqlx::query_scalar(&format!(
        "SELECT coalesce(json_agg(r ORDER BY r::text), '[]')::text
           FROM (SELECT to_jsonb(t) AS r FROM {table} t) x"
    ))
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_projection_is_swapped_in_while_the_api_keeps_reading() {
    let env = TestEnv::new()
        // A small pool: the swap must not need a second connection while it holds its lock.
        .set("DATABASE_POOL_SIZE", "6");
    let summary = run(
        &env,
        &[
            "simulate",
            "--days",
            "3",
            "--calls-per-day",
            "8",
            "--seed",
            "3",
            "--publish",
        ],
    )
    .await;
    // The app's projectors build the read models from the stream.
    let app = env.spawn_app().await;
    let pool = app.state.pool.clone();
    let refused = callmeback(&env)
        .args(["simulate", "--days", "1", "--calls-per-day", "1"])
        .output()
        .await
        .unwrap();
    assert!(
        !refused.status.success(),
        "simulate refuses while serve runs"
    );
    let calls = summary["calls"].as_i64().unwrap();
    let projected = common::eventually(std::time::Duration::from_secs(60), || async {
        let settled: i64 =
            sqlx::query_scalar("SELECT count(*) FROM rm_calls WHERE charged_cents IS NOT NULL")
                .fetch_one(&pool)
                .await
                .unwrap();
        (settled == calls).then_some(())
    })
    .await;
    assert!(projected.is_some(), "the live projector caught up");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let live_calls = rows(&pool, "rm_calls").await;
    let live_costs = rows(&pool, "rm_call_costs").await;
    let user: uuid::Uuid = sqlx::query_scalar("SELECT user_id FROM rm_wallets LIMIT 1")
        .fetch_one(&pool)
        .await
        .unwrap();

    // Read the table in a loop, as the API does, while the rebuild runs.
    let stop = tokio_util::sync::CancellationToken::new();
    let reader = {
        let pool = pool.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut reads, mut fewest) = (0u64, i64::MAX);
            while !stop.is_cancelled() {
                let n: i64 = tokio::time::timeout(
                    std::time::Duration::from_millis(500),
                    sqlx::query_scalar("SELECT count(*) FROM rm_calls").fetch_one(&pool),
                )
                .await
                .expect("a read never waits on the rebuild")
                .expect("a read never fails");
                fewest = fewest.min(n);
                reads += 1;
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            (reads, fewest)
        })
    };
    // And keep writing: credits granted to one user while the rebuild runs, which the swap
    // must neither lose nor apply twice.
    let writer = {
        let store = app.state.store.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                n += 1;
                store
                    .execute::<cmb_domain::wallet::Wallet>(
                        &user.to_string(),
                        cmb_domain::wallet::WalletCommand::Grant {
                            credits: 1,
                            reason: "during the rebuild".into(),
                            reference: format!("rebuild-{n}"),
                        },
                        &cmb_domain::CommandContext::system("test"),
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            n
        })
    };
    let out = callmeback(&env)
        .args([
            "replay",
            "--format",
            "json",
            "projections",
            "calls",
            "wallets",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rebuilt: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    stop.cancel();
    let (reads, fewest) = reader.await.unwrap();
    let grants = writer.await.unwrap();
    assert!(grants > 5, "{grants} grants during the rebuild");
    assert!(reads > 10, "the reader kept reading ({reads} reads)");
    assert_eq!(fewest, calls, "never an empty or partial table");
    assert_eq!(rebuilt.len(), 2, "{rebuilt:?}");
    assert_eq!(rebuilt[0]["projection"], "calls");
    assert_eq!(
        rebuilt[0]["rows"],
        calls + live_costs.matches("call_id").count() as i64
    );

    assert_eq!(
        rows(&pool, "rm_calls").await,
        live_calls,
        "rebuilt calls equal the live ones"
    );
    assert_eq!(rows(&pool, "rm_call_costs").await, live_costs);
    let (wallet, _) = app
        .state
        .store
        .load::<cmb_domain::wallet::Wallet>(&user.to_string())
        .await
        .unwrap();
    let agrees = common::eventually(std::time::Duration::from_secs(20), || async {
        let balance: i64 = sqlx::query_scalar("SELECT balance FROM rm_wallets WHERE user_id = $1")
            .bind(user)
            .fetch_one(&pool)
            .await
            .unwrap();
        (balance == wallet.balance).then_some(())
    })
    .await;
    assert!(
        agrees.is_some(),
        "the rebuilt wallet has every grant made during the rebuild, once ({} caught up at the swap)",
        rebuilt[1]["caught_up"]
    );
    let leftover: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE 'rebuild_%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(leftover, 0, "the rebuild schemas are dropped");
    app.stop().await;
    env.cleanup().await;
}

/// `replay projections` killed before its swap, and inside it (after the catch-up, before the
/// commit, holding the projection's swap lock): the live read model is left as it was and its
/// projector goes on following the stream, and the next rebuild drops what the dead ones left
/// and swaps in the same rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_killed_before_or_inside_its_swap_leaves_the_live_read_model_working() {
    let env = TestEnv::new().set("DATABASE_POOL_SIZE", "6");
    let summary = run(
        &env,
        &[
            "simulate",
            "--days",
            "2",
            "--calls-per-day",
            "4",
            "--seed",
            "5",
            "--publish",
        ],
    )
    .await;
    let app = env.spawn_app().await;
    let pool = app.state.pool.clone();
    let calls = summary["calls"].as_i64().unwrap();
    let projected = common::eventually(std::time::Duration::from_secs(60), || async {
        let settled: i64 =
            sqlx::query_scalar("SELECT count(*) FROM rm_calls WHERE charged_cents IS NOT NULL")
                .fetch_one(&pool)
                .await
                .unwrap();
        (settled == calls).then_some(())
    })
    .await;
    assert!(projected.is_some(), "the live projector caught up");
    let live_calls = rows(&pool, "rm_calls").await;
    let user: uuid::Uuid = sqlx::query_scalar("SELECT user_id FROM rm_wallets LIMIT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    let wallet_agrees = || async {
        let (wallet, _) = app
            .state
            .store
            .load::<cmb_domain::wallet::Wallet>(&user.to_string())
            .await
            .unwrap();
        common::eventually(std::time::Duration::from_secs(30), || async {
            let balance: i64 =
                sqlx::query_scalar("SELECT balance FROM rm_wallets WHERE user_id = $1")
                    .bind(user)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            (balance == wallet.balance).then_some(())
        })
        .await
        .is_some()
    };
    let leftovers = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'rebuild\\_%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    for (n, step) in ["rebuild.before_swap", "rebuild.before_commit"]
        .into_iter()
        .enumerate()
    {
        let out = callmeback(&env)
            .args(PROJECTIONS)
            .env("CMB_CRASH_AT", step)
            .output()
            .await
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(86),
            "killed at {step}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The second rebuild dropped the first one's schema and left its own.
        assert_eq!(leftovers().await, 1, "a dead rebuild's schema");
        assert_eq!(rows(&pool, "rm_calls").await, live_calls, "untouched");
        // The wallets projector (whose swap lock the dead process held at `before_commit`)
        // follows what happens next.
        app.state
            .store
            .execute::<cmb_domain::wallet::Wallet>(
                &user.to_string(),
                cmb_domain::wallet::WalletCommand::Grant {
                    credits: 1,
                    reason: "after a killed rebuild".into(),
                    reference: format!("killed-{n}"),
                },
                &cmb_domain::CommandContext::system("test"),
            )
            .await
            .unwrap();
        assert!(
            wallet_agrees().await,
            "the live wallets follow the stream after a rebuild killed at {step}"
        );
    }
    let out = callmeback(&env).args(PROJECTIONS).output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        leftovers().await,
        0,
        "the next rebuild dropped the leftovers"
    );
    assert_eq!(rows(&pool, "rm_calls").await, live_calls, "rebuilt alike");
    assert!(
        wallet_agrees().await,
        "the rebuilt wallet has every grant once"
    );
    app.stop().await;
    env.cleanup().await;
}
