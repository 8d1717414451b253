//! The message contract: one event, one JetStream message.
//!
//! - Subject: `{prefix}.{aggregate_type}.{aggregate_id}` (characters NATS reserves in a token —
//!   `.`, `*`, `>`, white space — are replaced by `_` in the subject only; the `Nats-Msg-Id`
//!   and the body carry the exact id).
//! - Headers: `Nats-Msg-Id` (`{aggregate_type}:{aggregate_id}:{sequence}`, stable per event, so
//!   JetStream drops a republished copy inside its duplicate window; [`aggregate_of`] reads the
//!   aggregate and sequence back from it) and `Cmb-Event-Type`. Nothing else: every consumer
//!   parses each header of every message it receives (a map of owned strings), and the body
//!   has all the rest. Messages published before this (with `Cmb-Aggregate-Type`,
//!   `Cmb-Aggregate-Id`, `Cmb-Sequence`, `Cmb-Event-Version`, `Cmb-Occurred-At`,
//!   `Cmb-Global-Position`, `Cmb-Commit-Xid` as well) read the same way.
//! - Body: the [`EventEnvelope`] as JSON: payload, metadata and the fields above.

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::HeaderMap;
use bytes::Bytes;
use cmb_domain::EventEnvelope;

pub const MSG_ID: &str = "Nats-Msg-Id";
pub const EVENT_TYPE: &str = "Cmb-Event-Type";

#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error("message body is not an event envelope: {0}")]
    Body(#[from] serde_json::Error),
    #[error("header {0} is missing or malformed")]
    Header(&'static str),
}

/// A subject token made safe for NATS.
pub fn subject_token(raw: &str) -> String {
    let token: String = raw
        .chars()
        .map(|c| match c {
            '.' | '*' | '>' => '_',
            c if c.is_whitespace() || c.is_control() => '_',
            c => c,
        })
        .collect();
    if token.is_empty() {
        "_".into()
    } else {
        token
    }
}

pub fn subject(prefix: &str, aggregate_type: &str, aggregate_id: &str) -> String {
    format!(
        "{prefix}.{}.{}",
        subject_token(aggregate_type),
        subject_token(aggregate_id)
    )
}

/// Headers and body of the message that carries `event`.
pub fn encode(event: &EventEnvelope) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    headers.insert(NATS_MESSAGE_ID, event.event_id().as_str());
    headers.insert(EVENT_TYPE, event.event_type.as_str());
    // Serialising a struct of strings, numbers and JSON values cannot fail.
    let body = serde_json::to_vec(event).expect("an envelope always serialises");
    (headers, Bytes::from(body))
}

/// The aggregate type, aggregate id and sequence a message's `Nats-Msg-Id` names (an
/// aggregate type has no `:`; an id may). Looked up by the client's standard header name: a
/// received message's `Nats-Msg-Id` is filed under it, never under the plain string.
pub fn aggregate_of(headers: &HeaderMap) -> Option<(String, String, u64)> {
    let id = headers.get(NATS_MESSAGE_ID)?.as_str();
    let (aggregate_type, rest) = id.split_once(':')?;
    let (aggregate_id, sequence) = rest.rsplit_once(':')?;
    Some((
        aggregate_type.to_string(),
        aggregate_id.to_string(),
        sequence.parse().ok()?,
    ))
}

/// The envelope carried by a message body.
pub fn decode_body(payload: &[u8]) -> Result<EventEnvelope, ContractError> {
    Ok(serde_json::from_slice(payload)?)
}

/// The envelope of a consumed message.
pub fn decode_message(message: &async_nats::Message) -> Result<EventEnvelope, ContractError> {
    decode_body(&message.payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_never_carry_reserved_characters() {
        assert_eq!(
            subject("cmb.events", "call", "a.b*c>d e"),
            "cmb.events.call.a_b_c_d_e"
        );
        assert_eq!(subject("p", "persona", "brad_001"), "p.persona.brad_001");
    }

    #[test]
    fn the_message_id_names_the_aggregate_even_with_colons_in_its_id() {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, "stripe_event:evt:1:a:17");
        assert_eq!(
            aggregate_of(&headers),
            Some(("stripe_event".into(), "evt:1:a".into(), 17))
        );
        headers.insert(NATS_MESSAGE_ID, "garbage");
        assert_eq!(aggregate_of(&headers), None);
    }

    #[test]
    fn an_envelope_survives_the_wire() {
        let event = EventEnvelope {
            aggregate_type: "persona".into(),
            aggregate_id: "brad_001".into(),
            sequence: 2,
            event_type: "PersonaUpdated".into(),
            event_version: "1".into(),
            occurred_at: chrono::Utc::now(),
            global_position: 42,
            commit_xid: 777,
            payload: serde_json::json!({"PersonaUpdated": {"name": "Brad"}}),
            metadata: Default::default(),
        };
        let (headers, body) = encode(&event);
        assert_eq!(
            headers.get(NATS_MESSAGE_ID).unwrap().as_str(),
            "persona:brad_001:2"
        );
        assert_eq!(
            headers.iter().count(),
            2,
            "Nats-Msg-Id and Cmb-Event-Type only"
        );
        assert_eq!(
            aggregate_of(&headers),
            Some(("persona".into(), "brad_001".into(), 2))
        );
        assert_eq!(decode_body(&body).unwrap(), event);
    }
}
