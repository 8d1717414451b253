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
use cqrs_es::Aggregate;
use postgres_es::PostgresEventRepository;
use sqlx::PgPool;

use super::keys::{self, Keyring};

mod commit;
use commit::{encode_rows, insert_failure, insert_rows, Committer, Insert};
pub use commit::{overloaded, StoreError};

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
