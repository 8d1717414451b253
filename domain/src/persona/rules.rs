use crate::ids::UserId;
use crate::values::{parse_name, Invalid};
use serde::{Deserialize, Serialize};

/// Who owns a persona.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "user_id")]
pub enum Owner {
    System,
    User(UserId),
}

impl Owner {
    /// The `created_by` column of the read model: `system` or the user id.
    pub fn created_by(&self) -> String {
        match self {
            Owner::System => "system".into(),
            Owner::User(id) => id.to_string(),
        }
    }
}

/// Per-persona turn-taking and silence thresholds, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnTaking {
    /// Silence after speech that ends the caller's turn.
    pub endpointing_ms: u32,
    /// Silence before a gentle reminder.
    pub silence_reminder_ms: u32,
    /// Silence before a polite goodbye and hang-up.
    pub silence_hangup_ms: u32,
}

impl Default for TurnTaking {
    fn default() -> Self {
        TurnTaking {
            endpointing_ms: 500,
            silence_reminder_ms: 10_000,
            silence_hangup_ms: 25_000,
        }
    }
}

impl TurnTaking {
    pub fn validate(self) -> Result<Self, Invalid> {
        if !(100..=3_000).contains(&self.endpointing_ms) {
            return Err(Invalid::new("endpointing_ms", "must be 100 to 3000"));
        }
        if !(3_000..=120_000).contains(&self.silence_reminder_ms) {
            return Err(Invalid::new(
                "silence_reminder_ms",
                "must be 3000 to 120000",
            ));
        }
        if self.silence_hangup_ms <= self.silence_reminder_ms || self.silence_hangup_ms > 300_000 {
            return Err(Invalid::new(
                "silence_hangup_ms",
                "must exceed silence_reminder_ms and be at most 300000",
            ));
        }
        Ok(self)
    }
}

/// How many personas a user may own.
#[derive(Debug, Clone, Copy)]
pub struct PersonaLimits {
    pub free: usize,
    pub premium: usize,
}

pub const PERSONA_LIMITS: PersonaLimits = PersonaLimits {
    free: 10,
    premium: 50,
};

/// At most 10 tags of 1 to 30 characters, lower-cased and de-duplicated.
pub fn parse_tags(raw: &[String]) -> Result<Vec<String>, Invalid> {
    if raw.len() > 10 {
        return Err(Invalid::new("tags", "at most 10 tags"));
    }
    let mut tags: Vec<String> = Vec::with_capacity(raw.len());
    for tag in raw {
        let tag = parse_name("tags", tag, 1, 30)?.to_lowercase();
        if tag.contains(',') {
            return Err(Invalid::new("tags", "a tag must not contain a comma"));
        }
        if !tags.contains(&tag) {
            tags.push(tag);
        }
    }
    Ok(tags)
}
