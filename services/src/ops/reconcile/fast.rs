//! The reconcile's fast path over message bodies: a call event's body is read in place into
//! borrowed structs of only the fields the reconcile uses (no JSON tree, no copy of the
//! payload, the price table and metadata skipped unread), straight from the bytes the
//! connection received.
//!
//! Whatever this path does not know how to read exactly as [`EventEnvelope::decode`] would —
//! another aggregate type (rare: system costs, Stripe events), an event version other than 1,
//! a call event with an upcaster registered — goes the general way: the whole envelope,
//! decoded and upcast.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, Utc};
use cmb_domain::call::{Outcome, Reversal};
use cmb_domain::EventEnvelope;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use uuid::Uuid;

use super::{CallFact, Reconciler};

/// The envelope's fields the reconcile reads; serde skips the others unread.
#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    aggregate_type: Cow<'a, str>,
    #[serde(borrow)]
    aggregate_id: Cow<'a, str>,
    #[serde(borrow)]
    event_version: Cow<'a, str>,
    #[serde(borrow)]
    occurred_at: Cow<'a, str>,
    #[serde(borrow)]
    payload: Payload<'a>,
}

/// A call event's payload (`{"EventType": {…}}`) as far as the reconcile reads it.
enum Payload<'a> {
    Requested {
        user_id: Uuid,
        payment_intent: Option<Cow<'a, str>>,
    },
    Fact(CallFact<'a>),
    /// Not a call event this build knows: the full decode decides.
    Unknown,
}

#[derive(Deserialize)]
struct Requested<'a> {
    user_id: Uuid,
    #[serde(borrow)]
    payment: PaymentRef<'a>,
}

/// `Payment`, internally tagged by `method`.
#[derive(Deserialize)]
struct PaymentRef<'a> {
    #[serde(borrow)]
    method: Cow<'a, str>,
    #[serde(borrow, default)]
    payment_intent_id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Placed<'a> {
    #[serde(borrow)]
    call_sid: Cow<'a, str>,
}

#[derive(Deserialize)]
struct Ended {
    outcome: Outcome,
    answered_secs: u32,
    price_cents: i64,
}

#[derive(Deserialize)]
struct CostRef<'a> {
    #[serde(borrow)]
    service: Cow<'a, str>,
    total_micros: i64,
    #[serde(borrow, default)]
    billed_reference: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Settled {
    charged_cents: i64,
}

#[derive(Deserialize)]
struct Reversed {
    kind: Reversal,
    amount_cents: i64,
}

impl<'de: 'a, 'a> Deserialize<'de> for Payload<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Payload<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an event payload {\"EventType\": {…}}")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Payload<'a>, M::Error> {
                let Some(kind) = map.next_key::<Cow<'de, str>>()? else {
                    return Ok(Payload::Unknown);
                };
                let payload = match kind.as_ref() {
                    "CallRequested" => {
                        let r: Requested<'a> = map.next_value()?;
                        let payment_intent = match r.payment.method.as_ref() {
                            "card" => match r.payment.payment_intent_id {
                                Some(pi) => Some(pi),
                                None => return Ok(Payload::Unknown),
                            },
                            "credits" => None,
                            _ => return Ok(Payload::Unknown),
                        };
                        Payload::Requested {
                            user_id: r.user_id,
                            payment_intent,
                        }
                    }
                    "CallPlaced" => {
                        let p: Placed<'a> = map.next_value()?;
                        Payload::Fact(CallFact::Placed {
                            call_sid: p.call_sid,
                        })
                    }
                    "CallEnded" => {
                        let e: Ended = map.next_value()?;
                        Payload::Fact(CallFact::Ended {
                            outcome: e.outcome,
                            answered_secs: e.answered_secs,
                            price_cents: e.price_cents,
                        })
                    }
                    "CostRecorded" => {
                        let c: CostRef<'a> = map.next_value()?;
                        Payload::Fact(CallFact::Cost {
                            billed: c.billed_reference.is_some(),
                            service: c.service,
                            total_micros: c.total_micros,
                        })
                    }
                    "CallSettled" => {
                        let s: Settled = map.next_value()?;
                        Payload::Fact(CallFact::Settled {
                            charged_cents: s.charged_cents,
                        })
                    }
                    "PaymentReversed" => {
                        let r: Reversed = map.next_value()?;
                        Payload::Fact(CallFact::Reversed {
                            kind: r.kind,
                            amount_cents: r.amount_cents,
                        })
                    }
                    other => {
                        map.next_value::<IgnoredAny>()?;
                        if cmb_domain::events::is_known("call", other) {
                            Payload::Fact(CallFact::Other)
                        } else {
                            Payload::Unknown
                        }
                    }
                };
                // An externally tagged enum has exactly one key.
                if map.next_key::<IgnoredAny>()?.is_some() {
                    return Ok(Payload::Unknown);
                }
                Ok(payload)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Whether a call event of this version is read by the fast path: version 1 with no upcaster
/// registered for call events (an upcast payload is only read by the general path).
fn fast_version(version: &str) -> bool {
    version == "1"
        && !cmb_domain::events::UPCASTERS
            .iter()
            .any(|u| u.aggregate_type == "call")
}

impl Reconciler {
    /// Adds the event a message body carries, at `position` in the log: see the module.
    pub fn add_body(&mut self, position: u128, body: &[u8]) -> Result<(), serde_json::Error> {
        if let Ok(b) = serde_json::from_slice::<Body>(body) {
            if b.aggregate_type == "call" && fast_version(&b.event_version) {
                match b.payload {
                    Payload::Fact(fact) => {
                        self.add_call_fact(position, &b.aggregate_id, fact);
                        return Ok(());
                    }
                    Payload::Requested {
                        user_id,
                        payment_intent,
                    } => {
                        if let Ok(at) = b.occurred_at.parse::<DateTime<Utc>>() {
                            let fact = CallFact::Requested {
                                at,
                                user_id,
                                payment_intent,
                            };
                            self.add_call_fact(position, &b.aggregate_id, fact);
                            return Ok(());
                        }
                    }
                    Payload::Unknown => {}
                }
            }
        }
        let e: EventEnvelope = serde_json::from_slice(body)?;
        self.add_at(position, &e);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::synthetic::History;

    /// The fast path and the general one give the same report, event for event.
    #[test]
    fn bodies_read_in_place_reconcile_as_decoded_envelopes() {
        let events: Vec<EventEnvelope> = History::new(3, 7, Utc::now(), 60).take(3_000).collect();
        let (mut general, mut fast) = (Reconciler::default(), Reconciler::default());
        for (i, e) in events.iter().enumerate() {
            general.add(e);
            let (_, body) = cmb_nats::contract::encode(e);
            fast.add_body(i as u128 + 1, &body).unwrap();
        }
        let (general, fast) = (general.report(), fast.report());
        assert!(general.totals.calls > 200);
        assert_eq!(
            serde_json::to_value(&general).unwrap(),
            serde_json::to_value(&fast).unwrap()
        );
        // Not an envelope: an error, as the general path gives.
        assert!(Reconciler::default().add_body(1, b"{}").is_err());
    }
}
