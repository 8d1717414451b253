//! Personas as the front end lists and searches them.

use async_trait::async_trait;
use cmb_domain::persona::PersonaEvent;
use cmb_domain::EventEnvelope;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::Projection;

mod queries;
pub use queries::*;

pub struct Personas;

#[async_trait]
impl Projection for Personas {
    fn name(&self) -> &'static str {
        "personas"
    }
    fn tables(&self) -> &'static [&'static str] {
        &["rm_personas", "rm_persona_knowledge"]
    }
    fn aggregate_types(&self) -> &'static [&'static str] {
        &["persona"]
    }
    async fn apply(&self, db: &mut PgConnection, e: &EventEnvelope) -> Result<(), sqlx::Error> {
        let event: PersonaEvent = e
            .decode()
            .map_err(|err| sqlx::Error::Decode(Box::new(err)))?;
        match event {
            PersonaEvent::PersonaCreated {
                owner,
                name,
                description,
                voice_id,
                system_prompt,
                greeting,
                is_public,
                tags,
                turn_taking,
            } => {
                sqlx::query(
                    "INSERT INTO rm_personas (id, created_by, name, description, voice_id, system_prompt,
                                              greeting, is_public, tags, turn_taking, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11)",
                )
                .bind(&e.aggregate_id)
                .bind(owner.created_by())
                .bind(name)
                .bind(description)
                .bind(voice_id)
                .bind(system_prompt)
                .bind(greeting)
                .bind(is_public)
                .bind(tags)
                .bind(sqlx::types::Json(turn_taking))
                .bind(e.occurred_at)
                .execute(db)
                .await?;
            }
            PersonaEvent::PersonaUpdated {
                name,
                description,
                voice_id,
                system_prompt,
                greeting,
                is_public,
                tags,
                turn_taking,
                ..
            } => {
                sqlx::query(
                    "UPDATE rm_personas SET
                        name = COALESCE($2, name),
                        description = COALESCE($3, description),
                        voice_id = COALESCE($4, voice_id),
                        system_prompt = COALESCE($5, system_prompt),
                        greeting = COALESCE($6, greeting),
                        is_public = COALESCE($7, is_public),
                        tags = COALESCE($8, tags),
                        turn_taking = COALESCE($9, turn_taking),
                        updated_at = $10
                      WHERE id = $1",
                )
                .bind(&e.aggregate_id)
                .bind(name)
                .bind(description)
                .bind(voice_id)
                .bind(system_prompt)
                .bind(greeting)
                .bind(is_public)
                .bind(tags)
                .bind(turn_taking.map(sqlx::types::Json))
                .bind(e.occurred_at)
                .execute(db)
                .await?;
            }
            PersonaEvent::PersonaDeleted => {
                sqlx::query("DELETE FROM rm_personas WHERE id = $1")
                    .bind(&e.aggregate_id)
                    .execute(&mut *db)
                    .await?;
                sqlx::query("DELETE FROM rm_persona_knowledge WHERE persona_id = $1")
                    .bind(&e.aggregate_id)
                    .execute(db)
                    .await?;
            }
            PersonaEvent::KnowledgeDocumentAdded { document, at, .. } => {
                sqlx::query(
                    "INSERT INTO rm_persona_knowledge (persona_id, document_id, title, format, chars,
                                                       status, added_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, 'indexing', $6, $7)
                     ON CONFLICT (persona_id, document_id) DO NOTHING",
                )
                .bind(&e.aggregate_id)
                .bind(document.document_id.as_str())
                .bind(&document.title)
                .bind(document.format.as_str())
                .bind(document.chars as i32)
                .bind(at)
                .bind(e.occurred_at)
                .execute(db)
                .await?;
            }
            PersonaEvent::KnowledgeDocumentIndexed {
                document_id,
                passages,
                embedded,
                ..
            } => {
                sqlx::query(
                    "UPDATE rm_persona_knowledge SET status = 'indexed', passages = $3,
                            embedded = $4, reason = NULL, updated_at = $5
                      WHERE persona_id = $1 AND document_id = $2",
                )
                .bind(&e.aggregate_id)
                .bind(document_id.as_str())
                .bind(passages as i32)
                .bind(embedded)
                .bind(e.occurred_at)
                .execute(db)
                .await?;
            }
            PersonaEvent::KnowledgeDocumentIndexingFailed {
                document_id,
                reason,
            } => {
                sqlx::query(
                    "UPDATE rm_persona_knowledge SET status = 'failed', reason = $3, updated_at = $4
                      WHERE persona_id = $1 AND document_id = $2",
                )
                .bind(&e.aggregate_id)
                .bind(document_id.as_str())
                .bind(reason)
                .bind(e.occurred_at)
                .execute(db)
                .await?;
            }
            PersonaEvent::KnowledgeDocumentRemoved { document_id } => {
                sqlx::query(
                    "DELETE FROM rm_persona_knowledge WHERE persona_id = $1 AND document_id = $2",
                )
                .bind(&e.aggregate_id)
                .bind(document_id.as_str())
                .execute(db)
                .await?;
            }
        }
        Ok(())
    }
}

/// A persona row as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct PersonaRow {
    pub id: String,
    pub created_by: String,
    pub name: String,
    pub description: String,
    pub voice_id: String,
    pub system_prompt: String,
    pub greeting: String,
    pub is_public: bool,
    pub tags: Vec<String>,
    pub turn_taking: sqlx::types::Json<cmb_domain::persona::TurnTaking>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

pub async fn get(pool: &PgPool, id: &str) -> Result<Option<PersonaRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM rm_personas WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// Every row, ordered by id: for comparing a rebuilt read model with the live one.
pub async fn dump(pool: &PgPool) -> Result<Vec<PersonaRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM rm_personas ORDER BY id")
        .fetch_all(pool)
        .await
}
