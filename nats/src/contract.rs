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

/// One event as it goes out: what its subject, its headers and per-aggregate order need, and
/// its body, encoded once.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: u64,
    pub event_type: String,
    pub body: Bytes,
}

impl Outgoing {
    /// The message of `event`, its body serialised from the envelope.
    pub fn of(event: &EventEnvelope) -> Outgoing {
        let (_, body) = encode(event);
        Outgoing {
            aggregate_type: event.aggregate_type.clone(),
            aggregate_id: event.aggregate_id.clone(),
            sequence: event.sequence,
            event_type: event.event_type.clone(),
            body,
        }
    }

    /// Its `Nats-Msg-Id`.
    pub fn event_id(&self) -> String {
        cmb_domain::envelope::event_id(&self.aggregate_type, &self.aggregate_id, self.sequence)
    }

    /// `Nats-Msg-Id` and `Cmb-Event-Type`.
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, self.event_id().as_str());
        headers.insert(EVENT_TYPE, self.event_type.as_str());
        headers
    }
}

/// An event whose payload and metadata are JSON text already, as Postgres returns them.
#[derive(Debug, Clone, Copy)]
pub struct StoredParts<'a> {
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub sequence: u64,
    pub event_type: &'a str,
    pub event_version: &'a str,
    pub occurred_at: chrono::DateTime<chrono::Utc>,
    pub global_position: i64,
    pub commit_xid: i64,
    /// Valid JSON (a `jsonb` or `json` column's text): copied into the body as it is, without
    /// the white space `jsonb` prints after `:` and `,`.
    pub payload: &'a str,
    /// Valid JSON, an object.
    pub metadata: &'a str,
}

/// The body [`encode`] gives the same event, written around the stored JSON texts of its
/// payload and metadata instead of parsing them into a tree and serialising that again: the
/// publisher's only work per event is copying bytes.
pub fn body_from_stored(parts: &StoredParts<'_>) -> Bytes {
    let mut out = Vec::with_capacity(
        200 + parts.payload.len() + parts.metadata.len() + parts.aggregate_id.len(),
    );
    out.push(b'{');
    // `"key":value,` in the envelope's field order (serde's, so the bytes are `encode`'s);
    // writing a string, a number or a time to a Vec cannot fail.
    macro_rules! put {
        ($key:literal, $value:expr) => {
            out.extend_from_slice(concat!("\"", $key, "\":").as_bytes());
            serde_json::to_writer(&mut out, $value).expect("a plain value serialises");
            out.push(b',');
        };
    }
    put!("aggregate_type", parts.aggregate_type);
    put!("aggregate_id", parts.aggregate_id);
    put!("sequence", &parts.sequence);
    put!("event_type", parts.event_type);
    put!("event_version", parts.event_version);
    put!("occurred_at", &parts.occurred_at);
    put!("global_position", &parts.global_position);
    put!("commit_xid", &parts.commit_xid);
    out.extend_from_slice(b"\"payload\":");
    push_compact(&mut out, parts.payload);
    out.extend_from_slice(b",\"metadata\":");
    push_compact(&mut out, parts.metadata);
    out.push(b'}');
    Bytes::from(out)
}

/// Appends valid JSON text without the white space between its tokens.
fn push_compact(out: &mut Vec<u8>, json: &str) {
    let (mut in_string, mut escaped) = (false, false);
    for &b in json.as_bytes() {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            in_string = b == b'"';
            out.push(b);
        }
    }
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

    fn envelope() -> EventEnvelope {
        EventEnvelope {
            aggregate_type: "persona".into(),
            aggregate_id: "brad \"001\"".into(),
            sequence: 2,
            event_type: "PersonaUpdated".into(),
            event_version: "1".into(),
            occurred_at: chrono::Utc::now(),
            global_position: 42,
            commit_xid: 777,
            payload: serde_json::json!({"PersonaUpdated": {"name": "Brad, \"the\" : one", "tags": [1, 2.5, null, true], "note": "a\\\" b\n"}}),
            metadata: serde_json::from_value(serde_json::json!({
                "request_id": "r 1", "actor": "system", "correlation_id": "c", "causation_id": "d"
            }))
            .unwrap(),
        }
    }

    fn parts<'a>(e: &'a EventEnvelope, payload: &'a str, metadata: &'a str) -> StoredParts<'a> {
        StoredParts {
            aggregate_type: &e.aggregate_type,
            aggregate_id: &e.aggregate_id,
            sequence: e.sequence,
            event_type: &e.event_type,
            event_version: &e.event_version,
            occurred_at: e.occurred_at,
            global_position: e.global_position,
            commit_xid: e.commit_xid,
            payload,
            metadata,
        }
    }

    #[test]
    fn a_body_written_around_the_stored_json_is_the_encoded_one() {
        let e = envelope();
        let payload = serde_json::to_string(&e.payload).unwrap();
        let metadata = serde_json::to_string(&e.metadata).unwrap();
        let (_, encoded) = encode(&e);
        // Compact JSON in, the very bytes `encode` writes out.
        assert_eq!(body_from_stored(&parts(&e, &payload, &metadata)), encoded);
    }

    #[test]
    fn jsonb_text_goes_into_the_body_without_its_white_space() {
        let e = envelope();
        // As `jsonb` prints it: keys reordered, a space after each `:` and `,` — and inside
        // the strings, white space, quotes, colons and escapes that must stay as they are.
        let payload = r#"{"PersonaUpdated": {"name": "Brad, \"the\" : one", "note": "a\\\" b\n", "tags": [1, 2.5, null, true]}}"#;
        let metadata = r#"{"actor": "system", "request_id": "r 1", "causation_id": "d", "correlation_id": "c"}"#;
        let body = body_from_stored(&parts(&e, payload, metadata));
        assert_eq!(decode_body(&body).unwrap(), e);
        let text = std::str::from_utf8(&body).unwrap();
        assert!(
            text.contains(r#""payload":{"PersonaUpdated":{"name":"Brad, \"the\" : one","note""#),
            "{text}"
        );
        assert!(
            text.contains(r#""metadata":{"actor":"system","request_id":"r 1","#),
            "{text}"
        );
    }

    #[test]
    fn an_outgoing_message_carries_the_two_headers() {
        let e = envelope();
        let out = Outgoing::of(&e);
        assert_eq!(out.event_id(), e.event_id());
        let headers = out.headers();
        assert_eq!(headers.iter().count(), 2);
        assert_eq!(headers.get(EVENT_TYPE).unwrap().as_str(), "PersonaUpdated");
        assert_eq!(decode_body(&out.body).unwrap(), e);
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
