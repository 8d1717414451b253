//! The analysts' replay: read the event log (JetStream, or the Postgres event store), print it,
//! or reconcile what each call cost us against what we charged and what providers billed.
//!
//! Money: revenue in integer cents; provider costs are recorded in micro-dollars and rounded
//! to cents once per line item (one call × one provider), half up; every total is the sum of
//! its rounded lines, so reports add up.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;

use chrono::{DateTime, NaiveDate, Utc};
use cmb_domain::call::{CallEvent, Payment};
use cmb_domain::EventEnvelope;
use serde::Serialize;
use uuid::Uuid;

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
            line.revenue_cents = line.charged_cents.unwrap_or(0) - line.refunded_cents;
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

/// A provider's billed line, from a generic CSV or Twilio's call export.
#[derive(Debug, Clone, PartialEq)]
pub struct Billed {
    pub provider: String,
    pub reference: String,
    pub micros: i64,
    pub source: String,
}

/// Reads a billed file: the generic `provider,call_id,usage_date,quantity,unit,billed_usd`, or
/// Twilio's call-records export (columns `Sid`, `Duration`, `Price`; prices are negative).
pub fn read_billed(path: &std::path::Path) -> anyhow::Result<Vec<Billed>> {
    let text = std::fs::read_to_string(path)?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = split_csv(lines.next().unwrap_or(""))
        .into_iter()
        .map(|h| h.trim().to_string())
        .collect();
    let col = |name: &str| header.iter().position(|h| h.eq_ignore_ascii_case(name));
    let mut out = Vec::new();
    let source = path.display().to_string();
    if let (Some(p), Some(c), Some(b)) = (col("provider"), col("call_id"), col("billed_usd")) {
        for (n, line) in lines.enumerate() {
            let f = split_csv(line);
            let get = |i: usize| f.get(i).map(|s| s.trim().to_string()).unwrap_or_default();
            let micros = parse_usd_micros(&get(b)).ok_or_else(|| {
                anyhow::anyhow!(
                    "{source} line {}: billed_usd {:?} is not a decimal",
                    n + 2,
                    get(b)
                )
            })?;
            out.push(Billed {
                provider: get(p).to_lowercase(),
                reference: get(c),
                micros,
                source: source.clone(),
            });
        }
    } else if let (Some(s), Some(pr)) = (col("Sid"), col("Price")) {
        for (n, line) in lines.enumerate() {
            let f = split_csv(line);
            let get = |i: usize| f.get(i).map(|s| s.trim().to_string()).unwrap_or_default();
            let micros = parse_usd_micros(&get(pr)).ok_or_else(|| {
                anyhow::anyhow!(
                    "{source} line {}: Price {:?} is not a decimal",
                    n + 2,
                    get(pr)
                )
            })?;
            out.push(Billed {
                provider: "twilio".into(),
                reference: get(s),
                micros: micros.abs(),
                source: source.clone(),
            });
        }
    } else {
        anyhow::bail!("{source}: expected a header `provider,call_id,usage_date,quantity,unit,billed_usd` or Twilio's export (Sid, Duration, Price)");
    }
    Ok(out)
}

/// Splits a CSV line, honouring double quotes.
fn split_csv(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                fields.last_mut().expect("a field").push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(String::new()),
            _ => fields.last_mut().expect("a field").push(c),
        }
    }
    fields
}

/// Billed rows matched to our calls, summed per (call id, provider, the bill's reference):
/// what `reconcile --record` turns into events.
pub fn billed_per_call(
    report: &Report,
    billed: &[Billed],
) -> BTreeMap<(String, String, String), i64> {
    let mut by_ref: HashMap<&str, &str> = HashMap::new();
    for c in &report.calls {
        by_ref.insert(&c.call_id, &c.call_id);
        if let Some(sid) = &c.call_sid {
            by_ref.insert(sid, &c.call_id);
        }
    }
    let mut out = BTreeMap::new();
    for b in billed {
        if let Some(call) = by_ref.get(b.reference.as_str()) {
            *out.entry((call.to_string(), b.provider.clone(), b.reference.clone()))
                .or_default() += b.micros;
        }
    }
    out
}

#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    pub call_id: Option<String>,
    pub provider: String,
    pub reference: String,
    pub estimated_cents: Option<i64>,
    pub billed_cents: Option<i64>,
    pub difference_cents: i64,
    pub kind: &'static str,
}

/// Our estimates against what providers billed: every call × provider off by more than
/// `threshold` cents, every billed row matching no call, every call missing from a provider's
/// bill.
pub fn compare(report: &Report, billed: &[Billed], threshold: i64) -> (Vec<Difference>, i64) {
    let mut by_ref: HashMap<String, &CallLine> = HashMap::new();
    for c in &report.calls {
        by_ref.insert(c.call_id.clone(), c);
        if let Some(sid) = &c.call_sid {
            by_ref.insert(sid.clone(), c);
        }
    }
    let mut billed_per: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut diffs = Vec::new();
    let providers: HashSet<String> = billed.iter().map(|b| b.provider.clone()).collect();
    for b in billed {
        match by_ref.get(&b.reference) {
            Some(call) => {
                *billed_per
                    .entry((call.call_id.clone(), b.provider.clone()))
                    .or_default() += b.micros
            }
            None => diffs.push(Difference {
                call_id: None,
                provider: b.provider.clone(),
                reference: b.reference.clone(),
                estimated_cents: None,
                billed_cents: Some(micros_to_cents(b.micros)),
                difference_cents: micros_to_cents(b.micros),
                kind: "billed_but_unknown",
            }),
        }
    }
    let mut total_diff = 0;
    for c in &report.calls {
        for provider in &providers {
            let estimated = c.cost_cents.get(provider).copied();
            let billed = billed_per
                .get(&(c.call_id.clone(), provider.clone()))
                .map(|m| micros_to_cents(*m));
            let (kind, diff) = match (estimated, billed) {
                (None, None) => continue,
                (Some(e), None) if e != 0 => ("missing_from_bill", -e),
                (Some(_), None) => continue,
                (None, Some(b)) => ("billed_without_estimate", b),
                (Some(e), Some(b)) => ("differs", b - e),
            };
            total_diff += diff;
            if diff.abs() > threshold || kind != "differs" {
                diffs.push(Difference {
                    call_id: Some(c.call_id.clone()),
                    provider: provider.clone(),
                    reference: c.call_sid.clone().unwrap_or_else(|| c.call_id.clone()),
                    estimated_cents: estimated,
                    billed_cents: billed,
                    difference_cents: diff,
                    kind,
                });
            }
        }
    }
    (diffs, total_diff)
}

fn dollars(cents: i64) -> String {
    cmb_domain::values::Cents(cents).to_string()
}

/// The report as a table (for people), CSV or JSON (for tools).
pub fn write_report(out: &mut dyn Write, report: &Report, format: &str) -> std::io::Result<()> {
    match format {
        "json" => {
            serde_json::to_writer(&mut *out, report)?;
            writeln!(out)
        }
        "csv" => {
            writeln!(out, "call_id,user_id,day,outcome,answered_secs,price_cents,charged_cents,refunded_cents,revenue_cents,cost_cents,margin_cents")?;
            for c in &report.calls {
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{},{}",
                    c.call_id,
                    c.user_id,
                    c.day.map(|d| d.to_string()).unwrap_or_default(),
                    c.outcome.clone().unwrap_or_default(),
                    c.answered_secs,
                    c.price_cents.unwrap_or(0),
                    c.charged_cents.unwrap_or(0),
                    c.refunded_cents,
                    c.revenue_cents,
                    c.total_cost_cents,
                    c.margin_cents
                )?;
            }
            Ok(())
        }
        _ => {
            writeln!(
                out,
                "{:<36}  {:<10}  {:>9}  {:>9}  {:>9}",
                "call", "outcome", "revenue", "cost", "margin"
            )?;
            for c in &report.calls {
                writeln!(
                    out,
                    "{:<36}  {:<10}  {:>9}  {:>9}  {:>9}",
                    c.call_id,
                    c.outcome.clone().unwrap_or_else(|| "-".into()),
                    dollars(c.revenue_cents),
                    dollars(c.total_cost_cents),
                    dollars(c.margin_cents)
                )?;
            }
            writeln!(out, "\nper provider:")?;
            for (p, cents) in &report.per_provider {
                writeln!(out, "  {p:<12} {:>10}", dollars(*cents))?;
            }
            writeln!(out, "per day:")?;
            for (d, line) in &report.per_day {
                let cost: i64 = line.cost_cents.values().sum();
                writeln!(
                    out,
                    "  {d}  revenue {:>10}  cost {:>10}",
                    dollars(line.revenue_cents),
                    dollars(cost)
                )?;
            }
            writeln!(
                out,
                "\ntotal: {} calls, revenue {}, cost {}, margin {}",
                report.totals.calls,
                dollars(report.totals.revenue_cents),
                dollars(report.totals.cost_cents),
                dollars(report.totals.margin_cents)
            )?;
            writeln!(out, "anomalies: {}", report.anomalies.len())?;
            for a in &report.anomalies {
                writeln!(out, "  {:<32} {} {}", a.kind, a.call_id, a.detail)?;
            }
            Ok(())
        }
    }
}

/// An SVG chart: cost per day stacked by provider, revenue per day as a line.
pub fn chart_svg(report: &Report) -> String {
    let days: Vec<(&NaiveDate, &DayLine)> = report.per_day.iter().collect();
    let providers: Vec<String> = report.per_provider.keys().cloned().collect();
    let colours = [
        "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948",
    ];
    let max = days
        .iter()
        .map(|(_, d)| d.revenue_cents.max(d.cost_cents.values().sum()))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let (w, h, left, bottom) = (900.0, 400.0, 70.0, 40.0);
    let bw = ((w - left - 20.0) / days.len().max(1) as f64).max(2.0);
    let y = |cents: f64| h - bottom - (cents / max) * (h - bottom - 20.0);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    svg.push_str(&format!(
        r#"<text x="{left}" y="14">cost per day by provider (bars), revenue (line); max {}</text>"#,
        dollars(max as i64)
    ));
    let mut points = Vec::new();
    for (i, (day, line)) in days.iter().enumerate() {
        let x = left + i as f64 * bw;
        let mut acc = 0.0;
        for (p, provider) in providers.iter().enumerate() {
            let c = *line.cost_cents.get(provider).unwrap_or(&0) as f64;
            if c > 0.0 {
                svg.push_str(&format!(
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{day} {provider} {}</title></rect>"#,
                    y(acc + c), bw * 0.8, y(acc) - y(acc + c), colours[p % colours.len()], dollars(c as i64)
                ));
            }
            acc += c;
        }
        points.push(format!(
            "{:.1},{:.1}",
            x + bw * 0.4,
            y(line.revenue_cents as f64)
        ));
    }
    svg.push_str(&format!(
        r##"<polyline points="{}" fill="none" stroke="#222" stroke-width="2"/>"##,
        points.join(" ")
    ));
    for (p, provider) in providers.iter().enumerate() {
        svg.push_str(&format!(
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{provider}</text>"#,
            left + p as f64 * 110.0, h - 15.0, colours[p % colours.len()], left + p as f64 * 110.0 + 14.0, h - 6.0
        ));
    }
    svg.push_str("</svg>\n");
    svg
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
