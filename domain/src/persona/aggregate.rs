use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};

use super::command::{PersonaCommand, PersonaDraft};
use super::event::PersonaEvent;
use super::rules::{Owner, TurnTaking};
use crate::ids::{DocumentId, UserId};
use crate::knowledge::{DocumentStatus, KnowledgeDocument, NewDocument, MAX_DOCUMENTS};

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
    #[error("a persona holds at most {max} documents; remove one first")]
    TooManyDocuments { max: usize },
    #[error("this text is already in the persona's knowledge as \"{title}\"")]
    DuplicateDocument { title: String },
    #[error("no such document")]
    DocumentNotFound,
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
    /// The documents it draws on in calls, in the order they were added.
    #[serde(default)]
    pub knowledge: Vec<KnowledgeDocument>,
}

impl Persona {
    pub fn document(&self, id: &DocumentId) -> Option<&KnowledgeDocument> {
        self.knowledge
            .iter()
            .find(|d| &d.document.document_id == id)
    }

    fn add_document(
        &self,
        document: NewDocument,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<PersonaEvent, PersonaError> {
        if self.knowledge.len() >= MAX_DOCUMENTS {
            return Err(PersonaError::TooManyDocuments { max: MAX_DOCUMENTS });
        }
        if let Some(d) = self.knowledge.iter().find(|d| {
            d.document.sha256 == document.sha256 || d.document.document_id == document.document_id
        }) {
            return Err(PersonaError::DuplicateDocument {
                title: d.document.title.clone(),
            });
        }
        Ok(PersonaEvent::KnowledgeDocumentAdded {
            document,
            at,
            owner: self.owner,
        })
    }

    /// Whether document `id` is there and still waiting for its indexing outcome.
    fn indexing(&self, id: &DocumentId) -> bool {
        self.exists()
            && self
                .document(id)
                .is_some_and(|d| d.status == DocumentStatus::Indexing)
    }

    pub fn exists(&self) -> bool {
        self.created && !self.deleted
    }

    fn check_owner(&self, by: UserId) -> Result<(), PersonaError> {
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
            owner: self.owner,
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
            owner: self.owner,
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
            PersonaCommand::AddKnowledge { by, document, at } => {
                self.check_owner(by)?;
                let event = self.add_document(document, at)?;
                sink.write(event, self).await;
            }
            PersonaCommand::MarkKnowledgeIndexed {
                document_id,
                passages,
                embedded,
                costs,
            } => {
                if self.indexing(&document_id) {
                    let event = PersonaEvent::KnowledgeDocumentIndexed {
                        document_id,
                        passages,
                        embedded,
                        costs,
                    };
                    sink.write(event, self).await;
                }
            }
            PersonaCommand::MarkKnowledgeFailed {
                document_id,
                reason,
            } => {
                if self.indexing(&document_id) {
                    let event = PersonaEvent::KnowledgeDocumentIndexingFailed {
                        document_id,
                        reason,
                    };
                    sink.write(event, self).await;
                }
            }
            PersonaCommand::RemoveKnowledge { by, document_id } => {
                self.check_owner(by)?;
                if self.document(&document_id).is_none() {
                    return Err(PersonaError::DocumentNotFound);
                }
                sink.write(PersonaEvent::KnowledgeDocumentRemoved { document_id }, self)
                    .await;
            }
            PersonaCommand::DefineSystemKnowledge { documents, at } => {
                if self.owner != Some(Owner::System) || !self.exists() {
                    return Err(PersonaError::NotFound);
                }
                let shipped: Vec<&DocumentId> = documents.iter().map(|d| &d.document_id).collect();
                let gone: Vec<DocumentId> = self
                    .knowledge
                    .iter()
                    .map(|d| d.document.document_id.clone())
                    .filter(|id| !shipped.contains(&id))
                    .collect();
                for document_id in gone {
                    sink.write(PersonaEvent::KnowledgeDocumentRemoved { document_id }, self)
                        .await;
                }
                for document in documents {
                    if self.document(&document.document_id).is_none() {
                        let event = self.add_document(document, at)?;
                        sink.write(event, self).await;
                    }
                }
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
                    knowledge: Vec::new(),
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
                ..
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
            PersonaEvent::KnowledgeDocumentAdded { document, at, .. } => {
                self.knowledge.push(KnowledgeDocument {
                    document,
                    status: DocumentStatus::Indexing,
                    added_at: at,
                    costs: Vec::new(),
                })
            }
            PersonaEvent::KnowledgeDocumentIndexed {
                document_id,
                passages,
                embedded,
                costs,
            } => {
                if let Some(d) = self
                    .knowledge
                    .iter_mut()
                    .find(|d| d.document.document_id == document_id)
                {
                    d.status = DocumentStatus::Indexed { passages, embedded };
                    d.costs = costs;
                }
            }
            PersonaEvent::KnowledgeDocumentIndexingFailed {
                document_id,
                reason,
            } => {
                if let Some(d) = self
                    .knowledge
                    .iter_mut()
                    .find(|d| d.document.document_id == document_id)
                {
                    d.status = DocumentStatus::Failed { reason };
                }
            }
            PersonaEvent::KnowledgeDocumentRemoved { document_id } => self
                .knowledge
                .retain(|d| d.document.document_id != document_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

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
        let user = UserId::generate();
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
                by: UserId::generate(),
                patch: PersonaPatch::default(),
            })
            .then_expect_error(PersonaError::SystemPersona);
        Given::with(())
            .given(vec![created(Owner::System, "Brad")])
            .when(PersonaCommand::Delete {
                by: UserId::generate(),
            })
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
        let owner = UserId::generate();
        Given::with(())
            .given(vec![created(Owner::User(owner), "Coach")])
            .when(PersonaCommand::Update {
                by: UserId::generate(),
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
                owner: Some(Owner::User(owner)),
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
        let owner = UserId::generate();
        Given::with(())
            .given(vec![
                created(Owner::User(owner), "Coach"),
                PersonaEvent::PersonaDeleted,
            ])
            .when(PersonaCommand::Delete { by: owner })
            .then_expect_error(PersonaError::NotFound);
    }

    fn doc(id: &str, sha: &str) -> crate::knowledge::NewDocument {
        crate::knowledge::NewDocument {
            document_id: id.into(),
            title: format!("Doc {id}"),
            format: crate::knowledge::DocumentFormat::Markdown,
            chars: 100,
            sha256: sha.into(),
        }
    }

    fn at() -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap()
    }

    #[test]
    fn only_the_owner_adds_knowledge_and_the_same_text_is_not_added_twice() {
        let owner = UserId::generate();
        let added = PersonaEvent::KnowledgeDocumentAdded {
            document: doc("d1", "aa"),
            at: at(),
            owner: Some(Owner::User(owner)),
        };
        Given::with(())
            .given(vec![created(Owner::User(owner), "Coach")])
            .when(PersonaCommand::AddKnowledge {
                by: owner,
                document: doc("d1", "aa"),
                at: at(),
            })
            .then_expect_events(vec![added.clone()]);
        Given::with(())
            .given(vec![created(Owner::User(owner), "Coach")])
            .when(PersonaCommand::AddKnowledge {
                by: UserId::generate(),
                document: doc("d1", "aa"),
                at: at(),
            })
            .then_expect_error(PersonaError::NotOwner { visible: true });
        Given::with(())
            .given(vec![created(Owner::User(owner), "Coach"), added])
            .when(PersonaCommand::AddKnowledge {
                by: owner,
                document: doc("d2", "aa"),
                at: at(),
            })
            .then_expect_error(PersonaError::DuplicateDocument {
                title: "Doc d1".into(),
            });
    }

    #[test]
    fn a_persona_holds_a_bounded_number_of_documents() {
        let owner = UserId::generate();
        let mut given = vec![created(Owner::User(owner), "Coach")];
        for i in 0..crate::knowledge::MAX_DOCUMENTS {
            given.push(PersonaEvent::KnowledgeDocumentAdded {
                document: doc(&format!("d{i}"), &format!("sha{i}")),
                at: at(),
                owner: Some(Owner::User(owner)),
            });
        }
        Given::with(())
            .given(given)
            .when(PersonaCommand::AddKnowledge {
                by: owner,
                document: doc("new", "new"),
                at: at(),
            })
            .then_expect_error(PersonaError::TooManyDocuments {
                max: crate::knowledge::MAX_DOCUMENTS,
            });
    }

    #[test]
    fn indexing_is_recorded_once_and_never_for_a_removed_document() {
        let owner = UserId::generate();
        let added = PersonaEvent::KnowledgeDocumentAdded {
            document: doc("d1", "aa"),
            at: at(),
            owner: Some(Owner::User(owner)),
        };
        let indexed = PersonaEvent::KnowledgeDocumentIndexed {
            document_id: "d1".into(),
            passages: 3,
            embedded: true,
            costs: vec![],
        };
        let mark = || PersonaCommand::MarkKnowledgeIndexed {
            document_id: "d1".into(),
            passages: 3,
            embedded: true,
            costs: vec![],
        };
        Given::with(())
            .given(vec![created(Owner::User(owner), "Coach"), added.clone()])
            .when(mark())
            .then_expect_events(vec![indexed.clone()]);
        Given::with(())
            .given(vec![
                created(Owner::User(owner), "Coach"),
                added.clone(),
                indexed,
            ])
            .when(mark())
            .then_expect_events(vec![]);
        Given::with(())
            .given(vec![
                created(Owner::User(owner), "Coach"),
                added,
                PersonaEvent::KnowledgeDocumentRemoved {
                    document_id: "d1".into(),
                },
            ])
            .when(mark())
            .then_expect_events(vec![]);
    }

    #[test]
    fn removing_needs_the_owner_and_an_existing_document() {
        let owner = UserId::generate();
        Given::with(())
            .given(vec![created(Owner::User(owner), "Coach")])
            .when(PersonaCommand::RemoveKnowledge {
                by: owner,
                document_id: "nope".into(),
            })
            .then_expect_error(PersonaError::DocumentNotFound);
    }

    #[test]
    fn a_system_library_is_brought_to_its_shipped_documents() {
        let old = PersonaEvent::KnowledgeDocumentAdded {
            document: doc("old", "o"),
            at: at(),
            owner: Some(Owner::System),
        };
        let keep = PersonaEvent::KnowledgeDocumentAdded {
            document: doc("keep", "k"),
            at: at(),
            owner: Some(Owner::System),
        };
        Given::with(())
            .given(vec![created(Owner::System, "Brad"), old, keep])
            .when(PersonaCommand::DefineSystemKnowledge {
                documents: vec![doc("keep", "k"), doc("new", "n")],
                at: at(),
            })
            .then_expect_events(vec![
                PersonaEvent::KnowledgeDocumentRemoved {
                    document_id: "old".into(),
                },
                PersonaEvent::KnowledgeDocumentAdded {
                    document: doc("new", "n"),
                    at: at(),
                    owner: Some(Owner::System),
                },
            ]);
    }
}
