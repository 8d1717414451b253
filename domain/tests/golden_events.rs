//! Golden fixtures: one stored payload per event type, in the shape that shipped
//! (`fixtures/events/<aggregate>/<EventType>.json`). Each must still decode — upcast first when
//! its version is older — and, at the current version, encode back to exactly the same JSON:
//! a change to an event's shape that would break the events already stored fails here, not in
//! a replay. Every type the domain knows (`cmb_domain::events::KNOWN`) has a fixture, and every
//! fixture names a known type.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use cmb_domain::events::{upcast, KNOWN};
use cqrs_es::DomainEvent;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/events")
}

/// Decodes `payload` as `E` and encodes it again: (its event type, its version, its JSON).
fn round_trip<E: DomainEvent + Serialize + DeserializeOwned>(
    payload: Value,
) -> Result<(String, String, Value), String> {
    let event: E = serde_json::from_value(payload).map_err(|e| e.to_string())?;
    let json = serde_json::to_value(&event).map_err(|e| e.to_string())?;
    Ok((event.event_type(), event.event_version(), json))
}

fn decode(aggregate: &str, payload: Value) -> Result<(String, String, Value), String> {
    use cmb_domain::*;
    match aggregate {
        "user" => round_trip::<user::UserEvent>(payload),
        "pricing" => round_trip::<pricing::PricingEvent>(payload),
        "wallet" => round_trip::<wallet::WalletEvent>(payload),
        "contacts" => round_trip::<contacts::ContactsEvent>(payload),
        "billing" => round_trip::<billing::BillingEvent>(payload),
        "stripe_event" => round_trip::<billing::StripeEventEvent>(payload),
        "system_cost" => round_trip::<system_cost::SystemCostEvent>(payload),
        "budget" => round_trip::<budget::BudgetEvent>(payload),
        "persona" => round_trip::<persona::PersonaEvent>(payload),
        "persona_preference" => round_trip::<persona::preference::PreferenceEvent>(payload),
        "call" => round_trip::<call::CallEvent>(payload),
        "memory" => round_trip::<memory::MemoryEvent>(payload),
        other => Err(format!("no event enum for aggregate type {other:?}")),
    }
}

fn fixtures() -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for aggregate in std::fs::read_dir(fixtures_dir()).expect("fixtures directory") {
        let aggregate = aggregate.unwrap().path();
        let aggregate_type = aggregate.file_name().unwrap().to_string_lossy().to_string();
        for file in std::fs::read_dir(&aggregate).unwrap() {
            let file = file.unwrap().path();
            let event_type = file.file_stem().unwrap().to_string_lossy().to_string();
            let fixture: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            out.push((aggregate_type.clone(), event_type, fixture));
        }
    }
    out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    out
}

#[test]
fn every_stored_shape_still_decodes_and_encodes_back_unchanged() {
    let mut failures = Vec::new();
    for (aggregate, event_type, fixture) in fixtures() {
        let version = fixture["event_version"].as_str().expect("event_version");
        let stored = fixture["payload"].clone();
        let (current, upcast) = upcast(&aggregate, &event_type, version, stored.clone());
        match decode(&aggregate, upcast.clone()) {
            Err(e) => failures.push(format!("{aggregate}/{event_type} v{version}: {e}")),
            Ok((name, code_version, json)) => {
                if name != event_type {
                    failures.push(format!("{aggregate}/{event_type}: decodes as {name}"));
                }
                if current != code_version {
                    failures.push(format!(
                        "{aggregate}/{event_type}: upcast to v{current}, the code writes v{code_version}"
                    ));
                }
                // Written today, a payload comes back byte for byte; an older one comes back
                // in the upcast shape.
                if json != upcast {
                    failures.push(format!(
                        "{aggregate}/{event_type} v{version}: shape changed\n  stored:  {upcast}\n  encoded: {json}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn every_known_event_type_has_a_fixture_and_no_fixture_is_unknown() {
    let known: BTreeSet<(String, String)> = KNOWN
        .iter()
        .flat_map(|(a, types)| types.iter().map(|t| (a.to_string(), t.to_string())))
        .collect();
    let fixtures: BTreeSet<(String, String)> =
        fixtures().into_iter().map(|(a, t, _)| (a, t)).collect();
    let missing: Vec<_> = known.difference(&fixtures).collect();
    let unknown: Vec<_> = fixtures.difference(&known).collect();
    assert!(missing.is_empty(), "no golden fixture for {missing:?}");
    assert!(
        unknown.is_empty(),
        "fixtures of types the domain does not know: {unknown:?}"
    );
}
