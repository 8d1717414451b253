//! Writing a command's events: encoded once ([`encode_rows`]), appended in one statement
//! ([`insert_rows`]), and committed together with the commands of concurrent callers
//! ([`Committer`]: group commit in the process); and the store's own errors ([`StoreError`],
//! [`overloaded`]).

use std::sync::Arc;

use cmb_domain::CommandContext;
use cqrs_es::{Aggregate, DomainEvent as _};
use sqlx::PgPool;

use crate::backbone::keys::Keyring;

/// The event store's own failure (not a refusal, not overload), with its cause.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("reading {aggregate}:{id}'s events")]
    Read {
        aggregate: &'static str,
        id: String,
        #[source]
        source: cqrs_es::persist::PersistenceError,
    },
    #[error("opening {aggregate}:{id}'s personal fields")]
    Open {
        aggregate: &'static str,
        id: String,
        #[source]
        source: crate::backbone::keys::KeyError,
    },
    #[error("decoding {aggregate}:{id}:{sequence} {event_type}")]
    Decode {
        aggregate: &'static str,
        id: String,
        sequence: usize,
        event_type: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("encoding an event of {aggregate}:{id}")]
    Encode {
        aggregate: &'static str,
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("sealing {aggregate}:{id}'s personal fields")]
    Seal {
        aggregate: &'static str,
        id: String,
        #[source]
        source: crate::backbone::keys::KeyError,
    },
    /// Writing the events, or a table a command keeps beside them.
    #[error("Postgres")]
    Postgres(#[from] sqlx::Error),
}

/// Whether Postgres, or our pool of connections to it, had no room for a request in time
/// (`PoolTimedOut`, `too_many_connections`, `cannot_connect_now`, `configuration_limit_exceeded`):
/// overload, which a client should retry later, rather than a fault.
pub fn overloaded(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(d) => {
            matches!(d.code().as_deref(), Some("53300" | "57P03" | "53400"))
        }
        _ => false,
    }
}

/// Why a command's events were not written.
pub(super) enum Insert {
    /// Another writer took one of their sequence numbers first.
    Conflict,
    /// Postgres had no room in time ([`overloaded`]).
    Busy(String),
    Failed(StoreError),
}

/// A command's events, encoded, to append after sequence `before` of aggregate `id`.
pub(super) struct Rows {
    aggregate_type: &'static str,
    id: String,
    before: u64,
    types: Vec<String>,
    versions: Vec<String>,
    payloads: Vec<String>,
    /// The command's metadata as JSON text (every event of the command carries it).
    metadata: String,
}

/// Encodes a command's events: each serialised once, straight to the JSON text Postgres
/// stores (personal fields sealed first).
pub(super) async fn encode_rows<A: Aggregate>(
    keys: &Keyring,
    id: &str,
    before: u64,
    events: &[A::Event],
    ctx: &CommandContext,
) -> Result<Rows, Insert> {
    let encode = |source| {
        Insert::Failed(StoreError::Encode {
            aggregate: A::TYPE,
            id: id.to_string(),
            source,
        })
    };
    let mut types = Vec::with_capacity(events.len());
    let mut versions = Vec::with_capacity(events.len());
    let mut payloads = Vec::with_capacity(events.len());
    for event in events {
        let event_type = event.event_type();
        let payload = if cmb_domain::privacy::is_personal(A::TYPE, &event_type) {
            let mut value = serde_json::to_value(event).map_err(encode)?;
            keys.seal(A::TYPE, id, &event_type, &mut value)
                .await
                .map_err(|source| {
                    Insert::Failed(StoreError::Seal {
                        aggregate: A::TYPE,
                        id: id.to_string(),
                        source,
                    })
                })?;
            value.to_string()
        } else {
            serde_json::to_string(event).map_err(encode)?
        };
        types.push(event_type);
        versions.push(event.event_version());
        payloads.push(payload);
    }
    let metadata = serde_json::to_string(&ctx.to_metadata()).map_err(encode)?;
    Ok(Rows {
        aggregate_type: A::TYPE,
        id: id.to_string(),
        before,
        types,
        versions,
        payloads,
        metadata,
    })
}

/// Appends the events of one or more commands in one statement (so one round trip, one
/// transaction, one wait for the log's flush): each command's events after its sequence
/// `before`, in order. The primary key refuses a sequence another writer took, which fails
/// the whole statement (nothing of it is written).
pub(super) async fn insert_rows(pool: &PgPool, commands: &[&Rows]) -> Result<(), sqlx::Error> {
    let n: usize = commands.iter().map(|c| c.types.len()).sum();
    let mut aggregate_types = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    let mut sequences = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut metadata = Vec::with_capacity(n);
    for c in commands {
        for (i, ((t, v), p)) in c.types.iter().zip(&c.versions).zip(&c.payloads).enumerate() {
            aggregate_types.push(c.aggregate_type);
            ids.push(c.id.as_str());
            sequences.push((c.before + 1 + i as u64) as i64);
            types.push(t.as_str());
            versions.push(v.as_str());
            payloads.push(p.as_str());
            metadata.push(c.metadata.as_str());
        }
    }
    sqlx::query(
        "INSERT INTO events
                (aggregate_type, aggregate_id, sequence, event_type, event_version, payload,
                 metadata)
         SELECT a, i, s, t, v, p::jsonb, m::json
           FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                       $6::text[], $7::text[]) WITH ORDINALITY AS u(a, i, s, t, v, p, m, n)
          ORDER BY n",
    )
    .bind(&aggregate_types)
    .bind(&ids)
    .bind(&sequences)
    .bind(&types)
    .bind(&versions)
    .bind(&payloads)
    .bind(&metadata)
    .execute(pool)
    .await?;
    Ok(())
}

/// What a statement's failure means for the commands in it.
pub(super) fn insert_failure(e: sqlx::Error) -> Insert {
    match e {
        sqlx::Error::Database(e) if e.code().as_deref() == Some("23505") => Insert::Conflict,
        e if overloaded(&e) => Insert::Busy(e.to_string()),
        e => Insert::Failed(e.into()),
    }
}

/// Commits the commands of concurrent callers together: each command's events are queued,
/// and whatever has queued while the statements before it were running goes out as one
/// statement ([`insert_rows`]) — group commit in the process: they share a transaction, a
/// commit and a wait for the log's flush. In `bench events` (16 concurrent writers) that took
/// Postgres's CPU per command from 0.75 to 0.31 ms (README "Benchmarks", `bench events`).
///
/// Nothing of a command's meaning changes: its events are written all or none, after the
/// sequence it was decided on. A statement holding several commands that fails (one of them
/// lost an optimistic-concurrency race, say) wrote nothing; each of its commands is then
/// written by a statement of its own, so only the loser sees the conflict. A caller that
/// stops waiting does not stop its command's statement (it runs on a task of its own), as a
/// dropped single statement would have committed or not anyway.
pub(super) struct Committer {
    queue: tokio::sync::mpsc::UnboundedSender<Queued>,
}

struct Queued {
    rows: Rows,
    done: tokio::sync::oneshot::Sender<Result<(), Insert>>,
}

/// Statements of queued commands in flight at once: while one waits for the log's flush,
/// the next gathers what arrives.
const COMMITTING: usize = 2;

/// Events in one statement at most.
const BATCH_EVENTS: usize = 256;

impl Committer {
    /// Starts the committer on the current runtime (`None` outside one: each command then
    /// writes its own statement).
    pub(super) fn start(pool: &PgPool) -> Option<Committer> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (queue, mut queued) = tokio::sync::mpsc::unbounded_channel::<Queued>();
        let pool = pool.clone();
        runtime.spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(COMMITTING));
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let Some(first) = queued.recv().await else {
                    return;
                };
                let mut events = first.rows.types.len();
                let mut batch = vec![first];
                while events < BATCH_EVENTS {
                    match queued.try_recv() {
                        Ok(next) => {
                            events += next.rows.types.len();
                            batch.push(next);
                        }
                        Err(_) => break,
                    }
                }
                let pool = pool.clone();
                tokio::spawn(async move {
                    commit_together(&pool, batch).await;
                    drop(slot);
                });
            }
        });
        Some(Committer { queue })
    }

    /// Queues `rows` and waits for their statement; `Err(rows)` if the committer has stopped
    /// (its runtime shut down).
    pub(super) async fn commit(&self, rows: Rows) -> Result<Result<(), Insert>, Rows> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        if let Err(back) = self.queue.send(Queued { rows, done }) {
            return Err(back.0.rows);
        }
        Ok(outcome.await.unwrap_or_else(|_| {
            Err(Insert::Busy(
                "the event store's committer stopped before answering".into(),
            ))
        }))
    }
}

/// Writes `batch` in one statement; if that fails with more than one command in it, each
/// command in a statement of its own (concurrently), so each gets its own answer.
async fn commit_together(pool: &PgPool, batch: Vec<Queued>) {
    let all: Vec<&Rows> = batch.iter().map(|q| &q.rows).collect();
    let together = insert_rows(pool, &all).await;
    metrics::histogram!("cmb_event_commit_batch_commands").record(batch.len() as f64);
    match together {
        Ok(()) => {
            for q in batch {
                let _ = q.done.send(Ok(()));
            }
        }
        Err(e) if batch.len() == 1 => {
            let q = batch.into_iter().next().expect("one command");
            let _ = q.done.send(Err(insert_failure(e)));
        }
        Err(e) if overloaded(&e) => {
            let busy = e.to_string();
            for q in batch {
                let _ = q.done.send(Err(Insert::Busy(busy.clone())));
            }
        }
        Err(_) => {
            futures::future::join_all(batch.into_iter().map(|q| async move {
                let alone = insert_rows(pool, &[&q.rows]).await.map_err(insert_failure);
                let _ = q.done.send(alone);
            }))
            .await;
        }
    }
}
