//! Costs grouped as an analyst asks (provider, day, user, persona) and unit economics (cost per
//! conversation minute by provider, margin): sums of the reconcile report's rounded lines, so
//! they add up with `replay reconcile` to the cent.

use std::collections::{BTreeMap, HashMap};

use schemars::JsonSchema;
use serde::Serialize;

use super::answers::{range, Answer, Paging, ToolError};
use super::log::{Log, Scope};
use crate::ops::reconcile::Report;

#[derive(Debug, Default, Clone, Serialize, JsonSchema)]
pub struct CostRow {
    /// The provider, day (YYYY-MM-DD), user id or persona id.
    pub key: String,
    /// The persona's name when grouped by persona.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Calls in the group (by provider: calls with a cost line of that provider).
    pub calls: usize,
    /// What the calls cost us (cents; each call × provider rounded once).
    pub cost_cents: i64,
    /// By provider (empty when grouped by provider).
    pub cost_by_provider_cents: BTreeMap<String, i64>,
    /// Revenue and margin (cents); absent by provider (revenue is not split by provider).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revenue_cents: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub margin_cents: Option<i64>,
    /// By provider: usage in the range that belongs to no call (cached greetings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_cost_cents: Option<i64>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct CostsAnswer {
    pub from: Option<String>,
    pub to: Option<String>,
    pub by: String,
    /// Cost of every call in the range (cents), not just this page.
    pub total_cost_cents: i64,
    pub rows: Vec<CostRow>,
    pub total_rows: usize,
    pub next_cursor: Option<String>,
}

/// Who each call is with, from its `CallRequested`.
#[derive(Default)]
struct Personas(HashMap<String, (String, String)>);

impl Personas {
    fn see(&mut self, e: &cmb_domain::EventEnvelope) {
        if e.event_type == "CallRequested" {
            let p = &e.payload["CallRequested"];
            if let Some(id) = p["persona_id"].as_str() {
                let name = p["persona_name"].as_str().unwrap_or_default();
                self.0
                    .insert(e.aggregate_id.clone(), (id.to_string(), name.to_string()));
            }
        }
    }
}

fn rows(report: &Report, personas: &Personas, by: &str) -> Answer<Vec<CostRow>> {
    let mut groups: BTreeMap<String, CostRow> = BTreeMap::new();
    match by {
        "provider" => {
            for line in &report.calls {
                for (provider, cents) in &line.cost_cents {
                    let row = groups.entry(provider.clone()).or_default();
                    row.calls += 1;
                    row.cost_cents += cents;
                }
            }
            for (provider, cents) in &report.system_cost_cents {
                groups
                    .entry(provider.clone())
                    .or_default()
                    .system_cost_cents = Some(*cents);
            }
        }
        "day" | "user" | "persona" => {
            for line in &report.calls {
                let (key, name) = match by {
                    "day" => (line.day.map(|d| d.to_string()).unwrap_or_default(), None),
                    "user" => (line.user_id.clone(), None),
                    _ => match personas.0.get(&line.call_id) {
                        Some((id, name)) => (id.clone(), Some(name.clone())),
                        None => (String::new(), None),
                    },
                };
                let row = groups.entry(key).or_default();
                row.name = name;
                row.calls += 1;
                row.cost_cents += line.total_cost_cents;
                *row.revenue_cents.get_or_insert(0) += line.revenue_cents;
                *row.margin_cents.get_or_insert(0) += line.margin_cents;
                for (provider, cents) in &line.cost_cents {
                    *row.cost_by_provider_cents
                        .entry(provider.clone())
                        .or_default() += cents;
                }
            }
        }
        other => {
            return Err(ToolError(format!(
                "by: provider, day, user or persona, not {other:?}"
            )))
        }
    }
    Ok(groups
        .into_iter()
        .map(|(key, row)| CostRow { key, ..row })
        .collect())
}

pub async fn costs(
    log: &Log,
    from: Option<&str>,
    to: Option<&str>,
    by: &str,
    paging: Paging,
) -> Answer<CostsAnswer> {
    let span = range(from, to)?;
    rows(&Report::default(), &Personas::default(), by)?;
    let report = log.report(span).await?;
    // Who each call was with, from the requests (read after the report, so every call in it
    // has its request here).
    let mut personas = Personas::default();
    if by == "persona" {
        let requests = Scope {
            event_type: Some("CallRequested".into()),
            ..Scope::of_type("call")
        };
        log.each(&requests, |e| personas.see(&e)).await?;
    }
    let all = rows(&report, &personas, by)?;
    let (rows, total_rows, next_cursor) = paging.page(all);
    Ok(CostsAnswer {
        from: span.0.map(|t| t.to_rfc3339()),
        to: span.1.map(|t| t.to_rfc3339()),
        by: by.to_string(),
        total_cost_cents: report.totals.cost_cents,
        rows,
        total_rows,
        next_cursor,
    })
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ProviderMinute {
    pub provider: String,
    pub cost_cents: i64,
    /// `cost_cents` per conversation minute, in cents (to 0.0001).
    pub cents_per_minute: Option<f64>,
    /// This provider's share of the calls' cost, percent (to 0.01).
    pub share_percent: Option<f64>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct UnitEconomics {
    pub from: Option<String>,
    pub to: Option<String>,
    pub calls: usize,
    /// Calls that were answered (some conversation time).
    pub answered_calls: usize,
    /// Seconds of conversation (answered time) over every call, and the same in minutes.
    pub conversation_seconds: u64,
    pub conversation_minutes: f64,
    pub revenue_cents: i64,
    pub cost_cents: i64,
    pub margin_cents: i64,
    /// Margin over revenue, percent (to 0.01); absent without revenue.
    pub margin_percent: Option<f64>,
    /// Per conversation minute, cents (to 0.0001); absent without conversation time.
    pub revenue_cents_per_minute: Option<f64>,
    pub cost_cents_per_minute: Option<f64>,
    pub margin_cents_per_minute: Option<f64>,
    pub providers: Vec<ProviderMinute>,
}

fn round(x: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (x * scale).round() / scale
}

/// Per conversation minute: `cents / (seconds / 60)`, to 0.0001 cent.
pub fn per_minute(cents: i64, seconds: u64) -> Option<f64> {
    (seconds > 0).then(|| round(cents as f64 * 60.0 / seconds as f64, 4))
}

/// `part / whole` in percent, to 0.01.
pub fn percent(part: i64, whole: i64) -> Option<f64> {
    (whole != 0).then(|| round(part as f64 * 100.0 / whole as f64, 2))
}

/// The unit economics of a report's calls.
pub fn unit_economics_of(report: &Report, span: super::answers::Range) -> UnitEconomics {
    let seconds: u64 = report.calls.iter().map(|c| c.answered_secs as u64).sum();
    let t = &report.totals;
    UnitEconomics {
        from: span.0.map(|t| t.to_rfc3339()),
        to: span.1.map(|t| t.to_rfc3339()),
        calls: t.calls,
        answered_calls: report.calls.iter().filter(|c| c.answered_secs > 0).count(),
        conversation_seconds: seconds,
        conversation_minutes: round(seconds as f64 / 60.0, 4),
        revenue_cents: t.revenue_cents,
        cost_cents: t.cost_cents,
        margin_cents: t.margin_cents,
        margin_percent: percent(t.margin_cents, t.revenue_cents),
        revenue_cents_per_minute: per_minute(t.revenue_cents, seconds),
        cost_cents_per_minute: per_minute(t.cost_cents, seconds),
        margin_cents_per_minute: per_minute(t.margin_cents, seconds),
        providers: report
            .per_provider
            .iter()
            .map(|(provider, cents)| ProviderMinute {
                provider: provider.clone(),
                cost_cents: *cents,
                cents_per_minute: per_minute(*cents, seconds),
                share_percent: percent(*cents, t.cost_cents),
            })
            .collect(),
    }
}

pub async fn unit_economics(
    log: &Log,
    from: Option<&str>,
    to: Option<&str>,
) -> Answer<UnitEconomics> {
    let span = range(from, to)?;
    let report = log.report(span).await?;
    Ok(unit_economics_of(&report, span))
}
