//! Providers' bills: read (the generic CSV or Twilio's call export), compared with our
//! estimates, and matched to calls for `reconcile --record`.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::{micros_to_cents, parse_usd_micros, BilledError, CallLine, Report};

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
pub fn read_billed(path: &std::path::Path) -> Result<Vec<Billed>, BilledError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| BilledError::Read {
        file: file.clone(),
        source,
    })?;
    parse_billed(&text, &file)
}

/// A header cell as compared: lower case, without spaces or underscores (`Call Sid`,
/// `call_sid` and `CallSid` are one column).
fn column_key(h: &str) -> String {
    h.chars()
        .filter(|c| !c.is_whitespace() && *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// A billed file's text (the formats of [`read_billed`]); `source` names it in messages. Read
/// with the `csv` crate: quoted fields (Twilio's dates and caller names hold commas), doubled
/// quotes, CRLF line ends, a UTF-8 byte-order mark, blank lines and ragged rows.
pub fn parse_billed(text: &str, source: &str) -> Result<Vec<Billed>, BilledError> {
    let text = text.trim_start_matches('\u{feff}');
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| BilledError::Header {
            file: source.to_string(),
            source: e,
        })?
        .iter()
        .map(column_key)
        .collect();
    let col = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| header.iter().position(|h| h == n))
    };
    let (provider, reference, amount, twilio) =
        match (col(&["provider"]), col(&["callid"]), col(&["billedusd"])) {
            (Some(p), Some(c), Some(b)) => (Some(p), c, b, false),
            _ => match (col(&["sid", "callsid"]), col(&["price"])) {
                (Some(s), Some(p)) => (None, s, p, true),
                _ => {
                    return Err(BilledError::Columns {
                        file: source.to_string(),
                    })
                }
            },
        };
    let amount_name = if twilio { "Price" } else { "billed_usd" };
    let source = source.to_string();
    let mut out = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| BilledError::Row {
            file: source.clone(),
            source: e,
        })?;
        if record.iter().all(str::is_empty) {
            continue;
        }
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        let get = |i: usize| record.get(i).unwrap_or("").to_string();
        if twilio && get(amount).is_empty() {
            // Twilio leaves the price of an unanswered call empty: nothing was billed.
            continue;
        }
        let micros = parse_usd_micros(&get(amount)).ok_or_else(|| BilledError::Amount {
            file: source.clone(),
            line,
            column: amount_name,
            value: get(amount),
        })?;
        out.push(Billed {
            provider: match provider {
                Some(p) => get(p).to_lowercase(),
                None => "twilio".into(),
            },
            reference: get(reference),
            micros: if twilio { micros.abs() } else { micros },
            source: source.clone(),
        });
    }
    Ok(out)
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
