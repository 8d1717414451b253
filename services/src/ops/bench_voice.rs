//! `bench voice --calls 100,200,500`: concurrent conversations measured from outside the
//! product. `callmeback serve` runs as a child process on a database and stream of its own;
//! this process plays every provider around it — Twilio (REST, signed callbacks and Media
//! Streams with a caller who talks and talks over the persona), Deepgram, the LLMs and
//! ElevenLabs, with fixed simulated delays — and the users, who place the calls through the
//! API. What a caller would notice is timed where Twilio sits: reply latency (the caller's last
//! word → the persona's first audio), net of the configured delays; barge-in (the caller's first
//! word over the persona → `clear`); how late outbound frames arrive against their pace. CPU and
//! resident memory are serve's own, read from `/proc/<pid>` while the calls are up. With
//! `--twilio-apart` the Twilio simulator (the measuring side) is a process of its own
//! (`callmeback sim twilio`, see `bench_voice_twilio`).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::config::Config;
use crate::ops::bench_voice_twilio::Twilio;
use crate::ops::child::{self, cpu_ms, load_average, rss_mib, Callgrind};

const ACCOUNT_SID: &str = "ACbe0c4be0c4be0c4be0c4be0c4be0c4b";
const AUTH_TOKEN: &str = "bench-voice-token";
/// The simulated delays (as in the Pipecat measurement the issue compares with): end of speech
/// → final transcript (the persona's endpointing, on the audio clock), the LLM's first token,
/// then 50 tokens/s, TTS's first byte.
const ENDPOINTING_MS: u64 = 400;
const LLM_FIRST_TOKEN_MS: u64 = 150;
const LLM_TOKENS_PER_SEC: u64 = 50;
const TTS_FIRST_BYTE_MS: u64 = 150;
/// The reply's first token ends its first sentence ("Okay. "), so no streaming time adds.
const REPLY: &str = "Okay. Tell me more about that, I am listening carefully to you.";
const CONFIGURED_MS: f64 = (ENDPOINTING_MS + LLM_FIRST_TOKEN_MS + TTS_FIRST_BYTE_MS) as f64;

/// The targets of issue 15.
pub const TARGET_NET_P99_MS: f64 = 20.0;
pub const TARGET_JITTER_P99_MS: f64 = 20.0;
pub const TARGET_CPU_PCT_PER_CALL: f64 = 0.15;
pub const TARGET_RSS_MB_PER_CALL: f64 = 0.5;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Figures {
    pub calls: u32,
    /// Media streams that opened (the call reached a voice session).
    pub sessions: u64,
    /// Calls requested whose stream never opened, carried none of the persona's audio, or
    /// did not end as completed.
    pub sessions_failed: u64,
    /// Caller turns whose reply latency was measured, and those ended over the persona's audio.
    pub replies: usize,
    pub replies_unmeasured: u64,
    pub reply_p50_ms: f64,
    pub reply_p99_ms: f64,
    /// Reply latency less the configured delays ([`CONFIGURED_MS`]): our overhead.
    pub net_p50_ms: f64,
    pub net_p99_ms: f64,
    pub barge_ins: usize,
    pub barge_ins_missed: u64,
    pub barge_in_p50_ms: f64,
    pub barge_in_p99_ms: f64,
    /// serve's own account (`TurnCompleted`, from the final transcript): the LLM's first
    /// token, TTS's first audio bytes and the first frame on the wire, p50 and p99.
    pub inside_llm_first_token_ms: [f64; 2],
    pub inside_tts_first_byte_ms: [f64; 2],
    pub inside_first_audio_ms: [f64; 2],
    /// Persona frames received, and how late against their pace (p99).
    pub frames: usize,
    pub jitter_p99_ms: f64,
    /// How late this process's own 20 ms ticker woke (p99): the measurement's noise floor.
    pub bench_tick_p99_ms: f64,
    /// How late this process sent the silence frame that ended a measured turn (p99), taken
    /// off that turn's reply latency.
    pub bench_endpoint_late_p99_ms: f64,
    /// serve's CPU while at least 90 % of the calls were up, in % of one core per call;
    /// `None` when they never were (the calls too short for that many): not sampled.
    pub cpu_pct_per_call: Option<f64>,
    pub cpu_window_s: f64,
    /// serve's resident memory: the peak while the calls were up less before they were placed,
    /// per call (`None`: not sampled, as the CPU); and the peak.
    pub rss_mib_per_call: Option<f64>,
    pub rss_mib_peak: f64,
    /// This process's CPU (the simulators, the callers), % of one core.
    pub bench_cpu_pct: f64,
    /// With `--twilio-apart`: the Twilio simulator's process CPU, % of one core (else it is in
    /// `bench_cpu_pct`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub twilio_cpu_pct: Option<f64>,
    /// Under callgrind (`CMB_BENCH_SERVE_PREFIX`): serve's instructions over the CPU window,
    /// per call-second — a CPU figure the machine's load does not move.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serve_instructions_per_call_second: Option<f64>,
    pub load_average: [f64; 3],
    /// With `--knowledge N`: the persona's passages and the retrieval on each caller turn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knowledge: Option<crate::ops::bench_knowledge::InCalls>,
}

fn percentile_ms(values: &mut [u64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_unstable();
    values[((values.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

/// Runs `calls` concurrent calls of about `seconds` each, the persona holding documents of
/// `knowledge` passages (none for 0); returns what was measured.
pub async fn run(
    base: &Config,
    calls: u32,
    seconds: u32,
    knowledge: usize,
    twilio_apart: bool,
) -> Result<Figures, child::BenchError> {
    let mut config = child::isolated(base, "voice", calls).await;

    // The providers, here.
    for (k, v) in [
        ("SIM_TWILIO_RING_MS", "300".to_string()),
        ("SIM_TWILIO_CALL_SECONDS", seconds.to_string()),
        // Lead silence, then turns of 0.8 s of speech and 1.6 s of silence: the persona's
        // replies run longer than that, so the caller talks over them.
        (
            "SIM_TWILIO_CALLER_TURNS",
            "800:1600,800:1600,800:1600,800:1600,800:1600".into(),
        ),
        (
            "SIM_CEREBRAS_FIRST_TOKEN_MS",
            LLM_FIRST_TOKEN_MS.to_string(),
        ),
        (
            "SIM_CEREBRAS_TOKENS_PER_SEC",
            LLM_TOKENS_PER_SEC.to_string(),
        ),
        ("SIM_CEREBRAS_REPLY", REPLY.into()),
        ("SIM_OPENAI_FIRST_TOKEN_MS", LLM_FIRST_TOKEN_MS.to_string()),
        ("SIM_OPENAI_TOKENS_PER_SEC", LLM_TOKENS_PER_SEC.to_string()),
        ("SIM_OPENAI_REPLY", REPLY.into()),
        (
            "SIM_ELEVENLABS_TTS_FIRST_BYTE_MS",
            TTS_FIRST_BYTE_MS.to_string(),
        ),
    ] {
        config.sim.insert(k.to_string(), v);
    }
    if knowledge > 0 {
        // The callers ask about what the documents cover, in turns long enough to say a
        // question of seven to nine words (the simulator hears a word every 250 ms).
        config.sim.insert(
            "SIM_DEEPGRAM_SCRIPT".into(),
            crate::ops::bench_knowledge::QUESTIONS.into(),
        );
        config.sim.insert(
            "SIM_TWILIO_CALLER_TURNS".into(),
            "2400:1600,2400:1600,2400:1600,2400:1600,2400:1600".into(),
        );
    }
    let shutdown = tokio_util::sync::CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    let mut twilio_vars: Vec<(&str, String)> = config
        .sim
        .iter()
        .filter(|(k, _)| k.starts_with("SIM_TWILIO_"))
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    twilio_vars.extend([
        ("TWILIO_ACCOUNT_SID", ACCOUNT_SID.to_string()),
        ("TWILIO_AUTH_TOKEN", AUTH_TOKEN.to_string()),
        // The reply latency is timed from the silence frame that ends a caller's turn for the
        // listener, as sent: how late the simulator sent it is its own delay, not serve's.
        (
            "SIM_TWILIO_CALLER_ENDPOINTING_MS",
            ENDPOINTING_MS.to_string(),
        ),
    ]);
    let (twilio, twilio_url) = Twilio::start(twilio_apart, &twilio_vars, &shutdown, &tasks).await?;
    use crate::serve::simulators as sims;
    let serve_sim = |name: &'static str, router: axum::Router| {
        cmb_sims::serve(name, router, shutdown.clone(), &tasks)
    };
    let deepgram_url = serve_sim("deepgram", sims::deepgram(&config).router()).await?;
    let cerebras_url = serve_sim("cerebras", sims::llm(&config, "CEREBRAS").router()).await?;
    let openai = sims::llm(&config, "OPENAI");
    let openai_url = serve_sim("openai", openai.router()).await?;
    let elevenlabs_url = serve_sim("elevenlabs", sims::elevenlabs(&config).router()).await?;

    let serve = child::spawn_serve(
        &config,
        &[
            ("TWILIO_BASE_URL", twilio_url),
            ("TWILIO_ACCOUNT_SID", ACCOUNT_SID.into()),
            ("TWILIO_AUTH_TOKEN", AUTH_TOKEN.into()),
            ("DEEPGRAM_BASE_URL", deepgram_url),
            ("CEREBRAS_BASE_URL", cerebras_url),
            ("OPENAI_BASE_URL", format!("{openai_url}/v1")),
            ("ELEVENLABS_BASE_URL", elevenlabs_url),
            // Every passage in the calls (the default loads 500).
            ("KNOWLEDGE_SESSION_PASSAGES", knowledge.max(500).to_string()),
        ],
        &format!("callmeback-bench-voice-{calls}"),
    )
    .await?;
    let pid = serve.pid.to_string();
    let http = child::client()?;
    let backbone = crate::backbone::connect(&config, 4).await?;
    let store = crate::backbone::store::EventStore::new(backbone.pool.clone());

    let crowd = child::Crowd {
        kind: "voice",
        subnet: 9,
        phone_digit: 9,
        credits: 1000,
    };
    let users = child::register_users(&http, &serve, &store, calls, &crowd).await?;
    let persona_id =
        child::create_persona(&http, &serve, &users.tokens[0], &json!({ "name": "Bench Buddy", "description": "A persona for the voice benchmark.",
                       "voice": "21m00Tcm4TlvDq8ikWAM", "system_prompt": "You are a benchmark persona. Be brief.",
                       "greeting": "Hi.", "is_public": true,
                       "turn_taking": { "endpointing_ms": ENDPOINTING_MS, "silence_reminder_ms": 60000, "silence_hangup_ms": 120000 } })).await?;
    let knowledge_passages = if knowledge > 0 {
        eprintln!("giving the persona documents of about {knowledge} passages…");
        let n = crate::ops::bench_knowledge::give_persona(
            &http,
            &serve.base_url,
            &users.tokens[0],
            &persona_id,
            knowledge,
        )
        .await?;
        eprintln!("{n} passages indexed");
        Some(n)
    } else {
        None
    };

    // Settle, then the baseline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = rss_mib(&pid);
    let embeddings_before = openai.embedding_requests();
    let bench_cpu_before = cpu_ms("self");
    let twilio_pid = twilio.pid().map(|p| p.to_string());
    let twilio_cpu_before = twilio_pid.as_deref().map(cpu_ms);
    let started = Instant::now();
    let answers = child::place_calls(&http, &serve, &users.tokens, &persona_id).await;
    let requested = answers.iter().filter(|s| **s == 201).count() as u64;
    if requested < calls as u64 {
        eprintln!(
            "{} of {calls} calls refused (statuses {:?})",
            calls as u64 - requested,
            answers.iter().filter(|s| **s != 201).collect::<Vec<_>>()
        );
    }

    // Sample serve's CPU and memory while the calls are up.
    let quorum = ((requested as f64 * 0.9).ceil() as u64).max(1);
    let (mut cpu_window, mut call_seconds, mut rss_peak) = (0.0, 0.0, rss_before);
    let mut window_s = 0.0;
    let mut last: Option<(Instant, f64, u64)> = None;
    let deadline = Instant::now() + Duration::from_secs(seconds as u64 * 3 + 300);
    // Under callgrind (`CMB_BENCH_SERVE_PREFIX`), serve's instructions are counted over the
    // same window as its CPU: instrumentation on when it opens, a dump when it closes.
    let callgrind = Callgrind::from_env(&pid);
    let mut counting = false;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let sims = twilio.calls().await;
        let live = sims
            .iter()
            .filter(|c| c.stream_opened && !c.stream_closed)
            .count() as u64;
        if let Some(cg) = &callgrind {
            if !counting && live >= quorum && window_s == 0.0 {
                cg.control("-i", "on");
                counting = true;
                last = None;
            } else if counting && live < quorum {
                cg.control("-d", "");
                cg.control("-i", "off");
                counting = false;
            }
        }
        let (now, cpu) = (Instant::now(), cpu_ms(&pid));
        if let Some((t, c, l)) = last {
            if live >= quorum && l >= quorum && (callgrind.is_none() || counting) {
                let dt = (now - t).as_secs_f64();
                cpu_window += cpu - c;
                call_seconds += dt * (live + l) as f64 / 2.0;
                window_s += dt;
                rss_peak = rss_peak.max(rss_mib(&pid));
            }
        }
        last = Some((now, cpu, live));
        let ended = sims.iter().filter(|c| c.ended).count() as u64;
        if (ended >= requested && sims.len() as u64 >= requested) || Instant::now() > deadline {
            break;
        }
    }
    if counting {
        if let Some(cg) = &callgrind {
            cg.control("-d", "");
        }
    }
    let serve_instructions = callgrind.as_ref().and_then(Callgrind::instructions);
    let bench_cpu = cpu_ms("self") - bench_cpu_before;
    let wall = started.elapsed().as_secs_f64();
    let twilio_cpu = twilio_pid
        .as_deref()
        .zip(twilio_cpu_before)
        .map(|(p, before)| (cpu_ms(p) - before) / 10.0 / wall);
    let load = load_average();
    let mut all = twilio.observations().await?;
    // A session failed when its call was requested and its stream never opened, never carried
    // the persona's voice, or the call did not end as completed.
    let sims = twilio.calls().await;
    let sessions = sims.iter().filter(|c| c.stream_opened).count() as u64;
    let good = sims
        .iter()
        .filter(|c| c.stream_opened && c.frames_received > 0 && c.status == "completed")
        .count() as u64;
    let sessions_failed = requested.saturating_sub(good);
    let mut net: Vec<u64> = all
        .reply_us
        .iter()
        .map(|r| r.saturating_sub(CONFIGURED_MS as u64 * 1000))
        .collect();
    let inside: Vec<Value> = sqlx::query_scalar(
        "SELECT payload -> 'TurnCompleted' -> 'timings' FROM events WHERE event_type = 'TurnCompleted'",
    )
    .fetch_all(&backbone.pool)
    .await
    .unwrap_or_default();
    let timing = |key: &str| -> [f64; 2] {
        let mut v: Vec<u64> = inside
            .iter()
            .filter_map(|t| t[key].as_u64())
            .map(|ms| ms * 1000)
            .collect();
        [percentile_ms(&mut v, 0.50), percentile_ms(&mut v, 0.99)]
    };
    let mut lateness: Vec<u64> = all
        .frame_lateness_us
        .iter()
        .map(|l| u64::from(*l))
        .collect();
    let mut ticks: Vec<u64> = all.tick_lateness_us.iter().map(|l| u64::from(*l)).collect();
    let mut endpoint_late: Vec<u64> = all.endpoint_late_us.iter().map(|l| u64::from(*l)).collect();
    let figures = Figures {
        calls,
        sessions,
        replies: all.reply_us.len(),
        replies_unmeasured: all.replies_unmeasured,
        reply_p50_ms: percentile_ms(&mut all.reply_us, 0.50),
        reply_p99_ms: percentile_ms(&mut all.reply_us, 0.99),
        net_p50_ms: percentile_ms(&mut net, 0.50),
        net_p99_ms: percentile_ms(&mut net, 0.99),
        barge_ins: all.barge_in_us.len(),
        barge_ins_missed: all.barge_ins_missed,
        barge_in_p50_ms: percentile_ms(&mut all.barge_in_us, 0.50),
        barge_in_p99_ms: percentile_ms(&mut all.barge_in_us, 0.99),
        inside_llm_first_token_ms: timing("llm_first_token_ms"),
        inside_tts_first_byte_ms: timing("tts_first_byte_ms"),
        inside_first_audio_ms: timing("first_audio_ms"),
        frames: lateness.len(),
        jitter_p99_ms: percentile_ms(&mut lateness, 0.99),
        bench_tick_p99_ms: percentile_ms(&mut ticks, 0.99),
        bench_endpoint_late_p99_ms: percentile_ms(&mut endpoint_late, 0.99),
        sessions_failed,
        cpu_pct_per_call: (call_seconds > 0.0).then(|| cpu_window / 10.0 / call_seconds),
        cpu_window_s: window_s,
        rss_mib_per_call: (window_s > 0.0)
            .then(|| (rss_peak - rss_before).max(0.0) / requested.max(1) as f64),
        rss_mib_peak: rss_peak,
        bench_cpu_pct: bench_cpu / 10.0 / wall,
        twilio_cpu_pct: twilio_cpu,
        serve_instructions_per_call_second: serve_instructions
            .filter(|_| call_seconds > 0.0)
            .map(|ir| ir as f64 / call_seconds),
        load_average: load,
        knowledge: knowledge_passages.map(|n| {
            crate::ops::bench_knowledge::InCalls::from_timings(
                n,
                openai.embedding_requests() - embeddings_before,
                &inside,
            )
        }),
    };
    serve.stop().await;
    twilio.stop().await;
    shutdown.cancel();
    tasks.close();
    backbone.pool.close().await;
    child::drop_isolated(&config).await;
    Ok(figures)
}

pub fn within_targets(f: &Figures) -> bool {
    f.replies > 0
        && f.sessions_failed == 0
        && f.net_p99_ms <= TARGET_NET_P99_MS
        && f.jitter_p99_ms <= TARGET_JITTER_P99_MS
        && f.cpu_pct_per_call
            .is_some_and(|c| c <= TARGET_CPU_PCT_PER_CALL)
        && f.rss_mib_per_call
            .is_some_and(|r| r <= TARGET_RSS_MB_PER_CALL)
}

/// A per-call figure of serve's, or why there is none.
fn sampled(figure: Option<f64>) -> String {
    figure.map_or(
        "not sampled (fewer than 90 % of the calls up at once: longer --seconds)".into(),
        |f| format!("{f:.3}"),
    )
}

/// How one row of the table shows a run's figure.
type Cell = Box<dyn Fn(&Figures) -> String>;

/// One table, a column per N and a row per figure, then one line of JSON with every figure.
pub fn print(rows: &[Figures]) {
    let pair = |a: f64, b: f64| format!("{a:.1}/{b:.1}");
    let table: Vec<(&str, Cell)> = vec![
        (
            "sessions (failed)",
            Box::new(|f: &Figures| format!("{} ({})", f.sessions, f.sessions_failed)),
        ),
        (
            "replies measured",
            Box::new(|f: &Figures| f.replies.to_string()),
        ),
        (
            "reply p50/p99 ms",
            Box::new(move |f: &Figures| pair(f.reply_p50_ms, f.reply_p99_ms)),
        ),
        (
            "net p50/p99 ms (≤ 20)",
            Box::new(move |f: &Figures| pair(f.net_p50_ms, f.net_p99_ms)),
        ),
        (
            "barge-in → clear p50/p99 ms",
            Box::new(move |f: &Figures| pair(f.barge_in_p50_ms, f.barge_in_p99_ms)),
        ),
        (
            "jitter p99 ms (≤ 20)",
            Box::new(|f: &Figures| format!("{:.1}", f.jitter_p99_ms)),
        ),
        (
            "CPU % of a core per call (≤ 0.15)",
            Box::new(|f: &Figures| sampled(f.cpu_pct_per_call)),
        ),
        (
            "RSS MiB per call (≤ 0.5)",
            Box::new(|f: &Figures| sampled(f.rss_mib_per_call)),
        ),
        (
            "serve instructions per call-second",
            Box::new(|f: &Figures| {
                f.serve_instructions_per_call_second
                    .map_or("-".into(), |ir| format!("{:.2} M", ir / 1e6))
            }),
        ),
        (
            "serve: LLM first token p50/p99 ms",
            Box::new(move |f: &Figures| {
                pair(
                    f.inside_llm_first_token_ms[0],
                    f.inside_llm_first_token_ms[1],
                )
            }),
        ),
        (
            "serve: TTS first byte p50/p99 ms",
            Box::new(move |f: &Figures| {
                pair(f.inside_tts_first_byte_ms[0], f.inside_tts_first_byte_ms[1])
            }),
        ),
        (
            "serve: first frame sent p50/p99 ms",
            Box::new(move |f: &Figures| {
                pair(f.inside_first_audio_ms[0], f.inside_first_audio_ms[1])
            }),
        ),
        (
            "bench ticker late p99 ms",
            Box::new(|f: &Figures| format!("{:.1}", f.bench_tick_p99_ms)),
        ),
        (
            "bench endpoint frame late p99 ms",
            Box::new(|f: &Figures| format!("{:.1}", f.bench_endpoint_late_p99_ms)),
        ),
        (
            "bench CPU % of a core",
            Box::new(|f: &Figures| format!("{:.0}", f.bench_cpu_pct)),
        ),
        (
            "Twilio simulator apart: CPU % of a core",
            Box::new(|f: &Figures| {
                f.twilio_cpu_pct
                    .map_or("- (in the bench)".into(), |c| format!("{c:.0}"))
            }),
        ),
        (
            "load average",
            Box::new(|f: &Figures| {
                format!(
                    "{:.2} {:.2} {:.2}",
                    f.load_average[0], f.load_average[1], f.load_average[2]
                )
            }),
        ),
        (
            "within the targets",
            Box::new(|f: &Figures| if within_targets(f) { "yes" } else { "no" }.to_string()),
        ),
    ];
    print!("{:<36}", "calls");
    for f in rows {
        print!(" {:>18}", f.calls);
    }
    println!();
    for (name, value) in &table {
        print!("{name:<36}");
        for f in rows {
            print!(" {:>18}", value(f));
        }
        println!();
    }
    for f in rows {
        if let Some(k) = &f.knowledge {
            println!(
                "{} calls, knowledge of {} passages: retrieval on the turn's path p50/p99/max {:.0}/{:.0}/{:.0} µs (its thread's CPU p50/p99 {:.0}/{:.0} µs) over {} turns, {} of them with the caller's words embedded in time, {} ranked ahead off the turn's path (p50/p99 {:.0}/{:.0} µs; the others {:.0}/{:.0} µs, CPU p99 {:.0} µs); {} requests to /embeddings",
                f.calls, k.passages, k.p50_us, k.p99_us, k.max_us, k.cpu_p50_us, k.cpu_p99_us, k.turns, k.with_vector, k.preranked,
                k.preranked_p50_us, k.preranked_p99_us, k.ranked_on_path_p50_us, k.ranked_on_path_p99_us, k.ranked_on_path_cpu_p99_us, k.embedding_requests
            );
        }
    }
    let largest = rows
        .iter()
        .filter(|f| within_targets(f))
        .map(|f| f.calls)
        .max();
    println!(
        "{}",
        json!({ "bench": "voice", "runs": rows, "largest_calls_within_targets": largest,
                "targets": { "net_p99_ms": TARGET_NET_P99_MS, "jitter_p99_ms": TARGET_JITTER_P99_MS,
                             "cpu_pct_per_call": TARGET_CPU_PCT_PER_CALL, "rss_mib_per_call": TARGET_RSS_MB_PER_CALL } })
    );
}
