//! The simulator's ear: finds speech in μ-law audio by the energy of each 20 ms frame and turns
//! it into what Deepgram would say, on the stream's own audio clock (bytes received, never wall
//! time), so results do not depend on how fast the audio arrives.

use std::collections::VecDeque;

use crate::twilio::{linear_to_mulaw, mulaw_to_linear, FRAME_BYTES};

/// 8 kHz mono μ-law: one byte is one sample.
pub const SAMPLES_PER_MS: u64 = 8;
/// A frame is voiced when its RMS is above this. μ-law silence (0xFF, 0x7F) decodes to 0 and
/// line hiss stays under ~100; speech sits in the thousands.
pub const VOICED_RMS: f64 = 500.0;
/// An interim result every 300 ms of speech.
const INTERIM_EVERY: u64 = 300 * SAMPLES_PER_MS;
/// How fast interim results grow: one more word per 250 ms of speech.
const WORD_EVERY: u64 = 250 * SAMPLES_PER_MS;
/// A voiced burst shorter than this (a click, a breath) is transcribed as nothing.
const MIN_SPEECH: u64 = 60 * SAMPLES_PER_MS;
/// Deepgram's default endpointing is 10 ms; the simulator's ear is not that quick.
const MIN_ENDPOINTING_MS: u32 = 100;
pub const BACKCHANNEL: &str = "mm-hmm";

/// What the client asked for in the query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenConfig {
    pub endpointing_ms: u32,
    pub utterance_end_ms: Option<u32>,
    pub interim_results: bool,
    pub vad_events: bool,
}

/// What the ear says, with times in samples since the stream began.
#[derive(Debug, Clone, PartialEq)]
pub enum Heard {
    SpeechStarted {
        at: u64,
    },
    Transcript {
        /// Empty when the burst was too short to be a word.
        text: String,
        words: Vec<Word>,
        is_final: bool,
        speech_final: bool,
        from_finalize: bool,
        start: u64,
        end: u64,
    },
    UtteranceEnd {
        last_word_end: u64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Word {
    /// As written in the script, punctuation included.
    pub punctuated: String,
    pub start: u64,
    pub end: u64,
}

struct Utterance {
    start: u64,
    /// End of the last voiced frame.
    voiced_end: u64,
    last_interim: u64,
}

pub struct Listener {
    config: ListenConfig,
    /// What long utterances say, in order; then `default_line`.
    script: VecDeque<String>,
    default_line: String,
    backchannel: u64,
    /// Every byte received: the audio clock and the bill.
    received: u64,
    /// Bytes not yet making a whole frame.
    partial: Vec<u8>,
    /// Start of the next frame to analyse.
    analysed: u64,
    utterance: Option<Utterance>,
    /// End of the last word of a finished utterance, until `UtteranceEnd` is sent for it.
    awaiting_utterance_end: Option<u64>,
}

impl Listener {
    pub fn new(
        config: ListenConfig,
        script: &[String],
        default_line: &str,
        backchannel_ms: u32,
    ) -> Self {
        Listener {
            config,
            script: script.iter().cloned().collect(),
            default_line: default_line.to_string(),
            backchannel: u64::from(backchannel_ms) * SAMPLES_PER_MS,
            received: 0,
            partial: Vec::with_capacity(FRAME_BYTES),
            analysed: 0,
            utterance: None,
            awaiting_utterance_end: None,
        }
    }

    /// Samples (bytes) received so far.
    pub fn samples_received(&self) -> u64 {
        self.received
    }

    pub fn seconds_received(&self) -> f64 {
        self.received as f64 / (SAMPLES_PER_MS * 1000) as f64
    }

    /// Takes audio of any length; answers once per whole frame it completes.
    pub fn hear(&mut self, audio: &[u8]) -> Vec<Heard> {
        self.received += audio.len() as u64;
        let mut heard = Vec::new();
        let mut rest = audio;
        // A frame begun by an earlier message is completed first; whole frames are then read
        // where they lie (no copy: this runs for every message of hundreds of streams).
        if !self.partial.is_empty() {
            let take = (FRAME_BYTES - self.partial.len()).min(rest.len());
            self.partial.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.partial.len() < FRAME_BYTES {
                return heard;
            }
            let voiced = is_voiced(&self.partial);
            self.partial.clear();
            self.next_frame(voiced, &mut heard);
        }
        let mut frames = rest.chunks_exact(FRAME_BYTES);
        for frame in frames.by_ref() {
            self.next_frame(is_voiced(frame), &mut heard);
        }
        self.partial.extend_from_slice(frames.remainder());
        heard
    }

    fn next_frame(&mut self, voiced: bool, heard: &mut Vec<Heard>) {
        let start = self.analysed;
        self.analysed += FRAME_BYTES as u64;
        self.frame(start, voiced, heard);
    }

    /// `Finalize` or `CloseStream`: the utterance in progress, if any, as a final result.
    pub fn finalize(&mut self) -> Vec<Heard> {
        let end = self.analysed;
        self.utterance
            .take()
            .map(|u| self.final_result(u, end, false))
            .into_iter()
            .collect()
    }

    fn frame(&mut self, start: u64, voiced: bool, heard: &mut Vec<Heard>) {
        let end = start + FRAME_BYTES as u64;
        match (&mut self.utterance, voiced) {
            (None, true) => {
                self.awaiting_utterance_end = None;
                self.utterance = Some(Utterance {
                    start,
                    voiced_end: end,
                    last_interim: start,
                });
                if self.config.vad_events {
                    heard.push(Heard::SpeechStarted { at: start });
                }
            }
            (None, false) => {
                let wait = self.config.utterance_end_ms.map(u64::from);
                if let (Some(last_word_end), Some(wait)) = (self.awaiting_utterance_end, wait) {
                    if end - last_word_end >= wait * SAMPLES_PER_MS {
                        self.awaiting_utterance_end = None;
                        heard.push(Heard::UtteranceEnd { last_word_end });
                    }
                }
            }
            (Some(u), true) => {
                u.voiced_end = end;
                let span = end - u.start;
                if self.config.interim_results
                    && span >= self.backchannel
                    && end - u.last_interim >= INTERIM_EVERY
                {
                    u.last_interim = end;
                    let (start, line) = (u.start, self.line_for(span).to_string());
                    let count = (1 + span / WORD_EVERY) as usize;
                    let words: Vec<&str> = line.split_whitespace().take(count).collect();
                    heard.push(Heard::Transcript {
                        text: words.join(" "),
                        words: spread(&words, start, end),
                        is_final: false,
                        speech_final: false,
                        from_finalize: false,
                        start,
                        end,
                    });
                }
            }
            (Some(u), false) => {
                let endpointing = self.config.endpointing_ms.max(MIN_ENDPOINTING_MS);
                if end - u.voiced_end >= u64::from(endpointing) * SAMPLES_PER_MS {
                    if let Some(u) = self.utterance.take() {
                        let result = self.final_result(u, end, true);
                        heard.push(result);
                    }
                }
            }
        }
    }

    /// What an utterance of `span` samples says, without consuming the script.
    fn line_for(&self, span: u64) -> &str {
        if span < MIN_SPEECH {
            ""
        } else if span < self.backchannel {
            BACKCHANNEL
        } else {
            self.script.front().unwrap_or(&self.default_line)
        }
    }

    fn final_result(&mut self, u: Utterance, end: u64, speech_final: bool) -> Heard {
        let span = u.voiced_end - u.start;
        let line = self.line_for(span).to_string();
        if span >= self.backchannel {
            self.script.pop_front();
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if !words.is_empty() {
            self.awaiting_utterance_end = Some(u.voiced_end);
        }
        Heard::Transcript {
            words: spread(&words, u.start, u.voiced_end),
            text: words.join(" "),
            is_final: true,
            speech_final,
            from_finalize: !speech_final,
            start: u.start,
            end,
        }
    }
}

/// Words spread evenly over `[start, end)` with short gaps between them; the last one ends
/// at `end`.
fn spread(words: &[&str], start: u64, end: u64) -> Vec<Word> {
    let n = words.len().max(1) as u64;
    let slot = (end - start) / n;
    words
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let from = start + i as u64 * slot;
            let last = i + 1 == words.len();
            Word {
                punctuated: w.to_string(),
                start: from,
                end: if last { end } else { from + slot * 9 / 10 },
            }
        })
        .collect()
}

/// Root mean square of the frame's linear samples.
pub fn rms(frame: &[u8]) -> f64 {
    if frame.is_empty() {
        return 0.0;
    }
    let energy: f64 = frame
        .iter()
        .map(|&b| f64::from(mulaw_to_linear(b)).powi(2))
        .sum();
    (energy / frame.len() as f64).sqrt()
}

/// Each μ-law byte's linear sample, squared: a frame's energy is a sum of table entries.
static SQUARED: std::sync::LazyLock<[u64; 256]> = std::sync::LazyLock::new(|| {
    std::array::from_fn(|b| {
        let s = i64::from(mulaw_to_linear(b as u8));
        (s * s) as u64
    })
});

/// Whether the frame's RMS is above [`VOICED_RMS`], in integers: the sum of squares against
/// `VOICED_RMS² × len` (the same decision as `rms(frame) > VOICED_RMS`, exact: both sides are
/// integers far below 2⁵³).
pub fn is_voiced(frame: &[u8]) -> bool {
    if frame.is_empty() {
        return false;
    }
    let squared = &*SQUARED;
    let energy: u64 = frame.iter().map(|&b| squared[usize::from(b)]).sum();
    let threshold = (VOICED_RMS * VOICED_RMS) as u64 * frame.len() as u64;
    energy > threshold
}

/// `ms` of speech-like audio as 20 ms μ-law frames: a 300 Hz + 700 Hz tone mix with noise,
/// RMS around 4000.
pub fn speech_frames(ms: u32) -> Vec<[u8; FRAME_BYTES]> {
    let mut noise: u32 = 0x9E37_79B9;
    let mut sample_index: u64 = 0;
    (0..ms.div_ceil(20))
        .map(|_| {
            let mut frame = [0xFF; FRAME_BYTES];
            for byte in frame.iter_mut() {
                let t = sample_index as f64 / 8000.0;
                sample_index += 1;
                // xorshift: deterministic noise without an RNG.
                noise ^= noise << 13;
                noise ^= noise >> 17;
                noise ^= noise << 5;
                let hiss = (f64::from(noise) / f64::from(u32::MAX) - 0.5) * 0.1;
                let tau = 2.0 * std::f64::consts::PI;
                let voice = 0.6 * (tau * 300.0 * t).sin() + 0.4 * (tau * 700.0 * t).sin();
                let sample = (voice + hiss) * 8000.0;
                *byte = linear_to_mulaw(sample.clamp(-32768.0, 32767.0) as i16);
            }
            frame
        })
        .collect()
}

/// `ms` of μ-law digital silence (0xFF) as 20 ms frames.
pub fn silence_frames(ms: u32) -> Vec<[u8; FRAME_BYTES]> {
    vec![[0xFF; FRAME_BYTES]; ms.div_ceil(20) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpointing_ms: u32) -> ListenConfig {
        ListenConfig {
            endpointing_ms,
            utterance_end_ms: Some(1000),
            interim_results: true,
            vad_events: true,
        }
    }

    fn hear_all(ear: &mut Listener, frames: &[[u8; FRAME_BYTES]]) -> Vec<Heard> {
        frames.iter().flat_map(|f| ear.hear(f)).collect()
    }

    #[test]
    fn tells_speech_from_silence_and_noise() {
        assert!(speech_frames(1000).iter().all(|f| is_voiced(f)));
        assert!(silence_frames(100).iter().all(|f| !is_voiced(f)));
        assert!(!is_voiced(&[0x7F; FRAME_BYTES]));
        // Low hiss of about ±200 stays silent.
        let hiss: Vec<u8> = (0..FRAME_BYTES)
            .map(|i| linear_to_mulaw(if i % 2 == 0 { 200 } else { -200 }))
            .collect();
        assert!(!is_voiced(&hiss));
    }

    #[test]
    fn the_integer_test_decides_as_the_rms_does() {
        // Every level a frame of one repeated byte can have, and mixes of two around the
        // threshold: the table's sum and the floating-point RMS agree on each.
        for b in 0..=255u8 {
            let frame = [b; FRAME_BYTES];
            assert_eq!(is_voiced(&frame), rms(&frame) > VOICED_RMS, "byte {b:#x}");
            for c in [0xFFu8, 0x7F, 0xA0, 0x20, 0xC0] {
                let mixed: Vec<u8> = (0..FRAME_BYTES)
                    .map(|i| if i % 3 == 0 { b } else { c })
                    .collect();
                assert_eq!(
                    is_voiced(&mixed),
                    rms(&mixed) > VOICED_RMS,
                    "bytes {b:#x}, {c:#x}"
                );
            }
        }
        assert!(!is_voiced(&[]));
    }

    #[test]
    fn the_clock_is_bytes_however_they_are_chunked() {
        let mut ear = Listener::new(config(300), &[], "hello there", 350);
        let audio: Vec<u8> = [
            silence_frames(500),
            speech_frames(1000),
            silence_frames(500),
        ]
        .concat()
        .concat();
        let heard: Vec<Heard> = audio.chunks(37).flat_map(|c| ear.hear(c)).collect();
        assert_eq!(ear.samples_received(), 16_000);
        assert_eq!(heard[0], Heard::SpeechStarted { at: 4000 });
        let last_final = heard.iter().rev().find_map(|h| match h {
            Heard::Transcript {
                is_final: true,
                start,
                end,
                text,
                ..
            } => Some((*start, *end, text.clone())),
            _ => None,
        });
        assert_eq!(last_final, Some((4000, 12000 + 2400, "hello there".into())));
    }

    #[test]
    fn a_click_is_not_a_word() {
        let mut ear = Listener::new(config(300), &["first".into()], "x", 350);
        let heard = hear_all(&mut ear, &[speech_frames(40), silence_frames(400)].concat());
        assert!(
            matches!(&heard[1], Heard::Transcript { text, is_final: true, .. } if text.is_empty())
        );
        // The script was not consumed and no UtteranceEnd is owed.
        let heard = hear_all(
            &mut ear,
            &[speech_frames(1000), silence_frames(1500)].concat(),
        );
        assert!(heard.iter().any(
            |h| matches!(h, Heard::Transcript { text, is_final: true, .. } if text == "first")
        ));
    }

    #[test]
    fn finalize_flushes_the_utterance_in_progress() {
        let mut ear = Listener::new(config(300), &[], "still talking", 350);
        hear_all(&mut ear, &speech_frames(800));
        let flushed = ear.finalize();
        assert!(matches!(
            &flushed[..],
            [Heard::Transcript { text, is_final: true, speech_final: false, from_finalize: true, .. }] if text == "still talking"
        ));
        assert!(ear.finalize().is_empty());
    }
}
