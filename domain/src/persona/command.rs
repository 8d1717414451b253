use super::rules::{Owner, TurnTaking};
use crate::cost::Cost;
use crate::ids::{DocumentId, UserId};
use crate::knowledge::NewDocument;
use crate::values::{parse_name, parse_text, Invalid};

/// A persona's full definition, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct PersonaDraft {
    pub name: String,
    pub description: String,
    pub voice_id: String,
    pub system_prompt: String,
    pub greeting: String,
    pub is_public: bool,
    pub tags: Vec<String>,
    pub turn_taking: TurnTaking,
}

impl PersonaDraft {
    /// Validates every field against the PRD's rules (name 3–50, description 10–500,
    /// prompt 20–2000, at most 10 tags).
    #[allow(clippy::too_many_arguments)]
    pub fn parse(
        name: &str,
        description: &str,
        voice_id: &str,
        system_prompt: &str,
        greeting: Option<&str>,
        is_public: bool,
        tags: &[String],
        turn_taking: TurnTaking,
    ) -> Result<PersonaDraft, Invalid> {
        let name = parse_name("name", name, 3, 50)?;
        let greeting = match greeting {
            Some(g) => parse_text("greeting", g, 1, 300)?,
            None => format!("Hi, it's {name}. Good to hear from you!"),
        };
        Ok(PersonaDraft {
            description: parse_text("description", description, 10, 500)?,
            voice_id: parse_voice_id(voice_id)?,
            system_prompt: parse_text("system_prompt", system_prompt, 20, 2000)?,
            greeting,
            is_public,
            tags: super::rules::parse_tags(tags)?,
            turn_taking: turn_taking.validate()?,
            name,
        })
    }
}

/// ElevenLabs voice ids are short alphanumeric strings.
pub fn parse_voice_id(raw: &str) -> Result<String, Invalid> {
    let s = raw.trim();
    if s.is_empty() || s.len() > 50 || !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(Invalid::new("voice", "must be an ElevenLabs voice id"));
    }
    Ok(s.to_string())
}

/// Changes to a persona; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PersonaPatch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub voice_id: Option<String>,
    pub system_prompt: Option<String>,
    pub greeting: Option<String>,
    pub is_public: Option<bool>,
    pub tags: Option<Vec<String>>,
    pub turn_taking: Option<TurnTaking>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PersonaCommand {
    Create {
        owner: Owner,
        draft: PersonaDraft,
    },
    /// Brings a system persona to its shipped definition; does nothing when it already is.
    DefineSystemPersona {
        draft: PersonaDraft,
    },
    Update {
        by: UserId,
        patch: PersonaPatch,
    },
    Delete {
        by: UserId,
    },
    /// The owner adds a document (its text already stored).
    AddKnowledge {
        by: UserId,
        document: NewDocument,
        at: chrono::DateTime<chrono::Utc>,
    },
    /// The indexing worker's outcome; nothing happens for a document removed or already
    /// settled (a redelivered message).
    MarkKnowledgeIndexed {
        document_id: DocumentId,
        passages: u32,
        embedded: bool,
        costs: Vec<Cost>,
    },
    MarkKnowledgeFailed {
        document_id: DocumentId,
        reason: String,
    },
    RemoveKnowledge {
        by: UserId,
        document_id: DocumentId,
    },
    /// Brings a system persona's built-in library to `documents`: adds what is missing,
    /// removes what is no longer shipped.
    DefineSystemKnowledge {
        documents: Vec<NewDocument>,
        at: chrono::DateTime<chrono::Utc>,
    },
}
