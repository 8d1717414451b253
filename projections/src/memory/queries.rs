//! What the API and the voice session ask of the memory read models (`rm_memory_*`).

use chrono::{DateTime, Utc};
use cmb_domain::{CallId, PersonaId, UserId};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct FactView {
    pub id: String,
    pub text: String,
    pub kind: String,
    /// The call it was learned from.
    #[sqlx(try_from = "String")]
    #[schema(value_type = String)]
    pub call_id: CallId,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct OpenItemView {
    pub id: String,
    pub text: String,
    #[sqlx(try_from = "String")]
    #[schema(value_type = String)]
    pub call_id: CallId,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct SummaryView {
    pub summary: String,
    #[sqlx(try_from = "String")]
    #[schema(value_type = String)]
    pub call_id: CallId,
    pub updated_at: DateTime<Utc>,
}

/// What persona `persona_id` remembers of `user`, as the user sees it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MemoryView {
    pub summary: Option<SummaryView>,
    pub facts: Vec<FactView>,
    pub open_items: Vec<OpenItemView>,
}

pub async fn view(
    pool: &PgPool,
    user: UserId,
    persona_id: &PersonaId,
) -> Result<MemoryView, sqlx::Error> {
    let summary = sqlx::query_as(
        "SELECT summary, call_id, updated_at FROM rm_memory_summary
          WHERE user_id = $1 AND persona_id = $2",
    )
    .bind(user.uuid())
    .bind(persona_id.as_str())
    .fetch_optional(pool)
    .await?;
    let facts = sqlx::query_as(
        "SELECT id, text, kind, call_id, at FROM rm_memory_facts
          WHERE user_id = $1 AND persona_id = $2 ORDER BY at, id",
    )
    .bind(user.uuid())
    .bind(persona_id.as_str())
    .fetch_all(pool)
    .await?;
    let open_items = sqlx::query_as(
        "SELECT id, text, call_id, at FROM rm_memory_open_items
          WHERE user_id = $1 AND persona_id = $2 ORDER BY at, id",
    )
    .bind(user.uuid())
    .bind(persona_id.as_str())
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
    user: UserId,
    persona_id: &PersonaId,
) -> Result<ForPrompt, sqlx::Error> {
    let summary = sqlx::query_scalar(
        "SELECT summary FROM rm_memory_summary WHERE user_id = $1 AND persona_id = $2",
    )
    .bind(user.uuid())
    .bind(persona_id.as_str())
    .fetch_optional(pool)
    .await?;
    let open_items = sqlx::query_scalar(
        "SELECT text FROM rm_memory_open_items WHERE user_id = $1 AND persona_id = $2
          ORDER BY at, id",
    )
    .bind(user.uuid())
    .bind(persona_id.as_str())
    .fetch_all(pool)
    .await?;
    let facts = sqlx::query_as(
        "SELECT id, text FROM rm_memory_facts WHERE user_id = $1 AND persona_id = $2
          ORDER BY at, id",
    )
    .bind(user.uuid())
    .bind(persona_id.as_str())
    .fetch_all(pool)
    .await?;
    Ok(ForPrompt {
        summary,
        open_items,
        facts,
    })
}

/// The personas that remember anything of `user`.
pub async fn personas_of(pool: &PgPool, user: UserId) -> Result<Vec<PersonaId>, sqlx::Error> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT persona_id FROM rm_memory_summary WHERE user_id = $1
         UNION SELECT persona_id FROM rm_memory_facts WHERE user_id = $1
         UNION SELECT persona_id FROM rm_memory_open_items WHERE user_id = $1
         ORDER BY 1",
    )
    .bind(user.uuid())
    .fetch_all(pool)
    .await?;
    Ok(ids.into_iter().map(PersonaId::from).collect())
}

/// A memory (user × persona) and the calls that taught it something still remembered.
#[derive(Debug, sqlx::FromRow)]
pub struct Learned {
    #[sqlx(rename = "user_id", try_from = "Uuid")]
    pub user: UserId,
    #[sqlx(rename = "persona_id", try_from = "String")]
    pub persona: PersonaId,
    pub calls: Vec<String>,
}

/// Per memory (user × persona), the calls that taught it something still remembered — a
/// fact, an open item or the summary — before `before` (for the transcripts' retention).
pub async fn learned_before(
    pool: &PgPool,
    before: DateTime<Utc>,
) -> Result<Vec<Learned>, sqlx::Error> {
    sqlx::query_as(
        "SELECT user_id, persona_id, array_agg(DISTINCT call_id) AS calls FROM (
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
