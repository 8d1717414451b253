//! The message contract: one event, one JetStream message.
//!
//! - Subject: `{prefix}.{aggregate_type}.{aggregate_id}` (characters NATS reserves in a token —
//!   `.`, `*`, `>`, white space — are replaced by `_` in the subject only; the headers and body
//!   carry the exact id).
//! - Headers: `Nats-Msg-Id` (`{aggregate_type}:{aggregate_id}:{sequence}`, stable per event, so
//!   JetStream drops a republished copy inside its duplicate window), `Cmb-Aggregate-Type`,
//!   `Cmb-Aggregate-Id`, `Cmb-Sequence`, `Cmb-Event-Type`, `Cmb-Event-Version`,
//!   `Cmb-Occurred-At` (RFC 3339), and `Cmb-Global-Position` / `Cmb-Commit-Xid` (the event
//!   store's commit order).
//! - Body: the [`EventEnvelope`] as JSON: payload, metadata and the fields above.

use async_nats::HeaderMap;
use bytes::Bytes;
use cmb_domain::EventEnvelope;

pub const MSG_ID: &str = "Nats-Msg-Id";
pub const AGGREGATE_TYPE: &str = "Cmb-Aggregate-Type";
pub const AGGREGATE_ID: &str = "Cmb-Aggregate-Id";
pub const SEQUENCE: &str = "Cmb-Sequence";
pub const EVENT_TYPE: &str = "Cmb-Event-Type";
pub const EVENT_VERSION: &str = "Cmb-Event-Version";
pub const OCCURRED_AT: &str = "Cmb-Occurred-At";
pub const GLOBAL_POSITION: &str = "Cmb-Global-Position";
pub const COMMIT_XID: &str = "Cmb-Commit-Xid";

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
    headers.insert(MSG_ID, event.event_id().as_str());
    headers.insert(AGGREGATE_TYPE, event.aggregate_type.as_str());
    headers.insert(AGGREGATE_ID, event.aggregate_id.as_str());
    headers.insert(SEQUENCE, event.sequence.to_string().as_str());
    headers.insert(EVENT_TYPE, event.event_type.as_str());
    headers.insert(EVENT_VERSION, event.event_version.as_str());
    headers.insert(OCCURRED_AT, event.occurred_at.to_rfc3339().as_str());
    headers.insert(GLOBAL_POSITION, event.global_position.to_string().as_str());
    headers.insert(COMMIT_XID, event.commit_xid.to_string().as_str());
    // Serialising a struct of strings, numbers and JSON values cannot fail.
    let body = serde_json::to_vec(event).expect("an envelope always serialises");
    (headers, Bytes::from(body))
}

/// The envelope carried by a message body.
pub fn decode_body(payload: &[u8]) -> Result<EventEnvelope, ContractError> {
    Ok(serde_json::from_slice(payload)?)
}

/// The envelope of a consumed message.
pub fn decode_message(message: &async_nats::Message) -> Result<EventEnvelope, ContractError> {
    decode_body(&message.payload)
}

/// The commit position `(commit_xid, global_position)` named by a message's headers.
pub fn commit_position(headers: &HeaderMap) -> Result<(i64, i64), ContractError> {
    let read = |name: &'static str| {
        headers
            .get(name)
            .and_then(|v| v.as_str().parse::<i64>().ok())
            .ok_or(ContractError::Header(name))
    };
    Ok((read(COMMIT_XID)?, read(GLOBAL_POSITION)?))
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
        assert_eq!(headers.get(MSG_ID).unwrap().as_str(), "persona:brad_001:2");
        assert_eq!(commit_position(&headers).unwrap(), (777, 42));
        assert_eq!(decode_body(&body).unwrap(), event);
    }
}
