//! The simulator's speech: a voiced tone cut into ElevenLabs' 100 ms chunks with their
//! character alignment (`speak`), framed as the socket sends them (`audio_frame_open`,
//! `audio_message`) and kept per sentence (`spoken`).

use std::sync::Arc;

use axum::extract::ws::Message;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::json;

use super::{timings, CHUNK_SAMPLES, TONE_HZ};
use crate::twilio::linear_to_mulaw;

/// One chunk of speech as ElevenLabs frames it — the audio in base64 and its character
/// alignment (given twice, as `alignment` and `normalizedAlignment`) — as the JSON object's
/// text without its closing brace, so that each socket adds its own field (`isFinal` on a
/// single stream, `contextId` on the multi-context one) with [`audio_message`].
pub(super) fn audio_frame_open(chunk: &AudioChunk) -> String {
    let alignment = json!({
        "chars": chunk.chars, "charStartTimesMs": chunk.starts, "charDurationsMs": chunk.durations,
    });
    let mut frame = json!({
        "audio": BASE64.encode(&chunk.audio),
        "normalizedAlignment": alignment,
        "alignment": alignment,
    })
    .to_string();
    // An object's text ends with its closing brace.
    frame.pop();
    frame
}

/// A chunk's message: its frame ([`audio_frame_open`]) and `"key":value_json`.
pub(super) fn audio_message(open: &str, key: &str, value_json: &str) -> Message {
    let mut text = String::with_capacity(open.len() + key.len() + value_json.len() + 6);
    text.push_str(open);
    text.push_str(",\"");
    text.push_str(key);
    text.push_str("\":");
    text.push_str(value_json);
    text.push('}');
    Message::Text(text.into())
}

/// A segment of text spoken from a given place in the tone: its chunks' frames
/// ([`audio_frame_open`]) and how many samples it lasts.
pub(super) struct Spoken {
    pub(super) frames: Vec<String>,
    samples: u64,
}

/// Speech is a pure function of the text, the rate and where in the tone it starts, and the
/// same sentences come back call after call (a persona's greeting, a benchmark's reply): each
/// is made and framed once and kept, not synthesised and encoded again per reply. At most
/// [`SPOKEN_KEPT`] are kept (then the cache starts over).
static SPOKEN: std::sync::LazyLock<std::sync::Mutex<SpokenCache>> =
    std::sync::LazyLock::new(Default::default);
/// Spoken segments by text, where in the tone they start (mod one second) and rate (its bits).
type SpokenCache = std::collections::HashMap<(String, u64, u64), Arc<Spoken>>;
const SPOKEN_KEPT: usize = 1024;

/// `text` spoken at `ms_per_char` from sample `*sample` of the tone (advanced past it), framed.
pub(super) fn spoken(text: &str, sample: &mut u64, ms_per_char: f64) -> Arc<Spoken> {
    let key = (text.to_string(), *sample % 8000, ms_per_char.to_bits());
    let kept = SPOKEN.lock().ok().and_then(|m| m.get(&key).cloned());
    let spoken = kept.unwrap_or_else(|| {
        let mut at = *sample;
        let chunks = speak(text, &mut at, ms_per_char);
        let spoken = Arc::new(Spoken {
            frames: chunks.iter().map(audio_frame_open).collect(),
            samples: at - *sample,
        });
        if let Ok(mut m) = SPOKEN.lock() {
            if m.len() >= SPOKEN_KEPT {
                m.clear();
            }
            m.insert(key, spoken.clone());
        }
        spoken
    });
    *sample += spoken.samples;
    spoken
}

/// One second of a voiced tone: 220 Hz with a few harmonics and a 4 Hz syllable swell, both
/// whole cycles in a second, so the tone repeats it seamlessly. Made once: hundreds of
/// simulated voices must not cost a sine per sample each.
static TONE: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    (0..8000u32)
        .map(|i| {
            let t = f64::from(i) / 8000.0;
            let w = 2.0 * std::f64::consts::PI * TONE_HZ * t;
            let voiced = w.sin() + 0.5 * (2.0 * w).sin() + 0.25 * (3.0 * w).sin();
            let swell = 0.6 + 0.4 * (2.0 * std::f64::consts::PI * 4.0 * t).sin().abs();
            linear_to_mulaw((voiced * swell * 6000.0) as i16)
        })
        .collect()
});

/// `samples` of the tone, continuous across chunks through `sample`, the running sample index.
fn tone(samples: usize, sample: &mut u64) -> Vec<u8> {
    (0..samples)
        .map(|_| {
            let b = TONE[(*sample % 8000) as usize];
            *sample += 1;
            b
        })
        .collect()
}

/// One 100 ms chunk of a segment: its audio and the characters that start in it, with start
/// times relative to the chunk and durations (ElevenLabs' `alignment`).
pub(super) struct AudioChunk {
    pub(super) audio: Vec<u8>,
    pub(super) chars: Vec<String>,
    pub(super) starts: Vec<u64>,
    pub(super) durations: Vec<u64>,
}

/// Cuts the speech of `text`, at base rate `ms_per_char`, into 100 ms chunks.
pub(super) fn speak(text: &str, sample: &mut u64, ms_per_char: f64) -> Vec<AudioChunk> {
    let timed = timings(text, ms_per_char);
    let total = (timed.last().map_or(0, |(_, s, d)| s + d) * 8) as usize;
    let mut chunks = Vec::new();
    let mut offset = 0;
    while offset < total {
        let len = CHUNK_SAMPLES.min(total - offset);
        let (from, to) = (offset as u64 / 8, (offset + len) as u64 / 8);
        let (mut names, mut starts, mut durations) = (Vec::new(), Vec::new(), Vec::new());
        for (c, start, duration) in &timed {
            if *start >= from && *start < to {
                names.push(c.to_string());
                starts.push(start - from);
                durations.push(*duration);
            }
        }
        chunks.push(AudioChunk {
            audio: tone(len, sample),
            chars: names,
            starts,
            durations,
        });
        offset += len;
    }
    chunks
}
