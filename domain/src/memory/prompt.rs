//! What a call's prompt carries of memory: the summary, the open items and the facts most
//! relevant to them, within a token budget (about four characters a token).

use super::embed::{embed, top_k};

pub const CHARS_PER_TOKEN: usize = 4;

/// The memory section of the system prompt, and the ids of the facts it carries. Facts are
/// `(id, text)`; `None` when there is nothing to remember.
pub fn memory_section(
    summary: Option<&str>,
    open_items: &[String],
    facts: &[(String, String)],
    budget_tokens: usize,
) -> Option<(String, Vec<String>)> {
    if summary.is_none() && open_items.is_empty() && facts.is_empty() {
        return None;
    }
    let mut budget = budget_tokens * CHARS_PER_TOKEN;
    let mut out = String::from("What you remember about the caller from earlier calls:");
    let mut push = |out: &mut String, line: String| -> bool {
        if line.len() > budget {
            return false;
        }
        budget -= line.len();
        out.push_str(&line);
        true
    };
    if let Some(s) = summary {
        push(&mut out, format!("\nSummary: {s}"));
    }
    for item in open_items {
        push(&mut out, format!("\nTo follow up on: {item}"));
    }
    // Facts closest to what the summary and open items are about first, then the rest.
    let query = embed(&format!(
        "{} {}",
        summary.unwrap_or(""),
        open_items.join(" ")
    ));
    let vectors: Vec<Vec<f32>> = facts.iter().map(|(_, t)| embed(t)).collect();
    let mut order: Vec<usize> = top_k(&query, &vectors, facts.len(), f32::MIN)
        .into_iter()
        .map(|(i, _)| i)
        .collect();
    order.dedup();
    let mut carried = Vec::new();
    for i in order {
        let (id, text) = &facts[i];
        if push(&mut out, format!("\nFact: {text}")) {
            carried.push(id.clone());
        }
    }
    out.push_str("\nUse this naturally, only when it fits; never recite it.");
    Some((out, carried))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_bounds_the_section() {
        let facts: Vec<(String, String)> = (0..50)
            .map(|i| {
                (
                    format!("f{i}"),
                    format!("fact {i} is rather long and wordy"),
                )
            })
            .collect();
        let (text, carried) =
            memory_section(Some("Runner."), &["race".into()], &facts, 40).unwrap();
        assert!(text.len() <= 40 * 4 + 120, "{}", text.len());
        assert!(carried.len() < 50 && !carried.is_empty());
        assert!(text.contains("Summary: Runner.") && text.contains("To follow up on: race"));
        assert_eq!(memory_section(None, &[], &[], 400), None);
    }
}
