use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};

use super::command::{PersonaCommand, PersonaDraft};
use super::event::PersonaEvent;
use super::rules::{Owner, TurnTaking};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PersonaError {
    #[error("persona not found")]
    NotFound,
    #[error("a persona with this id already exists")]
    AlreadyExists,
    #[error("system personas are read-only")]
    SystemPersona,
    /// Someone else's persona; `visible` says whether the caller may see it (public).
    #[error("this persona belongs to someone else")]
    NotOwner { visible: bool },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Persona {
    pub created: bool,
    pub deleted: bool,
    pub owner: Option<Owner>,
    pub name: String,
    pub description: String,
    pub voice_id: String,
    pub system_prompt: String,
    pub greeting: String,
    pub is_public: bool,
    pub tags: Vec<String>,
    pub turn_taking: TurnTaking,
}

impl Persona {
    pub fn exists(&self) -> bool {
        self.created && !self.deleted
    }

    fn check_owner(&self, by: uuid::Uuid) -> Result<(), PersonaError> {
        match self.owner {
            _ if !self.exists() => Err(PersonaError::NotFound),
            Some(Owner::System) => Err(PersonaError::SystemPersona),
            Some(Owner::User(owner)) if owner == by => Ok(()),
            _ => Err(PersonaError::NotOwner {
                visible: self.is_public,
            }),
        }
    }

    fn created_event(owner: Owner, d: PersonaDraft) -> PersonaEvent {
        PersonaEvent::PersonaCreated {
            owner,
            name: d.name,
            description: d.description,
            voice_id: d.voice_id,
            system_prompt: d.system_prompt,
            greeting: d.greeting,
            is_public: d.is_public,
            tags: d.tags,
            turn_taking: d.turn_taking,
        }
    }

    /// The fields of `d` that differ from the current state, as an update event.
    fn diff(&self, d: PersonaDraft) -> Option<PersonaEvent> {
        fn changed<T: PartialEq>(old: &T, new: T) -> Option<T> {
            (old != &new).then_some(new)
        }
        let event = PersonaEvent::PersonaUpdated {
            name: changed(&self.name, d.name),
            description: changed(&self.description, d.description),
            voice_id: changed(&self.voice_id, d.voice_id),
            system_prompt: changed(&self.system_prompt, d.system_prompt),
            greeting: changed(&self.greeting, d.greeting),
            is_public: changed(&self.is_public, d.is_public),
            tags: changed(&self.tags, d.tags),
            turn_taking: changed(&self.turn_taking, d.turn_taking),
        };
        let unchanged = PersonaEvent::PersonaUpdated {
            name: None,
            description: None,
            voice_id: None,
            system_prompt: None,
            greeting: None,
            is_public: None,
            tags: None,
            turn_taking: None,
        };
        (event != unchanged).then_some(event)
    }

    fn as_draft(&self) -> PersonaDraft {
        PersonaDraft {
            name: self.name.clone(),
            description: self.description.clone(),
            voice_id: self.voice_id.clone(),
            system_prompt: self.system_prompt.clone(),
            greeting: self.greeting.clone(),
            is_public: self.is_public,
            tags: self.tags.clone(),
            turn_taking: self.turn_taking,
        }
    }
}

impl Aggregate for Persona {
    const TYPE: &'static str = "persona";
    type Command = PersonaCommand;
    type Event = PersonaEvent;
    type Error = PersonaError;
    type Services = ();

    async fn handle(
        &mut self,
        command: PersonaCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), PersonaError> {
        match command {
            PersonaCommand::Create { owner, draft } => {
                if self.created {
                    return Err(PersonaError::AlreadyExists);
                }
                sink.write(Self::created_event(owner, draft), self).await;
            }
            PersonaCommand::DefineSystemPersona { draft } => match self.owner {
                None => {
                    sink.write(Self::created_event(Owner::System, draft), self)
                        .await
                }
                Some(Owner::System) => {
                    if let Some(event) = self.diff(draft) {
                        sink.write(event, self).await;
                    }
                }
                Some(Owner::User(_)) => return Err(PersonaError::AlreadyExists),
            },
            PersonaCommand::Update { by, patch } => {
                self.check_owner(by)?;
                let current = self.as_draft();
                let next = PersonaDraft {
                    name: patch.name.unwrap_or(current.name.clone()),
                    description: patch.description.unwrap_or(current.description.clone()),
                    voice_id: patch.voice_id.unwrap_or(current.voice_id.clone()),
                    system_prompt: patch.system_prompt.unwrap_or(current.system_prompt.clone()),
                    greeting: patch.greeting.unwrap_or(current.greeting.clone()),
                    is_public: patch.is_public.unwrap_or(current.is_public),
                    tags: patch.tags.unwrap_or(current.tags.clone()),
                    turn_taking: patch.turn_taking.unwrap_or(current.turn_taking),
                };
                if let Some(event) = self.diff(next) {
                    sink.write(event, self).await;
                }
            }
            PersonaCommand::Delete { by } => {
                self.check_owner(by)?;
                sink.write(PersonaEvent::PersonaDeleted, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: PersonaEvent) {
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
                *self = Persona {
                    created: true,
                    deleted: false,
                    owner: Some(owner),
                    name,
                    description,
                    voice_id,
                    system_prompt,
                    greeting,
                    is_public,
                    tags,
                    turn_taking,
                }
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
            } => {
                if let Some(v) = name {
                    self.name = v;
                }
                if let Some(v) = description {
                    self.description = v;
                }
                if let Some(v) = voice_id {
                    self.voice_id = v;
                }
                if let Some(v) = system_prompt {
                    self.system_prompt = v;
                }
                if let Some(v) = greeting {
                    self.greeting = v;
                }
                if let Some(v) = is_public {
                    self.is_public = v;
                }
                if let Some(v) = tags {
                    self.tags = v;
                }
                if let Some(v) = turn_taking {
                    self.turn_taking = v;
                }
            }
            PersonaEvent::PersonaDeleted => self.deleted = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;
    use uuid::Uuid;

    use super::*;
    use crate::persona::PersonaPatch;

    type Given = TestFramework<Persona>;

    fn draft(name: &str) -> PersonaDraft {
        PersonaDraft::parse(
            name,
            "A persona for the tests.",
            "pNInz6obpgDQGcFmaJgB",
            "You are a test persona. Be brief.",
            None,
            true,
            &["test".into()],
            TurnTaking::default(),
        )
        .unwrap()
    }

    fn created(owner: Owner, name: &str) -> PersonaEvent {
        Persona::created_event(owner, draft(name))
    }

    #[test]
    fn a_user_creates_a_persona() {
        let user = Uuid::now_v7();
        Given::with(())
            .given_no_previous_events()
            .when(PersonaCommand::Create {
                owner: Owner::User(user),
                draft: draft("Coach"),
            })
            .then_expect_events(vec![created(Owner::User(user), "Coach")]);
    }

    #[test]
    fn system_personas_are_read_only() {
        Given::with(())
            .given(vec![created(Owner::System, "Brad")])
            .when(PersonaCommand::Update {
                by: Uuid::now_v7(),
                patch: PersonaPatch::default(),
            })
            .then_expect_error(PersonaError::SystemPersona);
        Given::with(())
            .given(vec![created(Owner::System, "Brad")])
            .when(PersonaCommand::Delete { by: Uuid::now_v7() })
            .then_expect_error(PersonaError::SystemPersona);
    }

    #[test]
    fn defining_a_system_persona_twice_changes_nothing() {
        Given::with(())
            .given(vec![created(Owner::System, "Brad")])
            .when(PersonaCommand::DefineSystemPersona {
                draft: draft("Brad"),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn only_the_owner_edits_and_only_what_changed_is_recorded() {
        let owner = Uuid::now_v7();
        Given::with(())
            .given(vec![created(Owner::User(owner), "Coach")])
            .when(PersonaCommand::Update {
                by: Uuid::now_v7(),
                patch: PersonaPatch::default(),
            })
            .then_expect_error(PersonaError::NotOwner { visible: true });
        Given::with(())
            .given(vec![created(Owner::User(owner), "Coach")])
            .when(PersonaCommand::Update {
                by: owner,
                patch: PersonaPatch {
                    name: Some("Coach".into()),
                    is_public: Some(false),
                    ..Default::default()
                },
            })
            .then_expect_events(vec![PersonaEvent::PersonaUpdated {
                name: None,
                description: None,
                voice_id: None,
                system_prompt: None,
                greeting: None,
                is_public: Some(false),
                tags: None,
                turn_taking: None,
            }]);
    }

    #[test]
    fn a_deleted_persona_is_gone() {
        let owner = Uuid::now_v7();
        Given::with(())
            .given(vec![
                created(Owner::User(owner), "Coach"),
                PersonaEvent::PersonaDeleted,
            ])
            .when(PersonaCommand::Delete { by: owner })
            .then_expect_error(PersonaError::NotFound);
    }
}
