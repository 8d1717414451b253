//! A document's text → passages of a few hundred tokens: split by headings, then paragraphs
//! (a long paragraph by sentences, a very long sentence by words), packed up to
//! [`TARGET_TOKENS`], each passage after the first of a section starting with the end of the
//! one before (about [`OVERLAP_TOKENS`]) so a fact on a boundary is whole in one of them.
//! HTML is first turned into the same shape as Markdown (`html_to_text`).

use super::{tokens, DocumentFormat};

/// A passage is packed up to about this many tokens.
pub const TARGET_TOKENS: usize = 250;
/// Never more than this (a unit is at most [`UNIT_TOKENS`]).
pub const MAX_TOKENS: usize = TARGET_TOKENS + UNIT_TOKENS;
/// What a passage repeats of the one before it, at most.
pub const OVERLAP_TOKENS: usize = 60;
/// The largest piece packing works with.
const UNIT_TOKENS: usize = 120;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passage {
    /// 0, 1, 2… in document order.
    pub ord: u32,
    /// The heading of its section, if any.
    pub heading: Option<String>,
    pub text: String,
    pub tokens: u32,
}

/// The text a document of `format` carries, with headings as Markdown `#` lines (PDF text is
/// extracted before it gets here; it is treated as plain text).
pub fn normalize(format: DocumentFormat, raw: &str) -> String {
    match format {
        DocumentFormat::Html => html_to_text(raw),
        _ => raw.replace("\r\n", "\n").replace('\r', "\n"),
    }
}

/// Splits `text` (Markdown headings, blank-line paragraphs) into passages.
pub fn split(text: &str) -> Vec<Passage> {
    let mut out: Vec<Passage> = Vec::new();
    for (heading, paragraphs) in sections(text) {
        let units: Vec<String> = paragraphs.iter().flat_map(|p| units(p)).collect();
        let mut start = 0;
        while start < units.len() {
            let mut end = start;
            let mut size = 0;
            while end < units.len() && (end == start || size + tokens(&units[end]) <= TARGET_TOKENS)
            {
                size += tokens(&units[end]);
                end += 1;
            }
            let text = units[start..end].join("\n\n");
            out.push(Passage {
                ord: out.len() as u32,
                heading: heading.clone(),
                tokens: tokens(&text) as u32,
                text,
            });
            if end >= units.len() {
                break;
            }
            // The next passage starts with the last units of this one, up to the overlap, but
            // always moves forward.
            let mut next = end;
            let mut carried = 0;
            while next - 1 > start && carried + tokens(&units[next - 1]) <= OVERLAP_TOKENS {
                next -= 1;
                carried += tokens(&units[next]);
            }
            start = next;
        }
    }
    out
}

/// (heading, paragraphs) in order; text before the first heading has none.
fn sections(text: &str) -> Vec<(Option<String>, Vec<String>)> {
    let mut out: Vec<(Option<String>, Vec<String>)> = vec![(None, Vec::new())];
    let mut paragraph = String::new();
    let flush = |paragraph: &mut String, out: &mut Vec<(Option<String>, Vec<String>)>| {
        let p = paragraph.split_whitespace().collect::<Vec<_>>().join(" ");
        if !p.is_empty() {
            out.last_mut().expect("a section").1.push(p);
        }
        paragraph.clear();
    };
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(h) = heading(trimmed) {
            flush(&mut paragraph, &mut out);
            out.push((Some(h), Vec::new()));
        } else if trimmed.is_empty() {
            flush(&mut paragraph, &mut out);
        } else {
            // A list item stays its own line within the paragraph.
            if !paragraph.is_empty() {
                paragraph.push(' ');
            }
            paragraph.push_str(trimmed);
        }
    }
    flush(&mut paragraph, &mut out);
    out.retain(|(_, ps)| !ps.is_empty());
    out
}

/// `# Title` … `###### Title` → `Title`.
fn heading(line: &str) -> Option<String> {
    let hashes = line.chars().take_while(|c| *c == '#').count();
    if !(1..=6).contains(&hashes) {
        return None;
    }
    let rest = &line[hashes..];
    if !rest.starts_with(' ') {
        return None;
    }
    let title = rest.trim().trim_end_matches('#').trim();
    (!title.is_empty()).then(|| title.to_string())
}

/// A paragraph in pieces of at most [`UNIT_TOKENS`]: whole, or by sentences, or by words.
fn units(paragraph: &str) -> Vec<String> {
    if tokens(paragraph) <= UNIT_TOKENS {
        return vec![paragraph.to_string()];
    }
    let mut out = Vec::new();
    let mut current = String::new();
    for sentence in sentences(paragraph) {
        if tokens(&sentence) > UNIT_TOKENS {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
            let words: Vec<&str> = sentence.split_whitespace().collect();
            let per = UNIT_TOKENS * 3 / 4;
            out.extend(words.chunks(per).map(|c| c.join(" ")));
            continue;
        }
        if !current.is_empty() && tokens(&current) + tokens(&sentence) > UNIT_TOKENS {
            out.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(&sentence);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Sentences: split after `.`, `!` or `?` followed by a space.
fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        current.push(c);
        if matches!(c, '.' | '!' | '?') && chars.peek().is_some_and(|n| n.is_whitespace()) {
            out.push(current.trim().to_string());
            current.clear();
        }
    }
    if !current.trim().is_empty() {
        out.push(current.trim().to_string());
    }
    out
}

/// HTML → text with Markdown headings: `<h1>`–`<h6>` become `#` lines, block elements end
/// paragraphs, `<script>`/`<style>`/`<head>` are dropped, the common entities decoded.
pub fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let mut rest = html;
    let mut skip_until: Option<&'static str> = None;
    while let Some(open) = rest.find('<') {
        if skip_until.is_none() {
            out.push_str(&decode_entities(&rest[..open]));
        }
        let after = &rest[open + 1..];
        let Some(close) = after.find('>') else {
            rest = "";
            break;
        };
        let tag = after[..close].trim();
        rest = &after[close + 1..];
        let closing = tag.starts_with('/');
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        if let Some(until) = skip_until {
            if closing && name == until {
                skip_until = None;
            }
            continue;
        }
        match name.as_str() {
            "script" if !closing => skip_until = Some("script"),
            "style" if !closing => skip_until = Some("style"),
            "head" if !closing => skip_until = Some("head"),
            "h1" | "h2" | "h3" | "h4" | "h5" | "h6" => {
                if closing {
                    out.push_str("\n\n");
                } else {
                    let level = name[1..].parse::<usize>().unwrap_or(1);
                    out.push_str(&format!("\n\n{} ", "#".repeat(level)));
                }
            }
            "p" | "div" | "section" | "article" | "br" | "li" | "tr" | "ul" | "ol" | "table"
            | "blockquote" | "pre" => out.push_str("\n\n"),
            _ => {}
        }
    }
    if skip_until.is_none() {
        out.push_str(&decode_entities(rest));
    }
    // A heading's text sits on its `#` line: join the lines between "# " and its close.
    out.lines().map(str::trim).collect::<Vec<_>>().join("\n")
}

fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    s.replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headings_start_sections_and_short_sections_are_one_passage() {
        let text = "Intro line.\n\n# Training\nRun three times a week.\n\nRest on Sunday.\n\n## Food\nEat oats.";
        let p = split(text);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].heading, None);
        assert_eq!(p[1].heading.as_deref(), Some("Training"));
        assert_eq!(p[1].text, "Run three times a week.\n\nRest on Sunday.");
        assert_eq!(p[2].heading.as_deref(), Some("Food"));
        assert_eq!(p.iter().map(|p| p.ord).collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn long_sections_become_bounded_passages_that_overlap() {
        let paragraph =
            |i: usize| format!("Paragraph {i} says something useful about topic {i}. ").repeat(4);
        let text: String = (0..40).map(|i| paragraph(i) + "\n\n").collect();
        let p = split(&text);
        assert!(p.len() > 3, "{}", p.len());
        for w in p.windows(2) {
            assert!(w[0].tokens as usize <= MAX_TOKENS);
            let last = w[0].text.rsplit("\n\n").next().unwrap();
            assert!(
                w[1].text.starts_with(last),
                "passages overlap by their boundary paragraph"
            );
        }
        // Nothing is lost: every paragraph is in some passage.
        for i in 0..40 {
            assert!(p
                .iter()
                .any(|x| x.text.contains(&format!("Paragraph {i} "))));
        }
    }

    #[test]
    fn a_huge_paragraph_is_cut_by_sentences_then_words() {
        let words = "word ".repeat(2000);
        let p = split(&words);
        assert!(p.len() >= 6);
        assert!(p.iter().all(|x| x.tokens as usize <= MAX_TOKENS));
    }

    #[test]
    fn html_headings_and_blocks_become_markdown_shape() {
        let html = "<html><head><title>x</title><style>p{}</style></head><body><h2>Our &amp; rules</h2><p>First.</p><p>Second<br>line</p><script>alert(1)</script></body></html>";
        let text = html_to_text(html);
        let p = split(&text);
        assert_eq!(p.len(), 1, "{text:?}");
        assert_eq!(p[0].heading.as_deref(), Some("Our & rules"));
        assert!(p[0].text.contains("First.") && p[0].text.contains("Second"));
        assert!(!text.contains("alert") && !text.contains("p{}"));
    }
}
