//! What the MCP tools answer, computed from the event log with the reconcile and bill-compare
//! functions `replay reconcile` uses (so the figures are the CLI's), shaped for a client:
//! rows to page through, totals beside them, and errors an analyst can act on.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::Value;

use super::log::Log;
use crate::ops::reconcile::{billed, Report};
use crate::telemetry::Causes;

/// A tool's failure, said so an analyst (or an assistant) can correct the call.
#[derive(Debug)]
pub struct ToolError(pub String);

impl<E: std::error::Error> From<E> for ToolError {
    fn from(e: E) -> Self {
        ToolError(format!("reading the event log failed: {}", Causes(&e)))
    }
}

pub type Answer<T> = Result<T, ToolError>;

fn bad(message: impl Into<String>) -> ToolError {
    ToolError(message.into())
}

/// Rows per page when the call does not say; the most a page may hold.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

/// A time range as `replay` takes it: `from` inclusive, `to` exclusive, each an ISO 8601 time
/// or a date (`to` as a date includes that whole day).
pub type Range = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

pub fn range(from: Option<&str>, to: Option<&str>) -> Answer<Range> {
    let parse = |field: &'static str, raw: &str, end: bool| {
        cmb_domain::values::parse_time_bound(field, raw, end).map_err(|_| {
            bad(format!(
                "{field}: expected a date (YYYY-MM-DD, UTC) or an ISO 8601 time, got {raw:?}"
            ))
        })
    };
    let from = from.map(|f| parse("from", f, false)).transpose()?;
    let to = to.map(|t| parse("to", t, true)).transpose()?;
    if let (Some(f), Some(t)) = (from, to) {
        if f >= t {
            return Err(bad(format!(
                "from ({f}) must be before to ({t}); a date as `to` includes its whole day"
            )));
        }
    }
    Ok((from, to))
}

/// Where a page starts and how long it is, from a tool's `cursor` and `limit`.
pub struct Paging {
    pub offset: usize,
    pub limit: usize,
}

impl Paging {
    pub fn new(cursor: Option<&str>, limit: Option<u32>) -> Answer<Paging> {
        let offset = match cursor {
            None | Some("") => 0,
            Some(c) => c.parse().map_err(|_| {
                bad(format!(
                    "cursor: {c:?} is not a cursor this server gave (pass `next_cursor` from the previous page)"
                ))
            })?,
        };
        let limit = limit.map(|l| l as usize).unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(bad(format!("limit: 1 to {MAX_LIMIT}, got {limit}")));
        }
        Ok(Paging { offset, limit })
    }

    /// This page of `rows`, with the total and the cursor of the next page.
    pub fn page<T>(&self, rows: Vec<T>) -> (Vec<T>, usize, Option<String>) {
        let total = rows.len();
        let page: Vec<T> = rows
            .into_iter()
            .skip(self.offset)
            .take(self.limit)
            .collect();
        let end = self.offset + page.len();
        let next = (end < total).then(|| end.to_string());
        (page, total, next)
    }
}

fn json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("report types serialise")
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ReconcileAnswer {
    /// The calls requested in this range are reported, with all their events however late.
    pub from: Option<String>,
    pub to: Option<String>,
    pub group_by: String,
    /// Calls, revenue, cost and margin (cents) of the whole range, not just this page.
    pub totals: Value,
    /// Per provider, cents of usage that belongs to no call (greetings cached at start-up).
    pub system_cost_cents: BTreeMap<String, i64>,
    pub anomalies: usize,
    /// This page of rows: per call (`call`), user, provider, day, or the anomalies.
    pub rows: Vec<Value>,
    pub total_rows: usize,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// The report's rows for one grouping, as a client pages through them.
fn grouped(report: &Report, group_by: &str) -> Answer<Vec<Value>> {
    Ok(match group_by {
        "call" => report.calls.iter().map(json).collect(),
        "user" => report
            .per_user
            .iter()
            .map(|(user, t)| {
                let mut row = json(t);
                row["user_id"] = user.clone().into();
                row
            })
            .collect(),
        "provider" => report
            .per_provider
            .iter()
            .map(|(p, cents)| serde_json::json!({ "provider": p, "cost_cents": cents }))
            .collect(),
        "day" => report
            .per_day
            .iter()
            .map(|(day, line)| {
                let mut row = json(line);
                row["day"] = day.to_string().into();
                row
            })
            .collect(),
        "anomaly" => report.anomalies.iter().map(json).collect(),
        other => {
            return Err(bad(format!(
                "group_by: call, user, provider, day or anomaly, not {other:?}"
            )))
        }
    })
}

pub async fn reconcile(
    log: &Log,
    from: Option<&str>,
    to: Option<&str>,
    group_by: &str,
    paging: Paging,
) -> Answer<ReconcileAnswer> {
    let span = range(from, to)?;
    grouped(&Report::default(), group_by)?;
    let report = log.report(span).await?;
    let (rows, total_rows, next_cursor) = paging.page(grouped(&report, group_by)?);
    Ok(ReconcileAnswer {
        from: span.0.map(|t| t.to_rfc3339()),
        to: span.1.map(|t| t.to_rfc3339()),
        group_by: group_by.to_string(),
        totals: json(&report.totals),
        system_cost_cents: report.system_cost_cents.clone(),
        anomalies: report.anomalies.len(),
        rows,
        total_rows,
        next_cursor,
    })
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct CompareAnswer {
    /// Billed rows read from the CSV.
    pub billed_rows: usize,
    /// The sum over every call × provider on the bill of billed minus estimated (cents).
    pub total_difference_cents: i64,
    /// This page of differences: `differs` (off by more than the threshold),
    /// `missing_from_bill`, `billed_without_estimate`, `billed_but_unknown`.
    pub differences: Vec<Value>,
    pub total_differences: usize,
    pub next_cursor: Option<String>,
}

/// `csv_text` compared with every call of the log (as `replay reconcile --billed FILE
/// --threshold N`); nothing is recorded.
pub async fn compare_bill(
    log: &Log,
    csv_text: &str,
    threshold_cents: i64,
    paging: Paging,
) -> Answer<CompareAnswer> {
    if threshold_cents < 0 {
        return Err(bad("threshold_cents: 0 or more"));
    }
    if csv_text.trim().is_empty() {
        return Err(bad("csv_text: empty; expected a header `provider,call_id,usage_date,quantity,unit,billed_usd` or Twilio's call export (Sid, Duration, Price), then rows"));
    }
    let rows = billed::parse_billed(csv_text, "csv_text")
        .map_err(|e| ToolError(Causes(&e).to_string()))?;
    let report = log.report((None, None)).await?;
    let (diffs, total) = billed::compare(&report, &rows, threshold_cents);
    let (differences, total_differences, next_cursor) =
        paging.page(diffs.iter().map(json).collect());
    Ok(CompareAnswer {
        billed_rows: rows.len(),
        total_difference_cents: total,
        differences,
        total_differences,
        next_cursor,
    })
}
