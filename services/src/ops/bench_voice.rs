//! `bench voice`: concurrent simulated calls through the whole product on this machine: the
//! Twilio simulator places and streams each call with a scripted caller who barges in, the
//! Deepgram, LLM and ElevenLabs simulators answer with fixed latencies, and the voice sessions
//! run between them. Reports our own overhead per turn, outbound frame jitter, CPU and memory
//! per call, and (with `--sweep`) the largest number of calls within the targets.

use std::time::Duration;

use cmb_domain::wallet::{Wallet, WalletCommand};
use cmb_domain::{Actor, CommandContext};
use serde_json::{json, Value};

use crate::config::Config;

/// The simulated providers' latencies the bench configures.
const LLM_FIRST_TOKEN_MS: u64 = 150;
const TTS_FIRST_BYTE_MS: u64 = 120;

#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub calls: u32,
    pub turns: usize,
    pub barge_ins: i64,
    pub overhead_p50_ms: f64,
    pub overhead_p99_ms: f64,
    pub jitter_p99_ms: f64,
    pub cpu_ms_per_call_second: f64,
    pub rss_mib_per_call: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// User + system CPU time of this process, in milliseconds (Linux).
fn cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the command name: state is field 0, utime 11, stime 12 (clock ticks of 10 ms).
    (ticks(11) + ticks(12)) * 10.0
}

fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

/// Runs `calls` concurrent calls on a fresh database and stream; returns the figures.
pub async fn run(base: &Config, calls: u32, seconds: u32) -> anyhow::Result<Figures> {
    use sqlx::migrate::MigrateDatabase;
    let mut config = base.clone();
    let db = format!("callmeback_bench_voice_{calls}");
    config.database_url = crate::ops::bench::with_database(&config.database_url, &db);
    config.stream.stream = format!("CMB_BENCH_VOICE_{calls}");
    config.stream.subject_prefix = format!("cmb.bench.voice{calls}");
    config.consumer_prefix = format!("cmbbv{calls}");
    config.http_addr = "127.0.0.1:0".parse().expect("an address");
    config.public_base_url_explicit = false;
    config.worker_ack_wait = Duration::from_secs(5);
    // Each simulated user registers from an address of its own (X-Forwarded-For, believed
    // from this machine's proxy: the bench).
    config.limits.trusted_proxies = vec![
        "127.0.0.1".parse().expect("an address"),
        "::1".parse().expect("an address"),
    ];
    for (k, v) in [
        ("SIM_TWILIO_RING_MS", "50".to_string()),
        ("SIM_TWILIO_CALL_SECONDS", seconds.to_string()),
        // Lead silence, then turns of 0.8 s of speech and 1.6 s of silence: the persona's
        // two-sentence replies run longer than that, so the caller barges in.
        (
            "SIM_TWILIO_CALLER_TURNS",
            "800:1600,800:1600,800:1600,800:1600,800:1600".into(),
        ),
        (
            "SIM_CEREBRAS_FIRST_TOKEN_MS",
            LLM_FIRST_TOKEN_MS.to_string(),
        ),
        ("SIM_CEREBRAS_TOKENS_PER_SEC", "2000".into()),
        (
            "SIM_CEREBRAS_REPLY",
            "Okay. Tell me more about that, I am listening carefully to you.".into(),
        ),
        (
            "SIM_ELEVENLABS_TTS_FIRST_BYTE_MS",
            TTS_FIRST_BYTE_MS.to_string(),
        ),
    ] {
        config.sim.insert(k.to_string(), v);
    }
    let _ = sqlx::Postgres::drop_database(&config.database_url).await;
    {
        let b = crate::backbone::connect(&config, 4).await?;
        b.js.delete_stream(&config.stream.stream).await.ok();
    }
    let app = crate::app::start(config.clone()).await?;
    let http = reqwest::Client::new();
    let base_url = format!("http://{}", app.addr);
    // Users, each with credits, and a persona with a one-word greeting.
    let mut tokens = Vec::new();
    for i in 0..calls {
        let reply: Value = http
            .post(format!("{base_url}/api/auth/register"))
            .header(
                "x-forwarded-for",
                format!("10.9.{}.{}", i / 250, i % 250 + 1),
            )
            .json(
                &json!({ "name": "Bench", "email": format!("bench{i}@example.com"),
                           "password": "Bench!pass1", "phone": format!("+1555{:06}9", i) }),
            )
            .send()
            .await?
            .json()
            .await?;
        let token = reply["token"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("register: {reply}"))?
            .to_string();
        let id = reply["user"]["id"].as_str().unwrap_or_default().to_string();
        app.state
            .store
            .execute::<Wallet>(
                &id,
                WalletCommand::Grant {
                    credits: 1000,
                    reason: "bench".into(),
                    reference: "bench".into(),
                },
                &CommandContext::for_request("bench", Actor::System),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        tokens.push(token);
    }
    let persona: Value = http
        .post(format!("{base_url}/api/personas"))
        .bearer_auth(&tokens[0])
        .json(&json!({ "name": "Bench Buddy", "description": "A persona for the voice benchmark.",
                       "voice": "21m00Tcm4TlvDq8ikWAM", "system_prompt": "You are a benchmark persona. Be brief.",
                       "greeting": "Hi.", "is_public": true,
                       "turn_taking": { "endpointing_ms": 300, "silence_reminder_ms": 60000, "silence_hangup_ms": 120000 } }))
        .send()
        .await?
        .json()
        .await?;
    let persona_id = persona["persona"]["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("persona: {persona}"))?
        .to_string();

    app.state.voice.pacing.reset();
    let cpu_before = cpu_ms();
    let rss_before = rss_mib();
    let started = std::time::Instant::now();
    let mut ids = Vec::new();
    for token in &tokens {
        let reply: Value = http
            .post(format!("{base_url}/api/call"))
            .bearer_auth(token)
            .json(&json!({ "persona_id": persona_id, "use_credits": true, "duration": 2 }))
            .send()
            .await?
            .json()
            .await?;
        ids.push(
            reply["call"]["id"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("call: {reply}"))?
                .to_string(),
        );
    }
    let mut rss_peak = rss_before;
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds as u64 + 60);
    loop {
        rss_peak = rss_peak.max(rss_mib());
        let ended: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE event_type = 'VoiceSessionEnded'",
        )
        .fetch_one(&app.state.pool)
        .await?;
        if ended as usize >= ids.len() || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_ms() - cpu_before;
    let turns: Vec<Value> = sqlx::query_scalar(
        "SELECT payload -> 'TurnCompleted' FROM events WHERE event_type = 'TurnCompleted'",
    )
    .fetch_all(&app.state.pool)
    .await?;
    let barge_ins: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum((payload -> 'VoiceSessionEnded' ->> 'barge_ins')::bigint), 0)::bigint
           FROM events WHERE event_type = 'VoiceSessionEnded'",
    )
    .fetch_one(&app.state.pool)
    .await?;
    // Ours: the time from the endpoint to the LLM's first token beyond the simulated latency
    // (request, connection, SSE parsing), plus the time from TTS's first audio bytes to the
    // first frame on the wire (framing, queue, pacing). What TTS takes between our first
    // sentence and its first byte is the simulator's (its latency and synthesis), not ours.
    let mut overhead: Vec<f64> = turns
        .iter()
        .filter_map(|t| {
            let t = &t["timings"];
            let first_audio = t["first_audio_ms"].as_f64()?;
            let first_byte = t["tts_first_byte_ms"].as_f64()?;
            let first_token = t["llm_first_token_ms"].as_f64()?;
            Some((first_token - LLM_FIRST_TOKEN_MS as f64).max(0.0) + (first_audio - first_byte))
        })
        .collect();
    overhead.sort_by(|a, b| a.total_cmp(b));
    // How late paced frames went out against their schedule (each session's histogram, added
    // to the instance's when its stream ended).
    let (_, jitter_p99) = app.state.voice.pacing.lateness_ms(0.99);
    app.stop().await;
    let _ = sqlx::Postgres::force_drop_database(&config.database_url).await;
    Ok(Figures {
        calls,
        turns: overhead.len(),
        barge_ins,
        overhead_p50_ms: percentile(&overhead, 0.50),
        overhead_p99_ms: percentile(&overhead, 0.99),
        jitter_p99_ms: jitter_p99,
        cpu_ms_per_call_second: cpu / (calls as f64 * wall),
        rss_mib_per_call: (rss_peak - rss_before).max(0.0) / calls as f64,
    })
}

pub fn print(rows: &[Figures], largest: Option<u32>) {
    println!(
        "{:>6} {:>6} {:>9} {:>13} {:>13} {:>12} {:>14} {:>12}",
        "calls",
        "turns",
        "barge-ins",
        "overhead p50",
        "overhead p99",
        "jitter p99",
        "CPU ms/call·s",
        "RSS MiB/call"
    );
    for f in rows {
        println!(
            "{:>6} {:>6} {:>9} {:>10.1} ms {:>10.1} ms {:>9.1} ms {:>14.1} {:>12.2}",
            f.calls,
            f.turns,
            f.barge_ins,
            f.overhead_p50_ms,
            f.overhead_p99_ms,
            f.jitter_p99_ms,
            f.cpu_ms_per_call_second,
            f.rss_mib_per_call
        );
    }
    if let Some(n) = largest {
        println!("largest N with overhead p99 ≤ 5 ms and jitter p99 ≤ 20 ms: {n}");
    }
    let runs: Vec<Value> = rows
        .iter()
        .map(|f| json!({ "calls": f.calls, "turns": f.turns, "barge_ins": f.barge_ins,
                         "overhead_p50_ms": f.overhead_p50_ms, "overhead_p99_ms": f.overhead_p99_ms,
                         "jitter_p99_ms": f.jitter_p99_ms, "cpu_ms_per_call_second": f.cpu_ms_per_call_second,
                         "rss_mib_per_call": f.rss_mib_per_call }))
        .collect();
    println!(
        "{}",
        json!({ "bench": "voice", "runs": runs, "largest_calls_within_targets": largest })
    );
}

pub fn within_targets(f: &Figures) -> bool {
    f.turns > 0 && f.overhead_p99_ms <= 5.0 && f.jitter_p99_ms <= 20.0
}
