//! A user's own take on a persona they can see: a custom prompt added to the persona's, a
//! voice of their choosing, a favourite mark, and whether the persona may remember them.
//! One aggregate per user × persona (id `<user_id>:<persona_id>`).

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::values::{parse_text, Invalid};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Customization {
    pub custom_prompt: Option<String>,
    pub voice_override: Option<String>,
    pub favorite: bool,
    pub memory_enabled: bool,
}

/// Nothing customised; memory is on until the user turns it off.
impl Default for Customization {
    fn default() -> Self {
        Customization {
            custom_prompt: None,
            voice_override: None,
            favorite: false,
            memory_enabled: true,
        }
    }
}

impl Customization {
    pub fn parse_prompt(raw: &str) -> Result<Option<String>, Invalid> {
        if raw.trim().is_empty() {
            return Ok(None);
        }
        parse_text("custom_prompt", raw, 1, 1000).map(Some)
    }
}

pub fn preference_id(user_id: uuid::Uuid, persona_id: &str) -> String {
    format!("{user_id}:{persona_id}")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PreferenceEvent {
    PersonaCustomized {
        user_id: uuid::Uuid,
        persona_id: String,
        customization: Customization,
    },
}

impl DomainEvent for PreferenceEvent {
    fn event_type(&self) -> String {
        "PersonaCustomized".to_string()
    }
    fn event_version(&self) -> String {
        "1".to_string()
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PreferenceError {
    #[error("malformed preference id")]
    BadId,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Preference {
    pub customization: Option<Customization>,
}

/// The command carries the ids, so the aggregate can put them in its event.
#[derive(Debug, Clone, PartialEq)]
pub struct Customize {
    pub user_id: uuid::Uuid,
    pub persona_id: String,
    pub customization: Customization,
}

impl Aggregate for Preference {
    const TYPE: &'static str = "persona_preference";
    type Command = Customize;
    type Event = PreferenceEvent;
    type Error = PreferenceError;
    type Services = ();

    async fn handle(
        &mut self,
        c: Customize,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), PreferenceError> {
        let current = self.customization.clone().unwrap_or_default();
        if self.customization.is_some() && current == c.customization {
            return Ok(());
        }
        sink.write(
            PreferenceEvent::PersonaCustomized {
                user_id: c.user_id,
                persona_id: c.persona_id,
                customization: c.customization,
            },
            self,
        )
        .await;
        Ok(())
    }

    fn apply(&mut self, event: PreferenceEvent) {
        let PreferenceEvent::PersonaCustomized { customization, .. } = event;
        self.customization = Some(customization);
    }
}
