//! Read models, built from the event stream.
//!
//! Each [`Projection`] turns events into rows of its own tables. [`apply`] runs it inside one
//! transaction that also moves the projection's per-aggregate offset, so an event is applied
//! exactly once however often it is delivered, and one that arrives before its predecessor is
//! refused (a [`Outcome::Gap`]) until the predecessor has been applied. Nothing here knows
//! NATS: the runner in `services` feeds events in, from a durable consumer or a replay.

pub mod accounts;
pub mod calls;
pub mod memory;
pub mod personas;
pub mod timeline;

use async_trait::async_trait;
use cmb_domain::EventEnvelope;
use sqlx::{PgConnection, PgPool};

/// A read model builder.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Stable name: the durable consumer's and the offsets' key.
    fn name(&self) -> &'static str;
    /// The tables it owns, emptied by a rebuild.
    fn tables(&self) -> &'static [&'static str];
    /// The aggregate types it reads; empty means all.
    fn aggregate_types(&self) -> &'static [&'static str];
    /// Applies one event. Called once per event, in per-aggregate order.
    async fn apply(&self, db: &mut PgConnection, event: &EventEnvelope) -> Result<(), sqlx::Error>;

    /// Applies several events, each the next of its aggregate (in per-aggregate order; events
    /// of different aggregates interleaved), as [`Projection::apply`] would one after the
    /// other. The default does just that; a projection with many events per aggregate writes
    /// them set-based instead (one statement per table for the whole batch).
    async fn apply_all(
        &self,
        db: &mut PgConnection,
        events: &[&EventEnvelope],
    ) -> Result<(), sqlx::Error> {
        for e in events {
            self.apply(db, e).await?;
        }
        Ok(())
    }

    fn wants(&self, aggregate_type: &str) -> bool {
        let types = self.aggregate_types();
        types.is_empty() || types.contains(&aggregate_type)
    }
}

/// What became of one delivered event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Applied before (a redelivery): nothing changed.
    AlreadyApplied,
    /// Its predecessor has not been applied yet; deliver it again later.
    Gap {
        expected: u64,
    },
    /// Not an aggregate type this projection reads.
    Ignored,
    /// An event type this build does not know (written by a newer one): skipped, counted in
    /// `cmb_projection_unknown_events_total`, its offset moved so the aggregate goes on.
    Unknown,
}

/// Applies `event` (found at `stream_sequence`) to `projection`, with its offset, in one
/// transaction.
pub async fn apply(
    pool: &PgPool,
    projection: &dyn Projection,
    event: &EventEnvelope,
    stream_sequence: u64,
) -> Result<Outcome, sqlx::Error> {
    if !projection.wants(&event.aggregate_type) {
        return Ok(Outcome::Ignored);
    }
    let mut conn = pool.acquire().await?;
    apply_on(&mut conn, projection, event, stream_sequence).await
}

/// The lock a swap of `projection` takes exclusively (`replay projections`), and every
/// application of one of its events takes shared: while a swap holds it, that projection's
/// live projector — and only it — pauses. (The two-key advisory lock space is apart from the
/// one-key space of the per-aggregate locks.)
pub const SWAP_LOCK_KEY: &str = "1, hashtext($1)";

/// [`apply`] on a connection: in a transaction of its own, or in a savepoint when the
/// connection is already in one (a swap's catch-up).
pub async fn apply_on(
    conn: &mut PgConnection,
    projection: &dyn Projection,
    event: &EventEnvelope,
    stream_sequence: u64,
) -> Result<Outcome, sqlx::Error> {
    use sqlx::Connection;
    if !projection.wants(&event.aggregate_type) {
        return Ok(Outcome::Ignored);
    }
    let mut tx = conn.begin().await?;
    // First the swap lock (shared), then serialise work on this projection × aggregate (a row
    // lock cannot cover the first event, whose offset row does not exist yet); the next
    // statement then sees every earlier commit. One round trip, evaluated left to right.
    sqlx::query(&format!(
        "SELECT pg_advisory_xact_lock_shared({SWAP_LOCK_KEY}),
                pg_advisory_xact_lock(hashtextextended($1 || '/' || $2 || '/' || $3, 0))"
    ))
    .bind(projection.name())
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
    .execute(&mut *tx)
    .await?;
    let last: Option<i64> = sqlx::query_scalar(
        "SELECT sequence FROM projection_offsets
          WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id = $3",
    )
    .bind(projection.name())
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
    .fetch_optional(&mut *tx)
    .await?;
    let last = last.unwrap_or(0) as u64;
    if event.sequence <= last {
        return Ok(Outcome::AlreadyApplied);
    }
    if event.sequence > last + 1 {
        return Ok(Outcome::Gap { expected: last + 1 });
    }
    let outcome = if event.is_known() {
        projection.apply(&mut tx, event).await?;
        Outcome::Applied
    } else {
        tracing::warn!(event = %event.event_id(), event_type = %event.event_type, "unknown event type skipped");
        metrics::counter!("cmb_projection_unknown_events_total", "projection" => projection.name(), "event_type" => event.event_type.clone()).increment(1);
        Outcome::Unknown
    };
    sqlx::query(
        "INSERT INTO projection_offsets (projection, aggregate_type, aggregate_id, sequence)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (projection, aggregate_type, aggregate_id) DO UPDATE SET sequence = EXCLUDED.sequence",
    )
    .bind(projection.name())
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
    .bind(event.sequence as i64)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO projection_status (projection, stream_sequence, events_applied, updated_at)
         VALUES ($1, $2, 1, now())
         ON CONFLICT (projection) DO UPDATE
            SET stream_sequence = GREATEST(projection_status.stream_sequence, EXCLUDED.stream_sequence),
                events_applied = projection_status.events_applied + 1,
                updated_at = now()",
    )
    .bind(projection.name())
    .bind(stream_sequence as i64)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(outcome)
}

/// Most events [`apply_batch`] applies in one transaction.
pub const MAX_BATCH: usize = 256;

/// The key of the advisory lock that serialises work on `projection` × one aggregate (one-key
/// space), the same in [`apply_on`] and [`apply_batch`].
const AGGREGATE_LOCK_KEY: &str = "hashtextextended($1 || '/' || t || '/' || i, 0)";

/// Applies `events` (each with the stream sequence it was found at, in delivery order) to
/// `projection` in one transaction, with their offsets: what [`apply`] does for each, at the
/// price of one commit (one WAL flush) for all of them instead of one each. An event whose
/// predecessor is neither applied nor earlier in the batch is a [`Outcome::Gap`], and the rest
/// go on. The outcomes come back in the events' order.
///
/// The locks are those of [`apply`]: the swap lock (shared), then every aggregate's lock, taken
/// in one order (by key), so two batches sharing aggregates (two instances on one durable
/// consumer) never wait on each other in a circle. When any event fails, nothing is applied
/// and the error is returned: the caller applies them one by one, to set aside only the one
/// that fails.
pub async fn apply_batch(
    pool: &PgPool,
    projection: &dyn Projection,
    events: &[(&EventEnvelope, u64)],
) -> Result<Vec<Outcome>, sqlx::Error> {
    use std::collections::BTreeMap;
    let mut outcomes = vec![Outcome::Ignored; events.len()];
    // Per aggregate: the last sequence applied (from the offsets, then as the batch goes).
    let mut last: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for (e, _) in events
        .iter()
        .filter(|(e, _)| projection.wants(&e.aggregate_type))
    {
        last.insert((e.aggregate_type.as_str(), e.aggregate_id.as_str()), 0);
    }
    if last.is_empty() {
        return Ok(outcomes);
    }
    let (types, ids): (Vec<&str>, Vec<&str>) = last.keys().copied().unzip();
    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "SELECT pg_advisory_xact_lock_shared({SWAP_LOCK_KEY})"
    ))
    .bind(projection.name())
    .execute(&mut *tx)
    .await?;
    // The inner query sorts, and `OFFSET 0` keeps the planner from evaluating the locks before
    // the sort: they are taken in key order.
    sqlx::query(&format!(
        "SELECT pg_advisory_xact_lock(k) FROM (
             SELECT DISTINCT {AGGREGATE_LOCK_KEY} AS k
               FROM unnest($2::text[], $3::text[]) AS u(t, i)
              ORDER BY k OFFSET 0) AS keys"
    ))
    .bind(projection.name())
    .bind(&types)
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    // After the locks: this statement sees every commit of whoever held them before.
    let applied: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT o.aggregate_type, o.aggregate_id, o.sequence
           FROM projection_offsets o
           JOIN unnest($2::text[], $3::text[]) AS u(t, i)
             ON o.aggregate_type = u.t AND o.aggregate_id = u.i
          WHERE o.projection = $1",
    )
    .bind(projection.name())
    .bind(&types)
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    for (t, i, sequence) in &applied {
        if let Some(at) = last.get_mut(&(t.as_str(), i.as_str())) {
            *at = *sequence as u64;
        }
    }
    let mut moved: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let mut highest = 0u64;
    let mut count = 0i64;
    // The events to apply, in delivery order (each the next of its aggregate), written
    // together by `apply_all` once the batch is sorted out.
    let mut due: Vec<&EventEnvelope> = Vec::with_capacity(events.len());
    for (n, (e, stream_sequence)) in events.iter().enumerate() {
        let key = (e.aggregate_type.as_str(), e.aggregate_id.as_str());
        let Some(at) = last.get_mut(&key) else {
            continue; // not an aggregate type it reads
        };
        if e.sequence <= *at {
            outcomes[n] = Outcome::AlreadyApplied;
            continue;
        }
        if e.sequence > *at + 1 {
            outcomes[n] = Outcome::Gap { expected: *at + 1 };
            continue;
        }
        outcomes[n] = if e.is_known() {
            due.push(e);
            Outcome::Applied
        } else {
            tracing::warn!(event = %e.event_id(), event_type = %e.event_type, "unknown event type skipped");
            metrics::counter!("cmb_projection_unknown_events_total", "projection" => projection.name(), "event_type" => e.event_type.clone()).increment(1);
            Outcome::Unknown
        };
        *at = e.sequence;
        moved.insert(key, e.sequence);
        highest = highest.max(*stream_sequence);
        count += 1;
    }
    if moved.is_empty() {
        // Nothing to write: duplicates and gaps only.
        tx.rollback().await?;
        return Ok(outcomes);
    }
    if !due.is_empty() {
        projection.apply_all(&mut tx, &due).await?;
    }
    let (types, rest): (Vec<&str>, Vec<(&str, i64)>) = moved
        .iter()
        .map(|((t, i), s)| (*t, (*i, *s as i64)))
        .unzip();
    let (ids, sequences): (Vec<&str>, Vec<i64>) = rest.into_iter().unzip();
    // The offsets and the status in one statement (one round trip).
    sqlx::query(
        "WITH offsets AS (
              INSERT INTO projection_offsets (projection, aggregate_type, aggregate_id, sequence)
              SELECT $1, t, i, s FROM unnest($2::text[], $3::text[], $4::bigint[]) AS u(t, i, s)
              ON CONFLICT (projection, aggregate_type, aggregate_id) DO UPDATE SET sequence = EXCLUDED.sequence)
         INSERT INTO projection_status (projection, stream_sequence, events_applied, updated_at)
         VALUES ($1, $5, $6, now())
         ON CONFLICT (projection) DO UPDATE
            SET stream_sequence = GREATEST(projection_status.stream_sequence, EXCLUDED.stream_sequence),
                events_applied = projection_status.events_applied + EXCLUDED.events_applied,
                updated_at = now()",
    )
    .bind(projection.name())
    .bind(&types)
    .bind(&ids)
    .bind(&sequences)
    .bind(highest as i64)
    .bind(count)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(outcomes)
}

/// Empties a projection's tables and offsets, for a rebuild from the first event.
pub async fn reset(pool: &PgPool, projection: &dyn Projection) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for table in projection.tables() {
        // Table names come from the projection's own constant list, never from input.
        sqlx::query(&format!("TRUNCATE {table}"))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("DELETE FROM projection_offsets WHERE projection = $1")
        .bind(projection.name())
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM projection_status WHERE projection = $1")
        .bind(projection.name())
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Every projection the service maintains.
pub fn all() -> Vec<std::sync::Arc<dyn Projection>> {
    vec![
        std::sync::Arc::new(timeline::Timeline),
        std::sync::Arc::new(personas::Personas),
        std::sync::Arc::new(accounts::Users),
        std::sync::Arc::new(accounts::Contacts),
        std::sync::Arc::new(accounts::Preferences),
        std::sync::Arc::new(accounts::Wallets),
        std::sync::Arc::new(calls::Calls),
        std::sync::Arc::new(memory::MemoryProjection),
    ]
}

/// The projection called `name`.
pub fn by_name(name: &str) -> Option<std::sync::Arc<dyn Projection>> {
    all().into_iter().find(|p| p.name() == name)
}
