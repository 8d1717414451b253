//! The analysts' replay: read the event log (JetStream, or the Postgres event store), print it,
//! or reconcile what each call cost us against what we charged and what providers billed.
//!
//! Money: revenue in integer cents; provider costs are recorded in micro-dollars and rounded
//! to cents once per line item (one call × one provider), half up; every total is the sum of
//! its rounded lines, so reports add up.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};

use hashbrown::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use cmb_domain::call::{CallEvent, Outcome, Payment, Reversal};
use cmb_domain::EventEnvelope;
use serde::Serialize;
use uuid::Uuid;

pub mod billed;
mod error;
mod facts;
pub mod fast;
mod merge;
pub mod output;
pub mod postgres;
pub mod stream;

pub use error::{BilledError, CopyError, Error};

/// Micro-dollars to cents, half up.
pub fn micros_to_cents(micros: i64) -> i64 {
    if micros >= 0 {
        (micros + 5_000) / 10_000
    } else {
        -((-micros + 5_000) / 10_000)
    }
}

/// A decimal dollar string ("-0.01400", "1.2") to micro-dollars, exactly (no floats).
pub fn parse_usd_micros(raw: &str) -> Option<i64> {
    let s = raw.trim().trim_start_matches('$');
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty() && frac.is_empty() {
        return None;
    }
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut frac_digits: String = frac.chars().take(7).collect();
    if !frac_digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    while frac_digits.len() < 7 {
        frac_digits.push('0');
    }
    // Seven digits: round the seventh half up into six.
    let seven: i64 = frac_digits.parse().ok()?;
    let micros = whole * 1_000_000 + (seven + 5) / 10;
    Some(if neg { -micros } else { micros })
}

/// Which events a replay keeps.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub aggregate_type: Option<String>,
    pub user: Option<Uuid>,
    pub call: Option<Uuid>,
}

impl Filter {
    /// Whether `e` passes, given the calls known to belong to the filtered user.
    pub fn keep(&self, e: &EventEnvelope, user_calls: &mut HashSet<String>) -> bool {
        if let Some(t) = &self.aggregate_type {
            if &e.aggregate_type != t {
                return false;
            }
        }
        if let Some(call) = self.call {
            if e.aggregate_id != call.to_string() {
                return false;
            }
        }
        if let Some(user) = self.user {
            let user = user.to_string();
            if e.event_type == "CallRequested"
                && e.payload["CallRequested"]["user_id"].as_str() == Some(user.as_str())
            {
                user_calls.insert(e.aggregate_id.clone());
            }
            let mine = e.aggregate_id == user
                || e.aggregate_id.starts_with(&format!("{user}:"))
                || user_calls.contains(&e.aggregate_id)
                || e.metadata.actor == format!("user:{user}");
            if !mine {
                return false;
            }
        }
        true
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CallLine {
    pub call_id: String,
    pub user_id: String,
    pub call_sid: Option<String>,
    pub payment_intent: Option<String>,
    pub day: Option<NaiveDate>,
    pub outcome: Option<String>,
    pub answered_secs: u32,
    pub price_cents: Option<i64>,
    pub charged_cents: Option<i64>,
    pub refunded_cents: i64,
    /// Cents of the capture the cardholder disputed (a chargeback), from the call's
    /// `PaymentReversed` events.
    pub disputed_cents: i64,
    pub revenue_cents: i64,
    /// Per provider, micro-dollars (exact) and cents (rounded once). Where a provider's bill
    /// was recorded for the call, its billed figures replace our estimates.
    pub cost_micros: BTreeMap<String, i64>,
    /// Per provider, what its recorded bills say (micro-dollars), when any was recorded.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub billed_micros: BTreeMap<String, i64>,
    pub cost_cents: BTreeMap<String, i64>,
    pub total_cost_cents: i64,
    pub margin_cents: i64,
    pub requested: bool,
    #[serde(skip)]
    pub requested_at: Option<DateTime<Utc>>,
    /// Refunds recorded on the call (`PaymentReversed`); the charge's own `charge.refunded`
    /// total may say the same (older logs have only that), so the larger counts.
    #[serde(skip)]
    pub refunded_on_call: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Anomaly {
    pub call_id: String,
    pub kind: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub calls: usize,
    pub revenue_cents: i64,
    pub cost_cents: i64,
    pub margin_cents: i64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub calls: Vec<CallLine>,
    pub per_user: BTreeMap<String, Totals>,
    pub per_provider: BTreeMap<String, i64>,
    /// Per provider, cents of usage that belongs to no call (`system_cost`: greetings
    /// synthesised for the cache, voice checks), recorded in the range: with `per_provider`,
    /// what the provider's bill should say.
    pub system_cost_cents: BTreeMap<String, i64>,
    pub per_day: BTreeMap<NaiveDate, DayLine>,
    pub totals: Totals,
    pub anomalies: Vec<Anomaly>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DayLine {
    pub revenue_cents: i64,
    pub cost_cents: BTreeMap<String, i64>,
}

/// What one call event tells the reconcile, and nothing more.
pub(crate) enum CallFact<'a> {
    Requested {
        at: DateTime<Utc>,
        user_id: Uuid,
        payment_intent: Option<Cow<'a, str>>,
    },
    Placed {
        call_sid: Cow<'a, str>,
    },
    Ended {
        outcome: Outcome,
        answered_secs: u32,
        price_cents: i64,
    },
    Cost {
        service: Cow<'a, str>,
        total_micros: i64,
        billed: bool,
    },
    Settled {
        charged_cents: i64,
    },
    /// Money captured for the call that came back (a refund) or was taken back (a dispute).
    Reversed {
        kind: Reversal,
        amount_cents: i64,
    },
    /// Another known call event: the call exists.
    Other,
}

/// `key`'s entry, made empty when new: the key is copied only then (a report has few users,
/// providers and days against its calls).
fn entry<'a, V: Default>(map: &'a mut BTreeMap<String, V>, key: &str) -> &'a mut V {
    if !map.contains_key(key) {
        map.insert(key.to_string(), V::default());
    }
    map.get_mut(key).expect("just made")
}

/// Folds events (in log order) into per-call lines.
///
/// Each event comes with its position in the log (any number that grows with log order: a
/// stream sequence, a commit position). Positions let partial reconcilers — of disjoint ranges
/// of the log, or of different aggregate types, folded in parallel — be [merged](Self::merge)
/// into exactly the report one reconciler folding the whole log in order would give: a
/// refund is matched to the call whose request came before it in the log, whichever part
/// each was folded in.
#[derive(Default)]
pub struct Reconciler {
    /// Per call, its line — boxed, so the map stays small to grow, merge and sort (a line is
    /// a few hundred bytes).
    calls: HashMap<String, Box<CallLine>>,
    /// Per payment intent, the calls requested with it and where, in log order.
    by_intent: HashMap<String, Vec<(u128, String)>>,
    /// Refunds (where, payment intent, cents), matched to calls in [`Self::report`].
    refunds: Vec<(u128, String, i64)>,
    /// Per provider, micro-dollars of system costs in the range.
    system_micros: BTreeMap<String, i64>,
    /// Only calls requested in this range (from inclusive, to exclusive) are reported.
    range: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
    /// The position [`Self::add`] gives the next event.
    next: u128,
}

impl Reconciler {
    /// Reports the calls requested in `range`, with all their events, however late.
    pub fn requested_between(range: (Option<DateTime<Utc>>, Option<DateTime<Utc>>)) -> Self {
        Reconciler {
            range,
            ..Default::default()
        }
    }

    /// Adds the next event in log order.
    pub fn add(&mut self, e: &EventEnvelope) {
        self.next += 1;
        self.add_at(self.next, e);
    }

    /// Adds an event at `position` in the log; one reconciler's events come in log order.
    pub fn add_at(&mut self, position: u128, e: &EventEnvelope) {
        match e.aggregate_type.as_str() {
            "call" => self.add_call(position, e),
            "system_cost" => {
                let cost = &e.payload["SystemCostRecorded"]["cost"];
                if let (Some(service), Some(micros)) =
                    (cost["service"].as_str(), cost["total_micros"].as_i64())
                {
                    self.add_system_cost(e.occurred_at, service, micros);
                }
            }
            "stripe_event" => {
                let p = &e.payload["StripeEventReceived"];
                if p["kind"] == "charge.refunded" {
                    let refunded = p["summary"]["amount_refunded"].as_i64().unwrap_or(0);
                    let pi = p["summary"]["payment_intent"]
                        .as_str()
                        .unwrap_or("")
                        .to_string();
                    self.refunds.push((position, pi, refunded));
                }
            }
            _ => {}
        }
    }

    fn add_system_cost(&mut self, at: DateTime<Utc>, service: &str, micros: i64) {
        let (from, to) = self.range;
        if from.is_none_or(|f| at >= f) && to.is_none_or(|t| at < t) {
            match self.system_micros.get_mut(service) {
                Some(sum) => *sum += micros,
                None => {
                    self.system_micros.insert(service.to_string(), micros);
                }
            }
        }
    }

    /// The call's line, made on its first event (one hash of the id; the id copied only then).
    fn line(&mut self, call_id: &str) -> &mut CallLine {
        self.calls.entry_ref(call_id).or_insert_with(|| {
            Box::new(CallLine {
                call_id: call_id.to_string(),
                ..Default::default()
            })
        })
    }

    fn add_call(&mut self, position: u128, e: &EventEnvelope) {
        let Ok(event) = e.decode::<CallEvent>() else {
            return;
        };
        let fact = match event {
            CallEvent::CallRequested {
                user_id, payment, ..
            } => CallFact::Requested {
                at: e.occurred_at,
                user_id,
                payment_intent: match payment {
                    Payment::Card { payment_intent_id } => Some(payment_intent_id.into()),
                    Payment::Credits { .. } => None,
                },
            },
            CallEvent::CallPlaced { call_sid } => CallFact::Placed {
                call_sid: call_sid.into(),
            },
            CallEvent::CallEnded {
                outcome,
                answered_secs,
                price_cents,
                ..
            } => CallFact::Ended {
                outcome,
                answered_secs,
                price_cents,
            },
            CallEvent::CostRecorded(cost) => CallFact::Cost {
                billed: cost.billed_reference.is_some(),
                service: cost.service.into(),
                total_micros: cost.total_micros,
            },
            CallEvent::CallSettled { charged_cents, .. } => CallFact::Settled { charged_cents },
            CallEvent::PaymentReversed {
                kind, amount_cents, ..
            } => CallFact::Reversed { kind, amount_cents },
            _ => CallFact::Other,
        };
        self.add_call_fact(position, &e.aggregate_id, fact);
    }

    /// Folds what one call event says (see [`fast`]: the same facts, read straight from a
    /// message body).
    fn add_call_fact(&mut self, position: u128, call_id: &str, fact: CallFact) {
        let line = self.line(call_id);
        match fact {
            CallFact::Requested {
                at,
                user_id,
                payment_intent,
            } => {
                line.requested = true;
                line.requested_at = Some(at);
                line.user_id = user_id.to_string();
                line.day = Some(at.date_naive());
                if let Some(pi) = payment_intent {
                    let pi = pi.into_owned();
                    line.payment_intent = Some(pi.clone());
                    self.by_intent
                        .entry(pi)
                        .or_default()
                        .push((position, call_id.to_string()));
                }
            }
            CallFact::Placed { call_sid } => line.call_sid = Some(call_sid.into_owned()),
            CallFact::Ended {
                outcome,
                answered_secs,
                price_cents,
            } => {
                line.outcome = Some(outcome.as_str().to_string());
                line.answered_secs = answered_secs;
                line.price_cents = Some(price_cents);
            }
            CallFact::Cost {
                service,
                total_micros,
                billed,
            } => {
                let sums = if billed {
                    &mut line.billed_micros
                } else {
                    &mut line.cost_micros
                };
                match sums.get_mut(service.as_ref()) {
                    Some(sum) => *sum += total_micros,
                    None => {
                        sums.insert(service.into_owned(), total_micros);
                    }
                }
            }
            CallFact::Settled { charged_cents } => line.charged_cents = Some(charged_cents),
            CallFact::Reversed {
                kind: Reversal::Refund,
                amount_cents,
            } => line.refunded_on_call += amount_cents,
            CallFact::Reversed {
                kind: Reversal::Dispute,
                amount_cents,
            } => line.disputed_cents += amount_cents,
            CallFact::Other => {}
        }
    }

    pub fn report(mut self) -> Report {
        let mut report = Report::default();
        let (from, to) = self.range;
        let orphan_refunds = self.match_refunds();
        let mut calls: Vec<Box<CallLine>> = self.calls.into_values().collect();
        calls.sort_unstable_by(|a, b| a.call_id.cmp(&b.call_id));
        report.calls.reserve(calls.len());
        for line in calls {
            let mut line = *line;
            // Only lines with a request can be placed in time; the others are anomalies.
            if let Some(at) = line.requested_at {
                if from.is_some_and(|f| at < f) || to.is_some_and(|t| at >= t) {
                    continue;
                }
            }
            for (provider, micros) in &line.billed_micros {
                line.cost_micros.insert(provider.clone(), *micros);
            }
            line.cost_cents = line
                .cost_micros
                .iter()
                .map(|(k, v)| (k.clone(), micros_to_cents(*v)))
                .collect();
            line.total_cost_cents = line.cost_cents.values().sum();
            line.refunded_cents = line.refunded_cents.max(line.refunded_on_call);
            line.revenue_cents =
                line.charged_cents.unwrap_or(0) - line.refunded_cents - line.disputed_cents;
            line.margin_cents = line.revenue_cents - line.total_cost_cents;
            let anomaly = |kind: &'static str, detail: String| Anomaly {
                call_id: line.call_id.clone(),
                kind,
                detail,
            };
            if !line.requested {
                report.anomalies.push(anomaly(
                    "cost_without_call",
                    format!(
                        "{} cents of cost events for a call never requested",
                        line.total_cost_cents
                    ),
                ));
            }
            match (line.price_cents, line.charged_cents) {
                (Some(price), Some(charged)) if price != charged => report.anomalies.push(anomaly(
                    "charge_differs_from_price",
                    format!("charged {charged} cents for a call priced {price} cents"),
                )),
                (Some(_), None) => report.anomalies.push(anomaly(
                    "hold_not_settled",
                    "the call ended but its hold was never captured or released".into(),
                )),
                (None, Some(charged)) if charged > 0 => report.anomalies.push(anomaly(
                    "capture_without_call",
                    format!("{charged} cents captured for a call that never ended"),
                )),
                _ => {}
            }
            if line.charged_cents.unwrap_or(0) > 0
                && line.outcome.as_deref().is_some_and(|o| o != "completed")
            {
                report.anomalies.push(anomaly(
                    "capture_without_completed_call",
                    format!(
                        "charged {} cents for a call that ended {}",
                        line.charged_cents.unwrap_or(0),
                        line.outcome.clone().unwrap_or_default()
                    ),
                ));
            }
            if line.disputed_cents > 0 {
                report.anomalies.push(anomaly(
                    "charge_disputed",
                    format!(
                        "{} cents of the capture disputed by the cardholder",
                        line.disputed_cents
                    ),
                ));
            }
            let user = entry(&mut report.per_user, &line.user_id);
            user.calls += 1;
            user.revenue_cents += line.revenue_cents;
            user.cost_cents += line.total_cost_cents;
            user.margin_cents += line.margin_cents;
            for (provider, cents) in &line.cost_cents {
                *entry(&mut report.per_provider, provider) += cents;
            }
            if let Some(day) = line.day {
                let d = report.per_day.entry(day).or_default();
                d.revenue_cents += line.revenue_cents;
                for (provider, cents) in &line.cost_cents {
                    *entry(&mut d.cost_cents, provider) += cents;
                }
            }
            report.totals.calls += 1;
            report.totals.revenue_cents += line.revenue_cents;
            report.totals.cost_cents += line.total_cost_cents;
            report.totals.margin_cents += line.margin_cents;
            report.calls.push(line);
        }
        for (provider, micros) in &self.system_micros {
            report
                .system_cost_cents
                .insert(provider.clone(), micros_to_cents(*micros));
        }
        for (pi, cents) in orphan_refunds {
            report.anomalies.push(Anomaly {
                call_id: String::new(),
                kind: "refund_without_call",
                detail: format!("{cents} cents refunded on {pi}, which pays for no call"),
            });
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::billed::*;
    use super::*;

    #[test]
    fn money_parses_exactly_and_rounds_once() {
        assert_eq!(parse_usd_micros("0.014"), Some(14_000));
        assert_eq!(parse_usd_micros("-0.01400"), Some(-14_000));
        assert_eq!(parse_usd_micros("$1.2"), Some(1_200_000));
        assert_eq!(parse_usd_micros("0.0000005"), Some(1));
        assert_eq!(parse_usd_micros("abc"), None);
        assert_eq!(micros_to_cents(14_000), 1);
        assert_eq!(micros_to_cents(15_000), 2);
        assert_eq!(micros_to_cents(4_999), 0);
        assert_eq!(micros_to_cents(-15_000), -2);
    }

    /// A month of calls with card payments and refunds — one refund before its call was
    /// requested, one of an unknown payment — folded whole in log order, and folded as
    /// `replay reconcile` reads the stream: call events in three ranges, the other types
    /// apart, bodies read in place, merged. The same report.
    #[test]
    fn partial_reconciles_merged_give_the_whole_fold() {
        use crate::ops::synthetic::History;
        let mut events: Vec<EventEnvelope> =
            History::new(5, 4, Utc::now(), 60).take(2_000).collect();
        let refund = |pi: &str, cents: i64| {
            let mut e = events[0].clone();
            e.aggregate_type = "stripe_event".into();
            e.aggregate_id = format!("evt_{pi}_{cents}");
            e.event_type = "StripeEventReceived".into();
            e.payload = serde_json::json!({"StripeEventReceived": {
                "kind": "charge.refunded", "object_id": "ch_1", "created": 0,
                "summary": {"amount_refunded": cents, "payment_intent": pi}}});
            e
        };
        let mut card_calls = 0;
        let mut with_refunds = Vec::new();
        for e in events.clone() {
            let mut e = e;
            if e.event_type == "CallRequested" && card_calls < 40 {
                card_calls += 1;
                let pi = format!("pi_{card_calls}");
                e.payload["CallRequested"]["payment"] =
                    serde_json::json!({"method": "card", "payment_intent_id": pi});
                if card_calls == 3 {
                    // Refunded before the request is in the log: no call to match.
                    with_refunds.push(refund(&pi, 7));
                }
                with_refunds.push(e);
                continue;
            }
            if e.event_type == "CallSettled" && with_refunds.len() % 3 == 0 {
                let n = card_calls;
                with_refunds.push(e);
                with_refunds.push(refund(&format!("pi_{n}"), 25));
                continue;
            }
            with_refunds.push(e);
        }
        with_refunds.push(refund("pi_unknown", 5));
        events = with_refunds;

        let mut whole = Reconciler::default();
        for e in &events {
            whole.add(e);
        }
        let whole = whole.report();
        assert!(whole.calls.iter().any(|c| c.refunded_cents == 25));
        let orphans: Vec<_> = whole
            .anomalies
            .iter()
            .filter(|a| a.kind == "refund_without_call")
            .collect();
        assert_eq!(orphans.len(), 2, "{orphans:?}");

        let n = events.len();
        let mut merged = Reconciler::default();
        let mut others = Reconciler::default();
        for range in [0..n / 3, n / 3..n / 2, n / 2..n] {
            let mut part = Reconciler::default();
            for (i, e) in events.iter().enumerate().take(range.end).skip(range.start) {
                let body = serde_json::to_vec(e).unwrap();
                if e.aggregate_type == "call" {
                    part.add_body(i as u128 + 1, &body).unwrap();
                } else {
                    others.add_body(i as u128 + 1, &body).unwrap();
                }
            }
            merged.merge(part);
        }
        merged.merge(others);
        assert_eq!(
            serde_json::to_value(&whole).unwrap(),
            serde_json::to_value(merged.report()).unwrap()
        );
    }

    #[test]
    fn billed_csv_fields_may_be_quoted() {
        let text = "provider,call_id,usage_date,quantity,unit,billed_usd\r\n\
                    \"Deepgram\",\"call, \"\"one\"\"\",2026-11-30,60,seconds,\"0.0043\"\r\n\
                    \r\n\
                    openai,c2,2026-11-30,1000,tokens,$0.0006\r\n";
        let rows = parse_billed(text, "bill.csv").unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0].provider, "deepgram");
        assert_eq!(rows[0].reference, "call, \"one\"");
        assert_eq!(rows[0].micros, 4_300);
        assert_eq!(rows[1].reference, "c2");
        assert_eq!(rows[1].micros, 600);
        let bad = parse_billed(
            "provider,call_id,usage_date,quantity,unit,billed_usd\nx,c,d,1,u,lots\n",
            "bill.csv",
        )
        .unwrap_err();
        assert!(format!("{bad}").contains("line 2"), "{bad}");
    }

    #[test]
    fn twilio_call_export_is_read() {
        // The console's call log export: RFC 2822 dates and caller names hold commas, so they
        // are quoted; prices are negative; Excel adds a byte-order mark.
        let text = "\u{feff}Sid,Parent Call Sid,Date Created,From,To,Direction,Status,Start Time,\
                    End Time,Duration,Price,Price Unit,Caller Name\n\
                    CA0001,,\"Mon, 30 Nov 2026 16:00:00 +0000\",+15005550006,+14155550123,\
                    outbound-api,completed,\"Mon, 30 Nov 2026 16:00:01 +0000\",\
                    \"Mon, 30 Nov 2026 16:01:01 +0000\",60,-0.01400,USD,\"Smith, Jane\"\n\
                    CA0002,,\"Mon, 30 Nov 2026 17:00:00 +0000\",+15005550006,+14155550124,\
                    outbound-api,no-answer,,,0,,USD,\n";
        // An unanswered call has no price: nothing billed, no row.
        let rows = parse_billed(text, "twilio.csv").unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].provider, "twilio");
        assert_eq!(rows[0].reference, "CA0001");
        assert_eq!(rows[0].micros, 14_000);
        let text = text.replace(",0,,USD,", ",0,-0.00x,USD,");
        let err = parse_billed(&text, "twilio.csv").unwrap_err();
        assert!(format!("{err}").contains("line 3"), "{err}");
        // The REST API's names (`call_sid`, `price`) read the same.
        let rows = parse_billed("call_sid,price\nCA9,-0.5\n", "api.csv").unwrap();
        assert_eq!(
            (rows[0].reference.as_str(), rows[0].micros),
            ("CA9", 500_000)
        );
    }
}
