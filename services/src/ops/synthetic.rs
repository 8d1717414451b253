//! Synthetic event histories of the real shapes, written straight into envelopes (not through
//! the command path), for `bench replay`: users granted credits, then calls paid by holds —
//! requested, dialled, placed, ringing, answered or not, ended, costed per provider, settled —
//! with each aggregate's sequence counted exactly as the event store would.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use cmb_domain::call::{CallEvent, Outcome, Payment, Status};
use cmb_domain::cost::{CostKind, LlmProvider};
use cmb_domain::pricing::{credits_for, PriceTable};
use cmb_domain::values::PhoneNumber;
use cmb_domain::wallet::WalletEvent;
use cmb_domain::{EventEnvelope, EventMetadata};
use cqrs_es::DomainEvent;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

/// Generates events, in commit order, without end; take as many as wanted.
pub struct History {
    rng: StdRng,
    users: Vec<Uuid>,
    sequences: HashMap<(&'static str, String), u64>,
    global_position: i64,
    start: DateTime<Utc>,
    /// Simulated seconds between two calls.
    spacing_secs: i64,
    calls: u64,
    queue: std::collections::VecDeque<EventEnvelope>,
    phone: PhoneNumber,
}

impl History {
    /// `users` users; calls `spacing_secs` apart from `start`.
    pub fn new(seed: u64, users: usize, start: DateTime<Utc>, spacing_secs: i64) -> History {
        let mut rng = StdRng::seed_from_u64(seed);
        let users = (0..users.max(1))
            .map(|_| Uuid::from_u128(rng.gen()))
            .collect();
        History {
            rng,
            users,
            sequences: HashMap::new(),
            global_position: 0,
            start,
            spacing_secs: spacing_secs.max(1),
            calls: 0,
            queue: Default::default(),
            // A constant, valid E.164 number.
            phone: PhoneNumber::parse("phone", "+14155550123").expect("a valid number"),
        }
    }

    fn push<E: DomainEvent>(
        &mut self,
        aggregate_type: &'static str,
        id: &str,
        at: DateTime<Utc>,
        event: E,
    ) {
        let sequence = self
            .sequences
            .entry((aggregate_type, id.to_string()))
            .or_insert(0);
        *sequence += 1;
        self.global_position += 1;
        self.queue.push_back(EventEnvelope {
            aggregate_type: aggregate_type.into(),
            aggregate_id: id.to_string(),
            sequence: *sequence,
            event_type: event.event_type(),
            event_version: event.event_version(),
            occurred_at: at,
            global_position: self.global_position,
            commit_xid: self.global_position,
            // Serialising a domain event (strings, numbers, enums) cannot fail.
            payload: serde_json::to_value(&event).expect("an event serialises"),
            metadata: EventMetadata {
                actor: "system".into(),
                ..Default::default()
            },
        });
    }

    /// One more call's events (and a grant when the user is new).
    fn next_call(&mut self) {
        let prices = PriceTable::LAUNCH;
        let n = self.calls;
        self.calls += 1;
        let user = self.users[self.rng.gen_range(0..self.users.len())];
        let wallet = user.to_string();
        let call = Uuid::from_u128(self.rng.gen()).to_string();
        let t = self.start + Duration::seconds(n as i64 * self.spacing_secs);
        if !self.sequences.contains_key(&("wallet", wallet.clone())) {
            self.push(
                "wallet",
                &wallet,
                t,
                WalletEvent::CreditsGranted {
                    credits: 1_000_000,
                    reason: "synthetic".into(),
                    reference: format!("grant-{user}"),
                    balance_after: 1_000_000,
                },
            );
        }
        let max_minutes = self.rng.gen_range(1..=10u32);
        let max_price = prices.max_price(max_minutes);
        let credits = credits_for(max_price);
        self.push(
            "wallet",
            &wallet,
            t,
            WalletEvent::CreditsReserved {
                hold_id: call.clone(),
                credits,
                available_after: 1_000_000 - credits,
            },
        );
        self.push(
            "call",
            &call,
            t,
            CallEvent::CallRequested {
                user_id: user,
                persona_id: "brad_001".into(),
                persona_name: "Brad".into(),
                phone: self.phone.clone(),
                max_minutes,
                payment: Payment::Credits { credits },
                prices,
                max_price_cents: max_price.0,
                scheduled_for: None,
                timezone: None,
            },
        );
        self.push(
            "call",
            &call,
            t,
            CallEvent::DialAttempted { attempt: 1, at: t },
        );
        let sid = format!("CA{}", Uuid::from_u128(self.rng.gen()).simple());
        self.push("call", &call, t, CallEvent::CallPlaced { call_sid: sid });
        let ring = t + Duration::seconds(self.rng.gen_range(2..20));
        self.push(
            "call",
            &call,
            ring,
            CallEvent::CallStatusChanged {
                status: Status::Ringing,
                sequence: Some(1),
                at: ring,
            },
        );
        let roll = self.rng.gen_range(0..100);
        let outcome = match roll {
            0..=79 => Outcome::Completed,
            80..=89 => Outcome::NoAnswer,
            90..=96 => Outcome::Busy,
            _ => Outcome::Failed,
        };
        let secs = if outcome == Outcome::Completed {
            self.rng.gen_range(5..=max_minutes * 60)
        } else {
            0
        };
        let end = ring + Duration::seconds(secs as i64 + 1);
        let status = if outcome == Outcome::Completed {
            Status::InProgress
        } else {
            Status::Ended(outcome)
        };
        self.push(
            "call",
            &call,
            ring,
            CallEvent::CallStatusChanged {
                status,
                sequence: Some(2),
                at: ring,
            },
        );
        let minutes = PriceTable::billed_minutes(secs).min(max_minutes);
        let price = if outcome == Outcome::Completed {
            prices.price_of_call(secs, max_minutes).0
        } else {
            0
        };
        self.push(
            "call",
            &call,
            end,
            CallEvent::CallEnded {
                outcome,
                answered_secs: secs,
                billed_minutes: minutes,
                price_cents: price,
                at: end,
            },
        );
        if secs > 0 {
            let m = PriceTable::billed_minutes(secs) as i64;
            let mut costs = vec![prices.cost(CostKind::TwilioVoiceMinutes, m, false)];
            let extra = self.rng.gen_range(0..=3);
            let tokens = self.rng.gen_range(500..20_000) * m;
            let chars = self.rng.gen_range(200..1_500) * m;
            let all = [
                prices.cost(CostKind::DeepgramStreamingStt, secs as i64, true),
                prices.cost(CostKind::ChatTokens(LlmProvider::Cerebras), tokens, true),
                prices.cost(CostKind::TtsCharacters, chars, true),
            ];
            costs.extend(all.into_iter().take(extra));
            for cost in costs {
                self.push("call", &call, end, CallEvent::CostRecorded(cost));
            }
        }
        let payment = Payment::Credits { credits };
        let settlement = payment.settle(price, max_price.0);
        let used = settlement.credits_used;
        let settle_at = end + Duration::seconds(1);
        if used > 0 {
            self.push(
                "wallet",
                &wallet,
                settle_at,
                WalletEvent::CreditsSettled {
                    hold_id: call.clone(),
                    used,
                    released: credits - used,
                    balance_after: 1_000_000 - used,
                },
            );
        } else {
            self.push(
                "wallet",
                &wallet,
                settle_at,
                WalletEvent::CreditsReleased {
                    hold_id: call.clone(),
                    credits,
                },
            );
        }
        self.push(
            "call",
            &call,
            settle_at,
            CallEvent::CallSettled {
                charged_cents: settlement.charged_cents,
                released_cents: settlement.released_cents,
            },
        );
    }
}

impl Iterator for History {
    type Item = EventEnvelope;

    fn next(&mut self) -> Option<EventEnvelope> {
        if self.queue.is_empty() {
            self.next_call();
        }
        self.queue.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_count_per_aggregate_and_calls_reconcile_without_anomalies() {
        let events: Vec<EventEnvelope> = History::new(7, 5, Utc::now(), 60).take(5_000).collect();
        let mut last: HashMap<(String, String), u64> = HashMap::new();
        for e in &events {
            let seq = last
                .entry((e.aggregate_type.clone(), e.aggregate_id.clone()))
                .or_insert(0);
            assert_eq!(e.sequence, *seq + 1, "{}", e.event_id());
            *seq = e.sequence;
        }
        // Whole calls only: stop at the last settlement.
        let end = events
            .iter()
            .rposition(|e| e.event_type == "CallSettled")
            .unwrap();
        let mut r = crate::ops::reconcile::Reconciler::default();
        for e in &events[..=end] {
            r.add(e);
        }
        let report = r.report();
        assert!(report.totals.calls > 300);
        assert!(report.anomalies.is_empty(), "{:?}", &report.anomalies[..3]);
        assert!(report.per_provider.contains_key("elevenlabs"));
    }
}
