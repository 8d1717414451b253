//! Call transcripts (`call_transcripts`, beside the event log: personal data kept for
//! `TRANSCRIPT_RETENTION_DAYS`, deletable, so not in events). Written once when a voice
//! session ends, before the event that says everything is recorded.

use chrono::{DateTime, Utc};
use cmb_domain::CallId;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// One line of a call, as said (or, cut off, as heard).
#[derive(Debug, Clone)]
pub struct Line {
    pub speaker: &'static str,
    pub text: String,
    pub cut_off: bool,
    pub at: DateTime<Utc>,
    /// On a caller's line: the knowledge passages (`<document id>:<ord>`) added to the reply.
    pub passages: Vec<String>,
}

/// A line read back.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct SavedLine {
    pub speaker: String,
    pub text: String,
    pub cut_off: bool,
    pub at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub passages: Vec<String>,
}

/// Saves a call's lines (again: nothing changes).
pub async fn save(pool: &PgPool, call_id: Uuid, lines: &[Line]) -> Result<(), sqlx::Error> {
    for (seq, line) in lines.iter().enumerate() {
        sqlx::query(
            "INSERT INTO call_transcripts (call_id, seq, speaker, text, cut_off, at, passages)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(call_id)
        .bind(seq as i32)
        .bind(line.speaker)
        .bind(&line.text)
        .bind(line.cut_off)
        .bind(line.at)
        .bind(&line.passages)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// A call's transcript, in order.
pub async fn of(pool: &PgPool, call_id: CallId) -> Result<Vec<SavedLine>, sqlx::Error> {
    sqlx::query_as(
        "SELECT speaker, text, cut_off, at, passages FROM call_transcripts
          WHERE call_id = $1 ORDER BY seq",
    )
    .bind(call_id.uuid())
    .fetch_all(pool)
    .await
}

/// A call's lines as (speaker, text), for the memory worker.
pub async fn lines(pool: &PgPool, call_id: Uuid) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as("SELECT speaker, text FROM call_transcripts WHERE call_id = $1 ORDER BY seq")
        .bind(call_id)
        .fetch_all(pool)
        .await
}

/// Deletes transcripts older than `days` days. Returns how many lines went.
pub async fn purge(pool: &PgPool, days: u32) -> Result<u64, sqlx::Error> {
    let done =
        sqlx::query("DELETE FROM call_transcripts WHERE at < now() - make_interval(days => $1)")
            .bind(days as i32)
            .execute(pool)
            .await?;
    Ok(done.rows_affected())
}

/// Why a round of the transcripts' retention stopped; the next round starts over.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error("deleting old transcript lines")]
    Purge(#[source] sqlx::Error),
    #[error("forgetting what personas learned from old calls")]
    Memory(#[source] crate::usecases::memory::Error),
    #[error("destroying old calls' memory keys")]
    Keys(#[source] crate::backbone::keys::KeyError),
}

/// The transcripts' retention, hourly: lines older than `days` days are deleted, and with
/// them what personas learned from those calls: forgotten by the memories
/// (`usecases::memory::expire`), and the keys it was sealed under in the log destroyed
/// (`Keyring::expire_calls`), so it cannot be read back from events either. Returns the lines
/// deleted and the memory items forgotten.
pub async fn apply_retention(
    store: &crate::backbone::store::EventStore,
    days: u32,
) -> Result<(u64, usize), RetentionError> {
    let lines = purge(store.pool(), days)
        .await
        .map_err(RetentionError::Purge)?;
    let before = Utc::now() - chrono::Duration::days(i64::from(days));
    let forgotten = crate::usecases::memory::expire(store, before)
        .await
        .map_err(RetentionError::Memory)?;
    store
        .keys()
        .expire_calls(before)
        .await
        .map_err(RetentionError::Keys)?;
    Ok((lines, forgotten))
}
