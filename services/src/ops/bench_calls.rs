//! `bench calls --calls N`: N concurrent calls through the real HTTP API, measured from outside.
//! This process plays Twilio (the simulator's REST API, signed status callbacks and Media
//! Streams with a scripted caller) and the users (registration, a persona, `POST /api/call`
//! all at once); `callmeback serve` runs as a child process on a database and stream of its own,
//! placing every call itself, with its own simulators for Deepgram, the LLM and ElevenLabs.
//! Reports calls requested and placed, answered, voice sessions started and failed, 5xx
//! answers, and projection lag p50/p99 of the calls' events (from serve's
//! `cmb_projection_lag_seconds` histogram, read once the projections have caught up), how
//! long placing the calls took and catching up after them, as a table and, last, one line of
//! JSON.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cmb_sims::twilio::{Settings, TwilioSim};
use serde_json::json;

use crate::config::Config;
use crate::ops::child;

const ACCOUNT_SID: &str = "ACbe0c4be0c4be0c4be0c4be0c4be0c4b";
const AUTH_TOKEN: &str = "bench-calls-token";

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Figures {
    pub calls: u32,
    /// `POST /api/call` answered 201.
    pub requested: u64,
    /// Calls created at (simulated) Twilio.
    pub placed: u64,
    pub answered: u64,
    /// Answered calls whose media stream opened and carried the persona's audio.
    pub sessions_started: u64,
    pub sessions_failed: u64,
    /// 5xx answers: to this process's requests and, per serve's own count, to anyone.
    pub http_5xx: u64,
    /// Commit to read model, over every event of the calls (the bench waits for the
    /// projections to catch up before reading it); `null` in the JSON when beyond the
    /// histogram's largest bucket (30 s).
    pub projection_lag_p50_ms: f64,
    pub projection_lag_p99_ms: f64,
    pub projected_events: u64,
    /// Commit to JetStream's acknowledgement (the publisher's share of the projection lag),
    /// over the same span.
    pub publication_lag_p50_ms: f64,
    pub publication_lag_p99_ms: f64,
    /// Projection lag p99 per projection.
    pub projection_lag_p99_ms_by_projection: BTreeMap<String, f64>,
    /// Per stage of [`STAGES`], p50 and p99 (ms, bucket bounds): where the lag goes.
    pub stage_lag_ms: BTreeMap<String, [f64; 2]>,
    /// Per projection, p99 (ms) of its `queue` and `apply` stages.
    pub stage_lag_p99_ms_by_projection: BTreeMap<String, [f64; 2]>,
    /// Per projection, p50 and p99 of the events it took in one batch (bucket bounds).
    pub batch_events_by_projection: BTreeMap<String, [f64; 2]>,
    /// Events the projectors received before their predecessor (redelivered later).
    pub projection_gaps: u64,
    /// From the first call requested to the last one created at Twilio (the dialer's pace).
    pub placing_seconds: f64,
    /// From the last call's end until no projection had a message waiting (`null`: not within
    /// 300 s).
    pub caught_up_seconds: Option<f64>,
    pub seconds: f64,
    pub load_average: [f64; 3],
}

/// The stages of `cmb_lag_stage_seconds`, in the order an event goes through them.
const STAGES: [&str; 4] = ["publish_read", "publish_ack", "queue", "apply"];

/// `name{labels} value` lines of a Prometheus text exposition.
fn samples(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let rest = &key[name.len()..];
            (rest.is_empty() || rest.starts_with('{'))
                .then(|| (rest.to_string(), value.parse().ok()))
                .and_then(|(k, v)| Some((k, v?)))
        })
        .collect()
}

/// The lag histogram summed over projections: upper bound (seconds) → cumulative count.
fn lag_buckets(text: &str) -> BTreeMap<String, f64> {
    buckets(text, crate::telemetry::PROJECTION_LAG, &[])
}

/// Histogram `metric`'s buckets summed over the series whose labels contain every one of
/// `labels`: upper bound (seconds) → cumulative count.
fn buckets(text: &str, metric: &str, labels: &[&str]) -> BTreeMap<String, f64> {
    let mut by_le = BTreeMap::new();
    for (series, v) in samples(text, &format!("{metric}_bucket")) {
        if !labels.iter().all(|l| series.contains(l)) {
            continue;
        }
        let labels = series;
        if let Some(le) = labels
            .split("le=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        {
            *by_le.entry(le.to_string()).or_insert(0.0) += v;
        }
    }
    by_le
}

/// The bucket bound (ms) under which a fraction `q` of the events in `after − before` fall.
fn quantile_ms(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, q: f64) -> f64 {
    quantile(before, after, q) * 1000.0
}

/// The bucket bound under which a fraction `q` of the samples in `after − before` fall.
fn quantile(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, q: f64) -> f64 {
    let mut bounds: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            (bound, n - before.get(le).copied().unwrap_or(0.0))
        })
        .collect();
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = bounds.last().map(|b| b.1).unwrap_or(0.0);
    if total <= 0.0 {
        return 0.0;
    }
    bounds
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map(|(b, _)| *b)
        .unwrap_or(f64::INFINITY)
}

fn counter(text: &str, name: &str, label: &str) -> f64 {
    samples(text, name)
        .into_iter()
        .filter(|(l, _)| l.contains(label))
        .map(|(_, v)| v)
        .sum()
}

/// Runs the benchmark with `calls` concurrent calls of about `seconds` each.
pub async fn run(base: &Config, calls: u32, seconds: u32) -> Result<Figures, child::BenchError> {
    let config = child::isolated(base, "calls", calls).await;

    // Twilio, here: the REST API, signed callbacks and media streams with a caller who talks.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    let mut settings = Settings::from_lookup(&|k: &str| match k {
        "SIM_TWILIO_RING_MS" => Some("300".to_string()),
        "SIM_TWILIO_CALL_SECONDS" => Some(seconds.to_string()),
        _ => None,
    });
    settings.account_sid = ACCOUNT_SID.into();
    settings.auth_token = AUTH_TOKEN.into();
    let twilio = TwilioSim::new(settings);
    let twilio_url = cmb_sims::serve("twilio", twilio.router(), shutdown.clone(), &tasks).await?;

    let serve = child::spawn_serve(
        &config,
        &[
            ("TWILIO_BASE_URL", twilio_url.clone()),
            ("TWILIO_ACCOUNT_SID", ACCOUNT_SID.into()),
            ("TWILIO_AUTH_TOKEN", AUTH_TOKEN.into()),
        ],
        &format!("callmeback-bench-calls-{calls}"),
    )
    .await?;
    let base_url = serve.base_url.clone();
    let http = child::client()?;
    let backbone = crate::backbone::connect(&config, 4).await?;
    let store = crate::backbone::store::EventStore::new(backbone.pool.clone());

    // The users, each with credits.
    let crowd = child::Crowd {
        kind: "calls",
        subnet: 8,
        phone_digit: 7,
        credits: 1000,
    };
    let users = child::register_users(&http, &serve, &store, calls, &crowd).await?;
    let persona_id =
        child::create_persona(&http, &serve, &users.tokens[0], &json!({ "name": "Bench Caller", "description": "A persona for the calls benchmark.",
                       "voice": "21m00Tcm4TlvDq8ikWAM", "system_prompt": "You are a benchmark persona. Be brief.",
                       "greeting": "Hi there.", "is_public": true })).await?;

    let metrics = |http: reqwest::Client| {
        let url = format!("{base_url}/metrics");
        async move { http.get(url).send().await?.text().await }
    };
    let before = metrics(http.clone()).await?;
    let lag_before = lag_buckets(&before);
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let answers = child::place_calls(&http, &serve, &users.tokens, &persona_id).await;
    let requested = answers.iter().filter(|s| **s == 201).count() as u64;
    let five_xx = users.server_errors + answers.iter().filter(|s| **s >= 500).count() as u64;
    let refused: BTreeMap<u16, usize> =
        answers
            .iter()
            .filter(|s| **s != 201)
            .fold(BTreeMap::new(), |mut m, s| {
                *m.entry(*s).or_default() += 1;
                m
            });
    if !refused.is_empty() {
        eprintln!("answers other than 201 (0 = no answer): {refused:?}");
    }

    // Until every requested call has ended at Twilio (or a generous bound).
    let deadline = Instant::now() + Duration::from_secs(seconds as u64 + 300);
    loop {
        let sims = twilio.calls();
        let ended = sims.iter().filter(|c| c.ended_at.is_some()).count() as u64;
        if (ended >= requested && sims.len() as u64 >= requested) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let seconds_taken = started.elapsed().as_secs_f64();
    let load = child::load_average();
    // The last session records settle, and the projections catch up with every event of the
    // calls (the lag of an event still waiting would otherwise be missing from the figures).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ended_at = Instant::now();
    let mut caught_up_seconds = None;
    while ended_at.elapsed() < Duration::from_secs(300) {
        // The projectors refresh their waiting counts every 2 s.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let text = metrics(http.clone()).await?;
        let waiting: f64 = samples(&text, "cmb_projection_lag_messages")
            .into_iter()
            .map(|(_, v)| v)
            .sum();
        if waiting == 0.0 {
            caught_up_seconds = Some(ended_at.elapsed().as_secs_f64());
            break;
        }
    }
    let after = metrics(http.clone()).await?;
    let lag_after = lag_buckets(&after);
    let sims = twilio.calls();
    let answered = sims.iter().filter(|c| c.answered_at.is_some()).count() as u64;
    let sessions_started = sims
        .iter()
        .filter(|c| c.answered_at.is_some() && c.stream_opened && c.frames_received > 0)
        .count() as u64;
    let failed_inside = counter(&after, "cmb_voice_sessions_total", "outcome=\"failed\"") as u64;
    let serve_5xx = counter(&after, "cmb_http_responses_total", "class=\"5xx\"") as u64;
    let projected = lag_after.get("+Inf").copied().unwrap_or(0.0)
        - lag_before.get("+Inf").copied().unwrap_or(0.0);
    let placing_seconds = sims
        .iter()
        .map(|c| c.date_created)
        .max()
        .map_or(0.0, |last| {
            (last - started_at)
                .to_std()
                .unwrap_or_default()
                .as_secs_f64()
        });
    let publication = |t: &str| buckets(t, crate::telemetry::PUBLICATION_LAG, &[]);
    let (publication_before, publication_after) = (publication(&before), publication(&after));
    let projection_lag_p99_ms_by_projection = cmb_projections::all()
        .iter()
        .map(|p| {
            let label = format!("projection=\"{}\"", p.name());
            let of = |t: &str| buckets(t, crate::telemetry::PROJECTION_LAG, &[&label]);
            (
                p.name().to_string(),
                quantile_ms(&of(&before), &of(&after), 0.99),
            )
        })
        .collect();
    // Where the lag goes, stage by stage (serve's `cmb_lag_stage_seconds`).
    let stage = |labels: &[&str], q: f64| {
        let of = |t: &str| buckets(t, crate::telemetry::LAG_STAGE, labels);
        quantile_ms(&of(&before), &of(&after), q)
    };
    let mut stage_lag_ms = BTreeMap::new();
    for name in STAGES {
        let label = format!("stage=\"{name}\"");
        stage_lag_ms.insert(
            name.to_string(),
            [stage(&[&label], 0.50), stage(&[&label], 0.99)],
        );
    }
    let stage_lag_p99_ms_by_projection = cmb_projections::all()
        .iter()
        .map(|p| {
            let projection = format!("projection=\"{}\"", p.name());
            let of = |name: &str| {
                let label = format!("stage=\"{name}\"");
                stage(&[&label, &projection], 0.99)
            };
            (p.name().to_string(), [of("queue"), of("apply")])
        })
        .collect();
    let batch_events_by_projection = cmb_projections::all()
        .iter()
        .map(|p| {
            let label = format!("projection=\"{}\"", p.name());
            let of = |t: &str| buckets(t, crate::telemetry::PROJECTION_BATCH, &[&label]);
            let (b, a) = (of(&before), of(&after));
            (
                p.name().to_string(),
                [quantile(&b, &a, 0.50), quantile(&b, &a, 0.99)],
            )
        })
        .collect();
    let figures = Figures {
        calls,
        requested,
        placed: sims.len() as u64,
        answered,
        sessions_started,
        sessions_failed: (answered - sessions_started.min(answered)).max(failed_inside),
        http_5xx: five_xx.max(serve_5xx),
        projection_lag_p50_ms: quantile_ms(&lag_before, &lag_after, 0.50),
        projection_lag_p99_ms: quantile_ms(&lag_before, &lag_after, 0.99),
        projected_events: projected as u64,
        publication_lag_p50_ms: quantile_ms(&publication_before, &publication_after, 0.50),
        publication_lag_p99_ms: quantile_ms(&publication_before, &publication_after, 0.99),
        projection_lag_p99_ms_by_projection,
        stage_lag_ms,
        stage_lag_p99_ms_by_projection,
        batch_events_by_projection,
        projection_gaps: (counter(&after, "cmb_projection_events_total", "outcome=\"gap\"")
            - counter(&before, "cmb_projection_events_total", "outcome=\"gap\""))
            as u64,
        placing_seconds,
        caught_up_seconds,
        seconds: seconds_taken,
        load_average: load,
    };
    serve.stop().await;
    shutdown.cancel();
    tasks.close();
    backbone.pool.close().await;
    child::drop_isolated(&config).await;
    Ok(figures)
}

pub fn print(f: &Figures) {
    println!(
        "{:>6} {:>9} {:>7} {:>9} {:>9} {:>8} {:>5} {:>12} {:>12} {:>10} {:>9} {:>10} {:>8} {:>16}",
        "calls",
        "requested",
        "placed",
        "answered",
        "sessions",
        "failed",
        "5xx",
        "lag p50 ≤",
        "lag p99 ≤",
        "projected",
        "placing s",
        "caught up",
        "seconds",
        "load avg"
    );
    let ms = |v: f64| {
        if v.is_finite() {
            format!("{v:.0} ms")
        } else {
            "> 30 s".to_string()
        }
    };
    println!(
        "{:>6} {:>9} {:>7} {:>9} {:>9} {:>8} {:>5} {:>12} {:>12} {:>10} {:>9.1} {:>10} {:>8.1} {:>16}",
        f.calls,
        f.requested,
        f.placed,
        f.answered,
        f.sessions_started,
        f.sessions_failed,
        f.http_5xx,
        ms(f.projection_lag_p50_ms),
        ms(f.projection_lag_p99_ms),
        f.projected_events,
        f.placing_seconds,
        f.caught_up_seconds
            .map_or("no".to_string(), |s| format!("{s:.1} s")),
        f.seconds,
        format!(
            "{:.2} {:.2} {:.2}",
            f.load_average[0], f.load_average[1], f.load_average[2]
        )
    );
    println!(
        "publication lag p50 ≤ {}, p99 ≤ {}; projection lag p99 by projection: {}",
        ms(f.publication_lag_p50_ms),
        ms(f.publication_lag_p99_ms),
        f.projection_lag_p99_ms_by_projection
            .iter()
            .map(|(p, v)| format!("{p} {}", ms(*v)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "by stage p50 / p99: {}; queue / apply p99 by projection: {}; {} events out of order",
        STAGES
            .iter()
            .map(|s| {
                let [p50, p99] = f.stage_lag_ms.get(*s).copied().unwrap_or_default();
                format!("{s} {} / {}", ms(p50), ms(p99))
            })
            .collect::<Vec<_>>()
            .join(", "),
        f.stage_lag_p99_ms_by_projection
            .iter()
            .map(|(p, [queue, apply])| format!("{p} {} / {}", ms(*queue), ms(*apply)))
            .collect::<Vec<_>>()
            .join(", "),
        f.projection_gaps
    );
    println!(
        "events per projector batch p50 / p99: {}",
        f.batch_events_by_projection
            .iter()
            .map(|(p, [p50, p99])| format!("{p} {p50} / {p99}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("{}", json!({ "bench": "calls", "figures": f }));
}
