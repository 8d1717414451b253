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
