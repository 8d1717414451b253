//! `callmeback replay`: the analysts' reader of the event log (JetStream or Postgres): print
//! it, reconcile revenue and costs (against providers' bills, recording them with `--record`),
//! or rebuild read models from it and swap them in.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Subcommand;

use crate::backbone::store::CommandError;
use crate::config::Config;
use crate::ops::reconcile;

#[derive(clap::Args)]
pub struct ReplayRange {
    /// Where to read: `nats` (the JetStream stream, with an ordered consumer) or `postgres`.
    #[arg(long, default_value = "nats", global = true)]
    source: String,
    /// From this time (ISO 8601) or date (YYYY-MM-DD, UTC), inclusive.
    #[arg(long, global = true)]
    from: Option<String>,
    /// Up to this time or date (a date means its whole day), exclusive.
    #[arg(long, global = true)]
    to: Option<String>,
    /// Start at this stream sequence (NATS only).
    #[arg(long, global = true)]
    since_seq: Option<u64>,
    /// Only this aggregate type (call, wallet, user, …).
    #[arg(long = "type", global = true)]
    aggregate_type: Option<String>,
    /// Only this user's events (and their calls').
    #[arg(long, global = true)]
    user: Option<uuid::Uuid>,
    /// Only this call's events.
    #[arg(long, global = true)]
    call: Option<uuid::Uuid>,
    /// table (default on a terminal), csv or json.
    #[arg(long, global = true)]
    format: Option<String>,
}

#[derive(Subcommand)]
pub enum ReplayCommand {
    /// Print the events as JSON lines.
    Events,
    /// Rebuild read models into fresh tables from the whole stream and swap them in without
    /// downtime for the API (see `rebuild.rs`). Always from the first event: a read model
    /// folds every event of its aggregates, so `--from`/`--to` do not apply.
    Projections {
        #[arg(required = true, num_args = 1..)]
        names: Vec<String>,
    },
    /// Revenue, cost and margin per call, user, provider and day, with anomalies; with
    /// `--billed`, differences from what providers billed.
    Reconcile {
        /// Draw cost (stacked by provider) and revenue per day into this SVG file.
        #[arg(long)]
        chart: Option<std::path::PathBuf>,
        /// Providers' bills: the generic CSV or Twilio's call export.
        #[arg(long, num_args = 1..)]
        billed: Vec<std::path::PathBuf>,
        /// Differences larger than this many cents are listed.
        #[arg(long, default_value_t = 1)]
        threshold: i64,
        /// Record the billed figures of rows that match a call as cost events
        /// (`estimated = false`), once per call, provider and reference.
        #[arg(long, requires = "billed")]
        record: bool,
        /// Fold every event one by one as a decoded envelope (the reference the fast paths
        /// are checked against; what a filtered reconcile does): slower, the same report.
        #[arg(long)]
        event_by_event: bool,
    },
}

/// A `replay` that could not run or finish, with its cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--{field}: expected YYYY-MM-DD or an ISO 8601 time, got {raw:?}")]
    Time { field: &'static str, raw: String },
    #[error("--format: table, csv or json")]
    Format,
    #[error("--source: nats or postgres, not {0:?}")]
    Source(String),
    #[error("replay projections rebuilds from the first event: a read model folds every event of its aggregates, so --from, --to, --since-seq and the filters do not apply")]
    ProjectionsFiltered,
    #[error("replay projections reads the stream (--source nats): the stream sequence is what the live projectors resume from")]
    ProjectionsFromPostgres,
    #[error("no projection {name:?}; there are: {all}")]
    NoProjection { name: String, all: String },
    #[error("connecting")]
    Connect(#[from] crate::backbone::ConnectError),
    #[error("reading the event store")]
    Store(#[from] sqlx::Error),
    #[error("reading the stream's last sequence")]
    LastSequence(#[source] async_nats::Error),
    #[error("opening the stream")]
    Open(#[source] async_nats::Error),
    #[error("reading the stream")]
    Stream(#[from] cmb_nats::replay::ReplayError),
    #[error("a reader of the log stopped")]
    Reader(#[from] tokio::task::JoinError),
    #[error("reconciling")]
    Reconcile(#[from] reconcile::Error),
    #[error("opening an event's personal fields")]
    Keys(#[from] crate::backbone::keys::KeyError),
    #[error("reading a bill")]
    Billed(#[from] reconcile::BilledError),
    #[error("recording a bill on call {call_id}")]
    Record {
        call_id: String,
        #[source]
        source: CommandError<cmb_domain::call::CallError>,
    },
    #[error("rebuilding")]
    Rebuild(#[from] crate::ops::rebuild::RebuildError),
    #[error("writing the chart to {path}")]
    Chart {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the output")]
    Write(#[from] std::io::Error),
    #[error("writing JSON")]
    Json(#[from] serde_json::Error),
    #[error("writing CSV")]
    Csv(#[from] csv::Error),
}

fn parse_time(
    field: &'static str,
    raw: &str,
    end: bool,
) -> Result<chrono::DateTime<chrono::Utc>, Error> {
    // The field name is only for the API's message; the command line says its own.
    cmb_domain::values::parse_time_bound("time", raw, end).map_err(|_| Error::Time {
        field,
        raw: raw.to_string(),
    })
}

/// `replay …`: read the log and print it, reconcile it, or rebuild read models from it.
pub async fn run(
    config: Config,
    range: ReplayRange,
    command: ReplayCommand,
) -> Result<ExitCode, Error> {
    use std::io::IsTerminal;
    let from = range
        .from
        .as_deref()
        .map(|f| parse_time("from", f, false))
        .transpose()?;
    let to = range
        .to
        .as_deref()
        .map(|t| parse_time("to", t, true))
        .transpose()?;
    let format = range.format.clone().unwrap_or_else(|| {
        if std::io::stdout().is_terminal() {
            "table".into()
        } else {
            "json".into()
        }
    });
    if !["table", "csv", "json"].contains(&format.as_str()) {
        return Err(Error::Format);
    }
    if let ReplayCommand::Projections { names } = &command {
        return replay_projections(config, &range, names, &format).await;
    }
    let filter = crate::ops::reconcile::Filter {
        aggregate_type: range.aggregate_type.clone(),
        user: range.user,
        call: range.call,
    };
    // A reconcile covers the calls requested in the range with everything that belongs to
    // them, however late (settlements, refunds, bills recorded afterwards), so it reads the
    // whole log and places each call by its request.
    let calls_in_range = (from, to);
    let (from, to) = if matches!(command, ReplayCommand::Reconcile { .. }) {
        (None, None)
    } else {
        (from, to)
    };
    let b = crate::backbone::connect(&config, 4).await?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let unfiltered = range.aggregate_type.is_none() && range.user.is_none() && range.call.is_none();
    let fast = matches!(
        command,
        ReplayCommand::Reconcile {
            event_by_event: false,
            ..
        }
    );
    let report = if fast && unfiltered {
        // The whole log's reconcile: added up by Postgres, or read from the stream in place
        // by parallel consumers (the same report as the event-by-event fold below).
        Some(match range.source.as_str() {
            "postgres" => {
                crate::ops::reconcile::postgres::reconcile_in_sql(&b.pool, calls_in_range).await?
            }
            "nats" => {
                let until = cmb_nats::replay::last_sequence(&b.js, &config.stream)
                    .await
                    .map_err(Error::LastSequence)?;
                let start = range.since_seq.unwrap_or(1);
                let partitions = crate::ops::reconcile::stream::PARTITIONS;
                crate::ops::reconcile::stream::reconcile(
                    &config.nats_url,
                    &config.stream,
                    start,
                    until,
                    calls_in_range,
                    partitions,
                )
                .await?
                .0
            }
            other => return Err(Error::Source(other.to_string())),
        })
    } else {
        None
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
    let mut progress = crate::backbone::projector::Progress::new("replay", 0)
        .force(std::io::stderr().is_terminal() && format != "json");
    let reader = match range.source.as_str() {
        _ if report.is_some() => {
            drop(tx);
            tokio::spawn(async { Ok(()) })
        }
        "postgres" => {
            let pool = b.pool.clone();
            tokio::spawn(async move {
                crate::ops::reconcile::postgres::from_postgres(&pool, tx, from, to).await?;
                Ok::<_, Error>(())
            })
        }
        "nats" => {
            let until = cmb_nats::replay::last_sequence(&b.js, &config.stream)
                .await
                .map_err(Error::LastSequence)?;
            progress = crate::backbone::projector::Progress::new("replay", until)
                .force(std::io::stderr().is_terminal() && format != "json");
            let start = match (range.since_seq, from) {
                (Some(seq), _) => cmb_nats::replay::Start::Sequence(seq),
                (None, Some(t)) => cmb_nats::replay::Start::Time(t),
                (None, None) => cmb_nats::replay::Start::Beginning,
            };
            let filter_subject = match &range.aggregate_type {
                Some(t) => config.stream.type_subjects(t),
                None => config.stream.all_subjects(),
            };
            let mut events =
                cmb_nats::replay::open(&b.js, &config.stream, &filter_subject, start, until)
                    .await
                    .map_err(Error::Open)?;
            tokio::spawn(async move {
                while let Some(item) = events.recv().await {
                    let e = item?.event;
                    if to.is_some_and(|t| e.occurred_at >= t)
                        || from.is_some_and(|f| e.occurred_at < f)
                    {
                        continue;
                    }
                    if tx.send(e).await.is_err() {
                        break;
                    }
                }
                Ok(())
            })
        }
        other => return Err(Error::Source(other.to_string())),
    };
    let mut user_calls = std::collections::HashSet::new();
    let mut reconciler = crate::ops::reconcile::Reconciler::requested_between(calls_in_range);
    let printing = matches!(command, ReplayCommand::Events);
    // Printed events show personal fields opened, or `[erased]` where the user was erased.
    let keys = crate::backbone::keys::Keyring::new(b.pool.clone());
    while let Some(e) = rx.recv().await {
        progress.tick(1);
        if !filter.keep(&e, &mut user_calls) {
            continue;
        }
        if printing {
            serde_json::to_writer(&mut out, &*keys.opened(&e).await?)?;
            writeln!(out)?;
        } else {
            reconciler.add(&e);
        }
    }
    reader.await??;
    if let ReplayCommand::Reconcile {
        chart,
        billed,
        threshold,
        record,
        ..
    } = command
    {
        let report = report.unwrap_or_else(|| reconciler.report());
        if let Some(path) = chart {
            std::fs::write(&path, crate::ops::reconcile::output::chart_svg(&report)).map_err(
                |source| Error::Chart {
                    path: path.display().to_string(),
                    source,
                },
            )?;
        }
        if billed.is_empty() {
            crate::ops::reconcile::output::write_report(&mut out, &report, &format)?;
        } else {
            let mut rows = Vec::new();
            for path in &billed {
                rows.extend(crate::ops::reconcile::billed::read_billed(path)?);
            }
            let (diffs, total) = crate::ops::reconcile::billed::compare(&report, &rows, threshold);
            let (recorded, unchanged) = if record {
                record_billed(&b.pool, &report, &rows).await?
            } else {
                (0, 0)
            };
            if record && format != "json" {
                eprintln!("recorded {recorded} billed figures ({unchanged} were already recorded)");
            }
            match format.as_str() {
                "json" => {
                    let mut body = serde_json::json!({ "differences": diffs, "total_difference_cents": total });
                    if record {
                        body["recorded"] = recorded.into();
                        body["already_recorded"] = unchanged.into();
                    }
                    serde_json::to_writer(&mut out, &body)?;
                    writeln!(out)?;
                }
                "csv" => {
                    let mut w = csv::Writer::from_writer(&mut out);
                    w.write_record([
                        "kind",
                        "call_id",
                        "provider",
                        "reference",
                        "estimated_cents",
                        "billed_cents",
                        "difference_cents",
                    ])?;
                    for d in &diffs {
                        w.write_record([
                            d.kind.to_string(),
                            d.call_id.clone().unwrap_or_default(),
                            d.provider.clone(),
                            d.reference.clone(),
                            d.estimated_cents.map(|c| c.to_string()).unwrap_or_default(),
                            d.billed_cents.map(|c| c.to_string()).unwrap_or_default(),
                            d.difference_cents.to_string(),
                        ])?;
                    }
                    w.flush()?;
                }
                _ => {
                    for d in &diffs {
                        writeln!(
                            out,
                            "{:<24} {:<36} {:<10} estimated {:>6} billed {:>6} difference {:>6}",
                            d.kind,
                            d.call_id.clone().unwrap_or_else(|| d.reference.clone()),
                            d.provider,
                            d.estimated_cents
                                .map(|c| c.to_string())
                                .unwrap_or_else(|| "-".into()),
                            d.billed_cents
                                .map(|c| c.to_string())
                                .unwrap_or_else(|| "-".into()),
                            d.difference_cents
                        )?;
                    }
                    writeln!(out, "total difference: {total} cents")?;
                }
            }
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `reconcile --record`: each billed figure matched to a call becomes a cost event with
/// `estimated = false`, once per call, provider and reference (the aggregate drops repeats).
/// Returns (recorded, already recorded).
async fn record_billed(
    pool: &sqlx::PgPool,
    report: &crate::ops::reconcile::Report,
    rows: &[crate::ops::reconcile::billed::Billed],
) -> Result<(u64, u64), Error> {
    use cmb_domain::call::{Call, CallCommand, Cost};
    let store = crate::backbone::store::EventStore::new(pool.clone());
    let ctx = cmb_domain::CommandContext::system("reconcile-record");
    let (mut recorded, mut unchanged) = (0, 0);
    for ((call_id, provider, reference), micros) in
        crate::ops::reconcile::billed::billed_per_call(report, rows)
    {
        let cost = Cost::priced(&provider, "billed", 1, "bill", micros, 1, false);
        let committed = store
            .execute::<Call>(
                &call_id,
                CallCommand::RecordBilledCost { reference, cost },
                &ctx,
            )
            .await
            .map_err(|source| Error::Record {
                call_id: call_id.clone(),
                source,
            })?;
        if committed.events > 0 {
            recorded += 1;
        } else {
            unchanged += 1;
        }
    }
    Ok((recorded, unchanged))
}

/// `replay projections NAME…`: each rebuilt into fresh tables and swapped in.
async fn replay_projections(
    config: Config,
    range: &ReplayRange,
    names: &[String],
    format: &str,
) -> Result<ExitCode, Error> {
    use std::io::IsTerminal;
    if range.from.is_some()
        || range.to.is_some()
        || range.since_seq.is_some()
        || range.aggregate_type.is_some()
        || range.user.is_some()
        || range.call.is_some()
    {
        return Err(Error::ProjectionsFiltered);
    }
    if range.source != "nats" {
        return Err(Error::ProjectionsFromPostgres);
    }
    let mut projections = Vec::new();
    for name in names {
        let Some(p) = cmb_projections::by_name(name) else {
            let all: Vec<_> = cmb_projections::all().iter().map(|p| p.name()).collect();
            return Err(Error::NoProjection {
                name: name.clone(),
                all: all.join(", "),
            });
        };
        projections.push(p);
    }
    let b = crate::backbone::connect(&config, 4).await?;
    let mut out = std::io::stdout().lock();
    for projection in projections {
        let rebuilt = crate::ops::rebuild::rebuild_and_swap(
            &b.pool,
            &b.js,
            &config.stream,
            projection.as_ref(),
            std::io::stderr().is_terminal() && format != "json",
        )
        .await?;
        if format == "json" {
            serde_json::to_writer(&mut out, &rebuilt)?;
            writeln!(out)?;
        } else {
            writeln!(
                out,
                "rebuilt {}: {} events applied ({} caught up at the swap), {} rows, {:.1}s",
                rebuilt.projection,
                rebuilt.events_applied,
                rebuilt.caught_up,
                rebuilt.rows,
                rebuilt.seconds
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
