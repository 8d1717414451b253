//! Every event type the domain knows, and the one way a stored event is read: first upcast to
//! the version the code speaks, then decoded.
//!
//! Events are never changed once shipped. A new shape of an event is a new `event_version`
//! with an [`Upcaster`] from the previous one, registered in [`UPCASTERS`]; a field added with
//! `#[serde(default)]` needs neither (old payloads still decode). The golden fixtures
//! (`domain/tests/fixtures/events/<aggregate>/<EventType>.json`, checked by
//! `domain/tests/golden_events.rs`) hold each type's shipped shape, so a change that would break
//! stored events fails a test instead of a replay.

use cqrs_es::persist::{EventUpcaster, SerializedEvent};
use serde_json::Value;

/// Per aggregate type, the event types it records (their `event_type` names). A type missing
/// here is unknown to this build: projections skip it (counted) instead of failing on it.
pub const KNOWN: &[(&str, &[&str])] = &[
    (
        "user",
        &[
            "UserRegistered",
            "ProfileUpdated",
            "SignInFailed",
            "AccountLocked",
            "SignedIn",
            "TokenRevoked",
            "PasswordChanged",
            "SessionsRevoked",
            "UserRegisteredWithWorkos",
            "WorkosLinked",
            "SignedInWithWorkos",
            "UserErased",
        ],
    ),
    ("pricing", &["PricesPublished"]),
    (
        "wallet",
        &[
            "CreditsGranted",
            "CreditsReserved",
            "CreditsSettled",
            "CreditsReleased",
            "CreditsRevoked",
            "DebtPaid",
        ],
    ),
    ("contacts", &["ContactAdded", "ContactRemoved"]),
    (
        "billing",
        &[
            "StripeCustomerCreated",
            "PaymentMethodAttached",
            "PaymentMethodDetached",
            "DefaultPaymentMethodSet",
            "PaymentAuthorized",
            "PaymentAuthorizationUsed",
        ],
    ),
    ("stripe_event", &["StripeEventReceived"]),
    ("system_cost", &["SystemCostRecorded"]),
    ("budget", &["BudgetSet", "BudgetAlertRaised"]),
    (
        "persona",
        &[
            "PersonaCreated",
            "PersonaUpdated",
            "PersonaDeleted",
            "KnowledgeDocumentAdded",
            "KnowledgeDocumentIndexed",
            "KnowledgeDocumentIndexingFailed",
            "KnowledgeDocumentRemoved",
        ],
    ),
    ("persona_preference", &["PersonaCustomized"]),
    (
        "call",
        &[
            "CallRequested",
            "ScheduledCallFired",
            "CallCancelled",
            "DialAttempted",
            "DialFailed",
            "CallPlaced",
            "CallStatusChanged",
            "CallEnded",
            "CostRecorded",
            "CallSettled",
            "PaymentReversed",
            "TurnCompleted",
            "VoiceSessionEnded",
        ],
    ),
    (
        "memory",
        &[
            "FactsLearned",
            "SummaryRewritten",
            "OpenItemOpened",
            "OpenItemClosed",
            "MemoryItemForgotten",
            "MemoryCleared",
            "CallDigested",
        ],
    ),
];

/// Whether this build knows `event_type` of `aggregate_type`.
pub fn is_known(aggregate_type: &str, event_type: &str) -> bool {
    KNOWN
        .iter()
        .any(|(a, types)| *a == aggregate_type && types.contains(&event_type))
}

/// Turns one version of an event's payload into the next.
#[derive(Clone, Copy)]
pub struct Upcaster {
    pub aggregate_type: &'static str,
    pub event_type: &'static str,
    pub from_version: &'static str,
    pub to_version: &'static str,
    /// The whole stored payload (`{"EventType": {…}}`) of `from_version`, in that of
    /// `to_version`.
    pub apply: fn(Value) -> Value,
}

/// The upcasters in force. Every event is at version 1 today; the next shape of an event adds
/// one here (and a golden fixture of the old shape, so the path stays tested).
pub const UPCASTERS: &[Upcaster] = &[];

/// `payload` of `version` brought to the newest version `upcasters` know for its type.
pub fn upcast_with(
    upcasters: &[Upcaster],
    aggregate_type: &str,
    event_type: &str,
    version: &str,
    payload: Value,
) -> (String, Value) {
    let mut version = version.to_string();
    let mut payload = payload;
    // Each step moves to a later version, so this ends; the bound guards a cyclic registry.
    for _ in 0..=upcasters.len() {
        let Some(step) = upcasters.iter().find(|u| {
            u.aggregate_type == aggregate_type
                && u.event_type == event_type
                && u.from_version == version
        }) else {
            break;
        };
        payload = (step.apply)(payload);
        version = step.to_version.to_string();
    }
    (version, payload)
}

/// [`upcast_with`] the registered [`UPCASTERS`].
pub fn upcast(
    aggregate_type: &str,
    event_type: &str,
    version: &str,
    payload: Value,
) -> (String, Value) {
    upcast_with(UPCASTERS, aggregate_type, event_type, version, payload)
}

/// The same upcasters for cqrs-es, so an aggregate loaded from the event store reads old
/// events exactly as consumers of the stream do.
pub struct StoreUpcaster;

impl EventUpcaster for StoreUpcaster {
    fn can_upcast(&self, event_type: &str, event_version: &str) -> bool {
        UPCASTERS
            .iter()
            .any(|u| u.event_type == event_type && u.from_version == event_version)
    }

    fn upcast(&self, event: SerializedEvent) -> SerializedEvent {
        let (version, payload) = upcast(
            &event.aggregate_type,
            &event.event_type,
            &event.event_version,
            event.payload,
        );
        SerializedEvent {
            event_version: version,
            payload,
            ..event
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A next version of `CallEnded` as it might come: `answered_seconds` renamed to
    /// `talk_seconds` in version 2, with a version 3 that adds a field.
    fn rename(mut v: Value) -> Value {
        if let Some(body) = v.get_mut("CallEnded").and_then(Value::as_object_mut) {
            if let Some(secs) = body.remove("answered_seconds") {
                body.insert("talk_seconds".into(), secs);
            }
        }
        v
    }
    fn add_channel(mut v: Value) -> Value {
        if let Some(body) = v.get_mut("CallEnded").and_then(Value::as_object_mut) {
            body.insert("channel".into(), json!("pstn"));
        }
        v
    }
    const NEXT: &[Upcaster] = &[
        Upcaster {
            aggregate_type: "call",
            event_type: "CallEnded",
            from_version: "2",
            to_version: "3",
            apply: add_channel,
        },
        Upcaster {
            aggregate_type: "call",
            event_type: "CallEnded",
            from_version: "1",
            to_version: "2",
            apply: rename,
        },
    ];

    #[test]
    fn an_old_event_is_upcast_step_by_step_to_the_newest_version() {
        let v1 = json!({"CallEnded": {"answered_seconds": 61}});
        let (version, payload) = upcast_with(NEXT, "call", "CallEnded", "1", v1);
        assert_eq!(version, "3");
        assert_eq!(
            payload,
            json!({"CallEnded": {"talk_seconds": 61, "channel": "pstn"}})
        );
    }

    #[test]
    fn other_types_and_current_versions_pass_unchanged() {
        let v = json!({"CallPlaced": {"sid": "CA1"}});
        assert_eq!(
            upcast_with(NEXT, "call", "CallPlaced", "1", v.clone()),
            ("1".to_string(), v.clone())
        );
        assert_eq!(
            upcast_with(NEXT, "persona", "CallEnded", "1", v.clone()),
            ("1".to_string(), v.clone())
        );
        assert_eq!(
            upcast_with(NEXT, "call", "CallEnded", "3", v.clone()),
            ("3".to_string(), v)
        );
    }

    #[test]
    fn known_types_are_known_and_others_are_not() {
        assert!(is_known("call", "CallEnded"));
        assert!(!is_known("call", "CallTeleported"));
        assert!(!is_known("spaceship", "CallEnded"));
    }
}
