//! Persona knowledge: documents a persona's creator uploads (a philosophy, examples, a FAQ) that
//! the persona draws on during every call. The documents' life is recorded on the persona
//! aggregate (`KnowledgeDocumentAdded`, `…Indexed`, `…IndexingFailed`, `…Removed`); their text
//! lives beside the event log (`knowledge_documents`), their passages in `knowledge_passages`.
//! Here: the limits, the documents' states, how a text is split into passages (`split`) and how
//! passages are ranked against what the caller said (`rank`). No I/O.

pub mod library;
pub mod rank;
pub mod split;
pub mod vectors;

use serde::{Deserialize, Serialize};

use crate::cost::Cost;
use crate::ids::DocumentId;

/// At most this many documents per persona.
pub const MAX_DOCUMENTS: usize = 20;
/// The largest upload accepted, in bytes (a PDF is larger than its text).
pub const MAX_UPLOAD_BYTES: usize = 5 * 1024 * 1024;
/// The most text one document may hold once extracted, in characters.
pub const MAX_DOCUMENT_CHARS: usize = 200_000;
/// A title is 1 to this many characters.
pub const MAX_TITLE_CHARS: usize = 120;

/// The kinds of document accepted, by their media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocumentFormat {
    Text,
    Markdown,
    Html,
    Pdf,
}

impl DocumentFormat {
    /// From a media type (`text/plain`, `text/markdown`, `text/html`, `application/pdf`) or,
    /// failing that, a file name's extension.
    pub fn detect(content_type: Option<&str>, file_name: Option<&str>) -> Option<Self> {
        let media = content_type
            .map(|c| {
                c.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        match media.as_str() {
            "text/plain" => return Some(DocumentFormat::Text),
            "text/markdown" | "text/x-markdown" => return Some(DocumentFormat::Markdown),
            "text/html" | "application/xhtml+xml" => return Some(DocumentFormat::Html),
            "application/pdf" => return Some(DocumentFormat::Pdf),
            _ => {}
        }
        let ext = file_name?.rsplit_once('.')?.1.to_ascii_lowercase();
        match ext.as_str() {
            "txt" | "text" => Some(DocumentFormat::Text),
            "md" | "markdown" => Some(DocumentFormat::Markdown),
            "html" | "htm" => Some(DocumentFormat::Html),
            "pdf" => Some(DocumentFormat::Pdf),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DocumentFormat::Text => "text",
            DocumentFormat::Markdown => "markdown",
            DocumentFormat::Html => "html",
            DocumentFormat::Pdf => "pdf",
        }
    }
}

/// A document as it is added (its text already extracted and stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewDocument {
    pub document_id: DocumentId,
    pub title: String,
    pub format: DocumentFormat,
    /// Characters of extracted text.
    pub chars: u32,
    /// SHA-256 of the extracted text, hex: the same text is not added twice.
    pub sha256: String,
}

/// Where a document stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum DocumentStatus {
    Indexing,
    Indexed {
        passages: u32,
        /// False when the passages could not be embedded: only full-text search finds them.
        embedded: bool,
    },
    Failed {
        reason: String,
    },
}

impl DocumentStatus {
    pub fn name(&self) -> &'static str {
        match self {
            DocumentStatus::Indexing => "indexing",
            DocumentStatus::Indexed { .. } => "indexed",
            DocumentStatus::Failed { .. } => "failed",
        }
    }
}

/// A document of a persona, as the aggregate knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnowledgeDocument {
    pub document: NewDocument,
    pub status: DocumentStatus,
    pub added_at: chrono::DateTime<chrono::Utc>,
    /// What indexing it cost (embeddings), billed to the persona's owner.
    pub costs: Vec<Cost>,
}

/// Rough tokens of `text` (words × 4/3), the estimate used for budgets and passage sizes.
pub fn tokens(text: &str) -> usize {
    crate::cost::estimated_tokens(text.split_whitespace().count() as u64) as usize
}
