//! One persona reply: the LLM (with fallback) streamed sentence by sentence into TTS, its audio
//! to the outbound writer, its progress reported to the session on a channel.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cmb_domain::call::TurnTimings;
use cmb_providers::elevenlabs::{TtsAudio, TtsSession};
use cmb_providers::llm::{ChatMessage, ChatRequest, Llm, LlmChunk};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::outbound::{Out, FRAME_BYTES};
use super::shared::Voice;
use super::text::take_sentences;

/// Usage of one reply, kept outside its task so a cancelled reply is still billed.
#[derive(Default, Debug, Clone)]
pub(super) struct Usage {
    pub(super) provider: &'static str,
    pub(super) prompt_tokens: u64,
    pub(super) completion_tokens: u64,
    /// Counted from the deltas when the provider's usage never came (a cancelled stream).
    pub(super) words: u64,
    /// The prompt's tokens as estimated before sending: billed even when the provider's usage
    /// never comes (a reply cut off by a barge-in).
    pub(super) prompt_estimate: u64,
    pub(super) tts_chars: u64,
    /// Prompt tokens (estimated) of LLM requests this reply abandoned: the slower of a hedge.
    pub(super) abandoned: Vec<(&'static str, u64)>,
}

/// About four characters a token, and a few tokens of framing per message.
pub(super) fn estimate_prompt_tokens(messages: &[ChatMessage]) -> u64 {
    messages
        .iter()
        .map(|m| (m.content.chars().count() as u64).div_ceil(4) + 4)
        .sum()
}

pub(super) enum Pipe {
    FirstToken {
        turn: u64,
        at: Instant,
        provider: &'static str,
        fell_back: bool,
    },
    TtsFirstByte {
        turn: u64,
        at: Instant,
    },
    Text {
        turn: u64,
        text: String,
    },
    /// Characters of the reply's audio with the time each ends, in ms from the turn's first
    /// frame (from ElevenLabs' alignment, placed where the writer queues each chunk).
    Spoken {
        turn: u64,
        chars: Vec<(String, u64)>,
    },
    /// The reply's task has queued everything it will: `frames` frames of audio in all.
    Done {
        turn: u64,
        frames: u64,
    },
    Failed {
        turn: u64,
        reason: String,
    },
    /// Text-to-speech failed mid-reply: the LLM is stopped, and the reply is what was voiced.
    TtsFailed {
        turn: u64,
        reason: String,
    },
}

pub(super) struct Reply {
    pub(super) turn: u64,
    pub(super) task: JoinHandle<()>,
    pub(super) text: String,
    pub(super) endpoint_at: Instant,
    pub(super) timings: TurnTimings,
    pub(super) provider: &'static str,
    pub(super) fell_back: bool,
    pub(super) usage: Arc<Mutex<Usage>>,
    /// A fixed phrase (greeting, reminder), not an LLM reply.
    pub(super) phrase: bool,
    /// Its task has sent everything it will send.
    pub(super) done: bool,
    /// The writer has sent everything it was given so far.
    pub(super) idle: bool,
    /// Frames of this reply sent to Twilio when the writer last ran dry, and when.
    pub(super) sent_frames: u64,
    /// Frames its task queued in all (known once it is `done`): the reply has played when a
    /// mark at this many frames is echoed.
    pub(super) queued_frames: u64,
    /// Its characters and when each ends in its audio (ms), as far as TTS aligned them.
    pub(super) spoken: Vec<(String, u64)>,
    pub(super) drained_at: Option<Instant>,
    /// Text-to-speech failed before the end: only what was voiced and played is kept.
    pub(super) tts_failed: bool,
}

const FRAME_MS: u64 = 20;

/// Milliseconds from `from` to `to`.
pub(super) fn ms(from: Instant, to: Instant) -> u32 {
    to.saturating_duration_since(from)
        .as_millis()
        .min(u32::MAX as u128) as u32
}

/// One reply: LLM (with fallback) streamed sentence by sentence into TTS, audio to the writer.
pub(super) async fn respond(
    voice: Arc<Voice>,
    turn: u64,
    messages: Vec<ChatMessage>,
    tts: TtsSession,
    out: mpsc::Sender<Out>,
    pipe: mpsc::Sender<Pipe>,
    usage: Arc<Mutex<Usage>>,
) {
    {
        // Billed to the primary until another provider answers first, so a reply cut off
        // before its first token still counts the prompt that was read.
        let mut u = usage.lock().expect("usage");
        u.prompt_estimate = estimate_prompt_tokens(&messages);
        u.provider = voice.llm.provider();
    }
    let request = ChatRequest {
        messages,
        max_tokens: voice.settings.max_reply_tokens,
        temperature: 0.7,
    };
    // A context of the call's TTS socket (opened with the call) while the LLM thinks.
    let context = turn.to_string();
    let tts = tts.context(&context);
    let llm = first_token(&voice, &request, &usage);
    let (tts, llm) = tokio::join!(tts, llm);
    let (provider, mut rx, first, fell_back) = match llm {
        Ok(v) => v,
        Err(e) => {
            let _ = pipe.send(Pipe::Failed { turn, reason: e }).await;
            let _ = pipe.send(Pipe::Done { turn, frames: 0 }).await;
            return;
        }
    };
    usage.lock().expect("usage").provider = provider;
    let _ = pipe
        .send(Pipe::FirstToken {
            turn,
            at: Instant::now(),
            provider,
            fell_back,
        })
        .await;
    let tts = match tts {
        Ok(t) => t,
        Err(e) => {
            // The LLM's stream goes with `rx`: nothing of it is voiced.
            let _ = pipe
                .send(Pipe::TtsFailed {
                    turn,
                    reason: format!("text-to-speech: {e}"),
                })
                .await;
            let _ = pipe.send(Pipe::Done { turn, frames: 0 }).await;
            return;
        }
    };
    let (text_tx, mut audio_rx) = tts;
    // Audio pump: TTS audio → the writer, a mark after each chunk. Should TTS fail, the LLM
    // is stopped too (nothing more of the reply could be voiced).
    let tts_failed = tokio_util::sync::CancellationToken::new();
    let pump_failed = tts_failed.clone();
    let pump_out = out.clone();
    let pump_pipe = pipe.clone();
    let pump = tokio::spawn(async move {
        let mut first = true;
        // Frames of this turn queued so far: the writer pads each chunk to whole frames.
        let mut frames: u64 = 0;
        while let Some(a) = audio_rx.recv().await {
            match a {
                TtsAudio::Chunk(audio, alignment) => {
                    let offset = frames * FRAME_MS;
                    frames += (audio.len() as u64).div_ceil(FRAME_BYTES as u64);
                    let chars: Vec<(String, u64)> = alignment
                        .chars
                        .into_iter()
                        .zip(alignment.starts_ms.iter().zip(&alignment.durations_ms))
                        .map(|(c, (start, duration))| (c, offset + start + duration))
                        .collect();
                    if !chars.is_empty() {
                        let _ = pump_pipe.send(Pipe::Spoken { turn, chars }).await;
                    }
                    if first {
                        first = false;
                        let _ = pump_pipe
                            .send(Pipe::TtsFirstByte {
                                turn,
                                at: Instant::now(),
                            })
                            .await;
                    }
                    let _ = pump_out.send(Out::Audio { turn, audio }).await;
                    let _ = pump_out.send(Out::Mark { turn }).await;
                }
                TtsAudio::Final => break,
                TtsAudio::Error(e) => {
                    // Never voice an error: stop this reply's audio here.
                    pump_failed.cancel();
                    let _ = pump_pipe
                        .send(Pipe::TtsFailed {
                            turn,
                            reason: format!("text-to-speech: {e}"),
                        })
                        .await;
                    break;
                }
            }
        }
        frames
    });
    let mut said = String::new();
    let mut buffer = first;
    let mut words = buffer.split_whitespace().count() as u64;
    // What goes to TTS, counted as ElevenLabs bills it.
    let send_text = |said: &mut String, sentence: &str| {
        let chunk = format!("{} ", sentence.trim());
        said.push_str(&chunk);
        usage.lock().expect("usage").tts_chars +=
            cmb_providers::elevenlabs::billed_characters(&chunk);
        chunk
    };
    let mut tts_lost = false;
    'reply: loop {
        while let Some(sentence) = take_sentences(&mut buffer) {
            let chunk = send_text(&mut said, &sentence);
            let _ = pipe
                .send(Pipe::Text {
                    turn,
                    text: said.trim().to_string(),
                })
                .await;
            if text_tx.send(&chunk).await.is_err() {
                // The socket is gone: its contexts' audio ends with an error (the pump's).
                tts_lost = true;
                break 'reply;
            }
        }
        let next = tokio::select! {
            biased;
            _ = tts_failed.cancelled() => break,
            next = rx.recv() => next,
        };
        match next {
            Some(LlmChunk::Delta(d)) => {
                words += d.split_whitespace().count() as u64;
                usage.lock().expect("usage").words = words;
                buffer.push_str(&d);
            }
            Some(LlmChunk::Usage {
                prompt_tokens,
                completion_tokens,
            }) => {
                let mut u = usage.lock().expect("usage");
                u.prompt_tokens = prompt_tokens as u64;
                u.completion_tokens = completion_tokens as u64;
            }
            Some(LlmChunk::Error(e)) => {
                let _ = pipe.send(Pipe::Failed { turn, reason: e }).await;
                break;
            }
            Some(LlmChunk::Done) | None => break,
        }
    }
    // The LLM is done, or no longer wanted (TTS failed): its stream goes with `rx`.
    drop(rx);
    if tts_lost || tts_failed.is_cancelled() {
        // Nothing more can be voiced: the pump ends with the context's error.
        drop(text_tx);
        let frames = pump.await.unwrap_or(0);
        let _ = pipe.send(Pipe::Done { turn, frames }).await;
        return;
    }
    let rest = buffer.trim().to_string();
    if !rest.is_empty() {
        let chunk = send_text(&mut said, &rest);
        let _ = pipe
            .send(Pipe::Text {
                turn,
                text: said.trim().to_string(),
            })
            .await;
        let _ = text_tx.send(&chunk).await;
    }
    text_tx.end().await;
    let frames = pump.await.unwrap_or(0);
    let _ = pipe.send(Pipe::Done { turn, frames }).await;
}

/// Without a first token from the primary by then, the fallback is asked too (a hedge).
const HEDGE_AFTER: Duration = Duration::from_millis(400);

type FirstToken = (&'static str, mpsc::Receiver<LlmChunk>, String, bool);

/// One LLM's stream up to its first token, within `bound`.
async fn attempt(
    llm: &Llm,
    request: &ChatRequest,
    bound: Duration,
) -> Result<(mpsc::Receiver<LlmChunk>, String), String> {
    let deadline = Instant::now() + bound;
    let mut rx = tokio::time::timeout_at(deadline, llm.stream(request))
        .await
        .map_err(|_| format!("{}: no answer within {bound:?}", llm.provider()))?
        .map_err(|e| format!("{}: {e}", llm.provider()))?;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => {
                return Err(format!(
                    "{}: no first token within {bound:?}",
                    llm.provider()
                ))
            }
            Ok(Some(LlmChunk::Delta(d))) if !d.is_empty() => return Ok((rx, d)),
            Ok(Some(LlmChunk::Delta(_))) | Ok(Some(LlmChunk::Usage { .. })) => continue,
            Ok(Some(LlmChunk::Error(e))) => return Err(format!("{}: {e}", llm.provider())),
            Ok(Some(LlmChunk::Done)) | Ok(None) => {
                return Err(format!("{}: empty reply", llm.provider()))
            }
        }
    }
}

/// The first LLM stream to give a first token: the primary's, or, when the primary fails or
/// has not answered within [`HEDGE_AFTER`], whichever of it and the fallback answers first (the
/// other is cancelled, its prompt billed as abandoned). Returns (provider, stream, first
/// text, fell back).
async fn first_token(
    voice: &Voice,
    request: &ChatRequest,
    usage: &Arc<Mutex<Usage>>,
) -> Result<FirstToken, String> {
    let primary_name = voice.llm.provider();
    let primary = attempt(&voice.llm, request, voice.settings.first_token_timeout);
    tokio::pin!(primary);
    let Some(fallback) = &voice.fallback else {
        return primary
            .await
            .map(|(rx, first)| (primary_name, rx, first, false));
    };
    let early = tokio::select! {
        r = &mut primary => Some(r),
        _ = tokio::time::sleep(HEDGE_AFTER) => None,
    };
    let abandon = |provider: &'static str| {
        let mut u = usage.lock().expect("usage");
        let tokens = u.prompt_estimate;
        u.abandoned.push((provider, tokens));
    };
    let fallback_alone = |primary_error: String| async move {
        metrics::counter!("cmb_voice_llm_fallbacks_total").increment(1);
        tracing::warn!(error = %primary_error, "LLM fallback for this turn");
        attempt(fallback, request, Duration::from_secs(10))
            .await
            .map(|(rx, first)| (fallback.provider(), rx, first, true))
            .map_err(|e| format!("{primary_error}; then {e}"))
    };
    match early {
        Some(Ok((rx, first))) => Ok((primary_name, rx, first, false)),
        Some(Err(e)) => fallback_alone(e).await,
        None => {
            metrics::counter!("cmb_voice_llm_hedges_total").increment(1);
            let second = attempt(fallback, request, Duration::from_secs(10));
            tokio::pin!(second);
            tokio::select! {
                r = &mut primary => match r {
                    Ok((rx, first)) => {
                        abandon(fallback.provider());
                        Ok((primary_name, rx, first, false))
                    }
                    Err(e) => fallback_wins(fallback.provider(), second.await, e),
                },
                r = &mut second => match r {
                    Ok((rx, first)) => {
                        // The primary had the prompt too: billed, though cut off.
                        abandon(primary_name);
                        metrics::counter!("cmb_voice_llm_fallbacks_total").increment(1);
                        Ok((fallback.provider(), rx, first, true))
                    }
                    Err(e) => primary
                        .await
                        .map(|(rx, first)| (primary_name, rx, first, false))
                        .map_err(|p| format!("{p}; and {e}")),
                },
            }
        }
    }
}

fn fallback_wins(
    provider: &'static str,
    second: Result<(mpsc::Receiver<LlmChunk>, String), String>,
    primary_error: String,
) -> Result<FirstToken, String> {
    metrics::counter!("cmb_voice_llm_fallbacks_total").increment(1);
    second
        .map(|(rx, first)| (provider, rx, first, true))
        .map_err(|e| format!("{primary_error}; then {e}"))
}
