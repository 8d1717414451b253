//! Where the MCP tools read the event log: the Postgres event store (default; one
//! repeatable-read, read-only snapshot in commit order) or the JetStream stream (an ordered
//! consumer up to the last sequence when the read starts) — the same readers `replay` uses,
//! so the tools answer what `callmeback replay …` answers.

use chrono::{DateTime, Utc};
use cmb_domain::EventEnvelope;
use sqlx::PgPool;

use crate::ops::reconcile::{Filter, Reconciler, Report};

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
    pub source: Source,
}

impl Log {
    /// Every event of the log (of the aggregate type `only`, when given) in log order, handed
    /// to `each`.
    pub async fn each(
        &self,
        only: Option<&str>,
        mut each: impl FnMut(EventEnvelope),
    ) -> anyhow::Result<()> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
        let reader = match self.source {
            Source::Postgres => {
                let pool = self.pool.clone();
                tokio::spawn(async move {
                    crate::ops::reconcile::from_postgres(&pool, tx, None, None).await
                })
            }
            Source::Nats => {
                let until = cmb_nats::replay::last_sequence(&self.js, &self.stream)
                    .await
                    .map_err(|e| anyhow::anyhow!("reading the stream: {e}"))?;
                let subjects = match only {
                    Some(t) => self.stream.type_subjects(t),
                    None => self.stream.all_subjects(),
                };
                let mut events = cmb_nats::replay::open(
                    &self.js,
                    &self.stream,
                    &subjects,
                    cmb_nats::replay::Start::Beginning,
                    until,
                )
                .await
                .map_err(|e| anyhow::anyhow!("reading the stream: {e}"))?;
                tokio::spawn(async move {
                    while let Some(item) = events.recv().await {
                        let e = item.map_err(|e| anyhow::anyhow!("reading the stream: {e}"))?;
                        if tx.send(e.event).await.is_err() {
                            break;
                        }
                    }
                    Ok(())
                })
            }
        };
        while let Some(e) = rx.recv().await {
            if only.is_none_or(|t| e.aggregate_type == t) {
                each(e);
            }
        }
        reader.await??;
        Ok(())
    }

    /// The events `filter` keeps, in log order (as `replay events` prints them), with those
    /// in the time range only.
    pub async fn events(
        &self,
        filter: &Filter,
        range: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
        mut each: impl FnMut(EventEnvelope),
    ) -> anyhow::Result<()> {
        let mut user_calls = std::collections::HashSet::new();
        let (from, to) = range;
        self.each(filter.aggregate_type.as_deref(), |e| {
            if from.is_some_and(|f| e.occurred_at < f) || to.is_some_and(|t| e.occurred_at >= t) {
                return;
            }
            if filter.keep(&e, &mut user_calls) {
                each(e);
            }
        })
        .await
    }

    /// The reconcile report of the calls requested in `range` (as `replay reconcile`: the
    /// whole log is read and each call placed by its request), and every event handed to
    /// `also` on the way (for figures the report does not keep, e.g. each call's persona).
    pub async fn report(
        &self,
        range: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
        mut also: impl FnMut(&EventEnvelope),
    ) -> anyhow::Result<Report> {
        let mut reconciler = Reconciler::requested_between(range);
        self.each(None, |e| {
            also(&e);
            reconciler.add(&e);
        })
        .await?;
        Ok(reconciler.report())
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
