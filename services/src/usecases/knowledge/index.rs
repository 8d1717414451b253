//! Indexing a document: its text split into passages, embedded in batches on the
//! OpenAI-compatible `/embeddings` endpoint, written to `knowledge_passages` (full text by
//! Postgres's generated `tsvector`, the embedding beside it) in one transaction that replaces
//! whatever an earlier attempt wrote, so indexing again changes nothing. And the passages a
//! call loads.

use cmb_domain::cost::{Cost, CostKind};
use cmb_domain::knowledge::rank::PassageIn;
use cmb_domain::knowledge::split::{self, Passage};
use cmb_domain::knowledge::DocumentStatus;
use cmb_domain::persona::{Owner, Persona, PersonaCommand, PersonaError};
use cmb_domain::pricing::PricingError;
use cmb_domain::{CommandContext, DocumentId};
use cmb_providers::embeddings::Embeddings;
use sqlx::PgPool;

use crate::backbone::store::{CommandError, EventStore};

/// Passages embedded per request.
const BATCH: usize = 64;
/// Attempts per batch before the document is indexed for full-text search only.
const ATTEMPTS: u32 = 3;

#[derive(Debug, Clone, PartialEq)]
pub enum IndexOutcome {
    /// Already indexed or failed, or removed: nothing done.
    Settled,
    Indexed {
        passages: u32,
        embedded: bool,
    },
    Failed {
        reason: String,
    },
}

/// Why a document could not be indexed now: each is worth a retry (the store, the database
/// or the price list was unavailable); a document that can never be indexed is not an error
/// but [`IndexOutcome::Failed`].
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("loading or recording on the persona: {0}")]
    Persona(#[from] CommandError<PersonaError>),
    #[error("reading or writing the passages: {0}")]
    Db(#[from] sqlx::Error),
    #[error("loading prices: {0}")]
    Prices(#[from] CommandError<PricingError>),
}

/// Indexes document `document_id` of persona `persona_id`, if it is still waiting for it.
pub async fn index_document(
    store: &EventStore,
    embeddings: &Embeddings,
    persona_id: &str,
    document_id: &DocumentId,
    ctx: &CommandContext,
) -> Result<IndexOutcome, IndexError> {
    let (persona, _) = store.load::<Persona>(persona_id).await?;
    let waiting = persona.exists()
        && persona
            .document(document_id)
            .is_some_and(|d| d.status == DocumentStatus::Indexing);
    if !waiting {
        return Ok(IndexOutcome::Settled);
    }
    let body: Option<String> = sqlx::query_scalar(
        "SELECT body FROM knowledge_documents WHERE persona_id = $1 AND document_id = $2",
    )
    .bind(persona_id)
    .bind(document_id.as_str())
    .fetch_optional(store.pool())
    .await?;
    let passages = body.as_deref().map(split::split).unwrap_or_default();
    if passages.is_empty() {
        let reason = match body {
            None => "the document's text is missing",
            Some(_) => "the document has no text to index",
        }
        .to_string();
        let command = PersonaCommand::MarkKnowledgeFailed {
            document_id: document_id.clone(),
            reason: reason.clone(),
        };
        store.execute::<Persona>(persona_id, command, ctx).await?;
        return Ok(IndexOutcome::Failed { reason });
    }
    let (vectors, tokens) = embed_all(embeddings, &passages).await;
    let embedded = vectors.is_some();
    write_passages(store.pool(), persona_id, document_id, &passages, vectors).await?;
    let prices = crate::usecases::prices::current(store, chrono::Utc::now()).await?;
    let costs: Vec<Cost> = (tokens > 0)
        .then(|| prices.cost(CostKind::KnowledgeEmbeddingTokens, tokens as i64, false))
        .into_iter()
        .collect();
    let command = PersonaCommand::MarkKnowledgeIndexed {
        document_id: document_id.clone(),
        passages: passages.len() as u32,
        embedded,
        costs,
    };
    store.execute::<Persona>(persona_id, command, ctx).await?;
    if matches!(persona.owner, Some(Owner::User(_))) {
        tracing::info!(persona = %persona_id, document = %document_id, passages = passages.len(), embedded, "knowledge document indexed");
    }
    Ok(IndexOutcome::Indexed {
        passages: passages.len() as u32,
        embedded,
    })
}

/// Every passage's vector, and the tokens billed; `None` when a batch kept failing (the
/// tokens of the batches that succeeded are billed all the same).
async fn embed_all(embeddings: &Embeddings, passages: &[Passage]) -> (Option<Vec<Vec<f32>>>, u64) {
    let mut vectors = Vec::with_capacity(passages.len());
    let mut tokens = 0;
    for batch in passages.chunks(BATCH) {
        let inputs: Vec<String> = batch.iter().map(embedding_input).collect();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match embeddings.embed(&inputs).await {
                Ok(e) => {
                    tokens += e.prompt_tokens;
                    vectors.extend(e.vectors);
                    break;
                }
                Err(e) if attempt < ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, "embedding knowledge passages failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(500 * 2u64.pow(attempt)))
                        .await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "embedding knowledge passages failed; indexed for full-text search only");
                    return (None, tokens);
                }
            }
        }
    }
    (Some(vectors), tokens)
}

/// What is embedded of a passage: its heading and text.
fn embedding_input(p: &Passage) -> String {
    match &p.heading {
        Some(h) => format!("{h}\n{}", p.text),
        None => p.text.clone(),
    }
}

async fn write_passages(
    pool: &PgPool,
    persona_id: &str,
    document_id: &DocumentId,
    passages: &[Passage],
    vectors: Option<Vec<Vec<f32>>>,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM knowledge_passages WHERE persona_id = $1 AND document_id = $2")
        .bind(persona_id)
        .bind(document_id.as_str())
        .execute(&mut *tx)
        .await?;
    for (i, p) in passages.iter().enumerate() {
        let vector: Vec<f32> = vectors
            .as_ref()
            .and_then(|v| v.get(i).cloned())
            .unwrap_or_default();
        sqlx::query(
            "INSERT INTO knowledge_passages (persona_id, document_id, ord, heading, text, tokens, embedding)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(persona_id)
        .bind(document_id.as_str())
        .bind(p.ord as i32)
        .bind(&p.heading)
        .bind(&p.text)
        .bind(p.tokens as i32)
        .bind(vector)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// Deletes the passages of a removed document (again: nothing changes).
pub async fn drop_passages(
    pool: &PgPool,
    persona_id: &str,
    document_id: &DocumentId,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM knowledge_passages WHERE persona_id = $1 AND document_id = $2")
        .bind(persona_id)
        .bind(document_id.as_str())
        .execute(pool)
        .await?;
    Ok(())
}

/// The passages a call loads for persona `persona` (whose aggregate says which documents are
/// there now): at most `limit`, the most relevant to the persona's purpose first (Postgres
/// full-text rank against its name, description and tags), then in document order.
pub struct LoadedPassages {
    pub passages: Vec<PassageIn>,
    /// Passages the persona has beyond `limit`.
    pub left_out: usize,
}

#[derive(sqlx::FromRow)]
struct PassageRow {
    document_id: String,
    ord: i32,
    heading: Option<String>,
    text: String,
    tokens: i32,
    embedding: Vec<f32>,
    total: i64,
}

pub async fn passages(
    pool: &PgPool,
    persona_id: &str,
    persona: &Persona,
    limit: usize,
) -> Result<LoadedPassages, sqlx::Error> {
    let live: Vec<(DocumentId, String)> = persona
        .knowledge
        .iter()
        .filter(|d| matches!(d.status, DocumentStatus::Indexed { .. }))
        .map(|d| (d.document.document_id.clone(), d.document.title.clone()))
        .collect();
    if live.is_empty() {
        return Ok(LoadedPassages {
            passages: Vec::new(),
            left_out: 0,
        });
    }
    let ids: Vec<&str> = live.iter().map(|(id, _)| id.as_str()).collect();
    let purpose = format!(
        "{} {} {}",
        persona.name,
        persona.description,
        persona.tags.join(" ")
    );
    let rows: Vec<PassageRow> = sqlx::query_as(
        "SELECT document_id, ord, heading, text, tokens, embedding, count(*) OVER () AS total
           FROM knowledge_passages
          WHERE persona_id = $1 AND document_id = ANY($2)
          ORDER BY ts_rank(tsv, websearch_to_tsquery('english', $3)) DESC, document_id, ord
          LIMIT $4",
    )
    .bind(persona_id)
    .bind(&ids)
    .bind(purpose.replace(['"', '-'], " "))
    .bind(limit as i64)
    .fetch_all(pool)
    .await?;
    let total = rows.first().map(|r| r.total as usize).unwrap_or(0);
    let passages: Vec<PassageIn> = rows
        .into_iter()
        .map(|r| {
            let title = live
                .iter()
                .find(|(id, _)| id.as_str() == r.document_id)
                .map(|(_, t)| t.clone())
                .unwrap_or_default();
            PassageIn {
                id: format!("{}:{}", r.document_id, r.ord),
                document_title: title,
                heading: r.heading,
                text: r.text,
                tokens: r.tokens.max(0) as u32,
                embedding: r.embedding,
            }
        })
        .collect();
    Ok(LoadedPassages {
        left_out: total.saturating_sub(passages.len()),
        passages,
    })
}
