//! The analysts' MCP server. Over stdio, driven as a client drives it (newline-delimited
//! JSON-RPC: initialize, tools/list, tools/call), on a simulated month: every tool's answer
//! equals what `callmeback replay …` says. Over HTTP (`/mcp` on `serve`): a user's token and a
//! revoked analyst token are refused, a valid analyst token is served.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::time::Duration;

use common::{Api, TestEnv, PASSWORD};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// How long any one answer may take on a loaded machine.
const ANSWER_WITHIN: Duration = Duration::from_secs(120);

async fn cli(env: &TestEnv, args: &[&str]) -> std::process::Output {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_callmeback"))
        .args(args)
        .env_clear()
        .envs(&env.vars)
        .output()
        .await
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

async fn cli_json(env: &TestEnv, args: &[&str]) -> Value {
    let out = cli(env, args).await;
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

async fn cli_lines(env: &TestEnv, args: &[&str]) -> Vec<Value> {
    let out = cli(env, args).await;
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `callmeback mcp` as a child process, spoken to as an MCP client speaks to it.
struct Client {
    _child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    next_id: u64,
}

impl Client {
    fn start(env: &TestEnv, source: &str) -> Client {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_callmeback"))
            .args(["mcp", "--source", source])
            .env_clear()
            .envs(&env.vars)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("callmeback mcp starts");
        Client {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()).lines(),
            _child: child,
            next_id: 1,
        }
    }

    async fn send(&mut self, message: Value) {
        let mut line = serde_json::to_vec(&message).unwrap();
        line.push(b'\n');
        self.stdin.write_all(&line).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// A request's whole JSON-RPC answer (`result` or `error`).
    async fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }))
            .await;
        tokio::time::timeout(ANSWER_WITHIN, async {
            loop {
                let line = self
                    .stdout
                    .next_line()
                    .await
                    .unwrap()
                    .expect("the server answers before closing");
                let message: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("stdout carries only JSON-RPC ({e}): {line}"));
                if message["id"] == id {
                    return message;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{method} answered within {ANSWER_WITHIN:?}"))
    }

    async fn initialize(&mut self) -> Value {
        let answer = self
            .request(
                "initialize",
                json!({
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": { "name": "cmb-tests", "version": "1" }
                }),
            )
            .await;
        self.send(json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }))
            .await;
        answer["result"].clone()
    }

    /// A tool's result (`structuredContent`, `isError`, `content`).
    async fn call(&mut self, tool: &str, arguments: Value) -> Value {
        let answer = self
            .request(
                "tools/call",
                json!({ "name": tool, "arguments": arguments }),
            )
            .await;
        assert!(answer["error"].is_null(), "{tool}: {answer}");
        answer["result"].clone()
    }

    /// A tool's structured answer; it must not be an error.
    async fn answer(&mut self, tool: &str, arguments: Value) -> Value {
        let result = self.call(tool, arguments).await;
        assert_ne!(result["isError"], true, "{tool}: {result}");
        result["structuredContent"].clone()
    }

    /// Every row of a paged answer, following `next_cursor` with pages of `limit`.
    async fn all_rows(
        &mut self,
        tool: &str,
        arguments: Value,
        rows: &str,
        limit: u32,
    ) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut args = arguments.clone();
            args["limit"] = limit.into();
            if let Some(c) = &cursor {
                args["cursor"] = c.clone().into();
            }
            let page = self.answer(tool, args).await;
            let items = page[rows].as_array().unwrap().clone();
            assert!(items.len() <= limit as usize);
            out.extend(items);
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return out,
            }
        }
    }

    /// The text of a tool error.
    async fn error(&mut self, tool: &str, arguments: Value) -> String {
        let result = self.call(tool, arguments).await;
        assert_eq!(result["isError"], true, "{tool} refuses: {result}");
        result["content"][0]["text"].as_str().unwrap().to_string()
    }
}

fn keyed(rows: &[Value], key: &str) -> BTreeMap<String, Value> {
    rows.iter()
        .map(|r| {
            let mut r = r.clone();
            let k = r[key].as_str().unwrap().to_string();
            r.as_object_mut().unwrap().remove(key);
            (k, r)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tool_answers_over_stdio_as_the_cli_does_on_a_simulated_month() {
    let env = TestEnv::new();
    let summary = cli_json(
        &env,
        &[
            "simulate",
            "--days",
            "30",
            "--calls-per-day",
            "2",
            "--seed",
            "11",
            "--publish",
        ],
    )
    .await;
    assert_eq!(summary["calls"], 60, "{summary}");
    let pg = ["replay", "--source", "postgres", "--format", "json"];
    fn with<'a>(pg: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [pg, extra].concat()
    }
    let report = cli_json(&env, &with(&pg, &["reconcile"])).await;
    assert_eq!(report["totals"]["calls"], 60);

    let mut mcp = Client::start(&env, "postgres");
    let init = mcp.initialize().await;
    assert!(init["capabilities"]["tools"].is_object(), "{init}");
    assert!(init["serverInfo"]["name"].is_string(), "{init}");
    let tools = mcp.request("tools/list", json!({})).await["result"]["tools"].clone();
    let names: Vec<&str> = tools
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for name in [
        "call_timeline",
        "reconcile",
        "compare_bill",
        "costs",
        "unit_economics",
        "events",
    ] {
        let tool = tools.as_array().unwrap().iter().find(|t| t["name"] == name);
        let tool = tool.unwrap_or_else(|| panic!("{name} listed: {names:?}"));
        assert_eq!(tool["inputSchema"]["type"], "object", "{tool}");
        assert_eq!(tool["outputSchema"]["type"], "object", "{tool}");
        assert_eq!(tool["annotations"]["readOnlyHint"], true, "{tool}");
        assert!(tool["description"].as_str().unwrap().len() > 40, "{tool}");
    }
    assert_eq!(names.len(), 6, "{names:?}");
    let schema = &tools
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "costs")
        .unwrap()["inputSchema"];
    assert!(
        schema.to_string().contains("persona"),
        "`by` lists its values: {schema}"
    );

    // reconcile: every grouping, paged, is the CLI's report.
    let calls = mcp
        .all_rows("reconcile", json!({ "group_by": "call" }), "rows", 7)
        .await;
    assert_eq!(Value::from(calls), report["calls"]);
    let first = mcp.answer("reconcile", json!({ "limit": 5 })).await;
    assert_eq!(first["totals"], report["totals"]);
    assert_eq!(first["total_rows"], 60);
    assert_eq!(first["next_cursor"], "5");
    assert_eq!(
        json!(first["system_cost_cents"]),
        report["system_cost_cents"]
    );
    let users = mcp
        .all_rows("reconcile", json!({ "group_by": "user" }), "rows", 4)
        .await;
    assert_eq!(json!(keyed(&users, "user_id")), report["per_user"]);
    let providers = mcp
        .all_rows("reconcile", json!({ "group_by": "provider" }), "rows", 100)
        .await;
    let per_provider: BTreeMap<String, Value> = providers
        .iter()
        .map(|r| {
            (
                r["provider"].as_str().unwrap().into(),
                r["cost_cents"].clone(),
            )
        })
        .collect();
    assert_eq!(json!(per_provider), report["per_provider"]);
    assert!(
        per_provider.len() >= 4,
        "twilio, deepgram, an LLM, elevenlabs: {per_provider:?}"
    );
    let days = mcp
        .all_rows("reconcile", json!({ "group_by": "day" }), "rows", 9)
        .await;
    assert_eq!(json!(keyed(&days, "day")), report["per_day"]);
    assert_eq!(days.len(), 30);
    let anomalies = mcp
        .all_rows("reconcile", json!({ "group_by": "anomaly" }), "rows", 100)
        .await;
    assert_eq!(Value::from(anomalies), report["anomalies"]);
    // A range: the calls requested in those ten days, as `replay --from --to reconcile`.
    let (d1, d2) = (
        days[5]["day"].as_str().unwrap(),
        days[14]["day"].as_str().unwrap(),
    );
    let ranged_cli = cli_json(&env, &with(&pg, &["--from", d1, "--to", d2, "reconcile"])).await;
    let ranged = mcp
        .all_rows("reconcile", json!({ "from": d1, "to": d2 }), "rows", 1000)
        .await;
    assert_eq!(Value::from(ranged.clone()), ranged_cli["calls"]);
    assert_eq!(ranged.len(), 20, "two calls a day over ten days");

    // costs: by provider, day and user as the report's sums; by persona from the calls'
    // requests (`replay events --type call`).
    let by_provider = mcp
        .all_rows("costs", json!({ "by": "provider" }), "rows", 2)
        .await;
    for row in &by_provider {
        let p = row["key"].as_str().unwrap();
        assert_eq!(row["cost_cents"], report["per_provider"][p], "{row}");
        if let Some(system) = report["system_cost_cents"].get(p) {
            assert_eq!(&row["system_cost_cents"], system, "{row}");
        }
    }
    assert_eq!(
        by_provider.len(),
        per_provider
            .len()
            .max(report["system_cost_cents"].as_object().unwrap().len())
    );
    let by_day = mcp
        .all_rows("costs", json!({ "by": "day" }), "rows", 100)
        .await;
    for row in &by_day {
        let day = &report["per_day"][row["key"].as_str().unwrap()];
        let cost: i64 = day["cost_cents"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_i64().unwrap())
            .sum();
        assert_eq!(row["cost_cents"], cost, "{row}");
        assert_eq!(row["revenue_cents"], day["revenue_cents"], "{row}");
        assert_eq!(row["cost_by_provider_cents"], day["cost_cents"], "{row}");
    }
    let by_user = mcp
        .all_rows("costs", json!({ "by": "user" }), "rows", 100)
        .await;
    for row in &by_user {
        let user = &report["per_user"][row["key"].as_str().unwrap()];
        assert_eq!(row["cost_cents"], user["cost_cents"], "{row}");
        assert_eq!(row["margin_cents"], user["margin_cents"], "{row}");
        assert_eq!(row["calls"], user["calls"], "{row}");
    }
    assert_eq!(by_user.len(), report["per_user"].as_object().unwrap().len());
    let call_events = cli_lines(&env, &with(&pg, &["--type", "call", "events"])).await;
    let persona_of: HashMap<String, String> = call_events
        .iter()
        .filter(|e| e["event_type"] == "CallRequested")
        .map(|e| {
            (
                e["aggregate_id"].as_str().unwrap().to_string(),
                e["payload"]["CallRequested"]["persona_id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    let mut expected: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
    for c in report["calls"].as_array().unwrap() {
        let e = expected
            .entry(persona_of[c["call_id"].as_str().unwrap()].clone())
            .or_default();
        e.0 += 1;
        e.1 += c["total_cost_cents"].as_i64().unwrap();
        e.2 += c["revenue_cents"].as_i64().unwrap();
    }
    let by_persona = mcp
        .all_rows("costs", json!({ "by": "persona" }), "rows", 100)
        .await;
    let got: BTreeMap<String, (i64, i64, i64)> = by_persona
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_string(),
                (
                    r["calls"].as_i64().unwrap(),
                    r["cost_cents"].as_i64().unwrap(),
                    r["revenue_cents"].as_i64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(got, expected);

    // unit_economics: per conversation minute, from the report's calls.
    let unit = mcp.answer("unit_economics", json!({})).await;
    let seconds: i64 = report["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["answered_secs"].as_i64().unwrap())
        .sum();
    assert!(seconds > 0);
    let per_minute =
        |cents: i64| ((cents as f64 * 60.0 / seconds as f64) * 10_000.0).round() / 10_000.0;
    assert_eq!(unit["conversation_seconds"], seconds);
    assert_eq!(unit["cost_cents"], report["totals"]["cost_cents"]);
    assert_eq!(unit["margin_cents"], report["totals"]["margin_cents"]);
    let cost = report["totals"]["cost_cents"].as_i64().unwrap();
    assert_eq!(
        unit["cost_cents_per_minute"].as_f64().unwrap(),
        per_minute(cost)
    );
    let twilio = report["per_provider"]["twilio"].as_i64().unwrap();
    let row = unit["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "twilio")
        .unwrap();
    assert_eq!(
        row["cents_per_minute"].as_f64().unwrap(),
        per_minute(twilio)
    );

    // call_timeline: the call's events as `replay events --call`, its money as reconcile's.
    let line = report["calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["outcome"] == "completed" && c["charged_cents"].as_i64() > Some(0))
        .expect("a completed, charged call")
        .clone();
    let id = line["call_id"].as_str().unwrap();
    let story = mcp.answer("call_timeline", json!({ "call_id": id })).await;
    let cli_events = cli_lines(&env, &with(&pg, &["--call", id, "events"])).await;
    assert_eq!(story["events"].as_array().unwrap().len(), cli_events.len());
    for (mine, theirs) in story["events"].as_array().unwrap().iter().zip(&cli_events) {
        assert_eq!(mine["sequence"], theirs["sequence"]);
        assert_eq!(mine["event_type"], theirs["event_type"]);
        // The operator's CLI opens personal fields; the analysts' tools never do.
        assert_same_but_sealed(&mine["payload"], &theirs["payload"]);
        assert_eq!(mine["actor"], theirs["metadata"]["actor"]);
    }
    assert_eq!(story["cost_cents"], line["cost_cents"]);
    assert_eq!(story["total_cost_cents"], line["total_cost_cents"]);
    assert_eq!(story["payment"]["charged_cents"], line["charged_cents"]);
    assert_eq!(story["payment"]["revenue_cents"], line["revenue_cents"]);
    assert_eq!(story["payment"]["margin_cents"], line["margin_cents"]);
    assert_eq!(story["status"], "completed");
    assert_eq!(story["latencies"]["answered_secs"], line["answered_secs"]);
    assert!(
        story["latencies"]["answered_ms"].as_i64().unwrap() >= 0,
        "{story}"
    );
    assert!(!story["cost_lines"].as_array().unwrap().is_empty());

    // events: a user's, paged, as `replay events --user`.
    let user = line["user_id"].as_str().unwrap();
    let theirs = cli_lines(&env, &with(&pg, &["--user", user, "events"])).await;
    let mine = mcp
        .all_rows(
            "events",
            json!({ "filter": { "user_id": user } }),
            "events",
            3,
        )
        .await;
    assert_same_but_sealed(&Value::from(mine), &Value::from(theirs.clone()));
    assert!(theirs.len() > 3);
    let wallets = mcp
        .all_rows(
            "events",
            json!({ "filter": { "type": "wallet" } }),
            "events",
            1000,
        )
        .await;
    assert_same_but_sealed(
        &Value::from(wallets),
        &Value::from(cli_lines(&env, &with(&pg, &["--type", "wallet", "events"])).await),
    );
    let one_day = mcp
        .all_rows(
            "events",
            json!({ "filter": { "type": "call", "from": d1, "to": d1 } }),
            "events",
            50,
        )
        .await;
    assert_same_but_sealed(
        &Value::from(one_day.clone()),
        &Value::from(
            cli_lines(
                &env,
                &with(&pg, &["--type", "call", "--from", d1, "--to", d1, "events"]),
            )
            .await,
        ),
    );
    assert!(!one_day.is_empty());
    // By event type, alone and with a user: the CLI's events of that type.
    let settled = mcp
        .all_rows(
            "events",
            json!({ "filter": { "event_type": "CallSettled" } }),
            "events",
            1000,
        )
        .await;
    let cli_settled: Vec<Value> = call_events
        .iter()
        .filter(|e| e["event_type"] == "CallSettled")
        .cloned()
        .collect();
    assert_eq!(settled, cli_settled);
    let theirs_settled: Vec<Value> = theirs
        .iter()
        .filter(|e| e["event_type"] == "CallSettled")
        .cloned()
        .collect();
    let mine_settled = mcp
        .all_rows(
            "events",
            json!({ "filter": { "user_id": user, "event_type": "CallSettled" } }),
            "events",
            1000,
        )
        .await;
    assert_eq!(mine_settled, theirs_settled);
    assert!(!mine_settled.is_empty());
    let of_call = mcp
        .all_rows(
            "events",
            json!({ "filter": { "call_id": id } }),
            "events",
            1000,
        )
        .await;
    assert_same_but_sealed(&Value::from(of_call), &Value::from(cli_events.clone()));

    // compare_bill: the CSV's text, as `replay reconcile --billed FILE`.
    let sid = line["call_sid"].as_str().unwrap();
    let csv = format!(
        "Sid,From,To,Status,Duration,Price,PriceUnit\n{sid},+15005550006,+15550000000,completed,60,-0.50000,USD\nCAunknown00000000000000000000000,+1,+1,completed,60,-0.01400,USD\n"
    );
    let bill = std::env::temp_dir().join(format!("cmb-mcp-bill-{}.csv", env.id));
    std::fs::write(&bill, &csv).unwrap();
    let diff_cli = cli_json(
        &env,
        &with(
            &pg,
            &[
                "reconcile",
                "--billed",
                bill.to_str().unwrap(),
                "--threshold",
                "1",
            ],
        ),
    )
    .await;
    let _ = std::fs::remove_file(&bill);
    let diffs = mcp
        .all_rows(
            "compare_bill",
            json!({ "csv_text": csv, "threshold_cents": 1 }),
            "differences",
            10,
        )
        .await;
    assert_eq!(Value::from(diffs.clone()), diff_cli["differences"]);
    let compared = mcp
        .answer(
            "compare_bill",
            json!({ "csv_text": csv, "threshold_cents": 1 }),
        )
        .await;
    assert_eq!(
        compared["total_difference_cents"],
        diff_cli["total_difference_cents"]
    );
    assert!(diffs.iter().any(|d| d["kind"] == "billed_but_unknown"));
    assert!(diffs
        .iter()
        .any(|d| d["kind"] == "differs" && d["call_id"] == id));

    // Errors: tool errors an analyst can act on, and nothing written by asking.
    let e = mcp
        .error("call_timeline", json!({ "call_id": "not-a-call" }))
        .await;
    assert!(e.contains("call_id") && e.contains("UUID"), "{e}");
    let e = mcp
        .error(
            "call_timeline",
            json!({ "call_id": uuid::Uuid::new_v4().to_string() }),
        )
        .await;
    assert!(e.contains("no call"), "{e}");
    let e = mcp
        .error("reconcile", json!({ "from": "last tuesday" }))
        .await;
    assert!(e.starts_with("from:"), "{e}");
    let e = mcp
        .error("costs", json!({ "from": "2026-11-10", "to": "2026-11-01" }))
        .await;
    assert!(e.contains("before"), "{e}");
    let e = mcp
        .error("compare_bill", json!({ "csv_text": "a,b\n1,2\n" }))
        .await;
    assert!(e.contains("header"), "{e}");
    let e = mcp
        .error("events", json!({ "filter": { "user_id": "bob" } }))
        .await;
    assert!(e.contains("filter.user_id"), "{e}");
    let e = mcp
        .error("reconcile", json!({ "cursor": "page two" }))
        .await;
    assert!(e.contains("cursor"), "{e}");
    // Arguments off the input schema are refused by the SDK, as a tool error too.
    let e = mcp.error("costs", json!({ "by": "planet" })).await;
    assert!(e.contains("planet") && e.contains("persona"), "{e}");
    let e = mcp
        .error("unit_economics", json!({ "form": "2026-11-01" }))
        .await;
    assert!(e.contains("form"), "{e}");
    let after = cli_json(&env, &with(&pg, &["reconcile"])).await;
    assert_eq!(after, report, "asking changed nothing");

    // From the stream: the same answers.
    let mut from_nats = Client::start(&env, "nats");
    from_nats.initialize().await;
    let nats_report = from_nats
        .answer("reconcile", json!({ "limit": 1000 }))
        .await;
    assert_eq!(
        Value::from(nats_report["rows"].as_array().unwrap().clone()),
        report["calls"]
    );
    assert_eq!(nats_report["totals"], report["totals"]);
    let nats_story = from_nats
        .answer("call_timeline", json!({ "call_id": id }))
        .await;
    assert_eq!(nats_story, story, "the same story from the stream");
    let nats_events = from_nats
        .all_rows(
            "events",
            json!({ "filter": { "user_id": user } }),
            "events",
            1000,
        )
        .await;
    // The stream's order is per aggregate (the publisher's waves), not the store's commit
    // order across aggregates: as `replay --source nats events` gives them.
    let from_stream = cli_lines(
        &env,
        &["replay", "--source", "nats", "--user", user, "events"],
    )
    .await;
    assert_eq!(nats_events.len(), theirs.len());
    assert_same_but_sealed(&Value::from(nats_events), &Value::from(from_stream));
    env.cleanup().await;
}

/// One JSON-RPC request to `/mcp` as a streamable-HTTP client sends it.
async fn post_mcp(api: &Api, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/mcp", api.base))
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-11-25")
        .json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let response = req.send().await.expect("the server answers");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    // A JSON answer, or the JSON of the one `data:` event of an SSE answer.
    let json_text = text
        .lines()
        .find_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .unwrap_or(&text);
    (
        status,
        serde_json::from_str(json_text).unwrap_or(Value::String(text.clone())),
    )
}

fn initialize() -> Value {
    json!({ "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": { "name": "cmb-tests", "version": "1" } } })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_mcp_takes_analyst_tokens_only_and_refuses_revoked_ones() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, _) = api.register(PASSWORD).await;
    let user_token = user.token.clone().unwrap();

    let token =
        String::from_utf8(cli(&env, &["analyst-token", "create", "ana"]).await.stdout).unwrap();
    let token = token.trim().to_string();
    assert!(token.starts_with("cmba_"), "{token}");
    let stored: String =
        sqlx::query_scalar("SELECT token_sha256 FROM analyst_tokens WHERE name = 'ana'")
            .fetch_one(&app.state.pool)
            .await
            .unwrap();
    assert!(!stored.contains(&token[5..]), "stored hashed");

    let (status, body) = post_mcp(&api, None, initialize()).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    let (status, body) = post_mcp(&api, Some(&user_token), initialize()).await;
    assert_eq!(status, 403, "a user's token: {body}");
    assert_eq!(body["error"]["code"], "forbidden");
    let (status, body) = post_mcp(&api, Some("cmba_madeup"), initialize()).await;
    assert_eq!(status, 401, "{body}");
    // The analyst token opens nothing of the users' API.
    assert_eq!(api.with_token(&token).get("/api/auth/me").await.status, 401);

    let (status, body) = post_mcp(&api, Some(&token), initialize()).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["result"]["capabilities"]["tools"].is_object(),
        "{body}"
    );
    let (status, body) = post_mcp(
        &api,
        Some(&token),
        json!({ "jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {} }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["result"]["tools"].as_array().unwrap().len(),
        6,
        "{body}"
    );
    let (status, body) = post_mcp(
        &api,
        Some(&token),
        json!({ "jsonrpc": "2.0", "id": 3, "method": "tools/call",
                "params": { "name": "unit_economics", "arguments": {} } }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["structuredContent"]["calls"], 0, "{body}");

    // What the transport refuses is still a JSON error.
    for (method, body, status) in [
        ("GET", "", 405),
        ("POST", "not json", 415),
        ("DELETE", "", 405),
    ] {
        let r = reqwest::Client::new()
            .request(method.parse().unwrap(), format!("{}/mcp", api.base))
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .bearer_auth(&token)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{method}");
        let body: Value = r.json().await.expect("a JSON body");
        assert!(
            body["error"]["code"].is_string() && body["error"]["message"].is_string(),
            "{body}"
        );
    }
    let huge = "x".repeat(9 * 1024 * 1024);
    let (status, body) = post_mcp(
        &api,
        Some(&token),
        json!({ "jsonrpc": "2.0", "id": 4, "method": "tools/call",
                "params": { "name": "compare_bill", "arguments": { "csv_text": huge } } }),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large");

    let listed = cli_json(&env, &["analyst-token", "list", "--json"]).await;
    assert_eq!(listed[0]["name"], "ana");
    assert!(listed[0]["revoked_at"].is_null());
    cli(&env, &["analyst-token", "revoke", "ana"]).await;
    let (status, body) = post_mcp(&api, Some(&token), initialize()).await;
    assert_eq!(status, 401, "a revoked token: {body}");
    let listed = cli_json(&env, &["analyst-token", "list", "--json"]).await;
    assert!(listed[0]["revoked_at"].is_string(), "{listed}");
    // A name in force cannot be taken twice; after revocation it can be issued again.
    let again = cli(&env, &["analyst-token", "create", "ana"]).await;
    let fresh = String::from_utf8(again.stdout).unwrap().trim().to_string();
    assert_ne!(fresh, token);
    let (status, _) = post_mcp(&api, Some(&fresh), initialize()).await;
    assert_eq!(status, 200);
    let twice = tokio::process::Command::new(env!("CARGO_BIN_EXE_callmeback"))
        .args(["analyst-token", "create", "ana"])
        .env_clear()
        .envs(&env.vars)
        .output()
        .await
        .unwrap();
    assert!(!twice.status.success());
    assert!(String::from_utf8_lossy(&twice.stderr).contains("already in force"));
    app.stop().await;
    env.cleanup().await;
}

/// `mine` (an MCP answer) equals `theirs` (the CLI's) except that where the CLI shows a
/// personal field opened, the MCP answer holds it sealed (`{"$sealed": …}`), never in clear.
fn assert_same_but_sealed(mine: &Value, theirs: &Value) {
    match (mine, theirs) {
        (Value::Object(m), Value::String(_)) if m.contains_key("$sealed") => {}
        (Value::Object(m), Value::Object(t)) => {
            assert_eq!(
                m.keys().collect::<Vec<_>>(),
                t.keys().collect::<Vec<_>>(),
                "{mine} vs {theirs}"
            );
            for (k, v) in m {
                assert_same_but_sealed(v, &t[k]);
            }
        }
        (Value::Array(m), Value::Array(t)) => {
            assert_eq!(m.len(), t.len(), "{mine} vs {theirs}");
            for (a, b) in m.iter().zip(t) {
                assert_same_but_sealed(a, b);
            }
        }
        _ => assert_eq!(mine, theirs),
    }
}
