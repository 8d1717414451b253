//! The memory extraction answer: strict JSON from the LLM, checked before anything is
//! recorded. Malformed or oversized answers are refused (the worker retries once, then skips).

use serde::Deserialize;

pub const MAX_FACTS: usize = 20;
pub const MAX_ITEMS: usize = 10;
pub const MAX_ITEM_CHARS: usize = 300;
/// The largest answer read at all.
pub const MAX_ANSWER_CHARS: usize = 16_000;
pub const KINDS: &[&str] = &["preference", "person", "goal", "event", "other"];

#[derive(Debug, Clone, PartialEq)]
pub struct Extraction {
    /// (text, kind)
    pub facts: Vec<(String, String)>,
    pub summary: Option<String>,
    pub open_items: Vec<String>,
    pub closed_items: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExtractionError {
    #[error("the answer is not the JSON asked for: {0}")]
    Malformed(String),
    #[error("the answer is too large: {0}")]
    Oversized(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFact {
    text: String,
    #[serde(default)]
    kind: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawItem {
    text: String,
}

#[derive(Deserialize)]
struct Raw {
    facts: Vec<RawFact>,
    #[serde(default)]
    summary: Option<String>,
    #[serde(default)]
    open_items: Vec<RawItem>,
    #[serde(default)]
    closed_items: Vec<String>,
}

fn bounded(what: &str, text: String, max: usize) -> Result<String, ExtractionError> {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.chars().count() > max {
        return Err(ExtractionError::Oversized(format!(
            "{what} longer than {max} characters"
        )));
    }
    Ok(text)
}

/// Parses and checks an answer. A ```json fence around it is tolerated.
pub fn parse(answer: &str) -> Result<Extraction, ExtractionError> {
    if answer.chars().count() > MAX_ANSWER_CHARS {
        return Err(ExtractionError::Oversized(format!(
            "answer longer than {MAX_ANSWER_CHARS} characters"
        )));
    }
    let trimmed = answer.trim();
    let unfenced = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|s| s.trim_end().strip_suffix("```"))
        .unwrap_or(trimmed);
    let raw: Raw = serde_json::from_str(unfenced.trim())
        .map_err(|e| ExtractionError::Malformed(e.to_string()))?;
    if raw.facts.len() > MAX_FACTS {
        return Err(ExtractionError::Oversized(format!(
            "more than {MAX_FACTS} facts"
        )));
    }
    if raw.open_items.len() > MAX_ITEMS || raw.closed_items.len() > MAX_ITEMS * 2 {
        return Err(ExtractionError::Oversized("too many items".into()));
    }
    let mut facts = Vec::new();
    for f in raw.facts {
        let text = bounded("a fact", f.text, MAX_ITEM_CHARS)?;
        if text.is_empty() {
            continue;
        }
        let kind = f
            .kind
            .map(|k| k.trim().to_lowercase())
            .filter(|k| KINDS.contains(&k.as_str()))
            .unwrap_or_else(|| "other".into());
        facts.push((text, kind));
    }
    let summary = match raw.summary {
        Some(s) => Some(bounded("the summary", s, super::SUMMARY_MAX_CHARS)?),
        None => None,
    }
    .filter(|s| !s.is_empty());
    let mut open_items = Vec::new();
    for item in raw.open_items {
        let text = bounded("an open item", item.text, MAX_ITEM_CHARS)?;
        if !text.is_empty() {
            open_items.push(text);
        }
    }
    let closed_items = raw
        .closed_items
        .into_iter()
        .map(|id| id.trim().to_string())
        .filter(|id| !id.is_empty() && id.len() <= 100)
        .collect();
    Ok(Extraction {
        facts,
        summary,
        open_items,
        closed_items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_answer_is_read() {
        let e = parse(
            r#"```json
            {"facts":[{"text":"Training for a 10k","kind":"Goal"},{"text":"Likes tea","kind":"weird"}],
             "summary":"Runner.","open_items":[{"text":"race on Sunday"}],"closed_items":["o1"]}
            ```"#,
        )
        .unwrap();
        assert_eq!(
            e.facts,
            vec![
                ("Training for a 10k".into(), "goal".into()),
                ("Likes tea".into(), "other".into())
            ]
        );
        assert_eq!(e.summary.as_deref(), Some("Runner."));
        assert_eq!(e.open_items, vec!["race on Sunday".to_string()]);
        assert_eq!(e.closed_items, vec!["o1".to_string()]);
    }

    #[test]
    fn malformed_and_oversized_answers_are_refused() {
        assert!(matches!(
            parse("Sure! Here are the facts"),
            Err(ExtractionError::Malformed(_))
        ));
        assert!(matches!(
            parse(r#"{"facts":"none"}"#),
            Err(ExtractionError::Malformed(_))
        ));
        let long = format!(r#"{{"facts":[],"summary":"{}"}}"#, "x".repeat(1300));
        assert!(matches!(parse(&long), Err(ExtractionError::Oversized(_))));
        let many = format!(r#"{{"facts":[{}]}}"#, vec![r#"{"text":"a"}"#; 21].join(","));
        assert!(matches!(parse(&many), Err(ExtractionError::Oversized(_))));
    }
}
