//! The reconcile from the Postgres event store: either every event streamed in commit order
//! (for `replay events` and filtered reconciles), or the call facts the store keeps beside
//! each call event read from their covering index (no payload read), which gives the same
//! report.

use chrono::{DateTime, Utc};
use cmb_domain::EventEnvelope;

use super::{facts, Error, Reconciler, Report};
use crate::backbone::outbox::{envelope_from_row, CommitPosition, SELECT_ENVELOPE};

/// Events from Postgres in commit order (the same order the stream has), every event committed
/// when the read starts: one repeatable-read snapshot, so neither a transaction still open
/// elsewhere nor the publisher's progress decides what the report sees.
pub async fn from_postgres(
    pool: &sqlx::PgPool,
    tx: tokio::sync::mpsc::Sender<EventEnvelope>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<(), sqlx::Error> {
    let mut db = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *db)
        .await?;
    let mut after = CommitPosition::default();
    loop {
        let rows = sqlx::query(&format!(
            "{} WHERE (xact_id, global_position) > ($1::text::xid8, $2)
              ORDER BY xact_id, global_position
              LIMIT 5000",
            SELECT_ENVELOPE
        ))
        .bind(after.commit_xid)
        .bind(after.global_position)
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
        for e in batch {
            if from.is_some_and(|f| e.occurred_at < f) || to.is_some_and(|t| e.occurred_at >= t) {
                continue;
            }
            if tx.send(e).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// How many connections read the call facts at once, each the calls of a range of ids.
const PARTS: usize = 2;

/// `PARTS` ranges of call ids, together every id whatever it looks like (split for UUIDs'
/// first hex digit): (from inclusive, to exclusive).
fn id_ranges(parts: usize) -> Vec<(Option<String>, Option<String>)> {
    let bounds: Vec<Option<String>> = (1..parts)
        .map(|i| Some(format!("{:x}", 16 * i / parts)))
        .collect();
    let mut from = vec![None];
    from.extend(bounds.iter().cloned());
    let mut to = bounds;
    to.push(None);
    from.into_iter().zip(to).collect()
}

/// Opens a read-only transaction on `snapshot` (exported by the first reader), or on one of
/// its own (which it exports when `export`).
async fn snapshot_tx(
    pool: &sqlx::PgPool,
    snapshot: Option<&str>,
    export: bool,
) -> Result<(sqlx::Transaction<'static, sqlx::Postgres>, Option<String>), Error> {
    let mut db = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *db)
        .await?;
    if let Some(id) = snapshot {
        // Written into the statement (SET TRANSACTION SNAPSHOT takes no parameter).
        if !id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(Error::SnapshotId(id.to_string()));
        }
        sqlx::query(&format!("SET TRANSACTION SNAPSHOT '{id}'"))
            .execute(&mut *db)
            .await?;
    }
    // A plain index scan: compiling it would take longer than running it.
    sqlx::query("SET LOCAL jit = off").execute(&mut *db).await?;
    let exported = if export {
        Some(
            sqlx::query_scalar("SELECT pg_export_snapshot()")
                .fetch_one(&mut *db)
                .await?,
        )
    } else {
        None
    };
    Ok((db, exported))
}

/// Folds the facts of the calls whose ids are in `ids` (see [`facts`]): the partial
/// reconcile, and the calls to fold from their events instead.
async fn fold_facts(
    db: &mut sqlx::PgConnection,
    range: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
    ids: &(Option<String>, Option<String>),
) -> Result<(Reconciler, Vec<String>), Error> {
    use futures::TryStreamExt as _;
    let mut bounds = String::new();
    if let Some(from) = &ids.0 {
        bounds.push_str(&format!(" AND aggregate_id >= '{from}'"));
    }
    if let Some(to) = &ids.1 {
        bounds.push_str(&format!(" AND aggregate_id < '{to}'"));
    }
    let sql = format!(
        "COPY (SELECT {} FROM events WHERE {}{bounds} ORDER BY aggregate_id, sequence)
           TO STDOUT (FORMAT binary)",
        facts::CALL_FACTS_COLUMNS,
        facts::CALL_FACTS_ROWS
    );
    let mut copy = facts::CopyBinary::default();
    let mut fold = facts::CallFold::new(Reconciler::requested_between(range));
    let mut rows = db.copy_out_raw(&sql).await?;
    while let Some(chunk) = rows.try_next().await? {
        copy.push(&chunk, |f| fold.row(f))?;
    }
    copy.finish()?;
    Ok(fold.finish())
}

/// The reconcile, read by Postgres from the call facts the event store keeps beside each call
/// event (the covering index `events_call_facts`: no payload is read), over one
/// repeatable-read snapshot (every event committed when it starts) shared by [`PARTS`]
/// connections, each reading the calls of a range of ids; system costs and Stripe refunds
/// (few) read whole. A call with an event the facts do not tell exactly (an unknown type or
/// version, a value that does not parse) is folded from its own events instead, so the report
/// is the one the event-by-event reconcile gives.
pub async fn reconcile_in_sql(
    pool: &sqlx::PgPool,
    range: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
) -> Result<Report, Error> {
    // The facts are of the payloads as stored: with an upcaster for call events, only their
    // decoded (upcast) events tell the reconcile right.
    let upcast = cmb_domain::events::UPCASTERS
        .iter()
        .any(|u| u.aggregate_type == "call");
    let parts = if upcast {
        Vec::new()
    } else {
        id_ranges(
            PARTS
                .min(pool.options().get_max_connections() as usize)
                .max(1),
        )
    };
    let (mut db, snapshot) = snapshot_tx(pool, None, parts.len() > 1).await?;
    let mut readers = Vec::new();
    for ids in parts.iter().skip(1) {
        let (pool, snapshot, ids) = (pool.clone(), snapshot.clone(), ids.clone());
        readers.push(tokio::spawn(async move {
            let (mut db, _) = snapshot_tx(&pool, snapshot.as_deref(), false).await?;
            let folded = fold_facts(&mut db, range, &ids).await?;
            db.commit().await?;
            Ok::<_, Error>(folded)
        }));
    }
    let (mut r, mut refold) = match parts.first() {
        Some(ids) => fold_facts(&mut db, range, ids).await?,
        None => (Reconciler::requested_between(range), Vec::new()),
    };
    for reader in readers {
        let (part, calls) = reader.await??;
        r.merge(part);
        refold.extend(calls);
    }
    // The calls to fold from their events, and the few events of other types the reconcile
    // reads (both found through the primary key).
    let calls = if upcast {
        "aggregate_type = 'call'"
    } else {
        "aggregate_type = 'call' AND aggregate_id = ANY($1)"
    };
    let others = format!(
        "{SELECT_ENVELOPE}
          WHERE aggregate_type IN ('system_cost', 'stripe_event') OR ({calls})
          ORDER BY xact_id, global_position"
    );
    use futures::TryStreamExt as _;
    let query = sqlx::query(&others);
    let query = if upcast { query } else { query.bind(&refold) };
    let mut rows = query.fetch(&mut *db);
    while let Some(row) = rows.try_next().await? {
        let e: EventEnvelope = envelope_from_row(&row)?;
        r.add_at(facts::position(CommitPosition::of(&e)), &e);
    }
    drop(rows);
    db.commit().await?;
    Ok(r.report())
}
