//! The voice session: one Twilio media stream, from `start` to `stop` — its state and the
//! loop that reacts to the caller's audio, speech-to-text, the reply in flight and the writer.
//! The turns, the call's limits and the final record are in `turns`, `limits` and `record`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::BytesMut;
use cmb_domain::call::TurnTimings;
use cmb_providers::deepgram::{SttEvent, SttOptions};
use cmb_providers::elevenlabs::TtsSession;
use cmb_providers::llm::ChatMessage;
use cmb_providers::twilio::stream::Inbound;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::context::Context;
use super::error::SessionError;
use super::guard::Guard;
use super::outbound::{self, Out, Sent, FRAME_BYTES};
use super::reply::{ms, Pipe, Reply, Usage};
use super::shared::Voice;
use super::text::{heard_by_alignment, heard_prefix, is_backchannel, MS_PER_CHAR};
use crate::serve::transcripts::Line;

/// The longest a follow-up greeting may take to synthesise before the cached greeting is used.
const FOLLOW_UP_GREETING_WAIT: Duration = Duration::from_millis(1500);
/// How long after its last frame was sent a reply counts as played when Twilio echoes no mark.
pub(super) const MARK_WAIT: Duration = Duration::from_millis(1500);

/// Said when speech-to-text is lost for good in the middle of a call.
const STT_LOST: &str = "Sorry, I'm having trouble hearing you. Let's talk again later. Bye!";

pub(super) struct Session {
    pub(super) voice: Arc<Voice>,
    pub(super) ctx: Context,
    pub(super) out: mpsc::Sender<Out>,
    pub(super) sent_rx: mpsc::Receiver<Sent>,
    pub(super) pipe_tx: mpsc::Sender<Pipe>,
    pub(super) pipe_rx: mpsc::Receiver<Pipe>,
    pub(super) current_turn: Arc<AtomicU64>,
    pub(super) next_turn: u64,
    pub(super) reply: Option<Reply>,
    /// Frames of each turn Twilio has played (from echoed marks).
    pub(super) heard_frames: HashMap<u64, u64>,
    pub(super) history: Vec<ChatMessage>,
    pub(super) transcript: Vec<Line>,
    pub(super) pending: String,
    pub(super) pending_started: Option<Instant>,
    pub(super) last_activity: Instant,
    pub(super) reminded: bool,
    pub(super) warned: bool,
    pub(super) ending: Option<String>,
    pub(super) ending_at: Option<Instant>,
    pub(super) goodbye_turn: Option<u64>,
    pub(super) hung_up: bool,
    pub(super) started: Instant,
    pub(super) next_budget_check: Instant,
    pub(super) turns: u32,
    pub(super) barge_ins: u32,
    pub(super) early_replies: u32,
    pub(super) greeting_ms: Option<u32>,
    pub(super) barge_in_stop_ms: Option<u32>,
    /// Outbound audio paused for caller speech: the turn and its frames heard at the pause.
    pub(super) paused: Option<(u64, u64)>,
    pub(super) paused_at: Option<Instant>,
    pub(super) usage: Vec<Usage>,
    /// The call's text-to-speech socket: a context per reply, closed when the session goes.
    pub(super) tts: TtsSession,
    pub(super) timings: Vec<(u32, TurnTimings, bool, &'static str, bool)>,
    pub(super) writer: JoinHandle<()>,
}

/// However the session ends (an error included), the reply in flight (its LLM stream and
/// text-to-speech socket) and the writer go with it.
impl Drop for Session {
    fn drop(&mut self) {
        if let Some(reply) = &self.reply {
            reply.task.abort();
        }
        self.writer.abort();
    }
}

impl Session {
    pub(super) fn new(
        voice: Arc<Voice>,
        ctx: Context,
        sink: futures::stream::SplitSink<WebSocket, Message>,
        stream_sid: String,
    ) -> Self {
        let (out, out_rx) = mpsc::channel(4096);
        let (sent_tx, sent_rx) = mpsc::channel(256);
        let (pipe_tx, pipe_rx) = mpsc::channel(256);
        let current_turn = Arc::new(AtomicU64::new(0));
        let writer = tokio::spawn(outbound::run(
            sink,
            stream_sid,
            out_rx,
            sent_tx,
            current_turn.clone(),
            voice.pacing.clone(),
        ));
        let tts = TtsSession::new(
            voice.elevenlabs.clone(),
            &ctx.voice_id,
            &voice.settings.tts_model,
        );
        let history = vec![ChatMessage {
            role: "system".into(),
            content: ctx.system_prompt.clone(),
        }];
        Session {
            voice,
            ctx,
            out,
            sent_rx,
            pipe_tx,
            pipe_rx,
            current_turn,
            next_turn: 1,
            reply: None,
            heard_frames: HashMap::new(),
            history,
            transcript: Vec::new(),
            pending: String::new(),
            pending_started: None,
            last_activity: Instant::now(),
            reminded: false,
            warned: false,
            ending: None,
            ending_at: None,
            goodbye_turn: None,
            hung_up: false,
            started: Instant::now(),
            next_budget_check: Instant::now() + Duration::from_secs(15),
            turns: 0,
            barge_ins: 0,
            early_replies: 0,
            greeting_ms: None,
            barge_in_stop_ms: None,
            paused: None,
            paused_at: None,
            usage: Vec::new(),
            tts,
            timings: Vec::new(),
            writer,
        }
    }

    /// What the caller heard of `reply`: the frames Twilio acknowledged with marks, as text —
    /// the characters TTS's alignment puts before that point (for a fixed phrase synthesised
    /// over HTTP, without alignment, its characters spread evenly over its audio), or, should
    /// no character timing have come, an estimate at an average speaking rate.
    pub(super) fn heard(&self, reply: &Reply) -> String {
        let frames = self.heard_frames.get(&reply.turn).copied().unwrap_or(0);
        if reply.spoken.is_empty() {
            return heard_prefix(&reply.text, (frames * 20 / MS_PER_CHAR) as usize);
        }
        heard_by_alignment(&reply.spoken, frames * 20)
    }

    pub(super) fn new_turn(&mut self) -> u64 {
        let turn = self.next_turn;
        self.next_turn += 1;
        self.current_turn.store(turn, Ordering::Release);
        turn
    }

    pub(super) fn speaking(&self) -> bool {
        self.reply.is_some()
    }

    /// Runs the conversation until Twilio stops the stream, the socket goes, or `guard` ends
    /// it (the call ended, the paid duration is over, the socket fell silent).
    pub(super) async fn run(
        mut self,
        mut inbound: futures::stream::SplitStream<WebSocket>,
        mut guard: Guard,
    ) -> Result<(), SessionError> {
        let stt_options = SttOptions {
            model: "nova-2".into(),
            language: "en".into(),
            endpointing_ms: self.ctx.endpointing_ms,
            utterance_end_ms: (self.ctx.endpointing_ms + 700).max(1000),
        };
        // A follow-up greeting is synthesised while speech-to-text connects.
        let greeting_ready = Instant::now() + FOLLOW_UP_GREETING_WAIT;
        let follow_up = self.ctx.follow_up.clone().map(|text| {
            let voice = self.voice.clone();
            let voice_id = self.ctx.voice_id.clone();
            let spoken = text.clone();
            let task = tokio::spawn(async move {
                voice
                    .elevenlabs
                    .synthesize(&voice_id, &voice.settings.tts_model, &spoken)
                    .await
            });
            (text, task)
        });
        // The call's text-to-speech socket opens meanwhile, ready for the first reply.
        let tts = self.tts.clone();
        let call_id = self.ctx.call_id;
        tokio::spawn(async move {
            if let Err(e) = tts.open().await {
                tracing::warn!(call = %call_id, error = %e, "text-to-speech socket not opened yet");
            }
        });
        let stt = self.voice.deepgram.connect(&stt_options).await;
        let mut billed_secs = None;
        let (stt_audio, mut stt_events) = match stt {
            Ok(s) => (Some(s.audio), s.events),
            Err(e) => {
                tracing::error!(call = %self.ctx.call_id, error = %e, "speech-to-text unavailable");
                // Nothing was transcribed, so nothing is billed for it.
                billed_secs = Some(0.0);
                let (_tx, rx) = mpsc::channel(1);
                (None, rx)
            }
        };
        let mut stt_audio = stt_audio;
        let greeting = self.ctx.greeting.clone();
        if stt_audio.is_none() {
            // Nobody could answer a greeting: say sorry and end the call politely.
            if let Some((_, task)) = follow_up {
                task.abort();
            }
            self.say_goodbye("speech-to-text unavailable", STT_LOST)
                .await;
        } else {
            match follow_up {
                Some((text, task)) => match tokio::time::timeout_at(greeting_ready, task).await {
                    Ok(Ok(Ok(audio))) => {
                        self.speak(&text, Some(audio)).await;
                    }
                    outcome => {
                        let why = match outcome {
                            Err(_) => "not ready in time".to_string(),
                            Ok(Err(e)) => e.to_string(),
                            Ok(Ok(Err(e))) => e.to_string(),
                            Ok(Ok(Ok(_))) => unreachable!("matched above"),
                        };
                        tracing::warn!(call = %self.ctx.call_id, reason = %why, "follow-up greeting unavailable; using the usual one");
                        self.speak_phrase(&greeting).await;
                    }
                },
                None => {
                    self.speak_phrase(&greeting).await;
                }
            }
        }

        let mut audio_buf = BytesMut::with_capacity(FRAME_BYTES * 64);
        // One timer for the call's limits, armed for the next moment one of them could act;
        // nothing ticks while the call is idle.
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        let reason = loop {
            let next = self.next_check();
            if armed != Some(next) {
                timer.as_mut().reset(next);
                armed = Some(next);
            }
            tokio::select! {
                msg = inbound.next() => {
                    // After our goodbye and hang-up, Twilio may close the socket before (or
                    // without) a `stop`: the call still ended for our reason.
                    let Some(Ok(msg)) = msg else {
                        break self.ending.clone().unwrap_or_else(|| "stream closed".into());
                    };
                    guard.frames.fetch_add(1, Ordering::Relaxed);
                    let Message::Text(text) = msg else { continue };
                    let Some(message) = Inbound::parse(&text) else { continue };
                    match (message.event.as_ref(), message.media, message.mark) {
                        ("media", Some(media), _) => {
                            if let Some(tx) = &stt_audio {
                                // One 20 ms frame (160 bytes) decodes in place, no copy after.
                                audio_buf.reserve(FRAME_BYTES * 4);
                                let start = audio_buf.len();
                                audio_buf.resize(start + media.payload.len().div_ceil(4) * 3, 0);
                                match BASE64.decode_slice(media.payload.as_bytes(), &mut audio_buf[start..]) {
                                    Ok(n) => {
                                        audio_buf.truncate(start + n);
                                        let _ = tx.try_send(audio_buf.split().freeze());
                                    }
                                    Err(_) => audio_buf.truncate(start),
                                }
                            }
                        }
                        ("mark", _, Some(mark)) => {
                            if let Some((turn, frames)) = mark.name.split_once(':') {
                                if let (Ok(turn), Ok(frames)) = (turn.parse::<u64>(), frames.parse::<u64>()) {
                                    self.on_mark(turn, frames).await;
                                }
                            }
                        }
                        ("stop", _, _) => break self.ending.clone().unwrap_or_else(|| "caller hung up".into()),
                        _ => {}
                    }
                }
                Some(event) = stt_events.recv() => {
                    if let SttEvent::Closed { billed_secs: secs } = event {
                        billed_secs = Some(secs);
                        if self.ending.is_none() {
                            // Speech-to-text gave up reconnecting: the call cannot go on.
                            self.say_goodbye("speech-to-text unavailable", STT_LOST).await;
                        }
                        continue;
                    }
                    self.on_stt(event).await;
                }
                Some(p) = self.pipe_rx.recv() => self.on_pipe(p).await,
                Some(s) = self.sent_rx.recv() => self.on_sent(s).await,
                _ = &mut timer => {
                    armed = None;
                    self.on_tick().await
                }
                why = &mut guard.end => {
                    let why = why.unwrap_or("session guard gone");
                    break self.ending.clone().unwrap_or_else(|| why.to_string());
                }
            }
        };
        drop(guard);
        // Close speech-to-text and learn what it billed.
        stt_audio.take();
        if billed_secs.is_none() {
            let deadline = tokio::time::sleep(Duration::from_secs(3));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    e = stt_events.recv() => match e {
                        Some(SttEvent::Closed { billed_secs: s }) => { billed_secs = Some(s); break }
                        Some(_) => continue,
                        None => break,
                    }
                }
            }
        }
        self.finish(reason, billed_secs).await
    }

    pub(super) async fn on_stt(&mut self, event: SttEvent) {
        match event {
            SttEvent::SpeechStarted { .. } => {
                if self.pending_started.is_none() {
                    self.pending_started = Some(Instant::now());
                }
                // Speech onset over the persona: stop its audio now, decide on the words.
                if self.speaking() {
                    self.pause().await;
                }
            }
            SttEvent::Transcript {
                text,
                is_final,
                speech_final,
                ..
            } => {
                let text = text.trim().to_string();
                if text.is_empty() {
                    return;
                }
                if self.ending.is_some() {
                    // Talking over the goodbye does not keep the call open.
                    return;
                }
                if self.pending_started.is_none() {
                    self.pending_started = Some(Instant::now());
                }
                self.last_activity = Instant::now();
                self.reminded = false;
                if self.speaking() {
                    if is_backchannel(&text) {
                        // "mm-hmm" while the persona talks: a short pause, then on it goes.
                        if is_final {
                            self.resume().await;
                        } else {
                            self.pause().await;
                        }
                        return;
                    }
                    self.barge_in().await;
                }
                if let Some(k) = &self.ctx.knowledge {
                    let so_far = if self.pending.is_empty() {
                        text.clone()
                    } else {
                        format!("{} {text}", self.pending)
                    };
                    k.prefetch(so_far, is_final, speech_final, self.for_call());
                }
                if is_final {
                    if !self.pending.is_empty() {
                        self.pending.push(' ');
                    }
                    self.pending.push_str(&text);
                    if speech_final {
                        self.end_of_caller_turn().await;
                    }
                }
            }
            SttEvent::UtteranceEnd { .. } => {
                if self.paused.is_some() && self.pending.is_empty() {
                    self.resume().await;
                }
                if !self.pending.is_empty() {
                    self.end_of_caller_turn().await;
                }
            }
            SttEvent::Error(e) => {
                tracing::warn!(call = %self.ctx.call_id, error = %e, "speech-to-text error")
            }
            SttEvent::Closed { .. } => {}
        }
    }

    pub(super) async fn on_pipe(&mut self, p: Pipe) {
        let Some(reply) = self.reply.as_mut() else {
            return;
        };
        match p {
            Pipe::FirstToken {
                turn,
                at,
                provider,
                fell_back,
            } if turn == reply.turn => {
                reply.timings.llm_first_token_ms = Some(ms(reply.endpoint_at, at));
                reply.provider = provider;
                reply.fell_back = fell_back;
            }
            Pipe::TtsFirstByte { turn, at } if turn == reply.turn => {
                reply.timings.tts_first_byte_ms = Some(ms(reply.endpoint_at, at));
            }
            Pipe::Text { turn, text } if turn == reply.turn => reply.text = text,
            Pipe::Spoken { turn, chars } if turn == reply.turn => reply.spoken.extend(chars),
            Pipe::Failed { turn, reason } if turn == reply.turn => {
                tracing::warn!(call = %self.ctx.call_id, turn, %reason, "reply failed");
            }
            Pipe::TtsFailed { turn, reason } if turn == reply.turn => {
                tracing::warn!(call = %self.ctx.call_id, turn, %reason, "reply cut short: text-to-speech failed");
                reply.tts_failed = true;
            }
            Pipe::Done { turn, frames } if turn == reply.turn => {
                // The audio is queued; the reply is over once it has played (at once when it
                // had none).
                reply.done = true;
                reply.queued_frames = frames;
                if self.played_out() {
                    self.reply_over().await;
                }
            }
            _ => {}
        }
    }

    /// Twilio echoed a mark: `frames` of `turn` have played.
    pub(super) async fn on_mark(&mut self, turn: u64, frames: u64) {
        if self.paused.is_some_and(|(t, _)| t == turn) {
            // Twilio echoes every pending mark on a clear: not played.
            return;
        }
        let heard = self.heard_frames.entry(turn).or_default();
        *heard = (*heard).max(frames);
        let _ = self.out.try_send(Out::Played { turn, frames });
        if self.played_out() {
            self.reply_over().await;
        }
    }

    /// The current reply has been said in full.
    pub(super) async fn reply_over(&mut self) {
        let Some(reply) = self.reply.take() else {
            return;
        };
        if self.paused.take().is_some() {
            // Paused before it had any audio: the writer must not stay paused.
            self.paused_at = None;
            let _ = self.out.send(Out::Clear).await;
        }
        let turn = reply.turn;
        if reply.tts_failed {
            // Only what was voiced, and played, was said.
            let heard = self.heard(&reply);
            self.close_reply(reply, heard, true);
        } else {
            self.close_reply(reply, String::new(), false);
        }
        self.last_activity = Instant::now();
        if self.goodbye_turn == Some(turn) {
            self.hang_up().await;
        }
    }

    pub(super) async fn on_sent(&mut self, s: Sent) {
        match s {
            Sent::Playing { turn } => {
                if let Some(reply) = self.reply.as_mut().filter(|r| r.turn == turn) {
                    reply.idle = false;
                }
            }
            Sent::FirstFrame { turn, at } => {
                if turn == 1 && self.greeting_ms.is_none() {
                    self.greeting_ms = Some(ms(self.started, at));
                    metrics::histogram!("cmb_voice_greeting_ms")
                        .record(ms(self.started, at) as f64);
                }
                if let Some(reply) = self.reply.as_mut().filter(|r| r.turn == turn) {
                    reply.idle = false;
                    reply.timings.first_audio_ms = Some(ms(reply.endpoint_at, at));
                    if !reply.phrase {
                        metrics::histogram!("cmb_voice_first_audio_ms").record(ms(
                            reply.endpoint_at,
                            at,
                        )
                            as f64);
                    }
                }
            }
            Sent::Drained { turn, frames, at } => {
                if let Some(reply) = self.reply.as_mut().filter(|r| r.turn == turn) {
                    reply.idle = true;
                    reply.sent_frames = frames;
                    reply.drained_at = Some(at);
                    if self.played_out() {
                        self.reply_over().await;
                    }
                }
            }
        }
    }
}
