//! What a persona remembers about a user: facts, a rolling summary and open items to follow
//! up on. One aggregate per user × persona (id `<user_id>:<persona_id>`), so memory never
//! crosses users and one persona never sees another's.
//!
//! The memory worker digests each finished call once (`CallDigested` makes a redelivered call
//! a no-op). The user can forget one item or everything; those events are tombstones that
//! carry no content.

pub mod embed;
pub mod extraction;
pub mod prompt;

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// The longest summary kept, in characters.
pub const SUMMARY_MAX_CHARS: usize = 1200;
/// The id under which the summary can be forgotten like an item.
pub const SUMMARY_ID: &str = "summary";

pub fn memory_id(user_id: uuid::Uuid, persona_id: &str) -> String {
    format!("{user_id}:{persona_id}")
}

/// `<user_id>:<persona_id>` back into its parts (a user id is a UUID, so the first `:` splits).
pub fn parse_memory_id(id: &str) -> Option<(uuid::Uuid, &str)> {
    let (user, persona) = id.split_once(':')?;
    Some((uuid::Uuid::parse_str(user).ok()?, persona))
}

/// A fact about the user, as learned from a call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fact {
    pub id: String,
    pub text: String,
    /// `preference`, `person`, `goal`, `event` or `other`.
    pub kind: String,
    pub at: DateTime<Utc>,
    /// The embedding provider's vector, kept in the event so a rebuild reproduces it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embedding: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenItem {
    pub id: String,
    pub text: String,
    pub call_id: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RememberedFact {
    pub fact: Fact,
    pub call_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MemoryEvent {
    FactsLearned {
        call_id: String,
        facts: Vec<Fact>,
    },
    SummaryRewritten {
        call_id: String,
        summary: String,
    },
    OpenItemOpened {
        id: String,
        text: String,
        call_id: String,
        at: DateTime<Utc>,
    },
    OpenItemClosed {
        id: String,
        call_id: String,
    },
    /// Tombstone: which item went, never what it said.
    MemoryItemForgotten {
        id: String,
    },
    /// Tombstone: everything went.
    MemoryCleared,
    /// The call was digested (or skipped, with the reason); it is never extracted again.
    CallDigested {
        call_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        skipped: Option<String>,
    },
}

impl DomainEvent for MemoryEvent {
    fn event_type(&self) -> String {
        match self {
            MemoryEvent::FactsLearned { .. } => "FactsLearned",
            MemoryEvent::SummaryRewritten { .. } => "SummaryRewritten",
            MemoryEvent::OpenItemOpened { .. } => "OpenItemOpened",
            MemoryEvent::OpenItemClosed { .. } => "OpenItemClosed",
            MemoryEvent::MemoryItemForgotten { .. } => "MemoryItemForgotten",
            MemoryEvent::MemoryCleared => "MemoryCleared",
            MemoryEvent::CallDigested { .. } => "CallDigested",
        }
        .to_string()
    }
    fn event_version(&self) -> String {
        "1".into()
    }
}

/// What one call taught, validated (see [`extraction`]), with ids and vectors given by the
/// worker (the domain makes no ids and calls no provider).
#[derive(Debug, Clone, PartialEq)]
pub struct Digest {
    pub call_id: String,
    pub facts: Vec<Fact>,
    pub summary: Option<String>,
    pub open_items: Vec<(String, String)>,
    pub closed_items: Vec<String>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum MemoryCommand {
    Digest(Digest),
    /// The call could not be digested; remember that it was tried.
    Skip {
        call_id: String,
        reason: String,
    },
    Forget {
        id: String,
    },
    /// What was learned from these calls goes: their transcripts reached the end of their
    /// retention (facts, open items, and the summary when one of them last rewrote it).
    ForgetCalls {
        calls: BTreeSet<String>,
    },
    Clear,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MemoryError {
    #[error("no such memory item")]
    NoSuchItem,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    pub facts: Vec<RememberedFact>,
    pub summary: Option<String>,
    pub open_items: Vec<OpenItem>,
    pub digested: BTreeSet<String>,
    /// The call whose digest last rewrote the summary.
    #[serde(default)]
    pub summary_call: Option<String>,
}

impl Memory {
    pub fn is_empty(&self) -> bool {
        self.facts.is_empty() && self.summary.is_none() && self.open_items.is_empty()
    }

    fn has_item(&self, id: &str) -> bool {
        (id == SUMMARY_ID && self.summary.is_some())
            || self.facts.iter().any(|f| f.fact.id == id)
            || self.open_items.iter().any(|o| o.id == id)
    }
}

impl Aggregate for Memory {
    const TYPE: &'static str = "memory";
    type Command = MemoryCommand;
    type Event = MemoryEvent;
    type Error = MemoryError;
    type Services = ();

    async fn handle(
        &mut self,
        command: MemoryCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), MemoryError> {
        let events = match command {
            MemoryCommand::Digest(d) => {
                if self.digested.contains(&d.call_id) {
                    return Ok(());
                }
                let mut events = Vec::new();
                if !d.facts.is_empty() {
                    events.push(MemoryEvent::FactsLearned {
                        call_id: d.call_id.clone(),
                        facts: d.facts,
                    });
                }
                if let Some(summary) = d.summary.filter(|s| !s.trim().is_empty()) {
                    let summary: String = summary.chars().take(SUMMARY_MAX_CHARS).collect();
                    if self.summary.as_deref() != Some(summary.as_str()) {
                        events.push(MemoryEvent::SummaryRewritten {
                            call_id: d.call_id.clone(),
                            summary,
                        });
                    }
                }
                // Only items that are open, once each.
                let mut closed = BTreeSet::new();
                for id in d.closed_items {
                    if self.open_items.iter().any(|o| o.id == id) && closed.insert(id.clone()) {
                        events.push(MemoryEvent::OpenItemClosed {
                            id,
                            call_id: d.call_id.clone(),
                        });
                    }
                }
                for (id, text) in d.open_items {
                    events.push(MemoryEvent::OpenItemOpened {
                        id,
                        text,
                        call_id: d.call_id.clone(),
                        at: d.at,
                    });
                }
                events.push(MemoryEvent::CallDigested {
                    call_id: d.call_id,
                    skipped: None,
                });
                events
            }
            MemoryCommand::Skip { call_id, reason } => {
                if self.digested.contains(&call_id) {
                    return Ok(());
                }
                vec![MemoryEvent::CallDigested {
                    call_id,
                    skipped: Some(reason),
                }]
            }
            MemoryCommand::Forget { id } => {
                if !self.has_item(&id) {
                    return Err(MemoryError::NoSuchItem);
                }
                vec![MemoryEvent::MemoryItemForgotten { id }]
            }
            MemoryCommand::ForgetCalls { calls } => {
                let facts = self.facts.iter().filter(|f| calls.contains(&f.call_id));
                let items = self
                    .open_items
                    .iter()
                    .filter(|o| calls.contains(&o.call_id));
                let mut ids: Vec<String> = facts
                    .map(|f| f.fact.id.clone())
                    .chain(items.map(|o| o.id.clone()))
                    .collect();
                let summary_of_them = self
                    .summary_call
                    .as_ref()
                    .is_some_and(|c| calls.contains(c));
                if self.summary.is_some() && summary_of_them {
                    ids.push(SUMMARY_ID.into());
                }
                ids.into_iter()
                    .map(|id| MemoryEvent::MemoryItemForgotten { id })
                    .collect()
            }
            MemoryCommand::Clear => {
                if self.is_empty() {
                    return Ok(());
                }
                vec![MemoryEvent::MemoryCleared]
            }
        };
        for event in events {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: MemoryEvent) {
        match event {
            MemoryEvent::FactsLearned { call_id, facts } => {
                self.facts
                    .extend(facts.into_iter().map(|fact| RememberedFact {
                        fact,
                        call_id: call_id.clone(),
                    }))
            }
            MemoryEvent::SummaryRewritten { summary, call_id } => {
                self.summary = Some(summary);
                self.summary_call = Some(call_id);
            }
            MemoryEvent::OpenItemOpened {
                id,
                text,
                call_id,
                at,
            } => self.open_items.push(OpenItem {
                id,
                text,
                call_id,
                at,
            }),
            MemoryEvent::OpenItemClosed { id, .. } => self.open_items.retain(|o| o.id != id),
            MemoryEvent::MemoryItemForgotten { id } => {
                if id == SUMMARY_ID {
                    self.summary = None;
                    self.summary_call = None;
                }
                self.facts.retain(|f| f.fact.id != id);
                self.open_items.retain(|o| o.id != id);
            }
            MemoryEvent::MemoryCleared => {
                self.facts.clear();
                self.summary = None;
                self.summary_call = None;
                self.open_items.clear();
            }
            MemoryEvent::CallDigested { call_id, .. } => {
                self.digested.insert(call_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    fn at() -> DateTime<Utc> {
        DateTime::<Utc>::MIN_UTC
    }

    fn fact(id: &str, text: &str) -> Fact {
        Fact {
            id: id.into(),
            text: text.into(),
            kind: "goal".into(),
            at: at(),
            embedding: vec![],
        }
    }

    fn digest(call: &str) -> Digest {
        Digest {
            call_id: call.into(),
            facts: vec![fact("f1", "Training for a 10k")],
            summary: Some("We talk about running.".into()),
            open_items: vec![("o1".into(), "the race on Sunday".into())],
            closed_items: vec![],
            at: at(),
        }
    }

    #[test]
    fn a_call_is_digested_once() {
        let events = vec![
            MemoryEvent::FactsLearned {
                call_id: "c1".into(),
                facts: vec![fact("f1", "Training for a 10k")],
            },
            MemoryEvent::SummaryRewritten {
                call_id: "c1".into(),
                summary: "We talk about running.".into(),
            },
            MemoryEvent::OpenItemOpened {
                id: "o1".into(),
                text: "the race on Sunday".into(),
                call_id: "c1".into(),
                at: at(),
            },
            MemoryEvent::CallDigested {
                call_id: "c1".into(),
                skipped: None,
            },
        ];
        TestFramework::<Memory>::with(())
            .given_no_previous_events()
            .when(MemoryCommand::Digest(digest("c1")))
            .then_expect_events(events.clone());
        TestFramework::<Memory>::with(())
            .given(events.clone())
            .when(MemoryCommand::Digest(digest("c1")))
            .then_expect_events(vec![]);
        TestFramework::<Memory>::with(())
            .given(events)
            .when(MemoryCommand::Skip {
                call_id: "c1".into(),
                reason: "again".into(),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_later_call_closes_open_items_it_resolves_and_ignores_unknown_ones() {
        let given = vec![MemoryEvent::OpenItemOpened {
            id: "o1".into(),
            text: "the race".into(),
            call_id: "c1".into(),
            at: at(),
        }];
        let d = Digest {
            call_id: "c2".into(),
            facts: vec![],
            summary: None,
            open_items: vec![],
            closed_items: vec!["o1".into(), "o1".into(), "nope".into()],
            at: at(),
        };
        TestFramework::<Memory>::with(())
            .given(given)
            .when(MemoryCommand::Digest(d))
            .then_expect_events(vec![
                MemoryEvent::OpenItemClosed {
                    id: "o1".into(),
                    call_id: "c2".into(),
                },
                MemoryEvent::CallDigested {
                    call_id: "c2".into(),
                    skipped: None,
                },
            ]);
    }

    #[test]
    fn forgetting_leaves_a_tombstone_without_content() {
        let given = vec![MemoryEvent::FactsLearned {
            call_id: "c1".into(),
            facts: vec![fact("f1", "Has a sister, Anna")],
        }];
        TestFramework::<Memory>::with(())
            .given(given.clone())
            .when(MemoryCommand::Forget { id: "f1".into() })
            .then_expect_events(vec![MemoryEvent::MemoryItemForgotten { id: "f1".into() }]);
        TestFramework::<Memory>::with(())
            .given(given.clone())
            .when(MemoryCommand::Forget { id: "f2".into() })
            .then_expect_error(MemoryError::NoSuchItem);
        TestFramework::<Memory>::with(())
            .given(given)
            .when(MemoryCommand::Clear)
            .then_expect_events(vec![MemoryEvent::MemoryCleared]);
        TestFramework::<Memory>::with(())
            .given(vec![MemoryEvent::MemoryCleared])
            .when(MemoryCommand::Clear)
            .then_expect_events(vec![]);
    }

    #[test]
    fn what_expired_calls_taught_is_forgotten_and_nothing_else() {
        let given = vec![
            MemoryEvent::FactsLearned {
                call_id: "c1".into(),
                facts: vec![fact("f1", "Has a sister, Anna")],
            },
            MemoryEvent::OpenItemOpened {
                id: "o1".into(),
                text: "the race".into(),
                call_id: "c1".into(),
                at: at(),
            },
            MemoryEvent::SummaryRewritten {
                call_id: "c1".into(),
                summary: "Runs.".into(),
            },
            MemoryEvent::FactsLearned {
                call_id: "c2".into(),
                facts: vec![fact("f2", "Likes tea")],
            },
        ];
        let calls = |ids: &[&str]| MemoryCommand::ForgetCalls {
            calls: ids.iter().map(|s| s.to_string()).collect(),
        };
        let forgotten = |id: &str| MemoryEvent::MemoryItemForgotten { id: id.into() };
        TestFramework::<Memory>::with(())
            .given(given.clone())
            .when(calls(&["c1"]))
            .then_expect_events(vec![
                forgotten("f1"),
                forgotten("o1"),
                forgotten(SUMMARY_ID),
            ]);
        TestFramework::<Memory>::with(())
            .given(given.clone())
            .when(calls(&["c2", "c9"]))
            .then_expect_events(vec![forgotten("f2")]);
        let mut later = given;
        later.push(MemoryEvent::SummaryRewritten {
            call_id: "c2".into(),
            summary: "Runs, drinks tea.".into(),
        });
        TestFramework::<Memory>::with(())
            .given(later)
            .when(calls(&["c1"]))
            .then_expect_events(vec![forgotten("f1"), forgotten("o1")]);
    }

    #[test]
    fn the_summary_is_bounded() {
        let mut d = digest("c1");
        d.facts.clear();
        d.open_items.clear();
        d.summary = Some("x".repeat(5000));
        let mut m = Memory::default();
        for e in [
            MemoryEvent::SummaryRewritten {
                call_id: "c1".into(),
                summary: "x".repeat(SUMMARY_MAX_CHARS),
            },
            MemoryEvent::CallDigested {
                call_id: "c1".into(),
                skipped: None,
            },
        ] {
            m.apply(e);
        }
        TestFramework::<Memory>::with(())
            .given_no_previous_events()
            .when(MemoryCommand::Digest(d))
            .then_expect_events(vec![
                MemoryEvent::SummaryRewritten {
                    call_id: "c1".into(),
                    summary: "x".repeat(SUMMARY_MAX_CHARS),
                },
                MemoryEvent::CallDigested {
                    call_id: "c1".into(),
                    skipped: None,
                },
            ]);
        assert_eq!(m.summary.map(|s| s.len()), Some(SUMMARY_MAX_CHARS));
        assert_eq!(
            parse_memory_id(&memory_id(uuid::Uuid::nil(), "brad_001")),
            Some((uuid::Uuid::nil(), "brad_001"))
        );
    }
}
