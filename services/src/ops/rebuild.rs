//! `replay projections NAME…`: rebuilds read models into fresh tables from the stream and
//! swaps them in without downtime for the API.
//!
//! Projections name their tables in their SQL, so the fresh tables live in a schema of their
//! own (`rebuild_<name>_<n>`, copies of the live tables and of the offset tables made with
//! `LIKE … INCLUDING ALL`), and the projection runs on connections whose `search_path` puts
//! that schema first. The live tables are untouched meanwhile; the API reads them as usual.
//!
//! The swap is one transaction on one connection. It first takes the projection's swap lock
//! exclusively (`cmb_projections::SWAP_LOCK_KEY`; every application of that projection's events
//! takes it shared), so that projection's live projector pauses — its in-flight transactions
//! finish, new ones wait — while every other projection carries on. On the same connection it
//! then applies what reached the stream since the rebuild started, and replaces the live rows
//! and offsets with the rebuilt ones (`DELETE` + `INSERT … SELECT`). A lock timeout turns a
//! swap that cannot get its locks into an error. Readers are never blocked — until the
//! commit they see the old rows, after it the new ones. (Renaming tables would take a lock
//! that blocks readers, and would leave the cost views pointing at the old tables.) After the
//! commit the live projector resumes; what it delivers that the rebuild already applied, the
//! offsets turn away. The rebuild schema is dropped at the end, or on failure; one left by a
//! rebuild that died (killed mid-rebuild or mid-swap: its swap transaction rolled back with
//! it, the live tables untouched) is dropped by the next rebuild of that projection, which
//! holds a session lock so that two never run at once.

use std::time::Instant;

use async_nats::jetstream;
use cmb_nats::replay::Start;
use cmb_nats::StreamSettings;
use cmb_projections::{Outcome, Projection};
use sqlx::{Connection, PgPool};

#[derive(Debug, serde::Serialize)]
pub struct Rebuilt {
    pub projection: &'static str,
    pub events_applied: u64,
    /// Events applied inside the swap transaction (what arrived during the rebuild).
    pub caught_up: u64,
    pub rows: i64,
    pub seconds: f64,
}

/// Why a rebuild stopped (the live tables untouched; its schema dropped, or by the next
/// rebuild).
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("another rebuild of {0} is running; wait for it to finish")]
    Busy(&'static str),
    #[error("the database")]
    Db(#[from] sqlx::Error),
    #[error("reading the stream's last sequence")]
    Stream(#[source] async_nats::Error),
    #[error("replaying the stream")]
    Replay(#[from] cmb_nats::replay::ReplayError),
    #[error("opening an event's personal fields")]
    Keys(#[from] crate::backbone::keys::KeyError),
    #[error(
        "{event} arrived but its sequence {expected} never did; run `callmeback events verify`"
    )]
    Gap { event: String, expected: u64 },
}

/// The session lock a rebuild of a projection holds from start to end (two-key space, apart
/// from the swap lock's `1`).
const REBUILD_LOCK_KEY: &str = "2, hashtext($1)";

/// The tables a rebuild copies: the projection's own and its offsets.
const OFFSET_TABLES: [&str; 2] = ["projection_offsets", "projection_status"];

pub async fn rebuild_and_swap(
    pool: &PgPool,
    js: &jetstream::Context,
    settings: &StreamSettings,
    projection: &dyn Projection,
    show_progress: bool,
) -> Result<Rebuilt, RebuildError> {
    let started = Instant::now();
    // One rebuild of a projection at a time: a session lock on a connection of its own, held
    // to the end (released with the connection, also when the process dies). Holding it, the
    // rebuild schemas of this projection that exist are leftovers of a rebuild that died (a
    // kill mid-rebuild or mid-swap; a swap's transaction rolled back with it): dropped.
    let mut guard = pool.acquire().await?.detach();
    let alone: bool =
        sqlx::query_scalar(&format!("SELECT pg_try_advisory_lock({REBUILD_LOCK_KEY})"))
            .bind(projection.name())
            .fetch_one(&mut guard)
            .await?;
    if !alone {
        return Err(RebuildError::Busy(projection.name()));
    }
    let leftovers: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE $1")
            .bind(format!("rebuild\\_{}\\_%", projection.name()))
            .fetch_all(&mut guard)
            .await?;
    for leftover in leftovers {
        tracing::warn!(schema = %leftover, "dropping what a rebuild that died left behind");
        sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{leftover}\" CASCADE"))
            .execute(&mut guard)
            .await?;
    }
    let schema = format!(
        "rebuild_{}_{}",
        projection.name(),
        uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .get(..8)
            .unwrap_or("0")
    );
    // Names come from the projection's constant lists and a hex suffix, never from input.
    sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
        .execute(pool)
        .await?;
    let result = build_and_swap(pool, js, settings, projection, &schema, show_progress).await;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(pool)
        .await?;
    // The lock goes with the connection.
    let _ = guard.close().await;
    let (events_applied, caught_up, rows) = result?;
    Ok(Rebuilt {
        projection: projection.name(),
        events_applied,
        caught_up,
        rows,
        seconds: started.elapsed().as_secs_f64(),
    })
}

async fn build_and_swap(
    pool: &PgPool,
    js: &jetstream::Context,
    settings: &StreamSettings,
    projection: &dyn Projection,
    schema: &str,
    show_progress: bool,
) -> Result<(u64, u64, i64), RebuildError> {
    for table in projection.tables().iter().chain(OFFSET_TABLES.iter()) {
        sqlx::query(&format!(
            "CREATE TABLE \"{schema}\".{table} (LIKE public.{table} INCLUDING ALL)"
        ))
        .execute(pool)
        .await?;
    }
    let options = (*pool.connect_options())
        .clone()
        .options([("search_path", format!("{schema},public"))]);
    let fresh = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await?;

    let until = cmb_nats::replay::last_sequence(js, settings)
        .await
        .map_err(RebuildError::Stream)?;
    let mut progress =
        crate::backbone::projector::Progress::new(&format!("rebuild {}", projection.name()), until)
            .force(show_progress);
    let keys = crate::backbone::keys::Keyring::new(pool.clone());
    let applied = apply_range(
        &fresh,
        js,
        settings,
        projection,
        Start::Beginning,
        until,
        &mut progress,
    )
    .await?;
    progress.finish();
    crate::faults::crash_point("rebuild.before_swap");

    // The swap: one transaction on one connection. Its lock timeout turns a swap that cannot
    // get its lock into an error instead of a wait without end.
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '15s'")
        .execute(&mut *tx)
        .await?;
    // Pause this projection's live projector (wherever it runs): its in-flight transactions
    // finish, new ones wait for the commit. Other projections carry on.
    sqlx::query(&format!(
        "SELECT pg_advisory_xact_lock({})",
        cmb_projections::SWAP_LOCK_KEY
    ))
    .bind(projection.name())
    .execute(&mut *tx)
    .await?;
    let last = cmb_nats::replay::last_sequence(js, settings)
        .await
        .map_err(RebuildError::Stream)?;
    // What reached the stream since the rebuild started, applied on the swap's own connection
    // (into the rebuild schema): no other connection is needed while the lock is held.
    sqlx::query(&format!("SET LOCAL search_path TO \"{schema}\", public"))
        .execute(&mut *tx)
        .await?;
    let caught_up = if last > until {
        apply_range_on(
            &mut tx,
            &keys,
            js,
            settings,
            projection,
            Start::Sequence(until + 1),
            last,
        )
        .await?
    } else {
        0
    };
    sqlx::query("SET LOCAL search_path TO public")
        .execute(&mut *tx)
        .await?;
    let mut rows = 0;
    for table in projection.tables() {
        sqlx::query(&format!("DELETE FROM public.{table}"))
            .execute(&mut *tx)
            .await?;
        rows += sqlx::query(&format!(
            "INSERT INTO public.{table} SELECT * FROM \"{schema}\".{table}"
        ))
        .execute(&mut *tx)
        .await?
        .rows_affected() as i64;
    }
    for table in OFFSET_TABLES {
        sqlx::query(&format!("DELETE FROM public.{table} WHERE projection = $1"))
            .bind(projection.name())
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "INSERT INTO public.{table} SELECT * FROM \"{schema}\".{table} WHERE projection = $1"
        ))
        .bind(projection.name())
        .execute(&mut *tx)
        .await?;
    }
    crate::faults::crash_point("rebuild.before_commit");
    tx.commit().await?;
    fresh.close().await;
    Ok((applied + caught_up, caught_up, rows))
}

/// 1 for an event applied, 0 for one already applied or not the projection's. Read in stream
/// order, an aggregate's events come in order: a gap means the stream lost one.
fn counted(outcome: Outcome, event: &cmb_domain::EventEnvelope) -> Result<u64, RebuildError> {
    match outcome {
        Outcome::Applied => Ok(1),
        Outcome::Gap { expected } => Err(RebuildError::Gap {
            event: event.event_id(),
            expected,
        }),
        Outcome::AlreadyApplied | Outcome::Ignored | Outcome::Unknown => Ok(0),
    }
}

/// Applies the stream's events from `start` up to `until` to `projection` on `pool`.
async fn apply_range(
    pool: &PgPool,
    js: &jetstream::Context,
    settings: &StreamSettings,
    projection: &dyn Projection,
    start: Start,
    until: u64,
    progress: &mut crate::backbone::projector::Progress,
) -> Result<u64, RebuildError> {
    let mut rx = cmb_nats::replay::open(js, settings, &settings.all_subjects(), start, until)
        .await
        .map_err(RebuildError::Stream)?;
    // The keys are in `public`, on the rebuild schema's search path.
    let keys = crate::backbone::keys::Keyring::new(pool.clone());
    let mut applied = 0;
    while let Some(item) = rx.recv().await {
        let r = item?;
        let event = keys.opened(&r.event).await?;
        let outcome = cmb_projections::apply(pool, projection, &event, r.stream_sequence).await?;
        applied += counted(outcome, &r.event)?;
        progress.tick(1);
    }
    Ok(applied)
}

/// [`apply_range`] on one connection (inside the swap's transaction).
async fn apply_range_on(
    conn: &mut sqlx::PgConnection,
    keys: &crate::backbone::keys::Keyring,
    js: &jetstream::Context,
    settings: &StreamSettings,
    projection: &dyn Projection,
    start: Start,
    until: u64,
) -> Result<u64, RebuildError> {
    let mut rx = cmb_nats::replay::open(js, settings, &settings.all_subjects(), start, until)
        .await
        .map_err(RebuildError::Stream)?;
    let mut applied = 0;
    while let Some(item) = rx.recv().await {
        let r = item?;
        let event = keys.opened(&r.event).await?;
        let outcome =
            cmb_projections::apply_on(conn, projection, &event, r.stream_sequence).await?;
        applied += counted(outcome, &r.event)?;
    }
    Ok(applied)
}
