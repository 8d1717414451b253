//! The user's data on request (`GET /api/user/export`): one JSON document of everything we hold
//! about the user, written part by part into a bounded channel the response body streams from,
//! so a long history never sits whole in memory.
//!
//! From the read models: the profile, contacts, the personas they made (with their knowledge
//! documents), every call (with its payment, provider usage, timeline and transcript) and what
//! each persona remembers. From the event log: every event of the user's own aggregates (user,
//! wallet, contacts, billing, budget, memory and customisations, keyed by the user's id) and of
//! their calls and personas — credits, card authorisations and charges included — with
//! password hashes left out.

use bytes::Bytes;
use chrono::Utc;
use cmb_domain::UserId;
use cmb_projections::calls::{self, ListFilter as CallFilter, Sort as CallSort};
use cmb_projections::personas::{
    self, CreatedBy, ListFilter as PersonaFilter, Sort as PersonaSort,
};
use futures::TryStreamExt as _;
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::sync::mpsc;

use crate::serve::transcripts;

/// The archive's format, first in the document.
pub const FORMAT: &str = "callmeback-export/1";
/// Rows read per page of calls and personas.
const PAGE: i64 = 100;

type Chunk = Result<Bytes, std::io::Error>;

/// Why the archive stopped (logged; the client sees a truncated document, which does not parse).
#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("export: {0}")]
    Db(#[from] sqlx::Error),
    #[error("export: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the client went away")]
    Gone,
}

struct Writer {
    tx: mpsc::Sender<Chunk>,
}

impl Writer {
    async fn raw(&self, s: impl Into<Bytes>) -> Result<(), ExportError> {
        self.tx
            .send(Ok(s.into()))
            .await
            .map_err(|_| ExportError::Gone)
    }

    /// `"name":` and the value, after a comma unless it is the first member.
    async fn member(&self, name: &str, value: &impl Serialize) -> Result<(), ExportError> {
        let mut out = format!(",{}:", serde_json::to_string(name)?).into_bytes();
        serde_json::to_writer(&mut out, value)?;
        self.raw(out).await
    }

    /// An array's element, after a comma unless it is the first.
    async fn element(&self, first: &mut bool, value: &impl Serialize) -> Result<(), ExportError> {
        let mut out = if *first { Vec::new() } else { b",".to_vec() };
        *first = false;
        serde_json::to_writer(&mut out, value)?;
        self.raw(out).await
    }
}

/// The archive of `user`'s data, as a stream of JSON chunks.
pub fn archive(pool: PgPool, user: UserId) -> impl futures::Stream<Item = Chunk> {
    let (tx, rx) = mpsc::channel::<Chunk>(8);
    tokio::spawn(async move {
        let w = Writer { tx: tx.clone() };
        if let Err(e) = write(&pool, user, &w).await {
            if !matches!(e, ExportError::Gone) {
                tracing::error!(user = %user, error = %e, "export stopped midway");
                let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
}

async fn write(pool: &PgPool, user: UserId, w: &Writer) -> Result<(), ExportError> {
    let head = json!({ "format": FORMAT, "exported_at": Utc::now(), "user_id": user });
    let head = serde_json::to_string(&head)?;
    // The head's closing brace is left off: the members follow.
    w.raw(head[..head.len() - 1].to_string()).await?;
    w.member(
        "profile",
        &cmb_projections::accounts::user_view(pool, user).await?,
    )
    .await?;
    w.member(
        "contacts",
        &cmb_projections::accounts::contacts(pool, user).await?,
    )
    .await?;

    let mut aggregates: Vec<String> = Vec::new();
    w.raw(",\"personas\":[").await?;
    let mut first = true;
    for page in 1.. {
        let filter = PersonaFilter {
            viewer: Some(user),
            search: None,
            tags: Vec::new(),
            is_public: None,
            created_by: Some(CreatedBy::User(user)),
            sort: PersonaSort::Oldest,
            page,
            per_page: PAGE,
        };
        let (rows, _) = personas::list(pool, &filter).await?;
        for persona in &rows {
            let knowledge = personas::knowledge(pool, &persona.id).await?;
            aggregates.push(persona.id.to_string());
            w.element(
                &mut first,
                &json!({ "persona": persona, "knowledge": knowledge }),
            )
            .await?;
        }
        if (rows.len() as i64) < PAGE {
            break;
        }
    }
    w.raw("],\"calls\":[").await?;
    let mut first = true;
    for page in 1.. {
        let filter = CallFilter {
            user,
            status: None,
            from: None,
            to: None,
            sort: CallSort::Oldest,
            page,
            per_page: PAGE,
        };
        let (rows, _) = calls::list(pool, &filter).await?;
        for call in &rows {
            let id = call.id;
            let detail = json!({
                "call": call,
                "payment": call.payment(),
                "usage": calls::usage_lines(pool, id, user).await?,
                "timeline": cmb_projections::timeline::of(pool, "call", &id.to_string()).await?,
                "transcript": transcripts::of(pool, id).await?,
            });
            aggregates.push(id.to_string());
            w.element(&mut first, &detail).await?;
        }
        if (rows.len() as i64) < PAGE {
            break;
        }
    }
    w.raw("],\"memory\":[").await?;
    let mut first = true;
    for persona_id in cmb_projections::memory::personas_of(pool, user).await? {
        let memory = cmb_projections::memory::view(pool, user, &persona_id).await?;
        w.element(
            &mut first,
            &json!({ "persona_id": persona_id, "memory": memory }),
        )
        .await?;
    }
    w.raw("],\"events\":[").await?;
    let mut first = true;
    let mut rows = sqlx::query_as::<_, EventRow>(
        "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version,
                payload::text AS payload, recorded_at
           FROM events
          WHERE aggregate_id = $1 OR aggregate_id LIKE $1 || ':%' OR aggregate_id = ANY($2)
          ORDER BY xact_id, global_position",
    )
    .bind(user.to_string())
    .bind(&aggregates)
    .fetch(pool);
    // The user's own data, opened: their personal fields are sealed in the log.
    let keys = crate::backbone::keys::Keyring::new(pool.clone());
    while let Some(row) = rows.try_next().await? {
        let mut payload: Value = serde_json::from_str(&row.payload)?;
        keys.open(
            &row.aggregate_type,
            &row.aggregate_id,
            &row.event_type,
            &mut payload,
        )
        .await
        .map_err(sqlx::Error::from)?;
        redact(&mut payload);
        let event = json!({
            "aggregate_type": row.aggregate_type,
            "aggregate_id": row.aggregate_id,
            "sequence": row.sequence,
            "event_type": row.event_type,
            "event_version": row.event_version,
            "recorded_at": row.recorded_at,
            "payload": payload,
        });
        w.element(&mut first, &event).await?;
    }
    w.raw("]}").await
}

#[derive(sqlx::FromRow)]
struct EventRow {
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    event_type: String,
    event_version: String,
    payload: String,
    recorded_at: chrono::DateTime<Utc>,
}

/// Leaves password hashes out of an event's payload (they are ours to check, not the user's
/// data, and an offline guess at one is the one thing an export must not help).
fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key == "password_hash" {
                    *v = Value::String("[not exported]".into());
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hashes_are_left_out_wherever_they_are() {
        let mut v = json!({"UserRegistered": {"email": "a@b.c", "password_hash": "$argon2id$x"},
                           "list": [{"password_hash": "h"}]});
        redact(&mut v);
        assert_eq!(v["UserRegistered"]["password_hash"], "[not exported]");
        assert_eq!(v["UserRegistered"]["email"], "a@b.c");
        assert_eq!(v["list"][0]["password_hash"], "[not exported]");
    }
}
