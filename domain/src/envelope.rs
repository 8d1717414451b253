//! The event envelope: one committed event with its position and metadata.
//!
//! This is the message contract shared by the event store, the JetStream stream and every
//! consumer (projectors, workers, analysts' replay). Its JSON form is the body of each
//! JetStream message; see the README's "Message contract".

use std::collections::HashMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::UserId;

/// Who caused a command: a user, the system, a webhook source or a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Actor {
    User(UserId),
    System,
    Webhook(String),
    Worker(String),
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::User(id) => write!(f, "user:{id}"),
            Actor::System => f.write_str("system"),
            Actor::Webhook(source) => write!(f, "webhook:{source}"),
            Actor::Worker(name) => write!(f, "worker:{name}"),
        }
    }
}

impl From<Actor> for String {
    fn from(actor: Actor) -> Self {
        actor.to_string()
    }
}

impl TryFrom<String> for Actor {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Actor::parse(&s).ok_or_else(|| format!("unknown actor {s:?}"))
    }
}

impl Actor {
    pub fn parse(s: &str) -> Option<Actor> {
        if s == "system" {
            return Some(Actor::System);
        }
        let (kind, rest) = s.split_once(':')?;
        match kind {
            "user" => rest.parse().ok().map(Actor::User),
            "webhook" => Some(Actor::Webhook(rest.to_string())),
            "worker" => Some(Actor::Worker(rest.to_string())),
            _ => None,
        }
    }
}

/// The context a command runs in. It becomes every resulting event's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandContext {
    pub request_id: String,
    pub actor: Actor,
    /// The story this command belongs to (a call's whole life shares one).
    pub correlation_id: String,
    /// The event (or request) that directly caused this command.
    pub causation_id: String,
}

impl CommandContext {
    /// A fresh story started by an HTTP request.
    pub fn for_request(request_id: impl Into<String>, actor: Actor) -> Self {
        let request_id = request_id.into();
        CommandContext {
            correlation_id: request_id.clone(),
            causation_id: request_id.clone(),
            request_id,
            actor,
        }
    }

    /// A command issued by `actor` in reaction to an event: same story, caused by that event.
    pub fn caused_by(event: &EventEnvelope, actor: Actor) -> Self {
        CommandContext {
            request_id: event.metadata.request_id.clone(),
            actor,
            correlation_id: event.metadata.correlation_id.clone(),
            causation_id: event.event_id(),
        }
    }

    pub fn system(purpose: &str) -> Self {
        let id = format!("{purpose}-{}", Uuid::now_v7());
        CommandContext::for_request(id, Actor::System)
    }

    pub fn to_metadata(&self) -> HashMap<String, String> {
        HashMap::from([
            ("request_id".to_string(), self.request_id.clone()),
            ("actor".to_string(), self.actor.to_string()),
            ("correlation_id".to_string(), self.correlation_id.clone()),
            ("causation_id".to_string(), self.causation_id.clone()),
        ])
    }
}

/// Metadata stored with each event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EventMetadata {
    #[serde(default)]
    pub request_id: String,
    #[serde(default)]
    pub actor: String,
    #[serde(default)]
    pub correlation_id: String,
    #[serde(default)]
    pub causation_id: String,
}

/// One committed event, as published and consumed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// The event's position within its aggregate, from 1.
    pub sequence: u64,
    pub event_type: String,
    pub event_version: String,
    /// When the event store recorded it.
    pub occurred_at: DateTime<Utc>,
    /// Position in the event store's commit order (unique, not gap-free).
    pub global_position: i64,
    /// The committing transaction's id; (commit_xid, global_position) is the commit order.
    pub commit_xid: i64,
    pub payload: serde_json::Value,
    pub metadata: EventMetadata,
}

impl EventEnvelope {
    /// The stable identity of this event, also its JetStream `Nats-Msg-Id`.
    pub fn event_id(&self) -> String {
        event_id(&self.aggregate_type, &self.aggregate_id, self.sequence)
    }

    /// Decodes the payload as an aggregate's event enum, upcast first to the version this
    /// build speaks (see [`crate::events`]). Personal fields still sealed (the reader had no
    /// key, or the user was erased) read as [`crate::privacy::ERASED`].
    pub fn decode<E: serde::de::DeserializeOwned>(&self) -> Result<E, serde_json::Error> {
        let mut payload = self.payload.clone();
        crate::privacy::blank(&self.aggregate_type, &self.event_type, &mut payload);
        let (_, payload) = crate::events::upcast(
            &self.aggregate_type,
            &self.event_type,
            &self.event_version,
            payload,
        );
        serde_json::from_value(payload)
    }

    /// Whether this build knows the event's type (an unknown one comes from a newer build).
    pub fn is_known(&self) -> bool {
        crate::events::is_known(&self.aggregate_type, &self.event_type)
    }
}

pub fn event_id(aggregate_type: &str, aggregate_id: &str, sequence: u64) -> String {
    format!("{aggregate_type}:{aggregate_id}:{sequence}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actors_round_trip_through_their_string_form() {
        for actor in [
            Actor::User(UserId::generate()),
            Actor::System,
            Actor::Webhook("twilio".into()),
            Actor::Worker("dialer".into()),
        ] {
            assert_eq!(Actor::parse(&actor.to_string()), Some(actor));
        }
        assert_eq!(Actor::parse("nobody"), None);
    }

    #[test]
    fn caused_by_keeps_the_story_and_points_at_the_event() {
        let ctx = CommandContext::for_request("req-1", Actor::System);
        let meta = ctx.to_metadata();
        let env = EventEnvelope {
            aggregate_type: "call".into(),
            aggregate_id: "c1".into(),
            sequence: 3,
            event_type: "CallRequested".into(),
            event_version: "1".into(),
            occurred_at: Utc::now(),
            global_position: 7,
            commit_xid: 9,
            payload: serde_json::json!({}),
            metadata: serde_json::from_value(serde_json::to_value(meta).unwrap()).unwrap(),
        };
        let next = CommandContext::caused_by(&env, Actor::Worker("dialer".into()));
        assert_eq!(next.correlation_id, "req-1");
        assert_eq!(next.causation_id, "call:c1:3");
    }
}
