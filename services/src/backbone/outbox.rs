//! Publication of committed events to JetStream, exactly once and in per-aggregate order.
//!
//! The event table is the outbox. The publisher (a singleton under the `publisher` lease)
//! reads it by snapshot pairs, as PgQ does: what became visible between the previous
//! snapshot and the current one (`pg_visible_in_snapshot`, `pg_snapshot_xip`), in commit
//! order `(xact_id, global_position)`, so a transaction that commits late is never skipped and
//! one left open anywhere delays only its own events (README "Publication"). It publishes
//! each event with a `Nats-Msg-Id` stable per event and records its checkpoint after
//! JetStream acknowledges.
//! A crash between the acknowledgement and the checkpoint republishes a few events, which
//! JetStream drops inside its duplicate window; on taking the lease the publisher also moves
//! its checkpoint up to the stream's last message, so even a restart after the window cannot
//! duplicate. `callmeback events verify` ([`super::verify`]) repairs what a lost JetStream write left
//! missing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use cmb_domain::{EventEnvelope, EventMetadata};
use cmb_nats::contract::{Outgoing, StoredParts};
use cmb_nats::StreamSettings;
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres, Row};
use tokio_util::sync::CancellationToken;

use crate::backbone::lease::Lease;
use crate::config::PublisherSettings;

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

pub const SELECT_ENVELOPE: &str =
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

/// Where publication stands: every event of a transaction visible in `done` is on the stream;
/// of those visible in `pending` but not in `done`, the ones up to `at` (commit order) are too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// A `pg_snapshot` in its text form (`xmin:xmax:xip,…`).
    pub done: String,
    pub pending: Option<String>,
    pub at: CommitPosition,
}

impl Default for Checkpoint {
    fn default() -> Self {
        Checkpoint {
            // Nothing is visible in it: every event is still to publish.
            done: "1:1:".into(),
            pending: None,
            at: CommitPosition::default(),
        }
    }
}

/// The SQL condition "this event is on the stream according to the checkpoint `c`".
pub(crate) const COVERED: &str = "(pg_visible_in_snapshot(e.xact_id, c.snapshot)
     OR (c.pending IS NOT NULL AND pg_visible_in_snapshot(e.xact_id, c.pending)
         AND (e.xact_id, e.global_position) <= (c.commit_xid::text::xid8, c.global_position)))";

/// The next events to publish after `checkpoint`, in commit order, and the snapshot they were
/// read against (the checkpoint's `pending` one, or a fresh one when none was pending).
///
/// An event is due when its transaction is visible in the pending snapshot and was not in the
/// done one: in `done`'s in-progress list, or at or above its `xmax`. Two ordered index scans
/// (one per case) merged, so a batch costs its own size even behind a long backlog. Each scan
/// is bounded by values read here from `done`'s text ([`Bounds`]), which the index uses
/// whatever the plan: the in-progress list, and the later of the checkpoint's position and
/// `done`'s `xmax` — not `pg_snapshot_xip(s.done)` and `pg_snapshot_xmax(s.done)`, which a
/// cached generic plan applied as filters to every event from the start of the log, on every
/// poll. Nothing
/// here waits for the cluster's oldest transaction: a transaction still open is simply not
/// visible yet, and only its own events wait for it.
///
/// With `save`, the same statement first records `checkpoint` as the publisher's position
/// (what [`save_checkpoint`] does): the position after a batch is written by the read of the
/// next one, which comes after the batch's acknowledgements anyway — one round trip fewer
/// per batch.
pub async fn read_due<'e>(
    db: impl sqlx::PgExecutor<'e>,
    checkpoint: &Checkpoint,
    limit: i64,
    save: bool,
) -> Result<(Option<String>, Vec<Due>), sqlx::Error> {
    let saved = if save {
        format!("{SAVE_CHECKPOINT_CTE},")
    } else {
        String::new()
    };
    let sql = format!(
        "WITH {saved} s AS MATERIALIZED (
              SELECT $1::pg_snapshot AS done,
                     COALESCE($2::pg_snapshot, pg_current_snapshot()) AS pending)
         SELECT (SELECT pending::text FROM s) AS snapshot, u.* FROM (
           (SELECT {DUE_COLUMNS}
              FROM events, s
             WHERE xact_id = ANY($9::bigint[]::text[]::xid8[])
               AND pg_visible_in_snapshot(xact_id, s.pending)
               AND (xact_id, global_position) > ($3::text::xid8, $4)
             ORDER BY xact_id, global_position LIMIT $5)
           UNION ALL
           (SELECT {DUE_COLUMNS}
              FROM events, s
             WHERE xact_id >= pg_snapshot_xmax(s.done)
               AND xact_id < pg_snapshot_xmax(s.pending)
               AND pg_visible_in_snapshot(xact_id, s.pending)
               AND (xact_id, global_position) > ($7::text::xid8, $8)
             ORDER BY xact_id, global_position LIMIT $5)
         ) u
         ORDER BY u.xact_id, u.global_position
         LIMIT $5"
    );
    let bounds = Bounds::of(checkpoint).ok_or_else(|| {
        sqlx::Error::Decode(
            format!("the publisher's snapshot {:?} is not one", checkpoint.done).into(),
        )
    })?;
    let rows = sqlx::query(&sql)
        .bind(&checkpoint.done)
        .bind(checkpoint.pending.as_deref())
        .bind(checkpoint.at.commit_xid)
        .bind(checkpoint.at.global_position)
        .bind(limit)
        // The checkpoint's name ($6), used by the save only.
        .bind(PUBLISHER)
        .bind(bounds.above.commit_xid)
        .bind(bounds.above.global_position)
        .bind(&bounds.in_progress)
        .fetch_all(db)
        .await?;
    let snapshot = rows
        .first()
        .map(|r| r.try_get::<String, _>("snapshot"))
        .transpose()?;
    let events = rows.iter().map(due_from_row).collect::<Result<_, _>>()?;
    Ok((snapshot, events))
}

/// Where [`read_due`]'s two scans start, from the done snapshot's text (`xmin:xmax:xip,…`,
/// as Postgres writes a `pg_snapshot`): the transactions it saw in progress, and for those at
/// or above its `xmax`, the later of that `xmax` and the checkpoint's position.
#[derive(Debug, PartialEq, Eq)]
pub struct Bounds {
    pub in_progress: Vec<i64>,
    pub above: CommitPosition,
}

impl Bounds {
    /// `None` when `done` is not a snapshot's text.
    pub fn of(checkpoint: &Checkpoint) -> Option<Bounds> {
        let mut parts = checkpoint.done.splitn(3, ':');
        let (_xmin, xmax, xip) = (parts.next()?, parts.next()?, parts.next()?);
        let xmax = xmax.parse::<i64>().ok()?;
        let in_progress = xip
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse::<i64>().ok())
            .collect::<Option<Vec<_>>>()?;
        // Every event of transaction `xmax` itself comes after (xmax, i64::MIN).
        let floor = CommitPosition {
            commit_xid: xmax,
            global_position: i64::MIN,
        };
        Some(Bounds {
            in_progress,
            above: checkpoint.at.max(floor),
        })
    }
}

/// What [`read_due`] reads of an event: the payload and metadata as the JSON text Postgres
/// stores (metadata that is not an object, which no writer makes, as `{}`, as
/// [`envelope_from_row`] reads it).
const DUE_COLUMNS: &str = "aggregate_type, aggregate_id, sequence, event_type, event_version,
       payload::text AS payload,
       CASE WHEN json_typeof(metadata) = 'object' THEN metadata::text ELSE '{}' END AS metadata,
       global_position, xact_id, xact_id::text::bigint AS commit_xid, recorded_at";

/// An event due for publication: its message, its body written around the stored JSON
/// ([`cmb_nats::contract::body_from_stored`]: never parsed and encoded again), and what the
/// publisher's bookkeeping needs.
#[derive(Debug, Clone)]
pub struct Due {
    pub message: Outgoing,
    pub at: CommitPosition,
    pub occurred_at: chrono::DateTime<Utc>,
}

fn due_from_row(row: &sqlx::postgres::PgRow) -> Result<Due, sqlx::Error> {
    let aggregate_type: &str = row.try_get("aggregate_type")?;
    let aggregate_id: &str = row.try_get("aggregate_id")?;
    let sequence = row.try_get::<i64, _>("sequence")? as u64;
    let event_type: &str = row.try_get("event_type")?;
    let occurred_at = row.try_get("recorded_at")?;
    let at = CommitPosition {
        commit_xid: row.try_get("commit_xid")?,
        global_position: row.try_get("global_position")?,
    };
    let body = cmb_nats::contract::body_from_stored(&StoredParts {
        aggregate_type,
        aggregate_id,
        sequence,
        event_type,
        event_version: row.try_get("event_version")?,
        occurred_at,
        global_position: at.global_position,
        commit_xid: at.commit_xid,
        payload: row.try_get("payload")?,
        metadata: row.try_get("metadata")?,
    });
    Ok(Due {
        message: Outgoing {
            aggregate_type: aggregate_type.to_string(),
            aggregate_id: aggregate_id.to_string(),
            sequence,
            event_type: event_type.to_string(),
            body,
        },
        at,
        occurred_at,
    })
}

/// The publisher's confirmed position.
pub async fn checkpoint<'e>(
    db: impl sqlx::PgExecutor<'e>,
    name: &str,
) -> Result<Checkpoint, sqlx::Error> {
    let row: Option<(String, Option<String>, i64, i64)> = sqlx::query_as(
        "SELECT snapshot::text, pending::text, commit_xid, global_position
           FROM publisher_checkpoints WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(db)
    .await?;
    Ok(row
        .map(|(done, pending, commit_xid, global_position)| Checkpoint {
            done,
            pending,
            at: CommitPosition {
                commit_xid,
                global_position,
            },
        })
        .unwrap_or_default())
}

/// Records the publisher's position without waiting for it to reach the disk
/// (`synchronous_commit = off` for this one transaction): losing the last positions in a
/// crash of Postgres is harmless — the publisher then starts from an earlier one, and what it
/// publishes again JetStream drops (`Nats-Msg-Id`), as does the check of the stream's last
/// message per aggregate when it takes over — and any later commit that does wait flushes
/// this one too (the log is written in order).
async fn save_checkpoint(pool: &PgPool, name: &str, at: &Checkpoint) -> Result<(), sqlx::Error> {
    sqlx::query(&format!("WITH {SAVE_CHECKPOINT_CTE} SELECT 1"))
        .bind(&at.done)
        .bind(at.pending.as_deref())
        .bind(at.at.commit_xid)
        .bind(at.at.global_position)
        .bind(0i64) // the read's limit ($5), unused here
        .bind(name)
        .execute(pool)
        .await?;
    Ok(())
}

/// The checkpoint's upsert as a data-modifying `WITH` item (`$1`–`$4`: done, pending,
/// commit_xid, global_position; `$6`: the name), committed without waiting for its own fsync.
const SAVE_CHECKPOINT_CTE: &str = "saved AS (
         INSERT INTO publisher_checkpoints
                (name, snapshot, pending, commit_xid, global_position, updated_at)
         SELECT $6, $1::pg_snapshot, $2::pg_snapshot, $3, $4, now()
           FROM (SELECT set_config('synchronous_commit', 'off', true)) AS no_wait
         ON CONFLICT (name) DO UPDATE
            SET snapshot = EXCLUDED.snapshot, pending = EXCLUDED.pending,
                commit_xid = EXCLUDED.commit_xid, global_position = EXCLUDED.global_position,
                updated_at = now())";

/// How many committed events the publisher's checkpoint does not cover yet.
pub async fn unpublished(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "WITH c AS (SELECT * FROM publisher_checkpoints WHERE name = $1
                    UNION ALL
                    SELECT $1, 0, 0, now(), '1:1:'::pg_snapshot, NULL
                     WHERE NOT EXISTS (SELECT 1 FROM publisher_checkpoints WHERE name = $1))
         SELECT count(*) FROM events e, c
          WHERE e.xact_id >= pg_snapshot_xmin(c.snapshot) AND NOT {COVERED}"
    ))
    .bind(PUBLISHER)
    .fetch_one(pool)
    .await
}

/// The oldest transaction open anywhere on the Postgres server: it does not hold publication
/// back (see [`read_due`]), but it holds back vacuum and is worth an operator's look.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OldestTransaction {
    pub age_seconds: f64,
    pub database: Option<String>,
    pub pid: i32,
    pub state: Option<String>,
}

pub async fn oldest_transaction(pool: &PgPool) -> Result<Option<OldestTransaction>, sqlx::Error> {
    let row: Option<(f64, Option<String>, i32, Option<String>)> = sqlx::query_as(
        "SELECT extract(epoch FROM now() - xact_start)::float8, datname, pid, state
           FROM pg_stat_activity
          WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid()
            AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)
          ORDER BY xact_start LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    let oldest = row.map(|(age_seconds, database, pid, state)| OldestTransaction {
        age_seconds,
        database,
        pid,
        state,
    });
    metrics::gauge!("cmb_oldest_transaction_age_seconds")
        .set(oldest.as_ref().map_or(0.0, |o| o.age_seconds));
    Ok(oldest)
}

/// Drops the events the stream already holds, judged by the last message on each
/// aggregate's subject: per-aggregate order means every earlier event of that aggregate is in
/// too. Used on taking over (after a crash or a lost lease), so that what a predecessor
/// published but did not checkpoint is not published again, even long after JetStream's
/// duplicate window has passed.
async fn drop_already_published(
    js: &jetstream::Context,
    settings: &StreamSettings,
    batch: Vec<Due>,
) -> Result<Vec<Due>, async_nats::Error> {
    use std::collections::HashMap;
    let stream = js.get_stream(&settings.stream).await?;
    let mut published: HashMap<(String, String), u64> = HashMap::new();
    for e in batch.iter().map(|d| &d.message) {
        let key = (e.aggregate_type.clone(), e.aggregate_id.clone());
        if published.contains_key(&key) {
            continue;
        }
        let subject = settings.subject(&e.aggregate_type, &e.aggregate_id);
        let last = match stream.direct_get_last_for_subject(&subject).await {
            Ok(message) => {
                // Only trust a message that names this very aggregate (a subject token can
                // stand for several ids).
                match cmb_nats::contract::aggregate_of(&message.headers) {
                    Some((t, id, sequence)) if t == e.aggregate_type && id == e.aggregate_id => {
                        sequence
                    }
                    _ => 0,
                }
            }
            Err(err) if matches!(err.kind(), jetstream::stream::DirectGetErrorKind::NotFound) => 0,
            Err(err) => return Err(err.into()),
        };
        published.insert(key, last);
    }
    Ok(batch
        .into_iter()
        .filter(|d| {
            let e = &d.message;
            e.sequence > published[&(e.aggregate_type.clone(), e.aggregate_id.clone())]
        })
        .collect())
}

/// Publication lags (commit to acknowledgement), kept for benchmarks.
pub type LagSamples = Arc<Mutex<Vec<Duration>>>;

/// Called after each wave of a batch with the number of waves out so far (tests use it to
/// stall a publisher mid-batch); `None` in service.
pub type AfterWave = Arc<dyn Fn(usize) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

pub struct Publisher {
    pub pool: PgPool,
    pub js: jetstream::Context,
    pub stream: StreamSettings,
    pub settings: PublisherSettings,
    pub instance_id: String,
    pub lag_samples: Option<LagSamples>,
    pub after_wave: Option<AfterWave>,
}

/// Where a running publisher stands, and whether its checkpoint row says so yet.
struct Position {
    at: Checkpoint,
    unsaved: bool,
}

/// The publisher's checkpoint and lease name.
pub const PUBLISHER: &str = "publisher";

impl Publisher {
    /// Runs until `shutdown`: holds (or waits for) the lease and publishes.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut lease = Lease::new(PUBLISHER, &self.instance_id, self.settings.lease_ttl);
        let mut position: Option<Position> = None;
        // The publisher reads every few milliseconds: it keeps one connection of the pool
        // rather than taking and returning one per read (sqlx checks a connection with a
        // round trip each time it goes back); a failure returns it, and the next read takes
        // a fresh one.
        let mut conn: Option<PoolConnection<Postgres>> = None;
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            match self.step(&mut lease, &mut position, &mut conn).await {
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
                    conn = None;
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
        drop(conn);
        // The last position, if the next read was to write it.
        if let Some(Position { at, unsaved: true }) = &position {
            if lease.is_held() {
                if let Err(e) = save_checkpoint(&self.pool, PUBLISHER, at).await {
                    tracing::warn!(error = %e, "the publisher's last checkpoint was not saved");
                }
            }
        }
        lease.release(&self.pool).await;
        tracing::info!("publisher stopped");
    }

    /// One round: returns Ok(true) when it published something (or finished a snapshot).
    async fn step(
        &self,
        lease: &mut Lease,
        position: &mut Option<Position>,
        conn: &mut Option<PoolConnection<Postgres>>,
    ) -> Result<bool, async_nats::Error> {
        let was_held = lease.is_held();
        if !lease.ensure(&self.pool).await? {
            *position = None;
            return Ok(false);
        }
        let db = match conn {
            Some(db) => db,
            None => conn.insert(self.pool.acquire().await?),
        };
        let (Position { mut at, unsaved }, taking_over) = match position.take() {
            Some(p) if was_held => (p, false),
            _ => (
                Position {
                    at: checkpoint(&mut **db, PUBLISHER).await?,
                    unsaved: false,
                },
                true,
            ),
        };
        // The position after the last batch is written by this read.
        let (snapshot, mut batch) = read_due(&mut **db, &at, self.settings.batch, unsaved).await?;
        let read_at = Utc::now();
        let Some(last) = batch.last() else {
            return match at.pending.take() {
                // Nothing new visible: the done snapshot stays (its scan costs nothing).
                None => {
                    *position = Some(Position { at, unsaved: false });
                    Ok(false)
                }
                // The pending snapshot is fully out (written by the next read, at once).
                Some(pending) => {
                    at.done = pending;
                    at.at = CommitPosition::default();
                    *position = Some(Position { at, unsaved: true });
                    Ok(true)
                }
            };
        };
        let last = last.at;
        let full = batch.len() as i64 >= self.settings.batch;
        if at.pending.is_none() {
            at.pending = snapshot;
        }
        if taking_over {
            // Only the first batch after taking over can hold what a predecessor published.
            batch = drop_already_published(&self.js, &self.stream, batch).await?;
        }
        let (batch, occurred): (Vec<Outgoing>, Vec<_>) = batch
            .into_iter()
            .map(|d| (d.message, d.occurred_at))
            .unzip();
        let mut acks = Vec::with_capacity(batch.len());
        for (n, wave) in cmb_nats::publish::waves(&batch).into_iter().enumerate() {
            // A publisher that lost its lease stops within one wave.
            if !lease.ensure(&self.pool).await? {
                return Err("the publisher lease was lost mid-batch".into());
            }
            acks.extend(
                cmb_nats::publish::publish_wave(&self.js, &self.stream, &batch, &wave).await?,
            );
            if let Some(after_wave) = &self.after_wave {
                after_wave(n + 1).await;
            }
        }
        if full {
            at.at = last;
        } else {
            // Fewer than a batch: that was the pending snapshot's last page.
            at.done = at.pending.take().unwrap_or(at.done);
            at.at = CommitPosition::default();
        }
        // Acknowledged: the next read writes the new position down.
        *position = Some(Position { at, unsaved: true });
        let now = Utc::now();
        let fresh = acks.iter().filter(|a| !a.duplicate).count() as u64;
        metrics::counter!("cmb_events_published_total").increment(fresh);
        metrics::counter!("cmb_events_republished_duplicates_total")
            .increment(batch.len() as u64 - fresh);
        let lags: Vec<Duration> = occurred
            .iter()
            .map(|at| (now - *at).to_std().unwrap_or_default())
            .collect();
        for lag in &lags {
            metrics::histogram!(crate::telemetry::PUBLICATION_LAG).record(lag.as_secs_f64());
        }
        // Where that went: waiting to be read, then the waves to JetStream's acknowledgement.
        let acked_in = (now - read_at).to_std().unwrap_or_default().as_secs_f64();
        for at in &occurred {
            let waited = (read_at - *at).to_std().unwrap_or_default();
            metrics::histogram!(crate::telemetry::LAG_STAGE, "stage" => "publish_read")
                .record(waited.as_secs_f64());
            metrics::histogram!(crate::telemetry::LAG_STAGE, "stage" => "publish_ack")
                .record(acked_in);
        }
        if let Some(samples) = &self.lag_samples {
            samples.lock().expect("lag samples lock").extend(lags);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(done: &str, commit_xid: i64, global_position: i64) -> Checkpoint {
        Checkpoint {
            done: done.into(),
            pending: None,
            at: CommitPosition {
                commit_xid,
                global_position,
            },
        }
    }

    #[test]
    fn a_reads_bounds_come_from_the_done_snapshot_and_the_position() {
        // A finished snapshot: the scan above it starts at its xmax, not at the log's start.
        assert_eq!(
            Bounds::of(&at("100:105:100,103", 0, 0)),
            Some(Bounds {
                in_progress: vec![100, 103],
                above: CommitPosition {
                    commit_xid: 105,
                    global_position: i64::MIN
                },
            })
        );
        // Mid-snapshot, past its xmax: from the position.
        assert_eq!(
            Bounds::of(&at("105:105:", 107, 42)),
            Some(Bounds {
                in_progress: vec![],
                above: CommitPosition {
                    commit_xid: 107,
                    global_position: 42
                },
            })
        );
        assert_eq!(
            Bounds::of(&Checkpoint::default()).map(|b| b.above.commit_xid),
            Some(1)
        );
        assert_eq!(Bounds::of(&at("not a snapshot", 0, 0)), None);
        assert_eq!(Bounds::of(&at("1:2:x", 0, 0)), None);
    }
}
