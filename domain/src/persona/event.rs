use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use super::rules::{Owner, TurnTaking};
use crate::cost::Cost;
use crate::ids::DocumentId;
use crate::knowledge::NewDocument;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PersonaEvent {
    PersonaCreated {
        owner: Owner,
        name: String,
        description: String,
        voice_id: String,
        system_prompt: String,
        greeting: String,
        is_public: bool,
        tags: Vec<String>,
        turn_taking: TurnTaking,
    },
    PersonaUpdated {
        /// Whose persona (so its texts are sealed under the owner's key, `privacy`); absent
        /// in updates recorded before it was added (`privacy migrate` adds it to those).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<Owner>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        description: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        voice_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        system_prompt: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        greeting: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        is_public: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tags: Option<Vec<String>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        turn_taking: Option<TurnTaking>,
    },
    PersonaDeleted,
    /// A document the persona draws on in calls; its text is in `knowledge_documents`.
    KnowledgeDocumentAdded {
        #[serde(flatten)]
        document: NewDocument,
        at: chrono::DateTime<chrono::Utc>,
        /// Whose persona (its title is sealed under the owner's key); absent before it was
        /// added (`privacy migrate` adds it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<Owner>,
    },
    /// Its passages are searchable (`knowledge_passages`); embedding them cost `costs`,
    /// billed to the persona's owner.
    KnowledgeDocumentIndexed {
        document_id: DocumentId,
        passages: u32,
        embedded: bool,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        costs: Vec<Cost>,
    },
    /// It could not be indexed, and why.
    KnowledgeDocumentIndexingFailed {
        document_id: DocumentId,
        reason: String,
    },
    KnowledgeDocumentRemoved {
        document_id: DocumentId,
    },
}

impl DomainEvent for PersonaEvent {
    fn event_type(&self) -> String {
        match self {
            PersonaEvent::PersonaCreated { .. } => "PersonaCreated",
            PersonaEvent::PersonaUpdated { .. } => "PersonaUpdated",
            PersonaEvent::PersonaDeleted => "PersonaDeleted",
            PersonaEvent::KnowledgeDocumentAdded { .. } => "KnowledgeDocumentAdded",
            PersonaEvent::KnowledgeDocumentIndexed { .. } => "KnowledgeDocumentIndexed",
            PersonaEvent::KnowledgeDocumentIndexingFailed { .. } => {
                "KnowledgeDocumentIndexingFailed"
            }
            PersonaEvent::KnowledgeDocumentRemoved { .. } => "KnowledgeDocumentRemoved",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1".to_string()
    }
}
