//! The command path: load an aggregate from the Postgres event store (postgres-es's
//! repository reads it), let it decide, commit its events with the command's metadata in one
//! statement of our own, retrying on a concurrent writer.
//!
//! Personal fields are sealed on the way in and opened on the way out ([`super::keys`]), so
//! the aggregates decide on clear values and the log holds none.
//!
//! cqrs-es's `CqrsFramework` would also dispatch in-process `Query`s after the commit; we do
//! not use those (a crash loses them): every read model and worker is fed from JetStream.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cmb_domain::events::StoreUpcaster;
use cmb_domain::CommandContext;
use cqrs_es::persist::{EventUpcaster as _, PersistedEventRepository as _};
use cqrs_es::{Aggregate, DomainEvent as _};
use postgres_es::PostgresEventRepository;
use sqlx::PgPool;

use super::keys::{self, Keyring};

/// What a successful command wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub aggregate_type: &'static str,
    pub aggregate_id: String,
    /// The aggregate's last sequence after the command (unchanged if it wrote nothing).
    pub sequence: u64,
    pub events: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError<E: std::error::Error> {
    /// The aggregate refused the command.
    #[error(transparent)]
    Rejected(E),
    /// Other writers kept winning the race for this aggregate.
    #[error("the {0} was changed concurrently too often; try again")]
    Contended(&'static str),
    /// Postgres had no room for the request in time (pool timeout, too many connections):
    /// worth a retry, not a failure of ours.
    #[error("the event store is busy: {0}")]
    Busy(String),
    #[error("event store")]
    Store(#[source] StoreError),
}

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
        source: super::keys::KeyError,
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
        source: super::keys::KeyError,
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

/// The same for postgres-es's errors, which box the sqlx error they met.
fn persistence_overloaded(e: &cqrs_es::persist::PersistenceError) -> bool {
    use cqrs_es::persist::PersistenceError::{ConnectionError, UnknownError};
    match e {
        ConnectionError(inner) | UnknownError(inner) => {
            inner.downcast_ref::<sqlx::Error>().is_some_and(overloaded)
        }
        _ => false,
    }
}

/// Why a command's events were not written.
enum Insert {
    /// Another writer took one of their sequence numbers first.
    Conflict,
    /// Postgres had no room in time ([`overloaded`]).
    Busy(String),
    Failed(StoreError),
}

/// A command's events, encoded, to append after sequence `before` of aggregate `id`.
struct Rows {
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
async fn encode_rows<A: Aggregate>(
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
async fn insert_rows(pool: &PgPool, commands: &[&Rows]) -> Result<(), sqlx::Error> {
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
fn insert_failure(e: sqlx::Error) -> Insert {
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
struct Committer {
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
    fn start(pool: &PgPool) -> Option<Committer> {
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
    async fn commit(&self, rows: Rows) -> Result<Result<(), Insert>, Rows> {
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

/// How many times a command is re-decided after losing an optimistic-concurrency race.
const CONFLICT_RETRIES: usize = 8;

/// The states aggregates were left in by this store's last successful commands, so the next
/// command on one decides without reading its events again (one statement per command, not
/// two). Only a commit proves a kept state current: the insert after sequence `n` is refused
/// if any event `n + 1` exists (written by another instance, or by anything else), so a stale
/// state costs a re-decision on the stored events, never a wrong write; a command a kept state
/// refuses, or finds nothing to do, is decided again on the stored events too. A state is
/// kept at most [`keys::LIVE_FOR`] (the bound on another instance's erasures the data keys'
/// cache already has) and dropped by an erasure in this process ([`keys::erasures`]).
#[derive(Default)]
struct Kept {
    states: Mutex<HashMap<(&'static str, String), KeptState>>,
}

struct KeptState {
    aggregate: Box<dyn Any + Send>,
    sequence: u64,
    at: Instant,
    erasures: u64,
}

/// Aggregates kept at most (a bound on memory: a state is a few kilobytes at most); at the
/// bound, those kept longer than half of [`keys::LIVE_FOR`] go, and all of them if that is
/// not enough.
const KEPT_MAX: usize = 4_096;

impl Kept {
    /// Takes aggregate `id`'s kept state (a concurrent command on it reads the store).
    fn take<A: Aggregate + 'static>(&self, id: &str) -> Option<(A, u64)> {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let kept = states.remove(&(A::TYPE, id.to_string()))?;
        if kept.at.elapsed() >= keys::LIVE_FOR || kept.erasures != keys::erasures() {
            return None;
        }
        let aggregate = kept.aggregate.downcast::<A>().ok()?;
        Some((*aggregate, kept.sequence))
    }

    fn keep<A: Aggregate + 'static>(&self, id: &str, aggregate: A, sequence: u64) {
        let erasures = keys::erasures();
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        if states.len() >= KEPT_MAX {
            let now = Instant::now();
            states.retain(|_, k| now.duration_since(k.at) < keys::LIVE_FOR / 2);
            if states.len() >= KEPT_MAX {
                states.clear();
            }
        }
        states.insert(
            (A::TYPE, id.to_string()),
            KeptState {
                aggregate: Box::new(aggregate),
                sequence,
                at: Instant::now(),
                erasures,
            },
        );
    }
}

#[derive(Clone)]
pub struct EventStore {
    pool: PgPool,
    keys: Keyring,
    /// postgres-es's reader of the `events` table (an aggregate's events in order).
    repository: Arc<PostgresEventRepository>,
    kept: Arc<Kept>,
    /// Commits concurrent commands together ([`Committer`]); `None` when made outside a
    /// runtime.
    committer: Option<Arc<Committer>>,
}

impl EventStore {
    pub fn new(pool: PgPool) -> Self {
        EventStore {
            keys: Keyring::new(pool.clone()),
            repository: Arc::new(PostgresEventRepository::new(pool.clone())),
            kept: Default::default(),
            committer: Committer::start(&pool).map(Arc::new),
            pool,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The data keys personal fields are sealed with.
    pub fn keys(&self) -> &Keyring {
        &self.keys
    }

    /// Appends a command's events after sequence `before` of aggregate `id`, with the
    /// commands committing at the same time ([`Committer`]).
    async fn append<A: Aggregate>(
        &self,
        id: &str,
        before: u64,
        events: &[A::Event],
        ctx: &CommandContext,
    ) -> Result<(), Insert> {
        let rows = encode_rows::<A>(&self.keys, id, before, events, ctx).await?;
        let rows = match &self.committer {
            Some(committer) => match committer.commit(rows).await {
                Ok(outcome) => return outcome,
                Err(rows) => rows,
            },
            None => rows,
        };
        insert_rows(&self.pool, &[&rows])
            .await
            .map_err(insert_failure)
    }

    /// The aggregate's current state and sequence, straight from the event store (consistent,
    /// unlike a read model): its events read by postgres-es's repository, each opened
    /// ([`Keyring::open`]), upcast ([`StoreUpcaster`], the same upcasters the stream's readers
    /// use), decoded and applied in order.
    pub async fn load<A: Aggregate>(&self, id: &str) -> Result<(A, u64), CommandError<A::Error>> {
        let events = self.repository.get_events::<A>(id).await.map_err(|e| {
            if persistence_overloaded(&e) {
                CommandError::Busy(e.to_string())
            } else {
                CommandError::Store(StoreError::Read {
                    aggregate: A::TYPE,
                    id: id.to_string(),
                    source: e,
                })
            }
        })?;
        let mut aggregate = A::default();
        let mut sequence = 0;
        for mut event in events {
            self.keys
                .open(A::TYPE, id, &event.event_type, &mut event.payload)
                .await
                .map_err(|source| {
                    CommandError::Store(StoreError::Open {
                        aggregate: A::TYPE,
                        id: id.to_string(),
                        source,
                    })
                })?;
            if StoreUpcaster.can_upcast(&event.event_type, &event.event_version) {
                event = StoreUpcaster.upcast(event);
            }
            let decoded: A::Event = serde_json::from_value(event.payload).map_err(|source| {
                CommandError::Store(StoreError::Decode {
                    aggregate: A::TYPE,
                    id: id.to_string(),
                    sequence: event.sequence,
                    event_type: event.event_type.clone(),
                    source,
                })
            })?;
            aggregate.apply(decoded);
            sequence = event.sequence as u64;
        }
        Ok((aggregate, sequence))
    }

    /// Runs `command` against aggregate `id` and commits what it decides: on the state this
    /// store's last command on it left ([`Kept`]) when there is one, else on its stored events.
    pub async fn execute<A>(
        &self,
        id: &str,
        command: A::Command,
        ctx: &CommandContext,
    ) -> Result<Committed, CommandError<A::Error>>
    where
        A: Aggregate<Services = ()> + 'static,
        A::Command: Clone,
    {
        let mut attempt = 0;
        let mut kept = self.kept.take::<A>(id);
        loop {
            let from_kept = kept.is_some();
            let (mut aggregate, before) = match kept.take() {
                Some(kept) => kept,
                None => self.load::<A>(id).await?,
            };
            let sink = cqrs_es::event_sink::EventSink::default();
            if let Err(e) = aggregate.handle(command.clone(), &(), &sink).await {
                if from_kept {
                    // Refused on a kept state: decided again on the stored events.
                    continue;
                }
                return Err(CommandError::Rejected(e));
            }
            let events = sink.collect().await;
            let count = events.len();
            if count == 0 {
                if from_kept {
                    continue;
                }
                self.kept.keep(id, aggregate, before);
                return Ok(Committed {
                    aggregate_type: A::TYPE,
                    aggregate_id: id.to_string(),
                    sequence: before,
                    events: 0,
                });
            }
            match self.append::<A>(id, before, &events, ctx).await {
                Ok(()) => {
                    metrics::counter!("cmb_events_committed_total", "aggregate" => A::TYPE)
                        .increment(count as u64);
                    let sequence = before + count as u64;
                    self.kept.keep(id, aggregate, sequence);
                    return Ok(Committed {
                        aggregate_type: A::TYPE,
                        aggregate_id: id.to_string(),
                        sequence,
                        events: count,
                    });
                }
                // The kept state was behind the store: decided again on its events at once.
                Err(Insert::Conflict) if from_kept => {}
                Err(Insert::Conflict) if attempt < CONFLICT_RETRIES => {
                    attempt += 1;
                    // Back off a little, with jitter, so hot aggregates stop colliding.
                    let jitter = rand::random::<u64>() % (2 << attempt.min(6));
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Err(Insert::Conflict) => return Err(CommandError::Contended(A::TYPE)),
                Err(Insert::Busy(e)) => return Err(CommandError::Busy(e)),
                Err(Insert::Failed(e)) => return Err(CommandError::Store(e)),
            }
        }
    }

    /// Waits (up to `timeout`) until `projection` has applied `committed`, so a client that
    /// reads right after writing sees its write. Returns whether it caught up.
    pub async fn wait_projected(
        &self,
        projection: &str,
        committed: &Committed,
        timeout: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let seq: Option<i64> = sqlx::query_scalar(
                "SELECT sequence FROM projection_offsets
                  WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id = $3",
            )
            .bind(projection)
            .bind(committed.aggregate_type)
            .bind(&committed.aggregate_id)
            .fetch_optional(&self.pool)
            .await
            .ok()
            .flatten();
            if seq.unwrap_or(0) as u64 >= committed.sequence {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(projection, aggregate = %committed.aggregate_id, "read model lags");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
}
