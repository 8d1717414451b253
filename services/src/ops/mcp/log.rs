//! Where the MCP tools read the event log: the Postgres event store (default; one
//! repeatable-read, read-only snapshot in commit order) or the JetStream stream. Reports are
//! made by `replay reconcile`'s own functions (added up in SQL, or read from the stream by
//! parallel consumers), so the tools answer what `callmeback replay …` answers; the events of a
//! call, a type or a time range are read narrowed where the log is.

use chrono::{DateTime, Utc};
use cmb_domain::EventEnvelope;
use sqlx::PgPool;

use crate::ops::reconcile::{self, Filter, Report};

/// Which copy of the log the tools read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Postgres,
    Nats,
}

impl std::str::FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "postgres" => Ok(Source::Postgres),
            "nats" => Ok(Source::Nats),
            other => Err(format!("--source: postgres or nats, not {other:?}")),
        }
    }
}

/// The event log, as the tools read it.
#[derive(Clone)]
pub struct Log {
    pub pool: PgPool,
    pub js: async_nats::jetstream::Context,
    pub stream: cmb_nats::StreamSettings,
    /// For the stream's parallel readers, each on a connection of its own.
    pub nats_url: String,
    pub source: Source,
}

/// What part of the log a read needs, narrowed where the log is (a `WHERE` on the event
/// store's key and `recorded_at` index, a subject filter on the stream), so a question about one
/// call or one kind of aggregate does not read everything.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub aggregate_type: Option<String>,
    /// Only with `aggregate_type`.
    pub aggregate_id: Option<String>,
    /// Only events of this type (`CallRequested`, …).
    pub event_type: Option<String>,
    /// Recorded in `[from, to)`.
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

impl Scope {
    pub fn of_type(aggregate_type: &str) -> Scope {
        Scope {
            aggregate_type: Some(aggregate_type.into()),
            ..Scope::default()
        }
    }

    pub fn aggregate(aggregate_type: &str, id: &str) -> Scope {
        Scope {
            aggregate_id: Some(id.into()),
            ..Scope::of_type(aggregate_type)
        }
    }

    fn keeps(&self, e: &EventEnvelope) -> bool {
        self.aggregate_type
            .as_ref()
            .is_none_or(|t| &e.aggregate_type == t)
            && self
                .aggregate_id
                .as_ref()
                .is_none_or(|i| &e.aggregate_id == i)
            && self.from.is_none_or(|f| e.occurred_at >= f)
            && self.to.is_none_or(|t| e.occurred_at < t)
    }
}

/// Why a read of the log stopped.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("reading the event store")]
    Db(#[from] sqlx::Error),
    #[error("reading the stream")]
    Stream(#[source] async_nats::Error),
    #[error("reading the stream")]
    Replay(#[from] cmb_nats::replay::ReplayError),
    #[error("the log's reader died")]
    Reader(#[from] tokio::task::JoinError),
}

/// Events per query of a Postgres read.
const BATCH: i64 = 5000;

/// The events of `scope` from the event store in commit order (the stream's order), every
/// event committed when the read starts: one repeatable-read, read-only snapshot.
async fn from_store(
    pool: &PgPool,
    scope: Scope,
    tx: tokio::sync::mpsc::Sender<EventEnvelope>,
) -> Result<(), LogError> {
    use crate::backbone::outbox::{envelope_from_row, CommitPosition, SELECT_ENVELOPE};
    let mut db = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *db)
        .await?;
    let sql = format!(
        "{SELECT_ENVELOPE}
          WHERE (xact_id, global_position) > ($1::text::xid8, $2)
            AND ($3::text IS NULL OR aggregate_type = $3)
            AND ($4::text IS NULL OR aggregate_id = $4)
            AND ($5::timestamptz IS NULL OR recorded_at >= $5)
            AND ($6::timestamptz IS NULL OR recorded_at < $6)
            AND ($7::text IS NULL OR event_type = $7)
          ORDER BY xact_id, global_position
          LIMIT {BATCH}"
    );
    let mut after = CommitPosition::default();
    loop {
        let rows = sqlx::query(&sql)
            .bind(after.commit_xid)
            .bind(after.global_position)
            .bind(&scope.aggregate_type)
            .bind(&scope.aggregate_id)
            .bind(scope.from)
            .bind(scope.to)
            .bind(&scope.event_type)
            .fetch_all(&mut *db)
            .await?;
        let batch = rows
            .iter()
            .map(envelope_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let Some(last) = batch.last() else {
            return Ok(());
        };
        after = CommitPosition::of(last);
        let full = batch.len() as i64 == BATCH;
        for e in batch {
            if tx.send(e).await.is_err() {
                return Ok(());
            }
        }
        if !full {
            return Ok(());
        }
    }
}

impl Log {
    /// The events of `scope` in log order, handed to `each`.
    pub async fn each(
        &self,
        scope: &Scope,
        mut each: impl FnMut(EventEnvelope),
    ) -> Result<(), LogError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
        let reader = match self.source {
            Source::Postgres => {
                let (pool, scope) = (self.pool.clone(), scope.clone());
                tokio::spawn(async move { from_store(&pool, scope, tx).await })
            }
            Source::Nats => {
                let until = cmb_nats::replay::last_sequence(&self.js, &self.stream)
                    .await
                    .map_err(LogError::Stream)?;
                let subjects = match (&scope.aggregate_type, &scope.aggregate_id) {
                    (Some(t), Some(id)) => self.stream.subject(t, id),
                    (Some(t), None) => self.stream.type_subjects(t),
                    _ => self.stream.all_subjects(),
                };
                let start = match scope.from {
                    Some(t) => cmb_nats::replay::Start::Time(t),
                    None => cmb_nats::replay::Start::Beginning,
                };
                let mut events =
                    cmb_nats::replay::open(&self.js, &self.stream, &subjects, start, until)
                        .await
                        .map_err(LogError::Stream)?;
                tokio::spawn(async move {
                    while let Some(item) = events.recv().await {
                        let e = item?;
                        if tx.send(e.event).await.is_err() {
                            break;
                        }
                    }
                    Ok::<(), LogError>(())
                })
            }
        };
        while let Some(e) = rx.recv().await {
            // The stream's subjects carry ids with `.`, `*`, `>` and spaces replaced: the
            // headers' exact id decides.
            if scope.keeps(&e) {
                each(e);
            }
        }
        reader.await??;
        Ok(())
    }

    /// The events `filter` keeps, in log order (as `replay events` prints them), with those
    /// in the time range (and of `event_type`) only.
    pub async fn events(
        &self,
        filter: &Filter,
        event_type: Option<String>,
        range: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
        mut each: impl FnMut(EventEnvelope),
    ) -> Result<(), LogError> {
        let mut user_calls = std::collections::HashSet::new();
        let (from, to) = range;
        // A call's events are the call aggregate's, unless another type was asked for.
        let aggregate_type = filter
            .aggregate_type
            .clone()
            .or_else(|| filter.call.map(|_| "call".to_string()));
        // A user's calls are learnt from their requests, so then the type is picked here.
        let (server_type, local_type) = match filter.user {
            Some(_) => (None, event_type),
            None => (event_type, None),
        };
        let scope = Scope {
            event_type: server_type,
            aggregate_id: aggregate_type
                .as_ref()
                .and(filter.call.map(|c| c.to_string())),
            aggregate_type,
            from,
            to,
        };
        self.each(&scope, |e| {
            if filter.keep(&e, &mut user_calls)
                && local_type.as_ref().is_none_or(|t| &e.event_type == t)
            {
                each(e);
            }
        })
        .await
    }

    /// The reconcile report of the calls requested in `range`, as `replay reconcile` makes
    /// it (the same functions): added up by Postgres over one snapshot, or read from the
    /// stream by parallel consumers. Each call is placed by its request and has all its
    /// events, however late.
    pub async fn report(
        &self,
        range: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
    ) -> Result<Report, reconcile::Error> {
        use crate::ops::reconcile::{postgres, stream};
        match self.source {
            Source::Postgres => postgres::reconcile_in_sql(&self.pool, range).await,
            Source::Nats => {
                let until = cmb_nats::replay::last_sequence(&self.js, &self.stream)
                    .await
                    .map_err(reconcile::Error::LastSequence)?;
                let (report, _) = stream::reconcile(
                    &self.nats_url,
                    &self.stream,
                    1,
                    until,
                    range,
                    stream::PARTITIONS,
                )
                .await?;
                Ok(report)
            }
        }
    }
}

/// A pool for the tools alone, on the database of `pool`, whose connections cannot write
/// (`default_transaction_read_only`), connected when first used.
pub fn read_only_pool(pool: &PgPool, max_connections: u32) -> PgPool {
    let options = (*pool.connect_options())
        .clone()
        .options([("default_transaction_read_only", "on")]);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_lazy_with(options)
}
