//! The analysts' replay: calls made through the real path, reconciled from JetStream and from
//! Postgres (the same answers), then against billed files with deliberate discrepancies.

use crate::common;

use std::time::Duration;

use cmb_domain::wallet::{Wallet, WalletCommand};
use cmb_domain::{Actor, CommandContext};
use common::{eventually, Api, TestEnv, PASSWORD};
use serde_json::{json, Value};

async fn replay(env: &TestEnv, args: &[&str]) -> Value {
    let args: Vec<&str> = std::iter::once("replay")
        .chain(args.iter().copied())
        .collect();
    common::callmeback_json(env, &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_reconcile_to_the_cent_from_either_source_and_against_billed_files() {
    let env = TestEnv::new()
        .set("SIM_TWILIO_RING_MS", "100")
        .set("SIM_TWILIO_CALL_SECONDS", "2")
        .set("SIM_TWILIO_CALLER_TURNS", "0:60000");
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let mut ids = Vec::new();
    // Three users, three calls: two answered, one busy.
    for phone in [None, None, Some("+15558880001")] {
        let (user, profile) = api.register(PASSWORD).await;
        app.state
            .store
            .execute::<Wallet>(
                profile["id"].as_str().unwrap(),
                WalletCommand::Grant {
                    credits: 100,
                    reason: "test".into(),
                    reference: "r".into(),
                },
                &CommandContext::for_request("test", Actor::System),
            )
            .await
            .unwrap();
        let mut body = json!({ "persona_id": "brad_001", "use_credits": true, "duration": 1 });
        if let Some(p) = phone {
            body["phone_number"] = json!(p);
        }
        let reply = user.post("/api/call", body).await;
        assert_eq!(reply.status, 201, "{reply:?}");
        ids.push(reply.body["call"]["id"].as_str().unwrap().to_string());
    }
    let settled = eventually(Duration::from_secs(30), || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM rm_calls WHERE charged_cents IS NOT NULL")
                .fetch_one(&app.state.pool)
                .await
                .unwrap();
        (n == 3).then_some(())
    })
    .await;
    assert!(settled.is_some(), "every call settled");
    // Until the publisher has put every event on the stream (slow on a loaded machine), and
    // while the log stays still: the workers still write events of their own after the calls
    // settled (what memory learned and its LLM costs, on the calls; the system personas'
    // knowledge marked indexed), so both sources are read between two equal counts of the
    // store, and read again if it moved meanwhile.
    let config = env.config();
    let js = async_nats::jetstream::new(
        cmb_nats::connect(&config.nats_url, "callmeback tests")
            .await
            .unwrap(),
    );
    let stored = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events")
            .fetch_one(&app.state.pool)
            .await
            .unwrap()
    };
    let read = eventually(Duration::from_secs(120), || async {
        let before = stored().await;
        let on_stream = cmb_nats::replay::last_sequence(&js, &config.stream)
            .await
            .unwrap();
        if on_stream < before as u64 {
            return None;
        }
        let from_nats = replay(&env, &["--source", "nats", "--format", "json", "reconcile"]).await;
        let from_pg = replay(
            &env,
            &["--source", "postgres", "--format", "json", "reconcile"],
        )
        .await;
        (stored().await == before).then_some((from_nats, from_pg))
    })
    .await;
    let (from_nats, from_pg) = read.expect("the log kept still long enough to read it twice");
    assert_eq!(
        from_nats, from_pg,
        "the same answers from JetStream and Postgres"
    );
    let report = from_nats;
    assert_eq!(report["totals"]["calls"], 3);
    assert_eq!(
        report["totals"]["revenue_cents"], 130,
        "two answered one-minute calls at 65¢"
    );
    assert_eq!(
        report["anomalies"].as_array().unwrap().len(),
        0,
        "{}",
        report["anomalies"]
    );
    let twilio_cents = report["per_provider"]["twilio"].as_i64().unwrap();
    assert_eq!(
        twilio_cents, 2,
        "1.4¢ per call, rounded once per call: 1 + 1"
    );
    let calls = report["calls"].as_array().unwrap();
    let sid_of = |id: &str| {
        calls.iter().find(|c| c["call_id"] == id).unwrap()["call_sid"]
            .as_str()
            .unwrap()
            .to_string()
    };

    // A bill: call 0 as estimated, call 1 three cents dearer (Twilio's export), an unknown
    // CallSid (quoted, with a comma and quotes in it); the busy call is not billed (and not
    // estimated).
    let dir = std::env::temp_dir().join(format!("cmb-replay-{}", env.id));
    std::fs::create_dir_all(&dir).unwrap();
    let generic = dir.join("generic.csv");
    std::fs::write(
        &generic,
        format!(
            "provider,call_id,usage_date,quantity,unit,billed_usd\ntwilio,{},2026-11-29,1,minute,0.014\ntwilio,\"CAunknown, \"\"0\"\"\",2026-11-29,1,minute,0.014\n",
            ids[0]
        ),
    )
    .unwrap();
    let export = dir.join("twilio-export.csv");
    std::fs::write(
        &export,
        format!("Sid,From,To,Status,Duration,Price,PriceUnit\n{},+15005550006,+15550000000,completed,2,-0.04400,USD\n", sid_of(&ids[1])),
    )
    .unwrap();
    let diff = replay(
        &env,
        &[
            "--source",
            "postgres",
            "--format",
            "json",
            "reconcile",
            "--billed",
            generic.to_str().unwrap(),
            export.to_str().unwrap(),
        ],
    )
    .await;
    let diffs = diff["differences"].as_array().unwrap();
    let find = |kind: &str| {
        diffs
            .iter()
            .filter(|d| d["kind"] == kind)
            .collect::<Vec<_>>()
    };
    assert_eq!(find("billed_but_unknown").len(), 1, "{diffs:?}");
    assert_eq!(
        find("billed_but_unknown")[0]["reference"],
        "CAunknown, \"0\""
    );
    // The same as CSV: written by the csv crate, so the reference comes back whole.
    let out = common::callmeback_ok(
        &env,
        &[
            "replay",
            "--source",
            "postgres",
            "--format",
            "csv",
            "reconcile",
            "--billed",
            generic.to_str().unwrap(),
            export.to_str().unwrap(),
        ],
    )
    .await;
    let mut rows = csv::Reader::from_reader(out.as_slice());
    let unknown: Vec<csv::StringRecord> = rows
        .records()
        .map(Result::unwrap)
        .filter(|r| &r[0] == "billed_but_unknown")
        .collect();
    assert_eq!(unknown.len(), 1, "{unknown:?}");
    assert_eq!(&unknown[0][3], "CAunknown, \"0\"", "{unknown:?}");
    let off = find("differs");
    assert_eq!(off.len(), 1, "{diffs:?}");
    assert_eq!(off[0]["call_id"], ids[1].as_str());
    assert_eq!(
        off[0]["difference_cents"], 3,
        "4¢ billed against 1¢ estimated"
    );
    assert!(find("missing_from_bill").is_empty(), "{diffs:?}");
    // Without call 0's row, it is missing from the bill.
    std::fs::write(
        &generic,
        "provider,call_id,usage_date,quantity,unit,billed_usd\n",
    )
    .unwrap();
    let diff = replay(
        &env,
        &[
            "--source",
            "postgres",
            "--format",
            "json",
            "reconcile",
            "--billed",
            generic.to_str().unwrap(),
            export.to_str().unwrap(),
        ],
    )
    .await;
    let missing: Vec<&Value> = diff["differences"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["kind"] == "missing_from_bill")
        .collect();
    assert_eq!(missing.len(), 1);
    assert_eq!(missing[0]["call_id"], ids[0].as_str());

    // `--record`: the bill's figure for call 1 becomes a cost event (4.4¢, not estimated) and
    // replaces our estimate for Twilio; recording the same file again changes nothing.
    let record = |env: &TestEnv| {
        let export = export.to_str().unwrap().to_string();
        let env_vars = env.vars.clone();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_callmeback"))
                .args(["replay", "--source", "postgres", "--format", "json"])
                .args(["reconcile", "--record", "--billed", &export])
                .env_clear()
                .envs(&env_vars)
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<Value>(&out.stdout).unwrap()
        }
    };
    // The calls' events (recording writes on the call; the app writes events of its own in
    // the background, e.g. the system personas' knowledge marked indexed).
    let events_in_store = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE aggregate_type = 'call'")
            .fetch_one(&app.state.pool)
            .await
            .unwrap()
    };
    let first = record(&env).await;
    assert_eq!(
        (
            first["recorded"].as_i64(),
            first["already_recorded"].as_i64()
        ),
        (Some(1), Some(0))
    );
    let count = events_in_store().await;
    let second = record(&env).await;
    assert_eq!(
        (
            second["recorded"].as_i64(),
            second["already_recorded"].as_i64()
        ),
        (Some(0), Some(1))
    );
    assert_eq!(
        events_in_store().await,
        count,
        "the second recording wrote nothing"
    );
    let after = replay(
        &env,
        &["--source", "postgres", "--format", "json", "reconcile"],
    )
    .await;
    assert_eq!(
        after["per_provider"]["twilio"],
        1 + 4,
        "call 1 now costs what Twilio billed"
    );
    let call1 = after["calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["call_id"] == ids[1].as_str())
        .unwrap()
        .clone();
    assert_eq!(call1["billed_micros"]["twilio"], 44_000);
    assert_eq!(call1["cost_cents"]["twilio"], 4);
    assert_eq!(
        after["totals"]["revenue_cents"], 130,
        "revenue is untouched"
    );
    // The read models show billed truth: the bill replaces the estimate in the cost views.
    let micros = |sql: &'static str| {
        let pool = app.state.pool.clone();
        let id = ids[1].clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let projected = eventually(Duration::from_secs(30), || async {
        let twilio = micros(
            "SELECT COALESCE(sum(total_micros), 0)::bigint FROM rm_call_costs
              WHERE call_id = $1::uuid AND service = 'twilio' AND NOT superseded",
        )
        .await;
        let all = micros(
            "SELECT COALESCE(sum(total_micros), 0)::bigint FROM rm_call_costs
              WHERE call_id = $1::uuid AND NOT superseded",
        )
        .await;
        let view = micros("SELECT cost_micros FROM costs_per_call WHERE call_id = $1::uuid").await;
        let rm = micros("SELECT cost_micros FROM rm_calls WHERE id = $1::uuid").await;
        (twilio == 44_000 && view == all && rm == all).then_some(())
    })
    .await;
    assert!(
        projected.is_some(),
        "costs_per_call shows the billed 4.4¢ for call 1"
    );
    let diff = replay(
        &env,
        &[
            "--source",
            "postgres",
            "--format",
            "json",
            "reconcile",
            "--billed",
            export.to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        diff["differences"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["kind"] != "differs"),
        "{diff}"
    );

    // Events, filtered by call.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_callmeback"))
        .args(["replay", "--source", "nats", "--call", &ids[2], "events"])
        .env_clear()
        .envs(&env.vars)
        .output()
        .await
        .unwrap();
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events.iter().all(|e| e["aggregate_id"] == ids[2].as_str()));
    assert!(events.iter().any(|e| e["event_type"] == "CallEnded"));
    let chart = dir.join("chart.svg");
    replay(
        &env,
        &[
            "--source",
            "postgres",
            "--format",
            "json",
            "reconcile",
            "--chart",
            chart.to_str().unwrap(),
        ],
    )
    .await;
    assert!(std::fs::read_to_string(&chart).unwrap().starts_with("<svg"));
    let _ = std::fs::remove_dir_all(&dir);
    app.stop().await;
    env.cleanup().await;
}

/// A simulated month (cards, refunds, failures, costs) through the real command path: the
/// reconcile added up by Postgres, the one read from the stream by parallel consumers, and the
/// event-by-event fold of either source give the same report — for the whole log and for a
/// range of days.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_month_gives_the_same_report_from_either_source_and_either_path() {
    let env = TestEnv::new();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_callmeback"))
        .args(["simulate", "--days", "30", "--calls-per-day", "4"])
        .args(["--seed", "11", "--publish"])
        .env_clear()
        .envs(&env.vars)
        .output()
        .await
        .expect("simulate runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["calls"], 120, "{summary}");
    assert!(summary["refunds"].as_u64().unwrap() > 0, "{summary}");

    // `replay --source SOURCE [RANGE…] --format json reconcile [--event-by-event]`.
    let reconcile = |source: &'static str, range: Vec<String>, event_by_event: bool| {
        let env = &env;
        async move {
            let mut args = vec!["--source", source, "--format", "json"];
            args.extend(range.iter().map(String::as_str));
            args.push("reconcile");
            if event_by_event {
                args.push("--event-by-event");
            }
            replay(env, &args).await
        }
    };
    let sql = reconcile("postgres", vec![], false).await;
    assert_eq!(sql["totals"]["calls"], 120);
    assert!(
        sql["calls"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["refunded_cents"].as_i64() > Some(0)),
        "a refund is matched to its call"
    );
    assert_eq!(
        sql,
        reconcile("postgres", vec![], true).await,
        "Postgres: the SQL reconcile and the fold of every event"
    );
    assert_eq!(
        sql,
        reconcile("nats", vec![], false).await,
        "the SQL reconcile and the stream's parallel consumers"
    );
    assert_eq!(
        sql,
        reconcile("nats", vec![], true).await,
        "the SQL reconcile and the fold of every event from the stream"
    );
    // The calls requested over ten of the days, with everything that happened to them later.
    let days: Vec<String> = sql["per_day"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert!(days.len() >= 25, "{days:?}");
    let range = vec![format!("--from={}", days[10]), format!("--to={}", days[19])];
    let ranged = reconcile("postgres", range.clone(), false).await;
    let calls = ranged["totals"]["calls"].as_i64().unwrap();
    assert!(calls > 0 && calls < 120, "{}", ranged["totals"]);
    assert_eq!(ranged, reconcile("nats", range.clone(), false).await);
    assert_eq!(ranged, reconcile("postgres", range, true).await);
    env.cleanup().await;
}

/// The stream readers (`cmb_nats::replay::read` and `open`) from mid-stream starts and in
/// parallel over ranges of sequences, on the call subjects (filtered by the server) and on all:
/// every message of each range, once, in order, and nothing else. Large bodies make the
/// server's blocks small against the message count: there, NATS 2.9's count of what matches a
/// filter from a sequence on (`num_pending`) was off by tens to hundreds either way, and the
/// readers that ended a range on that count lost its last messages (9 of 1,000,000 in `bench
/// replay` with four readers) or waited for messages that never came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_from_mid_stream_and_in_parallel_read_every_message_once() {
    use cmb_nats::replay::{self, Start};
    use futures::StreamExt;
    use std::future::IntoFuture;

    let env = TestEnv::new();
    let settings = env.config().stream;
    let client = cmb_nats::connect(&env.config().nats_url, "callmeback tests")
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client.clone());
    cmb_nats::ensure_stream(&js, &settings).await.unwrap();
    const N: u64 = 20_000;
    // One envelope for every message (readers do not look at the subjects' ids), 4 kB each.
    let body = bytes::Bytes::from(
        serde_json::to_vec(&cmb_domain::EventEnvelope {
            aggregate_type: "call".into(),
            aggregate_id: "c".into(),
            sequence: 1,
            event_type: "Padding".into(),
            event_version: "1".into(),
            occurred_at: chrono::Utc::now(),
            global_position: 1,
            commit_xid: 1,
            payload: json!({ "Padding": "x".repeat(3_800) }),
            metadata: Default::default(),
        })
        .unwrap(),
    );
    // Four in five messages on call subjects (2,000 calls), the others on wallets; the last
    // message is a wallet's, so the call subjects end before the stream does.
    let mut calls = Vec::new();
    let mut acks = futures::stream::FuturesUnordered::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..N {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let subject = if !x.is_multiple_of(5) && i + 1 < N {
            calls.push(i + 1);
            settings.subject("call", &format!("c{}", x % 2_000))
        } else {
            settings.subject("wallet", &format!("w{}", x % 300))
        };
        while acks.len() >= 1_024 {
            let ack: Result<_, _> = acks.next().await.unwrap();
            ack.unwrap();
        }
        let ack = js.publish(subject, body.clone()).await.unwrap();
        acks.push(ack.into_future());
    }
    while let Some(ack) = acks.next().await {
        ack.unwrap();
    }
    let until = replay::last_sequence(&js, &settings).await.unwrap();
    assert_eq!(until, N);
    let all: Vec<u64> = (1..=N).collect();

    // Each range read twice: by the library's ordered consumer, and in place from the
    // connection's buffer (`read_bodies`: a push consumer, flow control answered by hand —
    // 20,000 bodies of 4 kB make the server ask for it many times over).
    let read = |filter: String, from: u64, to: u64| {
        let (client, js, settings) = (client.clone(), js.clone(), settings.clone());
        let (url, body) = (env.config().nats_url, body.clone());
        async move {
            let mut seen = Vec::new();
            let read = replay::read(
                &js,
                &settings,
                &filter,
                Start::Sequence(from),
                to,
                |s, _| {
                    seen.push(s);
                    Ok(())
                },
            );
            let n = tokio::time::timeout(Duration::from_secs(120), read)
                .await
                .expect("the range ends")
                .expect("read");
            assert_eq!(n, seen.len() as u64);
            let mut in_place = Vec::new();
            let read = replay::read_bodies(
                &client,
                &url,
                &settings,
                &filter,
                Start::Sequence(from),
                to,
                |s, b| {
                    assert_eq!(b, &body[..], "the body at {s}, whole");
                    in_place.push(s);
                    Ok(())
                },
            );
            let n = tokio::time::timeout(Duration::from_secs(120), read)
                .await
                .expect("the range ends, read in place")
                .expect("read in place");
            assert_eq!(n, in_place.len() as u64);
            assert_eq!(
                in_place, seen,
                "{filter} from {from} to {to}, read in place"
            );
            seen
        }
    };
    let between = |seqs: &[u64], from: u64, to: u64| -> Vec<u64> {
        seqs.iter()
            .copied()
            .filter(|s| (from..=to).contains(s))
            .collect()
    };
    for (filter, expected) in [
        (settings.type_subjects("call"), &calls),
        (settings.all_subjects(), &all),
    ] {
        // From sixteen places to the end, each alone.
        for k in 0..16 {
            let from = 1 + N * k / 16 + k * 7;
            assert_eq!(
                read(filter.clone(), from, until).await,
                between(expected, from, until),
                "{filter} from {from}"
            );
        }
        // Eight readers at once over eighths of the stream: each message once, in order.
        let bounds: Vec<u64> = (0..=8).map(|i| 1 + N * i / 8).collect();
        let parts = futures::future::join_all(
            bounds
                .windows(2)
                .map(|w| read(filter.clone(), w[0], w[1] - 1)),
        )
        .await;
        assert_eq!(&parts.concat(), expected, "{filter} in eight parts");
    }
    // The channel reader from a sequence in mid-stream.
    let from = N / 2 + 3;
    let mut rx = replay::open(
        &js,
        &settings,
        &settings.type_subjects("call"),
        Start::Sequence(from),
        until,
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(120), rx.recv())
        .await
        .expect("the range ends")
    {
        seen.push(item.expect("read").stream_sequence);
    }
    assert_eq!(seen, between(&calls, from, until), "open from {from}");
    env.cleanup().await;
}

/// The SQL reconcile reads the call facts the event store keeps beside each call event; a
/// call with an event those facts cannot tell exactly is folded from its events instead. Odd
/// logs written straight into the store — a call ended twice, an event of a type this build
/// does not know, another version, a cost of nineteen digits, a call with no request — give
/// the report the event-by-event fold gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_call_events_reconcile_in_sql_as_event_by_event() {
    let env = TestEnv::new();
    let b = env.backbone().await;
    let start = chrono::Utc::now() - chrono::Duration::days(3);
    let mut events: Vec<cmb_domain::EventEnvelope> =
        callmeback::ops::synthetic::History::new(9, 5, start, 600)
            .take(600)
            .collect();
    let calls: Vec<String> = events
        .iter()
        .filter(|e| e.event_type == "CallRequested")
        .map(|e| e.aggregate_id.clone())
        .collect();
    assert!(calls.len() > 20, "{}", calls.len());
    let next = |events: &[cmb_domain::EventEnvelope], call: &str| {
        events
            .iter()
            .filter(|e| e.aggregate_id == call)
            .map(|e| e.sequence)
            .max()
            .unwrap_or(0)
            + 1
    };
    let mut odd = |call: &str, event_type: &str, version: &str, payload: Value| {
        let mut e = events[0].clone();
        e.aggregate_type = "call".into();
        e.sequence = next(&events, call);
        e.aggregate_id = call.to_string();
        e.event_type = event_type.into();
        e.event_version = version.into();
        e.payload = json!({ event_type: payload });
        events.push(e);
    };
    let at = start.to_rfc3339();
    // Ended twice, differently: the later one counts.
    odd(
        &calls[1],
        "CallEnded",
        "1",
        json!({"outcome": "completed", "answered_secs": 61,
        "billed_minutes": 2, "price_cents": 105, "at": at}),
    );
    // A type this build does not know, and another version of a known one.
    odd(&calls[2], "CallTeleported", "1", json!({"to": "mars"}));
    odd(
        &calls[3],
        "CallEnded",
        "2",
        json!({"outcome": "busy", "answered_secs": 0,
        "billed_minutes": 0, "price_cents": 0, "at": at}),
    );
    // A cost past what the facts hold (18 digits), which the decoded event reads.
    odd(
        &calls[4],
        "CostRecorded",
        "1",
        json!({"service": "openai", "operation": "chat",
        "quantity": 1, "unit": "tokens", "unit_cost_micros": 1, "per_units": 1,
        "total_micros": 1_234_567_890_123_456_789_i64, "estimated": false}),
    );
    // A refund and a dispute recorded on a call, a bill's figure replacing an estimate.
    odd(
        &calls[5],
        "PaymentReversed",
        "1",
        json!({"kind": "refund", "reference": "re_1",
        "amount_cents": 7, "at": at}),
    );
    odd(
        &calls[5],
        "PaymentReversed",
        "1",
        json!({"kind": "dispute", "reference": "dp_1",
        "amount_cents": 3, "at": at}),
    );
    odd(
        &calls[6],
        "CostRecorded",
        "1",
        json!({"service": "twilio", "operation": "voice",
        "quantity": 1, "unit": "minutes", "unit_cost_micros": 20_000, "per_units": 1,
        "total_micros": 20_000, "estimated": false, "billed_reference": "CA1"}),
    );
    // A call with no request, only a dial.
    odd(
        "no-request",
        "DialAttempted",
        "1",
        json!({"attempt": 1, "at": at}),
    );
    for e in &events {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                 event_version, payload, metadata, recorded_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7::json, $8)",
        )
        .bind(&e.aggregate_type)
        .bind(&e.aggregate_id)
        .bind(e.sequence as i64)
        .bind(&e.event_type)
        .bind(&e.event_version)
        .bind(&e.payload)
        .bind(serde_json::to_string(&e.metadata).unwrap())
        .bind(e.occurred_at)
        .execute(&b.pool)
        .await
        .unwrap();
    }
    let args = ["--source", "postgres", "--format", "json", "reconcile"];
    let sql = replay(&env, &args).await;
    let folded = replay(&env, &[&args[..], &["--event-by-event"]].concat()).await;
    assert_eq!(sql, folded, "the SQL reconcile and the fold of every event");
    // And the odd events were read, not lost on both sides alike.
    let line = |id: &str| {
        sql["calls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["call_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no line for {id}"))
    };
    assert_eq!(line(&calls[1])["price_cents"], 105);
    assert_eq!(
        line(&calls[4])["cost_micros"]["openai"],
        1_234_567_890_123_456_789_i64
    );
    assert_eq!(line(&calls[5])["disputed_cents"], 3);
    assert_eq!(line(&calls[6])["billed_micros"]["twilio"], 20_000);
    assert!(
        line("no-request")["user_id"] == "",
        "{}",
        line("no-request")
    );
    assert!(sql["anomalies"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["call_id"] == "no-request" && a["kind"] == "cost_without_call"));
    env.cleanup().await;
}
