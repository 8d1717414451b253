//! `bench replay`: N events of the real shapes (thirty days of calls), written to a stream or
//! an event table of the bench's own, then replayed and reconciled the way `replay reconcile`
//! does it; the report is checked against the same events folded one by one as decoded
//! envelopes (the reconcile's reference), so a fast answer is also the right one.

use std::future::IntoFuture;
use std::time::Instant;

use futures::StreamExt;
use serde_json::json;

use crate::config::Config;
use crate::ops::reconcile::{self, Reconciler, Report};
use crate::ops::synthetic::History;

/// The synthetic month: `events` events of calls spread over thirty days.
fn history(events: u64) -> History {
    let start = chrono::Utc::now() - chrono::Duration::days(30);
    let spacing = (30 * 86_400 / (events / 11).max(1) as i64).max(1);
    let users = (events / 200).clamp(10, 50_000) as usize;
    History::new(42, users, start, spacing)
}

/// Generates `events` on a thread of its own, in batches of `batch` made by `each`; folds
/// them into the reference report on the way.
fn generate<T: Send + 'static>(
    events: u64,
    batch: usize,
    each: impl Fn(&cmb_domain::EventEnvelope) -> T + Send + 'static,
) -> (
    tokio::sync::mpsc::Receiver<Vec<T>>,
    tokio::task::JoinHandle<Report>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<T>>(16);
    let generator = tokio::task::spawn_blocking(move || {
        let mut history = history(events);
        let mut reference = Reconciler::default();
        let mut left = events;
        while left > 0 {
            let n = left.min(batch as u64);
            let items = (&mut history)
                .take(n as usize)
                .map(|e| {
                    reference.add(&e);
                    each(&e)
                })
                .collect();
            if tx.blocking_send(items).is_err() {
                break;
            }
            left -= n;
        }
        reference.report()
    });
    (rx, generator)
}

/// One reconcile's figures.
struct Run {
    seconds: f64,
    report: Report,
}

fn same(a: &Report, b: &Report) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

/// A `bench replay` that could not run or whose reconcile was wrong, with its cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--source: nats or postgres, not {0:?}")]
    Source(String),
    #[error("connecting to NATS")]
    Connect(#[from] async_nats::ConnectError),
    #[error("creating the bench's stream")]
    Stream(#[source] async_nats::Error),
    #[error("publishing")]
    Publish(#[source] async_nats::jetstream::context::PublishError),
    #[error("a publish's ack")]
    Ack(#[source] async_nats::jetstream::context::PublishError),
    #[error("the events' generator stopped")]
    Generator(#[source] tokio::task::JoinError),
    #[error("the bench's event table")]
    Database(#[from] sqlx::Error),
    #[error("migrating the bench's database")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("replaying the bench's stream")]
    Replay(#[from] cmb_nats::replay::ReplayError),
    #[error("a reader of the bench's stream stopped")]
    Reader(#[source] tokio::task::JoinError),
    #[error("replayed {replayed} of {events} events")]
    Replayed { replayed: u64, events: u64 },
    #[error("reconciling")]
    Reconcile(#[from] reconcile::Error),
    #[error("the reconcile differs from the reference fold")]
    NotTheReference,
}

/// `bench replay --source nats|postgres`.
pub async fn replay(
    config: Config,
    events: u64,
    source: &str,
    partitions: u64,
    keep: bool,
) -> Result<(), Error> {
    let (written_per_s, runs, replayed_per_s, messages) = match source {
        "nats" => nats(&config, events, partitions, keep).await?,
        "postgres" => postgres(&config, events, keep).await?,
        other => return Err(Error::Source(other.to_string())),
    };
    let (runs, reference) = runs;
    let per_s = |seconds: f64| (events as f64 / seconds.max(1e-9)).round();
    let rates: Vec<f64> = runs.iter().map(|r| per_s(r.seconds)).collect();
    let report = &runs[0].report;
    let same_as_reference = runs.iter().all(|r| same(&r.report, &reference));
    println!("bench replay: {events} events of the real shapes, from {source}");
    println!("| figure                              | value        |");
    println!("|-------------------------------------|--------------|");
    println!("| events written per second           | {written_per_s:>12.0} |");
    if let Some(replayed) = replayed_per_s {
        println!("| replayed per second (every body)    | {replayed:>12.0} |");
    }
    for (i, rate) in rates.iter().enumerate() {
        println!(
            "| replayed+reconciled per s, run {}    | {rate:>12.0} |",
            i + 1
        );
    }
    if let Some(m) = messages {
        println!("| messages delivered to the reconcile | {m:>12} |");
    }
    println!(
        "| calls reconciled                    | {:>12} |",
        report.totals.calls
    );
    println!(
        "| revenue (cents)                     | {:>12} |",
        report.totals.revenue_cents
    );
    println!(
        "| provider cost (cents)               | {:>12} |",
        report.totals.cost_cents
    );
    println!(
        "| anomalies                           | {:>12} |",
        report.anomalies.len()
    );
    println!("| same report as the reference fold   | {same_as_reference:>12} |");
    println!(
        "{}",
        json!({
            "bench": "replay",
            "source": source,
            "events": events,
            "partitions": partitions,
            "written_per_sec": written_per_s.round(),
            "replayed_per_sec": replayed_per_s,
            "replayed_reconciled_per_sec": rates,
            "messages_delivered": messages,
            "calls": report.totals.calls,
            "revenue_cents": report.totals.revenue_cents,
            "cost_cents": report.totals.cost_cents,
            "anomalies": report.anomalies.len(),
            "same_as_reference": same_as_reference,
        })
    );
    if !same_as_reference {
        return Err(Error::NotTheReference);
    }
    Ok(())
}

type Figures = (f64, (Vec<Run>, Report), Option<f64>, Option<u64>);

/// Publishes to a stream of its own (`<stream>_BENCH_REPLAY`, recreated) with bounded
/// in-flight acks; replays every body once, then reconciles twice.
async fn nats(config: &Config, events: u64, partitions: u64, keep: bool) -> Result<Figures, Error> {
    let mut settings = config.stream.clone();
    settings.stream = format!("{}_BENCH_REPLAY", config.stream.stream);
    settings.subject_prefix = format!("{}_bench_replay", config.stream.subject_prefix);
    let nats = cmb_nats::connect(&config.nats_url, "callmeback bench replay").await?;
    let js = async_nats::jetstream::new(nats.clone());
    js.delete_stream(&settings.stream).await.ok();
    cmb_nats::ensure_stream(&js, &settings)
        .await
        .map_err(Error::Stream)?;
    const MAX_IN_FLIGHT: usize = 8_192;
    let prefix = settings.clone();
    let (mut rx, generator) = generate(events, 1_000, move |e| {
        let (headers, body) = cmb_nats::contract::encode(e);
        (
            prefix.subject(&e.aggregate_type, &e.aggregate_id),
            headers,
            body,
        )
    });
    let started = Instant::now();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    while let Some(batch) = rx.recv().await {
        for (subject, headers, body) in batch {
            while in_flight.len() >= MAX_IN_FLIGHT {
                if let Some(ack) = in_flight.next().await {
                    let ack: Result<_, async_nats::jetstream::context::PublishError> = ack;
                    ack.map_err(Error::Ack)?;
                }
            }
            in_flight.push(
                js.publish_with_headers(subject, headers, body)
                    .await
                    .map_err(Error::Publish)?
                    .into_future(),
            );
        }
    }
    while let Some(ack) = in_flight.next().await {
        ack.map_err(Error::Ack)?;
    }
    let reference = generator.await.map_err(Error::Generator)?;
    let written_per_s = events as f64 / started.elapsed().as_secs_f64();
    let until = cmb_nats::replay::last_sequence(&js, &settings)
        .await
        .map_err(reconcile::Error::LastSequence)?;

    // Every body, on `partitions` consumers over all subjects, each body parsed (not kept).
    let started = Instant::now();
    let mut readers = Vec::new();
    for i in 0..partitions {
        let (client, url, settings) = (nats.clone(), config.nats_url.clone(), settings.clone());
        let (a, b) = (1 + until * i / partitions, until * (i + 1) / partitions);
        readers.push(tokio::spawn(async move {
            let all = settings.all_subjects();
            let start = cmb_nats::replay::Start::Sequence(a);
            let n = cmb_nats::replay::read_bodies(
                &client,
                &url,
                &settings,
                &all,
                start,
                b,
                |_, body| {
                    serde_json::from_slice::<serde::de::IgnoredAny>(body)?;
                    Ok(())
                },
            )
            .await?;
            Ok::<_, Error>(n)
        }));
    }
    let mut replayed = 0;
    for r in readers {
        replayed += r.await.map_err(Error::Reader)??;
    }
    let replayed_per_s = replayed as f64 / started.elapsed().as_secs_f64();
    if replayed != events {
        return Err(Error::Replayed { replayed, events });
    }

    let mut runs = Vec::new();
    let mut messages = 0;
    for _ in 0..2 {
        let started = Instant::now();
        let (report, read) = crate::ops::reconcile::stream::reconcile(
            &config.nats_url,
            &settings,
            1,
            until,
            (None, None),
            partitions,
        )
        .await?;
        runs.push(Run {
            seconds: started.elapsed().as_secs_f64(),
            report,
        });
        messages = read.messages;
    }
    if !keep {
        js.delete_stream(&settings.stream).await.ok();
    }
    Ok((
        written_per_s,
        (runs, reference),
        Some(replayed_per_s.round()),
        Some(messages),
    ))
}

/// A value for `COPY … FROM STDIN` (text format).
fn copy_text(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// Writes the events into an event table of its own (database `<name>_bench_replay`,
/// recreated) with `COPY`, 100,000 to a transaction; vacuums it; reconciles twice in SQL.
async fn postgres(config: &Config, events: u64, keep: bool) -> Result<Figures, Error> {
    use sqlx::migrate::MigrateDatabase;
    let name = config
        .database_url
        .rsplit('/')
        .next()
        .and_then(|n| n.split('?').next())
        .unwrap_or("callmeback");
    let url =
        crate::ops::bench::with_database(&config.database_url, &format!("{name}_bench_replay"));
    let _ = sqlx::Postgres::drop_database(&url).await;
    let pool = crate::backbone::db::connect(&url, 2).await?;
    crate::backbone::db::migrate(&pool)
        .await
        .map_err(Error::Migrate)?;
    let (mut rx, generator) = generate(events, 100_000, |e| {
        let mut row = String::with_capacity(1_024);
        for field in [
            e.aggregate_type.as_str(),
            e.aggregate_id.as_str(),
            &e.sequence.to_string(),
            e.event_type.as_str(),
            e.event_version.as_str(),
            &e.payload.to_string(),
            &serde_json::to_string(&e.metadata).unwrap_or_default(),
        ] {
            copy_text(&mut row, field);
            row.push('\t');
        }
        row.push_str(&e.occurred_at.to_rfc3339());
        row.push('\n');
        row
    });
    let started = Instant::now();
    while let Some(batch) = rx.recv().await {
        let mut db = pool.acquire().await?;
        let mut copy = db
            .copy_in_raw(
                "COPY events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                              payload, metadata, recorded_at) FROM STDIN",
            )
            .await?;
        copy.send(batch.concat().into_bytes()).await?;
        copy.finish().await?;
    }
    let reference = generator.await.map_err(Error::Generator)?;
    let written_per_s = events as f64 / started.elapsed().as_secs_f64();
    // As a table that has been in service for a while: hint bits set, statistics known.
    sqlx::query("VACUUM (ANALYZE) events")
        .execute(&pool)
        .await?;
    let mut runs = Vec::new();
    for _ in 0..2 {
        let started = Instant::now();
        let report = crate::ops::reconcile::postgres::reconcile_in_sql(&pool, (None, None)).await?;
        runs.push(Run {
            seconds: started.elapsed().as_secs_f64(),
            report,
        });
    }
    pool.close().await;
    if !keep {
        let _ = sqlx::Postgres::drop_database(&url).await;
    }
    Ok((written_per_s, (runs, reference), None, None))
}
