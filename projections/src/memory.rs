//! What each persona remembers about each user: facts (with their embeddings), the summary and
//! the open items. Forgetting an item or everything deletes rows; nothing forgotten survives
//! in a read model.

use async_trait::async_trait;
use cmb_domain::memory::{parse_memory_id, MemoryEvent, SUMMARY_ID};
use cmb_domain::EventEnvelope;
use sqlx::PgConnection;

use crate::Projection;

mod queries;
pub use queries::*;

pub struct MemoryProjection;

#[async_trait]
impl Projection for MemoryProjection {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn tables(&self) -> &'static [&'static str] {
        &[
            "rm_memory_facts",
            "rm_memory_summary",
            "rm_memory_open_items",
        ]
    }
    fn aggregate_types(&self) -> &'static [&'static str] {
        &["memory"]
    }
    async fn apply(&self, db: &mut PgConnection, e: &EventEnvelope) -> Result<(), sqlx::Error> {
        let (user, persona) = parse_memory_id(&e.aggregate_id).ok_or_else(|| {
            sqlx::Error::Decode(format!("malformed memory id {}", e.aggregate_id).into())
        })?;
        let event: MemoryEvent = e
            .decode()
            .map_err(|err| sqlx::Error::Decode(Box::new(err)))?;
        match event {
            MemoryEvent::FactsLearned { call_id, facts } => {
                for f in facts {
                    sqlx::query(
                        "INSERT INTO rm_memory_facts
                            (user_id, persona_id, id, text, kind, call_id, at, embedding)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                         ON CONFLICT (user_id, persona_id, id) DO NOTHING",
                    )
                    .bind(user)
                    .bind(persona)
                    .bind(&f.id)
                    .bind(&f.text)
                    .bind(&f.kind)
                    .bind(&call_id)
                    .bind(f.at)
                    .bind(&f.embedding)
                    .execute(&mut *db)
                    .await?;
                }
            }
            MemoryEvent::SummaryRewritten { call_id, summary } => {
                sqlx::query(
                    "INSERT INTO rm_memory_summary (user_id, persona_id, summary, call_id, updated_at)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (user_id, persona_id) DO UPDATE SET summary = EXCLUDED.summary,
                        call_id = EXCLUDED.call_id, updated_at = EXCLUDED.updated_at",
                )
                .bind(user)
                .bind(persona)
                .bind(summary)
                .bind(call_id)
                .bind(e.occurred_at)
                .execute(&mut *db)
                .await?;
            }
            MemoryEvent::OpenItemOpened {
                id,
                text,
                call_id,
                at,
            } => {
                sqlx::query(
                    "INSERT INTO rm_memory_open_items (user_id, persona_id, id, text, call_id, at)
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                )
                .bind(user)
                .bind(persona)
                .bind(id)
                .bind(text)
                .bind(call_id)
                .bind(at)
                .execute(&mut *db)
                .await?;
            }
            MemoryEvent::OpenItemClosed { id, .. } => {
                delete(db, "rm_memory_open_items", user, persona, Some(&id)).await?;
            }
            MemoryEvent::MemoryItemForgotten { id } => {
                if id == SUMMARY_ID {
                    delete(db, "rm_memory_summary", user, persona, None).await?;
                }
                delete(db, "rm_memory_facts", user, persona, Some(&id)).await?;
                delete(db, "rm_memory_open_items", user, persona, Some(&id)).await?;
            }
            MemoryEvent::MemoryCleared => {
                for table in self.tables() {
                    delete(db, table, user, persona, None).await?;
                }
            }
            MemoryEvent::CallDigested { .. } => {}
        }
        Ok(())
    }
}

/// Deletes this user × persona's rows of `table` (one of ours), or only item `id`.
async fn delete(
    db: &mut PgConnection,
    table: &str,
    user: uuid::Uuid,
    persona: &str,
    id: Option<&str>,
) -> Result<(), sqlx::Error> {
    let filter = if id.is_some() { " AND id = $3" } else { "" };
    sqlx::query(&format!(
        "DELETE FROM {table} WHERE user_id = $1 AND persona_id = $2{filter}"
    ))
    .bind(user)
    .bind(persona)
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

/// Every row of the memory read models, in a stable order (tests compare a rebuild with it).
pub async fn dump(pool: &sqlx::PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT x FROM (
            SELECT 'fact ' || user_id || ' ' || persona_id || ' ' || id || ' ' || text || ' '
                   || kind || ' ' || call_id || ' ' || at || ' ' || embedding::text AS x FROM rm_memory_facts
            UNION ALL SELECT 'summary ' || user_id || ' ' || persona_id || ' ' || summary || ' '
                   || call_id || ' ' || updated_at FROM rm_memory_summary
            UNION ALL SELECT 'open ' || user_id || ' ' || persona_id || ' ' || id || ' ' || text
                   || ' ' || call_id || ' ' || at FROM rm_memory_open_items
         ) rows ORDER BY x",
    )
    .fetch_all(pool)
    .await
}
