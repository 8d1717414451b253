//! Text rules of a conversation: what counts as a backchannel, what of a cut reply was heard,
//! where a reply can be voiced sentence by sentence.

/// Milliseconds of speech per character, to estimate heard text of audio of unknown length
/// (never the case today: a phrase's characters are spread over its audio, `spread_evenly`;
/// ElevenLabs speaks about 15 characters a second).
pub(super) const MS_PER_CHAR: u64 = 65;

/// Words that acknowledge without taking the turn.
pub(super) fn is_backchannel(text: &str) -> bool {
    const WORDS: &[&str] = &[
        "mm-hmm", "mhm", "mm", "hmm", "uh-huh", "uh", "um", "yeah", "yep", "yes", "ok", "okay",
        "right", "sure", "cough",
    ];
    let words: Vec<String> = text
        .split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric() && c != '-')
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect();
    !words.is_empty() && words.len() <= 2 && words.iter().all(|w| WORDS.contains(&w.as_str()))
}

/// The first `chars` characters of `text`, cut back to a word boundary.
pub(super) fn heard_prefix(text: &str, chars: usize) -> String {
    if chars >= text.chars().count() {
        return text.to_string();
    }
    let cut: String = text.chars().take(chars).collect();
    match cut.rfind(char::is_whitespace) {
        Some(i) => cut[..i].trim_end().to_string(),
        None => String::new(),
    }
}

/// What was heard of speech whose characters end at the given times (ms into its audio) once
/// `heard_ms` of it played: the characters said by then, cut back to a whole word (a word
/// whose punctuation is still to come counts as said).
pub(super) fn heard_by_alignment(spoken: &[(String, u64)], heard_ms: u64) -> String {
    let n = spoken
        .iter()
        .take_while(|(_, end)| *end <= heard_ms)
        .count();
    let text: String = spoken[..n].iter().map(|(c, _)| c.as_str()).collect();
    let word_ends = text.ends_with(char::is_whitespace)
        || spoken.get(n).is_none_or(|(c, _)| {
            c.chars()
                .all(|c| c.is_whitespace() || matches!(c, '.' | ',' | '!' | '?' | ';' | ':'))
        });
    let cut = if word_ends {
        text.as_str()
    } else {
        text.rfind(char::is_whitespace).map_or("", |i| &text[..i])
    };
    cut.trim().to_string()
}

/// `text`'s characters with the time each ends, spread evenly over `total_ms` of its audio:
/// where each falls, as best known without the provider's alignment (a phrase synthesised over
/// HTTP), for [`heard_by_alignment`].
pub(super) fn spread_evenly(text: &str, total_ms: u64) -> Vec<(String, u64)> {
    let n = text.chars().count() as u64;
    text.chars()
        .enumerate()
        .map(|(i, c)| (c.to_string(), total_ms * (i as u64 + 1) / n.max(1)))
        .collect()
}

/// Splits complete sentences off the front of `buffer`.
pub(super) fn take_sentences(buffer: &mut String) -> Option<String> {
    let mut end = None;
    let chars: Vec<(usize, char)> = buffer.char_indices().collect();
    for (i, (at, c)) in chars.iter().enumerate() {
        if matches!(c, '.' | '!' | '?') {
            let next = chars.get(i + 1).map(|(_, n)| *n);
            if next.is_none_or(char::is_whitespace) && next.is_some() {
                end = Some(at + c.len_utf8());
            }
        }
    }
    end.map(|e| {
        let sentence = buffer[..e].to_string();
        buffer.replace_range(..e, "");
        sentence
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backchannels_do_not_take_the_turn() {
        for b in ["mm-hmm", "Uh-huh.", "yeah", "okay right", "Mm."] {
            assert!(is_backchannel(b), "{b}");
        }
        for t in ["wait, stop", "yeah but no", "tell me more", ""] {
            assert!(!is_backchannel(t), "{t}");
        }
    }

    #[test]
    fn heard_text_is_cut_at_a_word() {
        assert_eq!(heard_prefix("Hello there, my friend.", 9), "Hello");
        assert_eq!(
            heard_prefix("Hello there, my friend.", 100),
            "Hello there, my friend."
        );
        assert_eq!(heard_prefix("Hello", 2), "");
    }

    #[test]
    fn heard_text_follows_the_alignment_not_a_rate() {
        // "Hi there." with characters of uneven length.
        let spoken: Vec<(String, u64)> = [
            ("H", 40),
            ("i", 110),
            (" ", 140),
            ("t", 180),
            ("h", 220),
            ("e", 300),
            ("r", 340),
            ("e", 420),
            (".", 600),
        ]
        .iter()
        .map(|(c, end)| (c.to_string(), *end))
        .collect();
        assert_eq!(heard_by_alignment(&spoken, 100), "");
        assert_eq!(heard_by_alignment(&spoken, 120), "Hi");
        assert_eq!(heard_by_alignment(&spoken, 400), "Hi");
        assert_eq!(heard_by_alignment(&spoken, 420), "Hi there");
        assert_eq!(heard_by_alignment(&spoken, 600), "Hi there.");
    }

    #[test]
    fn a_phrase_without_alignment_is_heard_in_proportion_to_what_played() {
        // Eleven characters over 1.1 s of audio: 100 ms each.
        let spoken = spread_evenly("Hello there", 1100);
        assert_eq!(spoken[0], ("H".to_string(), 100));
        assert_eq!(spoken[10], ("e".to_string(), 1100));
        assert_eq!(heard_by_alignment(&spoken, 0), "");
        assert_eq!(heard_by_alignment(&spoken, 500), "Hello");
        assert_eq!(heard_by_alignment(&spoken, 900), "Hello");
        assert_eq!(heard_by_alignment(&spoken, 1100), "Hello there");
    }

    #[test]
    fn sentences_split_where_a_reply_can_be_voiced() {
        let mut b = "Sure. Let me think! What about".to_string();
        assert_eq!(
            take_sentences(&mut b).as_deref(),
            Some("Sure. Let me think!")
        );
        assert_eq!(b, " What about");
        let mut b = "3.5 miles".to_string();
        assert_eq!(take_sentences(&mut b), None);
    }
}
