//! A user's contacts: the personas they keep at hand ("add to contacts"), at most 50.
//! Whether a persona may be added (exists, visible to the user) is checked by the service
//! against the persona before the command; this aggregate keeps the list's own rules.

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

pub const MAX_CONTACTS: usize = 50;

#[derive(Debug, Clone, PartialEq)]
pub enum ContactsCommand {
    Add {
        persona_id: String,
        at: DateTime<Utc>,
    },
    Remove {
        persona_id: String,
        reason: RemovalReason,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemovalReason {
    ByUser,
    PersonaDeleted,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ContactsEvent {
    ContactAdded {
        persona_id: String,
        at: DateTime<Utc>,
    },
    ContactRemoved {
        persona_id: String,
        reason: RemovalReason,
    },
}

impl DomainEvent for ContactsEvent {
    fn event_type(&self) -> String {
        match self {
            ContactsEvent::ContactAdded { .. } => "ContactAdded",
            ContactsEvent::ContactRemoved { .. } => "ContactRemoved",
        }
        .to_string()
    }
    fn event_version(&self) -> String {
        "1".to_string()
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ContactsError {
    #[error("this persona is already in your contacts")]
    AlreadyAdded,
    #[error("you can keep at most {MAX_CONTACTS} contacts")]
    Full,
    #[error("this persona is not in your contacts")]
    NotAContact,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Contacts {
    pub persona_ids: Vec<String>,
}

impl Aggregate for Contacts {
    const TYPE: &'static str = "contacts";
    type Command = ContactsCommand;
    type Event = ContactsEvent;
    type Error = ContactsError;
    type Services = ();

    async fn handle(
        &mut self,
        command: ContactsCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), ContactsError> {
        match command {
            ContactsCommand::Add { persona_id, at } => {
                if self.persona_ids.contains(&persona_id) {
                    return Err(ContactsError::AlreadyAdded);
                }
                if self.persona_ids.len() >= MAX_CONTACTS {
                    return Err(ContactsError::Full);
                }
                sink.write(ContactsEvent::ContactAdded { persona_id, at }, self)
                    .await;
            }
            ContactsCommand::Remove { persona_id, reason } => {
                if !self.persona_ids.contains(&persona_id) {
                    // A clean-up after a persona's deletion may come twice: nothing to do.
                    return match reason {
                        RemovalReason::PersonaDeleted => Ok(()),
                        RemovalReason::ByUser => Err(ContactsError::NotAContact),
                    };
                }
                sink.write(ContactsEvent::ContactRemoved { persona_id, reason }, self)
                    .await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: ContactsEvent) {
        match event {
            ContactsEvent::ContactAdded { persona_id, .. } => self.persona_ids.push(persona_id),
            ContactsEvent::ContactRemoved { persona_id, .. } => {
                self.persona_ids.retain(|p| *p != persona_id)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    fn added(id: &str) -> ContactsEvent {
        ContactsEvent::ContactAdded {
            persona_id: id.into(),
            at: DateTime::<Utc>::MIN_UTC,
        }
    }

    #[test]
    fn duplicates_and_the_fifty_first_are_refused() {
        TestFramework::<Contacts>::with(())
            .given(vec![added("brad_001")])
            .when(ContactsCommand::Add {
                persona_id: "brad_001".into(),
                at: Utc::now(),
            })
            .then_expect_error(ContactsError::AlreadyAdded);
        let fifty: Vec<_> = (0..50).map(|i| added(&format!("p{i}"))).collect();
        TestFramework::<Contacts>::with(())
            .given(fifty)
            .when(ContactsCommand::Add {
                persona_id: "p50".into(),
                at: Utc::now(),
            })
            .then_expect_error(ContactsError::Full);
    }

    #[test]
    fn a_deleted_personas_clean_up_is_idempotent() {
        TestFramework::<Contacts>::with(())
            .given(vec![])
            .when(ContactsCommand::Remove {
                persona_id: "gone".into(),
                reason: RemovalReason::PersonaDeleted,
            })
            .then_expect_events(vec![]);
    }
}
