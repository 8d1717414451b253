//! Providers' bills: read (the generic CSV or Twilio's call export), compared with our
//! estimates, and matched to calls for `reconcile --record`.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::{micros_to_cents, parse_usd_micros, CallLine, Report};

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
    parse_billed(&text, &path.display().to_string())
}

/// A billed file's text (the formats of [`read_billed`]); `source` names it in messages.
pub fn parse_billed(text: &str, source: &str) -> anyhow::Result<Vec<Billed>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = split_csv(lines.next().unwrap_or(""))
        .into_iter()
        .map(|h| h.trim().to_string())
        .collect();
    let col = |name: &str| header.iter().position(|h| h.eq_ignore_ascii_case(name));
    let mut out = Vec::new();
    let source = source.to_string();
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
pub(super) fn split_csv(line: &str) -> Vec<String> {
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
