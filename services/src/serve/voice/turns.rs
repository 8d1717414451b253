//! Turns: the caller's turn ends and a reply starts; the caller barges in and the reply is cut
//! to what was heard; fixed phrases (greeting, reminder, goodbye) are said as turns of their own;
//! remembered facts are recalled for a reply.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cmb_domain::call::TurnTimings;
use cmb_providers::llm::ChatMessage;
use tokio::time::Instant;

use super::knowledge::ForCall;
use super::outbound::{Out, FRAME_BYTES};
use super::reply::{ms, respond, Pipe, Reply, Usage};
use super::session::Session;
use super::text::spread_evenly;
use crate::serve::transcripts::Line;

/// Facts pulled into a turn, at most, and how similar to the caller's words they must be.
const RECALL_FACTS: usize = 3;
const RECALL_FLOOR: f32 = 0.15;

/// A fixed phrase's audio goes out in pieces of 500 ms (8 kHz μ-law), a mark after each.
const PHRASE_MARK_BYTES: usize = 4000;

/// Milliseconds of 8 kHz μ-law audio in `bytes`.
fn audio_ms(bytes: usize) -> u64 {
    bytes as u64 / 8
}

/// A pause for caller speech that brings no words (a cough, a noise) ends after this.
pub(super) const PAUSE_WITHOUT_WORDS: Duration = Duration::from_millis(1500);

impl Session {
    /// This call, for the knowledge work billed and logged on it.
    pub(super) fn for_call(&self) -> ForCall<'_> {
        ForCall {
            voice: &self.voice,
            call_id: self.ctx.call_id,
        }
    }

    /// The caller started speaking while the persona speaks (or is about to): stop the audio
    /// at once and have Twilio drop what it buffered, keeping the rest of the reply until the
    /// words tell a backchannel (resume) from an interruption (barge in).
    pub(super) async fn pause(&mut self) {
        if self.paused.is_some() || self.ending.is_some() {
            return;
        }
        let Some(reply) = &self.reply else {
            return;
        };
        let heard_at = Instant::now();
        let from = self.heard_frames.get(&reply.turn).copied().unwrap_or(0);
        self.paused = Some((reply.turn, from));
        self.paused_at = Some(heard_at);
        let _ = self.out.send(Out::Pause).await;
        let stop = ms(heard_at, Instant::now());
        self.barge_in_stop_ms = Some(self.barge_in_stop_ms.unwrap_or(0).max(stop));
        metrics::histogram!("cmb_voice_barge_in_stop_ms").record(stop as f64);
    }

    /// Whether the current reply's task is done and its last frame has played (its final
    /// mark echoed, or, should Twilio not echo it, well after it was sent).
    pub(super) fn played_out(&self) -> bool {
        let Some(reply) = &self.reply else {
            return false;
        };
        if !reply.done || self.paused.is_some() {
            return false;
        }
        // Every frame its task queued, not just those the writer had reported (the writer may
        // not have started on the reply when its task says it is done).
        let heard = self.heard_frames.get(&reply.turn).copied().unwrap_or(0);
        heard >= reply.queued_frames
            || (reply.idle
                && reply.sent_frames >= reply.queued_frames
                && reply
                    .drained_at
                    .is_some_and(|at| Instant::now() >= at + super::session::MARK_WAIT))
    }

    /// The caller's speech was a backchannel (or no words at all): go on from the last mark
    /// Twilio played.
    pub(super) async fn resume(&mut self) {
        self.paused_at = None;
        let Some((turn, from)) = self.paused.take() else {
            return;
        };
        metrics::counter!("cmb_voice_resumes_total").increment(1);
        let _ = self.out.send(Out::Resume { turn, from }).await;
        if self.played_out() {
            self.reply_over().await;
        }
    }

    /// The caller spoke over the persona: stop the audio at once, cancel the reply, keep what
    /// was heard.
    pub(super) async fn barge_in(&mut self) {
        let heard_at = Instant::now();
        let was_paused = self.paused.take().is_some();
        self.paused_at = None;
        let Some(reply) = self.reply.take() else {
            return;
        };
        let _ = self.out.send(Out::Clear).await;
        if !was_paused {
            let stop = ms(heard_at, Instant::now());
            self.barge_in_stop_ms = Some(self.barge_in_stop_ms.unwrap_or(0).max(stop));
            metrics::histogram!("cmb_voice_barge_in_stop_ms").record(stop as f64);
        }
        // Late audio of the old turn is now dropped by the writer.
        self.current_turn.store(self.next_turn, Ordering::Release);
        reply.task.abort();
        metrics::counter!("cmb_voice_barge_ins_total").increment(1);
        self.barge_ins += 1;
        let heard = self.heard(&reply);
        tracing::debug!(call = %self.ctx.call_id, turn = reply.turn, heard = %heard, "barge-in");
        self.close_reply(reply, heard, true);
    }

    /// Records a reply (whole or cut) in the conversation, transcript and timings.
    pub(super) fn close_reply(&mut self, reply: Reply, heard: String, interrupted: bool) {
        if !heard.is_empty() || !interrupted {
            let text = if interrupted {
                format!("{heard}—")
            } else {
                reply.text.clone()
            };
            self.history.push(ChatMessage {
                role: "assistant".into(),
                content: text,
            });
        }
        self.transcript.push(Line {
            speaker: "persona",
            text: if interrupted {
                heard
            } else {
                reply.text.clone()
            },
            cut_off: interrupted,
            at: chrono::Utc::now(),
            passages: Vec::new(),
        });
        self.usage.push(reply.usage.lock().expect("usage").clone());
        if !reply.phrase {
            self.turns += 1;
            self.timings.push((
                self.turns,
                reply.timings,
                interrupted,
                reply.provider,
                reply.fell_back,
            ));
        }
    }

    pub(super) async fn end_of_caller_turn(&mut self) {
        let text = std::mem::take(&mut self.pending);
        let started = self.pending_started.take();
        if text.is_empty() || self.ending.is_some() {
            return;
        }
        let endpoint_at = Instant::now();
        let knowledge = self
            .ctx
            .knowledge
            .as_ref()
            .map(|k| k.for_turn(&text, self.for_call()));
        self.transcript.push(Line {
            speaker: "caller",
            text: text.clone(),
            cut_off: false,
            at: chrono::Utc::now(),
            passages: knowledge
                .as_ref()
                .map(|k| k.ids.clone())
                .unwrap_or_default(),
        });
        // The caller went on after we had started answering: that answer was early.
        self.paused = None;
        self.paused_at = None;
        if let Some(reply) = self.reply.take() {
            self.early_replies += 1;
            let _ = self.out.send(Out::Clear).await;
            reply.task.abort();
            let heard = self.heard(&reply);
            self.close_reply(reply, heard, true);
        }
        let recalled = self.recall(&text);
        self.history.push(ChatMessage {
            role: "user".into(),
            content: text,
        });
        let mut messages = self.history.clone();
        // For this reply only, just before what the caller said.
        for note in [recalled, knowledge.as_ref().and_then(|k| k.note.clone())]
            .into_iter()
            .flatten()
        {
            messages.insert(messages.len() - 1, ChatMessage::new("system", &note));
        }
        let turn = self.new_turn();
        let usage = Arc::new(Mutex::new(Usage::default()));
        let task = tokio::spawn(respond(
            self.voice.clone(),
            turn,
            messages,
            self.tts.clone(),
            self.out.clone(),
            self.pipe_tx.clone(),
            usage.clone(),
        ));
        self.reply = Some(Reply {
            turn,
            task,
            text: String::new(),
            endpoint_at,
            timings: TurnTimings {
                stt_final_ms: started.map(|s| ms(s, endpoint_at)),
                knowledge_us: knowledge.as_ref().map(|k| k.us),
                knowledge_vector: knowledge.as_ref().map(|k| k.with_vector),
                knowledge_cpu_us: knowledge.as_ref().map(|k| k.cpu_us),
                knowledge_preranked: knowledge.as_ref().map(|k| k.preranked),
                ..Default::default()
            },
            provider: self.voice.llm.provider(),
            fell_back: false,
            usage,
            phrase: false,
            done: false,
            idle: true,
            sent_frames: 0,
            queued_frames: 0,
            spoken: Vec::new(),
            drained_at: None,
            tts_failed: false,
        });
    }

    /// The remembered facts most relevant to what the caller just said, as a note for the
    /// reply; measured, since it sits on the turn's latency path.
    pub(super) fn recall(&self, text: &str) -> Option<String> {
        if self.ctx.recall.is_empty() {
            return None;
        }
        let started = std::time::Instant::now();
        let query = cmb_domain::memory::embed::embed(text);
        let vectors: Vec<Vec<f32>> = self.ctx.recall.iter().map(|(_, v)| v.clone()).collect();
        let best = cmb_domain::memory::embed::top_k(&query, &vectors, RECALL_FACTS, RECALL_FLOOR);
        let took = started.elapsed();
        metrics::histogram!("cmb_memory_recall_us").record(took.as_micros() as f64);
        tracing::debug!(call = %self.ctx.call_id, us = took.as_micros() as u64, found = best.len(), "memory recall");
        if best.is_empty() {
            return None;
        }
        let facts: Vec<String> = best
            .iter()
            .map(|(i, _)| format!("- {}", self.ctx.recall[*i].0))
            .collect();
        Some(format!(
            "You may remember, if it fits what they just said:\n{}",
            facts.join("\n")
        ))
    }

    /// Says a fixed phrase (greeting, reminder, warning, goodbye) as its own turn.
    pub(super) async fn speak_phrase(&mut self, text: &str) -> u64 {
        self.speak(text, None).await
    }

    /// Says `text` as its own turn: `audio` when it was synthesised for this call already,
    /// else the cached (or once synthesised) phrase.
    pub(super) async fn speak(&mut self, text: &str, audio: Option<Bytes>) -> u64 {
        self.paused = None;
        self.paused_at = None;
        if let Some(reply) = self.reply.take() {
            reply.task.abort();
            let _ = self.out.send(Out::Clear).await;
            let heard = self.heard(&reply);
            self.close_reply(reply, heard, true);
        }
        let turn = self.new_turn();
        let voice = self.voice.clone();
        let voice_id = self.ctx.voice_id.clone();
        let out = self.out.clone();
        let pipe = self.pipe_tx.clone();
        let phrase = text.to_string();
        let usage = Arc::new(Mutex::new(Usage::default()));
        let billed = usage.clone();
        let task = tokio::spawn(async move {
            let mut frames = 0;
            let spoken = match audio {
                Some(audio) => Ok((audio, phrase.chars().count() as u64)),
                None => voice.phrase(&voice_id, &phrase).await,
            };
            match spoken {
                Ok((audio, chars)) => {
                    billed.lock().expect("usage").tts_chars += chars;
                    let _ = pipe
                        .send(Pipe::TtsFirstByte {
                            turn,
                            at: Instant::now(),
                        })
                        .await;
                    // Audio synthesised over HTTP comes without alignment: its characters are
                    // spread evenly over its length, and a mark every 500 ms tells how much
                    // of it played, so a phrase cut off keeps about what was heard of it.
                    let chars = spread_evenly(&phrase, audio_ms(audio.len()));
                    if !chars.is_empty() {
                        let _ = pipe.send(Pipe::Spoken { turn, chars }).await;
                    }
                    for piece in audio.chunks(PHRASE_MARK_BYTES) {
                        // The writer pads each piece to whole frames before its mark.
                        frames += piece.len().div_ceil(FRAME_BYTES) as u64;
                        let audio = audio.slice_ref(piece);
                        let _ = out.send(Out::Audio { turn, audio }).await;
                        let _ = out.send(Out::Mark { turn }).await;
                    }
                }
                Err(e) => {
                    let _ = pipe
                        .send(Pipe::Failed {
                            turn,
                            reason: e.to_string(),
                        })
                        .await;
                }
            }
            let _ = pipe.send(Pipe::Done { turn, frames }).await;
        });
        self.reply = Some(Reply {
            turn,
            task,
            text: text.to_string(),
            endpoint_at: Instant::now(),
            timings: TurnTimings::default(),
            provider: "",
            fell_back: false,
            usage,
            phrase: true,
            done: false,
            idle: true,
            sent_frames: 0,
            queued_frames: 0,
            spoken: Vec::new(),
            drained_at: None,
            tts_failed: false,
        });
        turn
    }
}
