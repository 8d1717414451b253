//! The analysts' replay: read the event log (JetStream, or the Postgres event store), print it,
//! or reconcile what each call cost us against what we charged and what providers billed.
//!
//! Money: revenue in integer cents; provider costs are recorded in micro-dollars and rounded
//! to cents once per line item (one call × one provider), half up; every total is the sum of
//! its rounded lines, so reports add up.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, NaiveDate, Utc};
use cmb_domain::call::{CallEvent, Payment, Reversal};
use cmb_domain::EventEnvelope;
use serde::Serialize;
use uuid::Uuid;

pub mod billed;
pub mod output;

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

/// Folds events (in log order) into per-call lines.
#[derive(Default)]
pub struct Reconciler {
    calls: BTreeMap<String, CallLine>,
    by_intent: HashMap<String, String>,
    orphan_refunds: Vec<(String, i64)>,
    /// Per provider, micro-dollars of system costs in the range.
    system_micros: BTreeMap<String, i64>,
    /// Only calls requested in this range (from inclusive, to exclusive) are reported.
    range: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
}

impl Reconciler {
    /// Reports the calls requested in `range`, with all their events, however late.
    pub fn requested_between(range: (Option<DateTime<Utc>>, Option<DateTime<Utc>>)) -> Self {
        Reconciler {
            range,
            ..Default::default()
        }
    }

    pub fn add(&mut self, e: &EventEnvelope) {
        match e.aggregate_type.as_str() {
            "call" => self.add_call(e),
            "system_cost" => {
                let (from, to) = self.range;
                let at = e.occurred_at;
                if from.is_none_or(|f| at >= f) && to.is_none_or(|t| at < t) {
                    let cost = &e.payload["SystemCostRecorded"]["cost"];
                    if let (Some(service), Some(micros)) =
                        (cost["service"].as_str(), cost["total_micros"].as_i64())
                    {
                        *self.system_micros.entry(service.to_string()).or_default() += micros;
                    }
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
                    match self.by_intent.get(&pi).and_then(|c| self.calls.get_mut(c)) {
                        Some(line) => line.refunded_cents = line.refunded_cents.max(refunded),
                        None => self.orphan_refunds.push((pi, refunded)),
                    }
                }
            }
            _ => {}
        }
    }

    fn add_call(&mut self, e: &EventEnvelope) {
        let Ok(event) = e.decode::<CallEvent>() else {
            return;
        };
        let line = self
            .calls
            .entry(e.aggregate_id.clone())
            .or_insert_with(|| CallLine {
                call_id: e.aggregate_id.clone(),
                ..Default::default()
            });
        match event {
            CallEvent::CallRequested {
                user_id, payment, ..
            } => {
                line.requested = true;
                line.requested_at = Some(e.occurred_at);
                line.user_id = user_id.to_string();
                line.day = Some(e.occurred_at.date_naive());
                if let Payment::Card { payment_intent_id } = payment {
                    self.by_intent
                        .insert(payment_intent_id.clone(), e.aggregate_id.clone());
                    line.payment_intent = Some(payment_intent_id);
                }
            }
            CallEvent::CallPlaced { call_sid } => line.call_sid = Some(call_sid),
            CallEvent::CallEnded {
                outcome,
                answered_secs,
                price_cents,
                ..
            } => {
                line.outcome = Some(outcome.as_str().to_string());
                line.answered_secs = answered_secs;
                line.price_cents = Some(price_cents);
            }
            CallEvent::CostRecorded(cost) if cost.billed_reference.is_some() => {
                *line.billed_micros.entry(cost.service).or_default() += cost.total_micros;
            }
            CallEvent::CostRecorded(cost) => {
                *line.cost_micros.entry(cost.service).or_default() += cost.total_micros;
            }
            CallEvent::CallSettled { charged_cents, .. } => {
                line.charged_cents = Some(charged_cents)
            }
            CallEvent::PaymentReversed {
                kind, amount_cents, ..
            } => match kind {
                Reversal::Refund => line.refunded_on_call += amount_cents,
                Reversal::Dispute => line.disputed_cents += amount_cents,
            },
            _ => {}
        }
    }

    pub fn report(self) -> Report {
        let mut report = Report::default();
        let (from, to) = self.range;
        for (_, mut line) in self.calls {
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
            let id = line.call_id.clone();
            let mut anomaly = |kind: &'static str, detail: String| {
                report.anomalies.push(Anomaly {
                    call_id: id.clone(),
                    kind,
                    detail,
                })
            };
            if !line.requested {
                anomaly(
                    "cost_without_call",
                    format!(
                        "{} cents of cost events for a call never requested",
                        line.total_cost_cents
                    ),
                );
            }
            match (line.price_cents, line.charged_cents) {
                (Some(price), Some(charged)) if price != charged => anomaly(
                    "charge_differs_from_price",
                    format!("charged {charged} cents for a call priced {price} cents"),
                ),
                (Some(_), None) => anomaly(
                    "hold_not_settled",
                    "the call ended but its hold was never captured or released".into(),
                ),
                (None, Some(charged)) if charged > 0 => anomaly(
                    "capture_without_call",
                    format!("{charged} cents captured for a call that never ended"),
                ),
                _ => {}
            }
            if line.charged_cents.unwrap_or(0) > 0
                && line.outcome.as_deref().is_some_and(|o| o != "completed")
            {
                anomaly(
                    "capture_without_completed_call",
                    format!(
                        "charged {} cents for a call that ended {}",
                        line.charged_cents.unwrap_or(0),
                        line.outcome.clone().unwrap_or_default()
                    ),
                );
            }
            if line.disputed_cents > 0 {
                anomaly(
                    "charge_disputed",
                    format!(
                        "{} cents of the capture disputed by the cardholder",
                        line.disputed_cents
                    ),
                );
            }
            let user = report.per_user.entry(line.user_id.clone()).or_default();
            user.calls += 1;
            user.revenue_cents += line.revenue_cents;
            user.cost_cents += line.total_cost_cents;
            user.margin_cents += line.margin_cents;
            for (provider, cents) in &line.cost_cents {
                *report.per_provider.entry(provider.clone()).or_default() += cents;
            }
            if let Some(day) = line.day {
                let d = report.per_day.entry(day).or_default();
                d.revenue_cents += line.revenue_cents;
                for (provider, cents) in &line.cost_cents {
                    *d.cost_cents.entry(provider.clone()).or_default() += cents;
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
        for (pi, cents) in self.orphan_refunds {
            report.anomalies.push(Anomaly {
                call_id: String::new(),
                kind: "refund_without_call",
                detail: format!("{cents} cents refunded on {pi}, which pays for no call"),
            });
        }
        report
    }
}

/// Events from Postgres in commit order (the same order the stream has), every event committed
/// when the read starts: one repeatable-read snapshot, so neither a transaction still open
/// elsewhere nor the publisher's progress decides what the report sees.
pub async fn from_postgres(
    pool: &sqlx::PgPool,
    tx: tokio::sync::mpsc::Sender<EventEnvelope>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> anyhow::Result<()> {
    let mut db = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *db)
        .await?;
    let mut after = crate::backbone::outbox::CommitPosition::default();
    loop {
        let rows = sqlx::query(&format!(
            "{} WHERE (xact_id, global_position) > ($1::text::xid8, $2)
              ORDER BY xact_id, global_position
              LIMIT 5000",
            crate::backbone::outbox::SELECT_ENVELOPE
        ))
        .bind(after.commit_xid)
        .bind(after.global_position)
        .fetch_all(&mut *db)
        .await?;
        let batch = rows
            .iter()
            .map(crate::backbone::outbox::envelope_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let Some(last) = batch.last() else {
            return Ok(());
        };
        after = crate::backbone::outbox::CommitPosition::of(last);
        for e in batch {
            if from.is_some_and(|f| e.occurred_at < f) || to.is_some_and(|t| e.occurred_at >= t) {
                continue;
            }
            if tx.send(e).await.is_err() {
                return Ok(());
            }
        }
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

    #[test]
    fn csv_fields_may_be_quoted() {
        assert_eq!(split_csv(r#"a,"b,c","d""e""#), vec!["a", "b,c", "d\"e"]);
    }
}
