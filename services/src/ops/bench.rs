//! Benchmarks. Each prints a table and, last, one line of JSON with the same figures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cmb_domain::persona::{Owner, Persona, PersonaCommand, PersonaDraft, PersonaPatch, TurnTaking};
use cmb_domain::{Actor, CommandContext};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::backbone::outbox::{LagSamples, Publisher};
use crate::backbone::store::EventStore;
use crate::config::Config;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// A database URL with its database name replaced.
pub fn with_database(url: &str, name: &str) -> String {
    match url.rsplit_once('/') {
        Some((base, rest)) => {
            let query = rest
                .split_once('?')
                .map(|(_, q)| format!("?{q}"))
                .unwrap_or_default();
            format!("{base}/{name}{query}")
        }
        None => url.to_string(),
    }
}

fn database_name(url: &str) -> String {
    url.rsplit('/')
        .next()
        .unwrap_or("callmeback")
        .split('?')
        .next()
        .unwrap_or("callmeback")
        .to_string()
}

/// Why `bench events` stopped.
#[derive(Debug, thiserror::Error)]
pub enum EventsBenchError {
    #[error(transparent)]
    Backbone(#[from] crate::backbone::ConnectError),
    #[error("the benchmark's stream")]
    Stream(#[source] async_nats::Error),
    #[error("a benchmark persona")]
    Invalid(#[from] cmb_domain::values::Invalid),
    #[error("a persona command")]
    Command(#[from] crate::backbone::store::CommandError<cmb_domain::persona::PersonaError>),
    #[error("a benchmark worker died")]
    Worker(#[from] tokio::task::JoinError),
}

/// `bench events`: `commands` persona commands from `concurrency` tasks over `aggregates`
/// personas, each producing one event, through the real command path, with the real
/// publisher running; measures commit and publication throughput and publication lag.
pub async fn events(
    mut config: Config,
    commands: u64,
    concurrency: u64,
    aggregates: u64,
) -> Result<(), EventsBenchError> {
    use sqlx::migrate::MigrateDatabase;
    let aggregates = aggregates.clamp(1, commands.max(1));
    let bench_db = format!("{}_bench", database_name(&config.database_url));
    config.database_url = with_database(&config.database_url, &bench_db);
    config.stream.stream = "CMB_BENCH_EVENTS".into();
    config.stream.subject_prefix = "cmb.bench.events".into();
    let _ = sqlx::Postgres::drop_database(&config.database_url).await;
    let b = crate::backbone::connect(&config, (concurrency as u32 + 4).max(8)).await?;
    b.js.delete_stream(&config.stream.stream).await.ok();
    cmb_nats::ensure_stream(&b.js, &config.stream)
        .await
        .map_err(EventsBenchError::Stream)?;

    let samples: LagSamples = Default::default();
    let shutdown = CancellationToken::new();
    // The publisher as `serve` runs it: on the pipeline's runtime, pool and NATS connection.
    let pipeline = crate::backbone::pipeline::Pipeline::start(&config).await?;
    let publisher = Publisher {
        pool: pipeline.pool.clone(),
        js: pipeline.js.clone(),
        stream: config.stream.clone(),
        settings: config.publisher.clone(),
        instance_id: config.instance_id.clone(),
        lag_samples: Some(samples.clone()),
        after_wave: None,
    };
    let publishing = pipeline.handle().spawn(publisher.run(shutdown.clone()));

    let store = EventStore::new(b.pool.clone());
    let owner = cmb_domain::UserId::generate();
    let ids: Arc<Vec<String>> = Arc::new(
        (0..aggregates)
            .map(|_| uuid::Uuid::now_v7().to_string())
            .collect(),
    );
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    // Worker w owns aggregates w, w + concurrency, …: commands on one aggregate stay in order.
    for w in 0..concurrency.min(aggregates) {
        let store = store.clone();
        let ids = ids.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mine: Vec<&String> = ids
                .iter()
                .skip(w as usize)
                .step_by(concurrency as usize)
                .collect();
            let mut done = 0u64;
            let mut round = 0usize;
            loop {
                for id in &mine {
                    if next.fetch_add(1, Ordering::Relaxed) >= commands {
                        return Ok::<u64, EventsBenchError>(done);
                    }
                    let ctx = CommandContext::for_request(
                        format!("bench-{w}-{done}"),
                        Actor::User(owner),
                    );
                    let command = if round == 0 {
                        PersonaCommand::Create {
                            owner: Owner::User(owner),
                            draft: PersonaDraft::parse(
                                &format!("Bench {id}")[..20],
                                "A persona made by the events benchmark.",
                                "pNInz6obpgDQGcFmaJgB",
                                "You exist to be benchmarked. Say little.",
                                None,
                                false,
                                &[],
                                TurnTaking::default(),
                            )?,
                        }
                    } else {
                        PersonaCommand::Update {
                            by: owner,
                            patch: PersonaPatch {
                                description: Some(format!("Benchmark revision number {round}.")),
                                ..Default::default()
                            },
                        }
                    };
                    store.execute::<Persona>(id, command, &ctx).await?;
                    done += 1;
                }
                round += 1;
            }
        }));
    }
    let mut committed = 0;
    for w in workers {
        committed += w.await??;
    }
    let commit_elapsed = started.elapsed();

    // Wait until the publisher has published everything committed.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let published = samples.lock().expect("samples").len() as u64;
        if published >= committed || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let publish_elapsed = started.elapsed();
    shutdown.cancel();
    let _ = publishing.await;

    let mut lags = samples.lock().expect("samples").clone();
    lags.sort();
    let published = lags.len() as u64;
    let committed_per_s = committed as f64 / commit_elapsed.as_secs_f64();
    let published_per_s = published as f64 / publish_elapsed.as_secs_f64();
    let p50 = percentile(&lags, 0.50);
    let p99 = percentile(&lags, 0.99);
    let stream_messages = {
        let mut s =
            b.js.get_stream(&config.stream.stream)
                .await
                .map_err(|e| EventsBenchError::Stream(e.into()))?;
        s.info()
            .await
            .map_err(|e| EventsBenchError::Stream(e.into()))?
            .state
            .messages
    };

    println!(
        "bench events: {commands} commands, {concurrency} concurrent, {aggregates} aggregates"
    );
    println!("| figure                     | value        |");
    println!("|----------------------------|--------------|");
    println!("| commands committed         | {committed:>12} |");
    println!("| events published           | {published:>12} |");
    println!("| messages in the stream     | {stream_messages:>12} |");
    println!("| committed per second       | {committed_per_s:>12.0} |");
    println!("| committed+published per s  | {published_per_s:>12.0} |");
    println!(
        "| publication lag p50 (ms)   | {:>12.1} |",
        p50.as_secs_f64() * 1e3
    );
    println!(
        "| publication lag p99 (ms)   | {:>12.1} |",
        p99.as_secs_f64() * 1e3
    );
    println!(
        "{}",
        json!({
            "bench": "events",
            "commands": commands,
            "concurrency": concurrency,
            "aggregates": aggregates,
            "committed": committed,
            "published": published,
            "stream_messages": stream_messages,
            "committed_per_sec": committed_per_s.round(),
            "published_per_sec": published_per_s.round(),
            "publication_lag_p50_ms": (p50.as_secs_f64() * 1e4).round() / 10.0,
            "publication_lag_p99_ms": (p99.as_secs_f64() * 1e4).round() / 10.0,
        })
    );
    b.js.delete_stream(&config.stream.stream).await.ok();
    Ok(())
}
