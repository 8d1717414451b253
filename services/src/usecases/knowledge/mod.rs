//! Persona knowledge: the owner adds documents (text, Markdown, HTML, PDF), lists and removes
//! them; system personas get their built-in libraries; the indexing worker splits, embeds and
//! indexes each document (`index`); a call loads the passages (`passages`). The text of a
//! document lives in `knowledge_documents`, its passages in `knowledge_passages` (this module
//! is the only one that knows those two tables); what happened to it is on the persona
//! aggregate.

pub mod index;

use cmb_domain::knowledge::{
    library, split, DocumentFormat, NewDocument, MAX_DOCUMENT_CHARS, MAX_TITLE_CHARS,
    MAX_UPLOAD_BYTES,
};
use cmb_domain::persona::{Persona, PersonaCommand, PersonaError};
use cmb_domain::values::Invalid;
use cmb_domain::{CommandContext, DocumentId, PersonaId, UserId};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::backbone::store::{CommandError, Committed, EventStore};
use crate::usecases::personas;

pub use index::{
    drop_passages, index_document, passages, IndexError, IndexOutcome, LoadedPassages,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error(transparent)]
    Persona(#[from] personas::Error),
    #[error(transparent)]
    Rejected(#[from] CommandError<PersonaError>),
    #[error("the document is larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("knowledge: {0}")]
    Db(#[from] sqlx::Error),
}

/// A document as uploaded.
pub struct Upload {
    pub title: Option<String>,
    pub file_name: Option<String>,
    pub format: DocumentFormat,
    pub bytes: Vec<u8>,
}

/// The text of an upload: UTF-8 for text, Markdown and HTML (HTML reduced to text with its
/// headings), extracted for PDF. Bad input is an `Invalid` on field `file`.
pub async fn extract_text(format: DocumentFormat, bytes: Vec<u8>) -> Result<String, Error> {
    if bytes.len() > MAX_UPLOAD_BYTES {
        return Err(Error::TooLarge {
            max: MAX_UPLOAD_BYTES,
        });
    }
    let raw = match format {
        DocumentFormat::Pdf => {
            if !bytes.starts_with(b"%PDF") {
                return Err(Invalid::new("file", "this is not a PDF file").into());
            }
            // Parsing a hostile PDF is CPU work, and the parser may panic: off the runtime,
            // with a panic turned into a refusal.
            let parsed = tokio::task::spawn_blocking(move || {
                std::panic::catch_unwind(|| pdf_extract::extract_text_from_mem(&bytes))
            })
            .await;
            match parsed {
                Ok(Ok(Ok(text))) => text,
                _ => {
                    return Err(
                        Invalid::new("file", "the PDF could not be read (no text found)").into(),
                    )
                }
            }
        }
        _ => String::from_utf8(bytes).map_err(|_| Invalid::new("file", "the text is not UTF-8"))?,
    };
    let text = split::normalize(format, &raw);
    let text = text.trim().to_string();
    if text.split_whitespace().next().is_none() {
        return Err(Invalid::new("file", "the document has no text").into());
    }
    if text.chars().count() > MAX_DOCUMENT_CHARS {
        return Err(Invalid::new(
            "file",
            format!("a document holds at most {MAX_DOCUMENT_CHARS} characters of text"),
        )
        .into());
    }
    Ok(text)
}

/// The title given, else the file name without its extension, else the first words.
fn title_of(upload: &Upload, text: &str) -> Result<String, Invalid> {
    let given = upload
        .title
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let from_file = upload
        .file_name
        .as_deref()
        .map(|f| f.rsplit_once('.').map(|(stem, _)| stem).unwrap_or(f).trim())
        .filter(|t| !t.is_empty());
    let title = match given.or(from_file) {
        Some(t) => t.to_string(),
        None => text
            .split_whitespace()
            .take(8)
            .collect::<Vec<_>>()
            .join(" ")
            .trim_start_matches('#')
            .trim()
            .to_string(),
    };
    if given.is_some() && title.chars().count() > MAX_TITLE_CHARS {
        return Err(Invalid::new(
            "title",
            format!("title: at most {MAX_TITLE_CHARS} characters"),
        ));
    }
    Ok(title.chars().take(MAX_TITLE_CHARS).collect())
}

fn sha256(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Stores the document's text, then records it on the persona (whose owner `user` must be).
/// Returns the document and the commit.
pub async fn add(
    store: &EventStore,
    user: UserId,
    persona: &PersonaId,
    upload: Upload,
    ctx: &CommandContext,
) -> Result<(NewDocument, Committed), Error> {
    // Ownership first: a stranger learns nothing from a validation error.
    personas::owned(store, persona, user).await?;
    let persona_id = persona.as_str();
    let format = upload.format;
    let mut upload = upload;
    let text = extract_text(format, std::mem::take(&mut upload.bytes)).await?;
    let document = NewDocument {
        document_id: DocumentId::new(Uuid::now_v7().to_string()),
        title: title_of(&upload, &text)?,
        format,
        chars: text.chars().count() as u32,
        sha256: sha256(&text),
    };
    store_text(store.pool(), persona_id, &document, &text).await?;
    let command = PersonaCommand::AddKnowledge {
        by: user,
        document: document.clone(),
        at: chrono::Utc::now(),
    };
    match store.execute::<Persona>(persona_id, command, ctx).await {
        Ok(c) => Ok((document, c)),
        Err(e) => {
            forget_text(store.pool(), persona_id, &document.document_id).await;
            Err(e.into())
        }
    }
}

async fn store_text(
    pool: &sqlx::PgPool,
    persona_id: &str,
    document: &NewDocument,
    text: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO knowledge_documents (persona_id, document_id, format, body)
         VALUES ($1, $2, $3, $4) ON CONFLICT (persona_id, document_id) DO NOTHING",
    )
    .bind(persona_id)
    .bind(document.document_id.as_str())
    .bind(document.format.as_str())
    .bind(text)
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes a document's text and passages (best effort: the aggregate already says it is
/// gone, and a call only uses passages of documents the aggregate has).
async fn forget_text(pool: &sqlx::PgPool, persona_id: &str, document_id: &DocumentId) {
    for table in ["knowledge_passages", "knowledge_documents"] {
        let done = sqlx::query(&format!(
            "DELETE FROM {table} WHERE persona_id = $1 AND document_id = $2"
        ))
        .bind(persona_id)
        .bind(document_id.as_str())
        .execute(pool)
        .await;
        if let Err(e) = done {
            tracing::warn!(persona = %persona_id, document = %document_id, error = %e, "deleting a document's {table} failed");
        }
    }
}

/// Deletes the text and passages of every document of persona `persona_id` (a deleted
/// persona's; again: nothing changes). Returns how many documents went.
pub async fn forget_persona(pool: &sqlx::PgPool, persona_id: &str) -> Result<u64, sqlx::Error> {
    sqlx::query("DELETE FROM knowledge_passages WHERE persona_id = $1")
        .bind(persona_id)
        .execute(pool)
        .await?;
    let done = sqlx::query("DELETE FROM knowledge_documents WHERE persona_id = $1")
        .bind(persona_id)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

/// Removes document `document_id` of `user`'s persona: recorded, then its text and passages
/// deleted.
pub async fn remove(
    store: &EventStore,
    user: UserId,
    persona: &PersonaId,
    document_id: &DocumentId,
    ctx: &CommandContext,
) -> Result<Committed, Error> {
    personas::owned(store, persona, user).await?;
    let persona_id = persona.as_str();
    let command = PersonaCommand::RemoveKnowledge {
        by: user,
        document_id: document_id.clone(),
    };
    let committed = store.execute::<Persona>(persona_id, command, ctx).await?;
    forget_text(store.pool(), persona_id, document_id).await;
    Ok(committed)
}

/// Brings every system persona's built-in library to what this build ships (after
/// `personas::define_system_personas`; idempotent, safe from any number of instances).
pub async fn define_system_libraries(
    store: &EventStore,
) -> Result<Vec<Committed>, CommandError<PersonaError>> {
    let ctx = CommandContext::system("define-system-libraries");
    let mut committed = Vec::new();
    for p in cmb_domain::persona::system::system_personas() {
        committed.push(define_system_library(store, p.id, &ctx).await?);
    }
    Ok(committed)
}

/// Brings system persona `persona_id`'s built-in library to what this build ships (a
/// document's id carries its text's hash, so a changed text is a new document).
async fn define_system_library(
    store: &EventStore,
    persona_id: &str,
    ctx: &CommandContext,
) -> Result<Committed, CommandError<PersonaError>> {
    let mut documents = Vec::new();
    for shipped in library::library(persona_id) {
        let text = shipped.markdown.trim();
        let hash = sha256(text);
        let document = NewDocument {
            document_id: DocumentId::new(format!("{}-{}", shipped.slug, &hash[..12])),
            title: shipped.title.to_string(),
            format: DocumentFormat::Markdown,
            chars: text.chars().count() as u32,
            sha256: hash,
        };
        store_text(store.pool(), persona_id, &document, text)
            .await
            .map_err(|e| CommandError::Store(e.into()))?;
        documents.push(document);
    }
    let command = PersonaCommand::DefineSystemKnowledge {
        documents,
        at: chrono::Utc::now(),
    };
    store.execute::<Persona>(persona_id, command, ctx).await
}
