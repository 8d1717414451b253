//! Personal data in event payloads, for crypto-shredding (README "Privacy").
//!
//! Events are never edited, so a user's right to erasure is honoured by encrypting the
//! personal fields of their events with a data key of their own and destroying that key when
//! they are erased. This module is the pure half: *which* fields of *which* events are
//! personal ([`fields`]), *whose* they are ([`subject`]), what a field reads as once its key is
//! gone ([`ERASED`]), and the walk over a payload that finds them. The cipher and the key table
//! live in `services` (`backbone::keys`), at the event store's boundary.
//!
//! A sealed field is stored as `{"$sealed": "<base64 of nonce ‖ ciphertext>"}` in place of its
//! value. A reader without the key sees it, through [`blank`] (done by
//! [`crate::EventEnvelope::decode`]), as [`ERASED`] — or an empty list where the field is a
//! list — so every event still decodes, and money, costs and ids, never sealed, read as
//! before.
//!
//! The paths name the fields of the stored version of each event: a new version that moves a
//! personal field lists its own paths here (sealing happens before, and opening before,
//! upcasting).

use serde_json::Value;
use uuid::Uuid;

/// What a personal field reads as once its owner was erased (or by a reader without keys).
pub const ERASED: &str = "[erased]";

/// The key of a sealed field's object.
pub const SEALED: &str = "$sealed";

/// One personal field of an event's body: a path of object keys, `[]` after a key meaning
/// "each element of this list" (`facts[].text`).
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub path: &'static str,
    /// What it reads as without its key.
    pub erased: Erased,
    /// Personal only when this holds of the event's body (always when `None`): a call's
    /// persona name is the user's own text for their own persona, not for a system one.
    pub only_if: Option<fn(&Value) -> bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Erased {
    /// The text [`ERASED`].
    Text,
    /// An empty list (an embedding vector).
    EmptyList,
}

impl Erased {
    pub fn value(self) -> Value {
        match self {
            Erased::Text => Value::String(ERASED.into()),
            Erased::EmptyList => Value::Array(Vec::new()),
        }
    }
}

const fn text(path: &'static str) -> Field {
    Field {
        path,
        erased: Erased::Text,
        only_if: None,
    }
}

/// The body's `persona_id` is a user's own persona.
fn of_a_users_persona(body: &Value) -> bool {
    body.get("persona_id")
        .and_then(Value::as_str)
        .is_some_and(|id| !crate::persona::system::is_system_persona(id))
}

/// Whose data an aggregate's events carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The aggregate id is the user's id.
    AggregateId,
    /// The aggregate id is `<user id>:<rest>` (a memory: [`crate::memory::memory_id`]).
    AggregateIdPrefix,
    /// The user id at this path of the body (itself never sealed); an event without one
    /// (a system persona's) has no personal fields.
    Body(&'static str),
}

/// A persona's texts: personal when the persona is a user's own (`owner.user_id`).
const PERSONA_TEXTS: &[Field] = &[
    text("name"),
    text("description"),
    text("system_prompt"),
    text("greeting"),
    text("tags[]"),
];

/// Per aggregate type and event type: the personal fields and whose they are.
const PERSONAL: &[(&str, &str, Owner, &[Field])] = &[
    (
        "user",
        "UserRegistered",
        Owner::AggregateId,
        &[text("name"), text("email"), text("phone")],
    ),
    (
        "user",
        "ProfileUpdated",
        Owner::AggregateId,
        &[text("name"), text("email"), text("phone")],
    ),
    (
        "user",
        "UserRegisteredWithWorkos",
        Owner::AggregateId,
        &[text("name"), text("email"), text("workos_user_id")],
    ),
    (
        "user",
        "WorkosLinked",
        Owner::AggregateId,
        &[text("workos_user_id")],
    ),
    (
        "user",
        "SignedInWithWorkos",
        Owner::AggregateId,
        &[text("organization_id")],
    ),
    (
        "billing",
        "PaymentMethodAttached",
        Owner::AggregateId,
        &[text("card.brand"), text("card.last4")],
    ),
    (
        "call",
        "CallRequested",
        Owner::Body("user_id"),
        &[
            text("phone"),
            Field {
                path: "persona_name",
                erased: Erased::Text,
                only_if: Some(of_a_users_persona),
            },
        ],
    ),
    (
        "persona",
        "PersonaCreated",
        Owner::Body("owner.user_id"),
        PERSONA_TEXTS,
    ),
    (
        "persona",
        "PersonaUpdated",
        Owner::Body("owner.user_id"),
        PERSONA_TEXTS,
    ),
    (
        "persona",
        "KnowledgeDocumentAdded",
        Owner::Body("owner.user_id"),
        &[text("title")],
    ),
    (
        "persona_preference",
        "PersonaCustomized",
        Owner::Body("user_id"),
        &[text("customization.custom_prompt")],
    ),
    (
        "memory",
        "FactsLearned",
        Owner::AggregateIdPrefix,
        &[
            text("facts[].text"),
            Field {
                path: "facts[].embedding",
                erased: Erased::EmptyList,
                only_if: None,
            },
        ],
    ),
    (
        "memory",
        "SummaryRewritten",
        Owner::AggregateIdPrefix,
        &[text("summary")],
    ),
    (
        "memory",
        "OpenItemOpened",
        Owner::AggregateIdPrefix,
        &[text("text")],
    ),
];

fn entry(
    aggregate_type: &str,
    event_type: &str,
) -> Option<&'static (&'static str, &'static str, Owner, &'static [Field])> {
    PERSONAL
        .iter()
        .find(|(a, e, _, _)| *a == aggregate_type && *e == event_type)
}

/// Every `(aggregate type, event type)` with personal fields.
pub fn personal_events() -> impl Iterator<Item = (&'static str, &'static str)> {
    PERSONAL.iter().map(|(a, e, _, _)| (*a, *e))
}

/// The personal fields of an event type (none for most).
pub fn fields(aggregate_type: &str, event_type: &str) -> &'static [Field] {
    entry(aggregate_type, event_type).map_or(&[], |(_, _, _, f)| f)
}

/// Whether events of this type carry personal fields.
pub fn is_personal(aggregate_type: &str, event_type: &str) -> bool {
    entry(aggregate_type, event_type).is_some()
}

/// The user whose personal data an event carries (`payload` is the stored `{"Type": {…}}`).
pub fn subject(
    aggregate_type: &str,
    aggregate_id: &str,
    event_type: &str,
    payload: &Value,
) -> Option<Uuid> {
    let (_, _, owner, _) = entry(aggregate_type, event_type)?;
    match owner {
        Owner::AggregateId => Uuid::parse_str(aggregate_id).ok(),
        Owner::AggregateIdPrefix => aggregate_id
            .split_once(':')
            .and_then(|(user, _)| Uuid::parse_str(user).ok()),
        Owner::Body(path) => path
            .split('.')
            .try_fold(payload.get(event_type)?, |v, key| v.get(key))?
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok()),
    }
}

/// The call whose transcript an event's personal fields were learned from (what personas
/// remember: facts, summary, open items), sealed under a key of that call's so that they go
/// with the transcript's retention; `None` for every other event.
pub fn call_scope(aggregate_type: &str, event_type: &str, payload: &Value) -> Option<Uuid> {
    if aggregate_type != "memory"
        || !matches!(
            event_type,
            "FactsLearned" | "SummaryRewritten" | "OpenItemOpened"
        )
    {
        return None;
    }
    payload
        .get(event_type)?
        .get("call_id")?
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
}

/// `text` (a provider's error message, recorded in clear) with anything that looks like a
/// phone number — seven digits or more, with `+`, spaces, dashes, dots or brackets between —
/// replaced by `[number]`: Twilio names the number it refused ("The 'To' number +1415… is not a
/// valid phone number"), and such texts are not sealed.
pub fn without_numbers(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit()
            || (chars[i] == '+' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            let mut j = i;
            let mut last_digit = i;
            let mut digits = 0;
            while j < chars.len() && (chars[j].is_ascii_digit() || "+ -().".contains(chars[j])) {
                if chars[j].is_ascii_digit() {
                    digits += 1;
                    last_digit = j;
                }
                j += 1;
            }
            if digits >= 7 {
                out.push_str("[number]");
                i = last_digit + 1;
                continue;
            }
            out.extend(&chars[i..=last_digit]);
            i = last_digit + 1;
            continue;
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

/// Calls `each` with every personal field present in `payload` (absent and `null` ones are
/// skipped), the field's description first.
pub fn each_field(
    aggregate_type: &str,
    event_type: &str,
    payload: &mut Value,
    mut each: impl FnMut(&Field, &mut Value),
) {
    let Some(body) = payload.get_mut(event_type) else {
        return;
    };
    for field in fields(aggregate_type, event_type) {
        if field.only_if.is_some_and(|applies| !applies(body)) {
            continue;
        }
        let steps: Vec<&str> = field.path.split('.').collect();
        visit(body, &steps, &mut |v| each(field, v));
    }
}

fn visit(value: &mut Value, steps: &[&str], each: &mut dyn FnMut(&mut Value)) {
    let Some((step, rest)) = steps.split_first() else {
        if !value.is_null() {
            each(value);
        }
        return;
    };
    let (key, list) = match step.strip_suffix("[]") {
        Some(key) => (key, true),
        None => (*step, false),
    };
    let Some(next) = value.get_mut(key) else {
        return;
    };
    if list {
        if let Some(items) = next.as_array_mut() {
            for item in items {
                visit(item, rest, each);
            }
        }
    } else {
        visit(next, rest, each);
    }
}

/// The ciphertext of a sealed field, if `value` is one.
pub fn sealed(value: &Value) -> Option<&str> {
    match value {
        Value::Object(map) if map.len() == 1 => map.get(SEALED)?.as_str(),
        _ => None,
    }
}

/// A sealed field holding `ciphertext`.
pub fn seal_value(ciphertext: String) -> Value {
    let mut map = serde_json::Map::with_capacity(1);
    map.insert(SEALED.into(), Value::String(ciphertext));
    Value::Object(map)
}

/// Whether any personal field of `payload` is sealed.
pub fn has_sealed(aggregate_type: &str, event_type: &str, payload: &mut Value) -> bool {
    let mut any = false;
    each_field(aggregate_type, event_type, payload, |_, v| {
        any |= sealed(v).is_some()
    });
    any
}

/// Replaces every sealed field of `payload` by what it reads as without its key.
pub fn blank(aggregate_type: &str, event_type: &str, payload: &mut Value) {
    each_field(aggregate_type, event_type, payload, |field, v| {
        if sealed(v).is_some() {
            *v = field.erased.value();
        }
    });
}

/// Replaces every personal field of `payload`, sealed or not, by what it reads as erased: what
/// is written for a user already erased.
pub fn erase(aggregate_type: &str, event_type: &str, payload: &mut Value) {
    each_field(aggregate_type, event_type, payload, |field, v| {
        *v = field.erased.value()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_listed_event_type_is_known() {
        for (aggregate, event, _, fields) in PERSONAL {
            assert!(
                crate::events::is_known(aggregate, event),
                "{aggregate}/{event}"
            );
            assert!(!fields.is_empty());
        }
    }

    #[test]
    fn the_subject_is_found_where_the_aggregate_keeps_it() {
        let user = Uuid::now_v7();
        let id = user.to_string();
        let p = json!({"UserRegistered": {"name": "A"}});
        assert_eq!(subject("user", &id, "UserRegistered", &p), Some(user));
        let p = json!({"FactsLearned": {"facts": []}});
        let memory = crate::memory::memory_id(user, "sys-coach");
        assert_eq!(subject("memory", &memory, "FactsLearned", &p), Some(user));
        let p = json!({"CallRequested": {"user_id": id, "phone": "+14155550123"}});
        assert_eq!(subject("call", "c1", "CallRequested", &p), Some(user));
        assert_eq!(subject("call", "c1", "CallEnded", &p), None);
        let p = json!({"PersonaCreated": {"owner": {"kind": "user", "user_id": id}}});
        assert_eq!(subject("persona", "p1", "PersonaCreated", &p), Some(user));
        let p = json!({"PersonaCreated": {"owner": {"kind": "system"}}});
        assert_eq!(subject("persona", "p1", "PersonaCreated", &p), None);
    }

    #[test]
    fn numbers_in_provider_messages_are_masked_and_short_codes_kept() {
        assert_eq!(
            without_numbers("Twilio answered 400: The 'To' number +1 (415) 555-0123 is not a valid phone number. (code 21211)"),
            "Twilio answered 400: The 'To' number [number] is not a valid phone number. (code 21211)"
        );
        assert_eq!(
            without_numbers("call 4155550123 refused"),
            "call [number] refused"
        );
        assert_eq!(
            without_numbers("Twilio answered 503: Service unavailable (code 20503)"),
            "Twilio answered 503: Service unavailable (code 20503)"
        );
    }

    #[test]
    fn a_calls_persona_name_is_personal_only_for_a_users_own_persona() {
        let user = Uuid::now_v7().to_string();
        let mut seen = Vec::new();
        let mut p = json!({"CallRequested": {"user_id": user, "phone": "+14155550123",
            "persona_id": "sarah_001", "persona_name": "Sarah"}});
        each_field("call", "CallRequested", &mut p, |f, _| seen.push(f.path));
        assert_eq!(seen, ["phone"]);
        let mut p = json!({"CallRequested": {"user_id": user, "phone": "+14155550123",
            "persona_id": Uuid::now_v7().to_string(), "persona_name": "My Aunt Zelda"}});
        seen.clear();
        each_field("call", "CallRequested", &mut p, |f, _| seen.push(f.path));
        assert_eq!(seen, ["phone", "persona_name"]);
        erase("call", "CallRequested", &mut p);
        assert_eq!(p["CallRequested"]["persona_name"], ERASED);
    }

    #[test]
    fn a_users_persona_and_card_still_decode_erased() {
        let user = Uuid::now_v7();
        let mut p = json!({"PersonaCreated": {"owner": {"kind": "user", "user_id": user},
            "name": "Zelda", "description": "d", "voice_id": "v", "system_prompt": "p",
            "greeting": "g", "is_public": false, "tags": ["aunt", "family"],
            "turn_taking": {"endpointing_ms": 500, "silence_hangup_ms": 25000,
                            "silence_reminder_ms": 10000}}});
        erase("persona", "PersonaCreated", &mut p);
        let e: crate::persona::PersonaEvent = serde_json::from_value(p).unwrap();
        let crate::persona::PersonaEvent::PersonaCreated { name, tags, .. } = e else {
            panic!("decoded as another event")
        };
        assert_eq!((name.as_str(), tags), (ERASED, vec![ERASED.to_string(); 2]));
        let mut p = json!({"PaymentMethodAttached": {"card": {"payment_method_id": "pm_1",
            "brand": "visa", "last4": "4242", "exp_month": 12, "exp_year": 2034}}});
        erase("billing", "PaymentMethodAttached", &mut p);
        let e: crate::billing::BillingEvent = serde_json::from_value(p).unwrap();
        let crate::billing::BillingEvent::PaymentMethodAttached { card } = e else {
            panic!("decoded as another event")
        };
        assert_eq!((card.brand.as_str(), card.last4.as_str()), (ERASED, ERASED));
        assert_eq!(card.payment_method_id, "pm_1");
    }

    #[test]
    fn fields_inside_lists_are_walked_and_sealed_ones_blank_to_their_erased_form() {
        let mut p = json!({"FactsLearned": {"call_id": "c1", "facts": [
            {"id": "f1", "text": {"$sealed": "x"}, "kind": "person", "embedding": {"$sealed": "y"}},
            {"id": "f2", "text": "in clear", "kind": "goal"}
        ]}});
        let mut seen = Vec::new();
        each_field("memory", "FactsLearned", &mut p, |f, _| seen.push(f.path));
        assert_eq!(seen, ["facts[].text", "facts[].text", "facts[].embedding"]);
        assert!(has_sealed("memory", "FactsLearned", &mut p));
        blank("memory", "FactsLearned", &mut p);
        assert_eq!(p["FactsLearned"]["facts"][0]["text"], ERASED);
        assert_eq!(p["FactsLearned"]["facts"][0]["embedding"], json!([]));
        assert_eq!(p["FactsLearned"]["facts"][1]["text"], "in clear");
        assert_eq!(p["FactsLearned"]["call_id"], "c1");
    }

    #[test]
    fn an_erased_user_event_still_decodes() {
        let mut p = json!({"UserRegistered": {"name": "Ann", "email": "ann@example.com",
            "phone": "+14155550123", "password_hash": "h"}});
        erase("user", "UserRegistered", &mut p);
        assert!(!has_sealed("user", "UserRegistered", &mut p));
        let e: crate::user::UserEvent = serde_json::from_value(p).unwrap();
        let crate::user::UserEvent::UserRegistered { name, email, .. } = e else {
            panic!("decoded as another event")
        };
        assert_eq!((name.as_str(), email.as_str()), (ERASED, ERASED));
    }
}
