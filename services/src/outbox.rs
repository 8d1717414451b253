//! Publication of committed events to JetStream, exactly once and in per-aggregate order.
//!
//! The event table is the outbox. The publisher (a singleton under the `publisher` lease)
//! reads it in commit order — `(xact_id, global_position)` — but only below the oldest
//! transaction still in flight (`pg_snapshot_xmin(pg_current_snapshot())`), so a transaction
//! that commits late can never land behind the reader. It publishes each event with a
//! `Nats-Msg-Id` stable per event and records its checkpoint after JetStream acknowledges.
//! A crash between the acknowledgement and the checkpoint republishes a few events, which
//! JetStream drops inside its duplicate window; on taking the lease the publisher also moves
//! its checkpoint up to the stream's last message, so even a restart after the window cannot
//! duplicate. `callmeback events verify` repairs what a lost JetStream write left missing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use cmb_domain::{EventEnvelope, EventMetadata};
use cmb_nats::StreamSettings;
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;

use crate::config::PublisherSettings;
use crate::lease::Lease;

/// A place in commit order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct CommitPosition {
    pub commit_xid: i64,
    pub global_position: i64,
}

impl CommitPosition {
    pub fn of(event: &EventEnvelope) -> Self {
        CommitPosition {
            commit_xid: event.commit_xid,
            global_position: event.global_position,
        }
    }
}

const SELECT_ENVELOPE: &str =
    "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version,
        payload, metadata, global_position, xact_id::text::bigint AS commit_xid, recorded_at
   FROM events";

/// Decodes a row of [`SELECT_ENVELOPE`].
pub fn envelope_from_row(row: &sqlx::postgres::PgRow) -> Result<EventEnvelope, sqlx::Error> {
    let metadata: serde_json::Value = row.try_get("metadata")?;
    Ok(EventEnvelope {
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get::<i64, _>("sequence")? as u64,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        occurred_at: row.try_get("recorded_at")?,
        global_position: row.try_get("global_position")?,
        commit_xid: row.try_get("commit_xid")?,
        payload: row.try_get("payload")?,
        metadata: serde_json::from_value::<EventMetadata>(metadata).unwrap_or_default(),
    })
}

/// Up to `limit` events after `after` in commit order, none of them overtakable.
pub async fn read_committed(
    pool: &PgPool,
    after: CommitPosition,
    limit: i64,
) -> Result<Vec<EventEnvelope>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "{SELECT_ENVELOPE}
          WHERE (xact_id, global_position) > ($1::text::xid8, $2)
            AND xact_id < pg_snapshot_xmin(pg_current_snapshot())
          ORDER BY xact_id, global_position
          LIMIT $3"
    ))
    .bind(after.commit_xid)
    .bind(after.global_position)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(envelope_from_row).collect()
}

/// The publisher's confirmed position.
pub async fn checkpoint(pool: &PgPool, name: &str) -> Result<CommitPosition, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT commit_xid, global_position FROM publisher_checkpoints WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?;
    Ok(row
        .map(|(commit_xid, global_position)| CommitPosition {
            commit_xid,
            global_position,
        })
        .unwrap_or_default())
}

/// Moves the checkpoint forward (never back).
async fn save_checkpoint(pool: &PgPool, name: &str, at: CommitPosition) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO publisher_checkpoints (name, commit_xid, global_position, updated_at)
         VALUES ($1, $2, $3, now())
         ON CONFLICT (name) DO UPDATE
            SET commit_xid = EXCLUDED.commit_xid, global_position = EXCLUDED.global_position,
                updated_at = now()
          WHERE (publisher_checkpoints.commit_xid, publisher_checkpoints.global_position)
              < (EXCLUDED.commit_xid, EXCLUDED.global_position)",
    )
    .bind(name)
    .bind(at.commit_xid)
    .bind(at.global_position)
    .execute(pool)
    .await?;
    Ok(())
}

/// Drops the events the stream already holds, judged by the last message on each
/// aggregate's subject: per-aggregate order means every earlier event of that aggregate is in
/// too. Used on taking over (after a crash or a lost lease), so that what a predecessor
/// published but did not checkpoint is not published again, even long after JetStream's
/// duplicate window has passed.
async fn drop_already_published(
    js: &jetstream::Context,
    settings: &StreamSettings,
    batch: Vec<EventEnvelope>,
) -> Result<Vec<EventEnvelope>, async_nats::Error> {
    use std::collections::HashMap;
    let stream = js.get_stream(&settings.stream).await?;
    let mut published: HashMap<(String, String), u64> = HashMap::new();
    for e in &batch {
        let key = (e.aggregate_type.clone(), e.aggregate_id.clone());
        if published.contains_key(&key) {
            continue;
        }
        let subject = settings.subject(&e.aggregate_type, &e.aggregate_id);
        let last = match stream.direct_get_last_for_subject(&subject).await {
            Ok(message) => {
                let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_string());
                // Only trust a message that names this very aggregate.
                if header(cmb_nats::contract::AGGREGATE_ID).as_deref()
                    == Some(e.aggregate_id.as_str())
                    && header(cmb_nats::contract::AGGREGATE_TYPE).as_deref()
                        == Some(e.aggregate_type.as_str())
                {
                    header(cmb_nats::contract::SEQUENCE)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0)
                } else {
                    0
                }
            }
            Err(err) if matches!(err.kind(), jetstream::stream::DirectGetErrorKind::NotFound) => 0,
            Err(err) => return Err(err.into()),
        };
        published.insert(key, last);
    }
    Ok(batch
        .into_iter()
        .filter(|e| e.sequence > published[&(e.aggregate_type.clone(), e.aggregate_id.clone())])
        .collect())
}

/// Publication lags (commit to acknowledgement), kept for benchmarks.
pub type LagSamples = Arc<Mutex<Vec<Duration>>>;

pub struct Publisher {
    pub pool: PgPool,
    pub js: jetstream::Context,
    pub stream: StreamSettings,
    pub settings: PublisherSettings,
    pub instance_id: String,
    pub lag_samples: Option<LagSamples>,
}

/// The publisher's checkpoint and lease name.
pub const PUBLISHER: &str = "publisher";

impl Publisher {
    /// Runs until `shutdown`: holds (or waits for) the lease and publishes.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut lease = Lease::new(PUBLISHER, &self.instance_id, self.settings.lease_ttl);
        let mut position: Option<CommitPosition> = None;
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            match self.step(&mut lease, &mut position).await {
                Ok(true) => failures = 0,
                Ok(false) => {
                    let pause = if lease.is_held() {
                        self.settings.idle_poll
                    } else {
                        self.settings.lease_ttl / 4
                    };
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
                Err(e) => {
                    failures += 1;
                    // Re-read the checkpoint after a failure: part of the batch may be out.
                    position = None;
                    let backoff = Duration::from_millis(50 * 2u64.pow(failures.min(6)));
                    tracing::warn!(error = %e, ?backoff, "publication failed; retrying");
                    metrics::counter!("cmb_publish_failures_total").increment(1);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
        lease.release(&self.pool).await;
        tracing::info!("publisher stopped");
    }

    /// One round: returns Ok(true) when it published something.
    async fn step(
        &self,
        lease: &mut Lease,
        position: &mut Option<CommitPosition>,
    ) -> Result<bool, async_nats::Error> {
        let was_held = lease.is_held();
        if !lease.ensure(&self.pool).await? {
            *position = None;
            return Ok(false);
        }
        let (at, taking_over) = match *position {
            Some(at) if was_held => (at, false),
            _ => (checkpoint(&self.pool, PUBLISHER).await?, true),
        };
        *position = Some(at);
        let mut batch = read_committed(&self.pool, at, self.settings.batch).await?;
        let Some(last) = batch.last() else {
            return Ok(false);
        };
        let last = CommitPosition::of(last);
        if taking_over {
            batch = drop_already_published(&self.js, &self.stream, batch).await?;
            // Only the first batch after taking over can hold what a predecessor published.
        }
        let acks = cmb_nats::publish::publish_in_order(&self.js, &self.stream, &batch).await?;
        save_checkpoint(&self.pool, PUBLISHER, last).await?;
        *position = Some(last);
        let now = Utc::now();
        let fresh = acks.iter().filter(|a| !a.duplicate).count() as u64;
        metrics::counter!("cmb_events_published_total").increment(fresh);
        metrics::counter!("cmb_events_republished_duplicates_total")
            .increment(batch.len() as u64 - fresh);
        let lags: Vec<Duration> = batch
            .iter()
            .map(|e| (now - e.occurred_at).to_std().unwrap_or_default())
            .collect();
        for lag in &lags {
            metrics::histogram!("cmb_publication_lag_seconds").record(lag.as_secs_f64());
        }
        if let Some(samples) = &self.lag_samples {
            samples.lock().expect("lag samples lock").extend(lags);
        }
        Ok(true)
    }
}

/// What `events verify` found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub in_store: u64,
    pub in_stream: u64,
    pub missing: Vec<String>,
    pub republished: u64,
    pub unknown_in_stream: u64,
}

/// Compares the stream with the event store up to the publisher's checkpoint (what the
/// publisher has not reached yet is its job, not a loss) and, with `repair`, republishes what
/// is missing, in commit order.
pub async fn verify(
    pool: &PgPool,
    js: &jetstream::Context,
    settings: &StreamSettings,
    repair: bool,
) -> Result<VerifyReport, async_nats::Error> {
    use std::collections::HashSet;
    let upto = checkpoint(pool, PUBLISHER).await?;
    let until = cmb_nats::replay::last_sequence(js, settings).await?;
    let mut seen: HashSet<String> = HashSet::new();
    let mut rx = cmb_nats::replay::open(
        js,
        settings,
        &settings.all_subjects(),
        cmb_nats::replay::Start::Beginning,
        until,
    )
    .await?;
    while let Some(item) = rx.recv().await {
        let r = item.map_err(|e| async_nats::Error::from(e.to_string()))?;
        seen.insert(r.event.event_id());
    }
    let mut report = VerifyReport {
        in_stream: seen.len() as u64,
        ..Default::default()
    };
    let mut after = CommitPosition::default();
    let mut store_ids: u64 = 0;
    loop {
        let batch = read_committed(pool, after, 5_000).await?;
        let Some(last) = batch.last() else { break };
        after = CommitPosition::of(last);
        let mut missing = Vec::new();
        for e in batch {
            if CommitPosition::of(&e) > upto {
                break;
            }
            store_ids += 1;
            if !seen.remove(&e.event_id()) {
                report.missing.push(e.event_id());
                missing.push(e);
            }
        }
        if repair && !missing.is_empty() {
            let acks = cmb_nats::publish::publish_in_order(js, settings, &missing).await?;
            report.republished += acks.iter().filter(|a| !a.duplicate).count() as u64;
        }
        if after > upto {
            break;
        }
    }
    report.in_store = store_ids;
    report.unknown_in_stream = seen.len() as u64;
    Ok(report)
}
