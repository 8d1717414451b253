//! Poison messages: an event a consumer keeps failing on is set aside after a bounded number
//! of deliveries (in `dead_letters`, with the error), so the other aggregates move on; an
//! event that cannot even be decoded is set aside at once, body and all — never acknowledged
//! and forgotten.
//!
//! For a projection, an aggregate's later events wait behind its set-aside one (applying them
//! would skip it): they are set aside too, and go back in stream order. `callmeback dlq retry`
//! marks letters `retry`; every running instance's consumer of that name picks them up
//! ([`redrive`]), fetches the message from the stream by its sequence and handles it again.
//!
//! Failures of the infrastructure (Postgres unreachable, the pool exhausted, a deadlock) are
//! not the event's fault: they are retried without limit and never set an event aside.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use cmb_domain::EventEnvelope;
use sqlx::PgPool;

/// Deliveries after which a failing event is set aside (the first try included).
pub const MAX_DELIVERIES: i64 = 6;

/// Whether a database error says something about the event (worth setting aside after a few
/// tries) or only about the database (retry, however long it takes).
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // Connection, resources, operator intervention, serialization and deadlock,
            // lock timeouts and cancels.
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57")
                || code.starts_with("40")
                || code == "55P03"
        }),
        _ => false,
    }
}

/// One set-aside message.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct Letter {
    pub id: i64,
    pub consumer: String,
    pub stream_sequence: i64,
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub sequence: Option<i64>,
    pub event_type: Option<String>,
    pub deliveries: i32,
    pub error: String,
    pub status: String,
    pub parked_at: chrono::DateTime<chrono::Utc>,
}

/// What is known of the message being set aside.
pub struct Parked<'a> {
    pub consumer: &'a str,
    pub stream_sequence: u64,
    pub event: Option<&'a EventEnvelope>,
    pub headers: Option<&'a HeaderMap>,
    /// Kept only when the event could not be decoded.
    pub body: Option<&'a [u8]>,
    pub deliveries: i64,
    pub error: &'a str,
    /// Set aside already marked for another try (behind a letter that is being retried).
    pub retry: bool,
}

/// Sets a message aside (again: a retried letter that failed goes back to `parked`).
pub async fn park(pool: &PgPool, p: Parked<'_>) -> Result<(), sqlx::Error> {
    let header = |name: &str| {
        p.headers
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    };
    let (aggregate_type, aggregate_id, sequence, event_type) = match p.event {
        Some(e) => (
            Some(e.aggregate_type.clone()),
            Some(e.aggregate_id.clone()),
            Some(e.sequence as i64),
            Some(e.event_type.clone()),
        ),
        None => {
            let named = p.headers.and_then(cmb_nats::contract::aggregate_of);
            let (t, id, sequence) = match named {
                Some((t, id, sequence)) => (Some(t), Some(id), i64::try_from(sequence).ok()),
                None => (None, None, None),
            };
            (t, id, sequence, header(cmb_nats::contract::EVENT_TYPE))
        }
    };
    sqlx::query(
        "INSERT INTO dead_letters (consumer, stream_sequence, aggregate_type, aggregate_id,
                                   sequence, event_type, deliveries, error, body, status)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (consumer, stream_sequence) DO UPDATE
            SET status = EXCLUDED.status, error = EXCLUDED.error, updated_at = now(),
                deliveries = dead_letters.deliveries + EXCLUDED.deliveries,
                claimed_until = NULL",
    )
    .bind(p.consumer)
    .bind(p.stream_sequence as i64)
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(sequence)
    .bind(event_type)
    .bind(p.deliveries as i32)
    .bind(p.error)
    .bind(p.body)
    .bind(if p.retry { "retry" } else { "parked" })
    .execute(pool)
    .await?;
    metrics::counter!("cmb_dead_letters_total", "consumer" => p.consumer.to_string()).increment(1);
    tracing::error!(
        consumer = p.consumer,
        stream_sequence = p.stream_sequence,
        event = p.event.map(|e| e.event_id()),
        deliveries = p.deliveries,
        error = p.error,
        "event set aside (dead letter); `callmeback dlq list` shows it"
    );
    Ok(())
}

/// An earlier event of the same aggregate that `consumer` has set aside.
pub struct Blocker {
    /// Why the event waits, for its own letter.
    pub reason: String,
    /// The blocker is being retried: the waiting event goes back with it.
    pub retrying: bool,
}

/// Whether `consumer` has an event of this aggregate set aside (its later events wait).
pub async fn blocker(
    pool: &PgPool,
    consumer: &str,
    event: &EventEnvelope,
) -> Result<Option<Blocker>, sqlx::Error> {
    let row: Option<(i64, Option<i64>, bool)> = sqlx::query_as(
        "SELECT min(stream_sequence), min(sequence), bool_or(status = 'retry')
           FROM dead_letters
          WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3
            AND status <> 'resolved'
         HAVING count(*) > 0",
    )
    .bind(consumer)
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(stream_sequence, sequence, retrying)| Blocker {
        reason: format!(
            "waiting behind {}:{}:{} (stream sequence {stream_sequence}), set aside",
            event.aggregate_type,
            event.aggregate_id,
            sequence.unwrap_or_default()
        ),
        retrying,
    }))
}

/// Open letters per consumer (for `/readyz` and the gauge).
pub async fn open_counts(pool: &PgPool) -> Result<BTreeMap<String, i64>, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT consumer, count(*) FROM dead_letters WHERE status <> 'resolved' GROUP BY consumer",
    )
    .fetch_all(pool)
    .await?;
    for (consumer, n) in &rows {
        metrics::gauge!("cmb_dead_letters_open", "consumer" => consumer.clone()).set(*n as f64);
    }
    Ok(rows.into_iter().collect())
}

/// Letters, newest first (`status` = None: every open one).
pub async fn list(pool: &PgPool, include_resolved: bool) -> Result<Vec<Letter>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, consumer, stream_sequence, aggregate_type, aggregate_id, sequence, event_type,
                deliveries, error, status, parked_at
           FROM dead_letters
          WHERE $1 OR status <> 'resolved'
          ORDER BY consumer, stream_sequence",
    )
    .bind(include_resolved)
    .fetch_all(pool)
    .await
}

/// Marks letters for another try: the given ids, or every parked one (of `consumer`, if
/// given). Returns how many.
pub async fn mark_retry(
    pool: &PgPool,
    ids: &[i64],
    consumer: Option<&str>,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE dead_letters SET status = 'retry', claimed_until = NULL, updated_at = now()
          WHERE status = 'parked'
            AND (cardinality($1::bigint[]) = 0 OR id = ANY($1))
            AND ($2::text IS NULL OR consumer = $2)",
    )
    .bind(ids)
    .bind(consumer)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Takes the next letter of `consumer` marked `retry` (the lowest stream sequence, so an
/// aggregate's letters go back in order), for a minute: another instance takes it over if this
/// one dies meanwhile.
async fn claim(pool: &PgPool, consumer: &str) -> Result<Option<(i64, u64)>, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "UPDATE dead_letters SET claimed_until = now() + interval '60 seconds'
          WHERE id = (SELECT id FROM dead_letters
                       WHERE consumer = $1 AND status = 'retry'
                         AND (claimed_until IS NULL OR claimed_until < now())
                       ORDER BY stream_sequence
                       LIMIT 1
                       FOR UPDATE SKIP LOCKED)
          RETURNING id, stream_sequence",
    )
    .bind(consumer)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(id, seq)| (id, seq as u64)))
}

async fn resolve(pool: &PgPool, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE dead_letters SET status = 'resolved', claimed_until = NULL, updated_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

async fn repark(pool: &PgPool, id: i64, error: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE dead_letters
            SET status = 'parked', error = $2, deliveries = deliveries + 1,
                claimed_until = NULL, updated_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// How a handler judged a redriven event.
pub enum Redriven {
    Done,
    /// It still fails (or still waits behind another letter): set aside again, with why.
    Failed(String),
}

/// Re-handles `consumer`'s letters marked `retry`, one at a time in stream order, until none
/// is left. Called by each consumer loop every few seconds.
pub async fn redrive<F, Fut>(
    pool: &PgPool,
    stream: &jetstream::stream::Stream,
    consumer: &str,
    mut handle: F,
) -> Result<u64, async_nats::Error>
where
    F: FnMut(u64, EventEnvelope) -> Fut,
    Fut: Future<Output = Redriven>,
{
    let mut done = 0;
    while let Some((id, stream_sequence)) = claim(pool, consumer).await? {
        let message = match stream.get_raw_message(stream_sequence).await {
            Ok(m) => m,
            Err(e) => {
                repark(pool, id, &format!("not on the stream any more: {e}")).await?;
                continue;
            }
        };
        let event = match cmb_nats::contract::decode_body(&message.payload) {
            Ok(e) => e,
            Err(e) => {
                repark(pool, id, &format!("cannot be decoded: {e}")).await?;
                continue;
            }
        };
        match handle(stream_sequence, event).await {
            Redriven::Done => {
                resolve(pool, id).await?;
                done += 1;
            }
            Redriven::Failed(error) => repark(pool, id, &error).await?,
        }
    }
    Ok(done)
}

/// How often a consumer loop looks for letters marked `retry`.
pub const REDRIVE_EVERY: Duration = Duration::from_secs(2);
