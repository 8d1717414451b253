//! What the API and the voice session ask of the personas read model (`rm_personas`).

use chrono::{DateTime, Utc};
use cmb_domain::persona::{PersonaDraft, TurnTaking};
use cmb_domain::{PersonaId, UserId};
use serde::Serialize;
use sqlx::{PgPool, Postgres, QueryBuilder};

/// A persona as the front end shows it. Another user's prompt is theirs: it is left out.
#[derive(Debug, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct PersonaView {
    #[sqlx(try_from = "String")]
    #[schema(value_type = String)]
    pub id: PersonaId,
    pub name: String,
    pub description: String,
    pub voice_id: String,
    pub system_prompt: Option<String>,
    pub greeting: String,
    pub is_public: bool,
    pub is_system: bool,
    /// `system`, or your user id on your own personas; left out on other users' personas.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    pub tags: Vec<String>,
    pub use_count: i64,
    /// How the persona takes turns on a call (endpointing and silence, in milliseconds).
    #[schema(value_type = Object)]
    pub turn_taking: sqlx::types::Json<TurnTaking>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl PersonaView {
    /// `owner`'s new persona as the projection will show it to them once it applies
    /// `PersonaCreated`: what a handler answers when the read model has not caught up yet.
    pub fn created(id: &PersonaId, owner: UserId, draft: &PersonaDraft, at: DateTime<Utc>) -> Self {
        PersonaView {
            id: id.clone(),
            name: draft.name.clone(),
            description: draft.description.clone(),
            voice_id: draft.voice_id.clone(),
            system_prompt: Some(draft.system_prompt.clone()),
            greeting: draft.greeting.clone(),
            is_public: draft.is_public,
            is_system: false,
            created_by: Some(owner.to_string()),
            tags: draft.tags.clone(),
            use_count: 0,
            turn_taking: sqlx::types::Json(draft.turn_taking),
            created_at: at,
            updated_at: at,
        }
    }
}

/// Columns of `PersonaView` from `rm_personas p`, for a viewer bound as `$1` (text, may be '').
pub(crate) const PERSONA_COLUMNS: &str = "p.id, p.name, p.description, p.voice_id,
    CASE WHEN p.created_by IN ('system', $1) THEN p.system_prompt END AS system_prompt,
    p.greeting, p.is_public, p.created_by = 'system' AS is_system,
    CASE WHEN p.created_by IN ('system', $1) THEN p.created_by END AS created_by, p.tags,
    p.use_count, p.turn_taking, p.created_at, p.updated_at";

/// Persona `id`, if `viewer` may see it (public, system, or theirs).
pub async fn view(
    pool: &PgPool,
    id: &PersonaId,
    viewer: Option<UserId>,
) -> Result<Option<PersonaView>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {PERSONA_COLUMNS} FROM rm_personas p
          WHERE p.id = $2 AND (p.is_public OR p.created_by IN ('system', $1))"
    ))
    .bind(viewer.map(|v| v.to_string()).unwrap_or_default())
    .bind(id.as_str())
    .fetch_optional(pool)
    .await
}

/// Whose personas a list shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreatedBy {
    System,
    User(UserId),
}

/// The order of a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    Popular,
    Newest,
    Oldest,
    Name,
}

impl Sort {
    fn order_by(self) -> &'static str {
        match self {
            Sort::Popular => {
                "p.use_count DESC, (p.created_by = 'system') DESC, lower(p.name), p.id"
            }
            Sort::Newest => "p.created_at DESC, p.id",
            Sort::Oldest => "p.created_at ASC, p.id",
            Sort::Name => "lower(p.name) ASC, p.id",
        }
    }
}

/// Which personas a viewer sees, in what order, which page.
#[derive(Debug, Clone)]
pub struct ListFilter {
    pub viewer: Option<UserId>,
    /// In the name or the description (at least 2 characters).
    pub search: Option<String>,
    /// Any of these tags (lower case).
    pub tags: Vec<String>,
    pub is_public: Option<bool>,
    pub created_by: Option<CreatedBy>,
    pub sort: Sort,
    pub page: i64,
    pub per_page: i64,
}

/// `SELECT <persona columns> FROM rm_personas p WHERE <visible to viewer and filters>`, or
/// the count of the same rows. Built afresh for each query (a builder's binds are consumed).
fn filtered<'a>(count: bool, viewer: &'a str, f: &'a ListFilter) -> QueryBuilder<'a, Postgres> {
    let mut q = QueryBuilder::new("SELECT ");
    if count {
        q.push("count(*)");
    } else {
        q.push("p.id, p.name, p.description, p.voice_id, CASE WHEN p.created_by IN ('system', ")
            .push_bind(viewer)
            .push(
                ") THEN p.system_prompt END AS system_prompt, p.greeting, p.is_public,
                 p.created_by = 'system' AS is_system,
                 CASE WHEN p.created_by IN ('system', ",
            )
            .push_bind(viewer)
            .push(
                ") THEN p.created_by END AS created_by, p.tags, p.use_count,
                 p.turn_taking, p.created_at, p.updated_at",
            );
    }
    q.push(" FROM rm_personas p WHERE (p.is_public OR p.created_by IN ('system', ")
        .push_bind(viewer)
        .push("))");
    if let Some(search) = f.search.as_deref() {
        let escaped = search
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        let pattern = format!("%{escaped}%");
        q.push(" AND (p.name ILIKE ")
            .push_bind(pattern.clone())
            .push(" OR p.description ILIKE ")
            .push_bind(pattern)
            .push(")");
    }
    if !f.tags.is_empty() {
        q.push(" AND p.tags && ").push_bind(f.tags.clone());
    }
    if let Some(is_public) = f.is_public {
        q.push(" AND p.is_public = ").push_bind(is_public);
    }
    match &f.created_by {
        None => {}
        Some(CreatedBy::System) => {
            q.push(" AND p.created_by = 'system'");
        }
        Some(CreatedBy::User(id)) => {
            q.push(" AND p.created_by = ").push_bind(id.to_string());
        }
    }
    q
}

/// One page of the personas `f.viewer` sees, and how many match in all.
pub async fn list(pool: &PgPool, f: &ListFilter) -> Result<(Vec<PersonaView>, i64), sqlx::Error> {
    let viewer = f.viewer.map(|v| v.to_string()).unwrap_or_default();
    let total: i64 = filtered(true, &viewer, f)
        .build_query_scalar()
        .fetch_one(pool)
        .await?;
    let mut rows = filtered(false, &viewer, f);
    rows.push(format!(
        " ORDER BY {} LIMIT {} OFFSET {}",
        f.sort.order_by(),
        f.per_page,
        (f.page - 1) * f.per_page
    ));
    let personas = rows.build_query_as().fetch_all(pool).await?;
    Ok((personas, total))
}

/// A document of a persona's knowledge, as its owner sees it (others see titles only).
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct KnowledgeDocumentView {
    pub id: String,
    pub title: String,
    pub format: String,
    pub chars: i32,
    pub status: String,
    pub passages: Option<i32>,
    pub embedded: Option<bool>,
    /// Why indexing failed.
    pub reason: Option<String>,
    pub added_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The documents of persona `id` (`rm_persona_knowledge`), oldest first.
pub async fn knowledge(
    pool: &PgPool,
    id: &PersonaId,
) -> Result<Vec<KnowledgeDocumentView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT document_id AS id, title, format, chars, status, passages, embedded, reason,
                added_at, updated_at
           FROM rm_persona_knowledge WHERE persona_id = $1 ORDER BY added_at, document_id",
    )
    .bind(id.as_str())
    .fetch_all(pool)
    .await
}
