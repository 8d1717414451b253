//! What the API and the voice session ask of the memory read models (`rm_memory_*`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct FactView {
    pub id: String,
    pub text: String,
    pub kind: String,
    /// The call it was learned from.
    pub call_id: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct OpenItemView {
    pub id: String,
    pub text: String,
    pub call_id: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct SummaryView {
    pub summary: String,
    pub call_id: String,
    pub updated_at: DateTime<Utc>,
}

/// What persona `persona_id` remembers of `user`, as the user sees it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MemoryView {
    pub summary: Option<SummaryView>,
    pub facts: Vec<FactView>,
    pub open_items: Vec<OpenItemView>,
}

pub async fn view(pool: &PgPool, user: Uuid, persona_id: &str) -> Result<MemoryView, sqlx::Error> {
    let summary = sqlx::query_as(
        "SELECT summary, call_id, updated_at FROM rm_memory_summary
          WHERE user_id = $1 AND persona_id = $2",
    )
    .bind(user)
    .bind(persona_id)
    .fetch_optional(pool)
    .await?;
    let facts = sqlx::query_as(
        "SELECT id, text, kind, call_id, at FROM rm_memory_facts
          WHERE user_id = $1 AND persona_id = $2 ORDER BY at, id",
    )
    .bind(user)
    .bind(persona_id)
    .fetch_all(pool)
    .await?;
    let open_items = sqlx::query_as(
        "SELECT id, text, call_id, at FROM rm_memory_open_items
          WHERE user_id = $1 AND persona_id = $2 ORDER BY at, id",
    )
    .bind(user)
    .bind(persona_id)
    .fetch_all(pool)
    .await?;
    Ok(MemoryView {
        summary,
        facts,
        open_items,
    })
}

/// Memory as a call's prompt uses it: the summary, the open items' texts and the facts
/// (id, text), oldest first.
#[derive(Debug, Clone, Default)]
pub struct ForPrompt {
    pub summary: Option<String>,
    pub open_items: Vec<String>,
    pub facts: Vec<(String, String)>,
}

pub async fn for_prompt(
    pool: &PgPool,
    user: Uuid,
    persona_id: &str,
) -> Result<ForPrompt, sqlx::Error> {
    let summary = sqlx::query_scalar(
        "SELECT summary FROM rm_memory_summary WHERE user_id = $1 AND persona_id = $2",
    )
    .bind(user)
    .bind(persona_id)
    .fetch_optional(pool)
    .await?;
    let open_items = sqlx::query_scalar(
        "SELECT text FROM rm_memory_open_items WHERE user_id = $1 AND persona_id = $2
          ORDER BY at, id",
    )
    .bind(user)
    .bind(persona_id)
    .fetch_all(pool)
    .await?;
    let facts = sqlx::query_as(
        "SELECT id, text FROM rm_memory_facts WHERE user_id = $1 AND persona_id = $2
          ORDER BY at, id",
    )
    .bind(user)
    .bind(persona_id)
    .fetch_all(pool)
    .await?;
    Ok(ForPrompt {
        summary,
        open_items,
        facts,
    })
}

/// The personas that remember anything of `user`.
pub async fn personas_of(pool: &PgPool, user: Uuid) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT persona_id FROM rm_memory_summary WHERE user_id = $1
         UNION SELECT persona_id FROM rm_memory_facts WHERE user_id = $1
         UNION SELECT persona_id FROM rm_memory_open_items WHERE user_id = $1
         ORDER BY 1",
    )
    .bind(user)
    .fetch_all(pool)
    .await
}

/// Per memory (user × persona), the calls that taught it something still remembered — a
/// fact, an open item or the summary — before `before` (for the transcripts' retention).
pub async fn learned_before(
    pool: &PgPool,
    before: DateTime<Utc>,
) -> Result<Vec<(Uuid, String, Vec<String>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT user_id, persona_id, array_agg(DISTINCT call_id) FROM (
            SELECT user_id, persona_id, call_id FROM rm_memory_facts WHERE at < $1
            UNION ALL
            SELECT user_id, persona_id, call_id FROM rm_memory_open_items WHERE at < $1
            UNION ALL
            SELECT user_id, persona_id, call_id FROM rm_memory_summary WHERE updated_at < $1
         ) learned GROUP BY user_id, persona_id",
    )
    .bind(before)
    .fetch_all(pool)
    .await
}
