//! The voice session: one Twilio media stream, from `start` to `stop`.
//!
//! Caller audio goes to speech-to-text; a finished caller turn goes, with the persona's prompt,
//! the user's customisation and the conversation so far, to the LLM (fallback on error or a
//! late first token); the reply streams sentence by sentence into text-to-speech, whose audio
//! the outbound writer paces back to Twilio with marks. The caller can barge in: `clear`,
//! the reply's tasks are cancelled, late audio is dropped by turn id, and the conversation keeps
//! only what the caller heard (from the marks Twilio echoed). Silence gets a reminder, then a
//! goodbye; the paid duration and the budget are hard caps. Every turn's timings, the costs and
//! the transcript are recorded when the session ends.

pub mod outbound;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use cmb_domain::call::{Call, CallCommand, TurnTimings};
use cmb_domain::cost::{CostKind, LlmProvider};
use cmb_domain::persona::preference::{preference_id, Preference};
use cmb_domain::persona::Persona;
use cmb_domain::pricing::PriceTable;
use cmb_domain::{Actor, CommandContext};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backbone::store::EventStore;
use crate::clock::Clock;
use crate::serve::transcripts::{self, Line};
use cmb_providers::deepgram::{Deepgram, SttEvent, SttOptions};
use cmb_providers::elevenlabs::{ElevenLabs, TtsAudio};
use cmb_providers::llm::{ChatMessage, ChatRequest, Llm, LlmChunk};
use cmb_providers::twilio::Twilio;
use outbound::{Out, Pacing, Sent};

/// Milliseconds of speech per character, to turn heard audio into heard text when a reply is
/// cut (ElevenLabs speaks about 15 characters a second).
const MS_PER_CHAR: u64 = 65;

#[derive(Debug, Clone)]
pub struct VoiceSettings {
    pub tts_model: String,
    /// A reply whose first token is later than this switches to the fallback LLM.
    pub first_token_timeout: Duration,
    pub max_reply_tokens: u32,
    pub warning_before_end: Duration,
}

/// What a session needs, shared by every session of the instance.
pub struct Voice {
    pub store: EventStore,
    pub deepgram: Deepgram,
    pub llm: Llm,
    pub fallback: Option<Llm>,
    pub elevenlabs: ElevenLabs,
    pub twilio: Twilio,
    pub clock: Clock,
    pub settings: VoiceSettings,
    /// Synthesised fixed phrases (greetings, reminders), by voice and text.
    pub tts_cache: Mutex<HashMap<(String, String), Bytes>>,
    pub pacing: Arc<Pacing>,
    /// How much of the prompt memory may take, in tokens (`MEMORY_PROMPT_TOKENS`).
    pub memory_prompt_tokens: usize,
}

/// The longest a follow-up greeting may take to synthesise before the cached greeting is used.
const FOLLOW_UP_GREETING_WAIT: Duration = Duration::from_millis(1500);
/// Facts pulled into a turn, at most, and how similar to the caller's words they must be.
const RECALL_FACTS: usize = 3;
const RECALL_FLOOR: f32 = 0.15;

impl Voice {
    /// Audio for a fixed phrase, from the cache or synthesised once (the greeting is warmed
    /// while the phone rings), and the characters this call to it was billed (0 from cache).
    pub async fn phrase(&self, voice_id: &str, text: &str) -> anyhow::Result<(Bytes, u64)> {
        let key = (voice_id.to_string(), text.to_string());
        if let Some(audio) = self.tts_cache.lock().expect("cache").get(&key) {
            return Ok((audio.clone(), 0));
        }
        let audio = self
            .elevenlabs
            .synthesize(voice_id, &self.settings.tts_model, text)
            .await
            .map_err(|e| anyhow::anyhow!("synthesising a phrase: {e}"))?;
        self.tts_cache
            .lock()
            .expect("cache")
            .insert(key, audio.clone());
        Ok((audio, text.chars().count() as u64))
    }
}

/// Who is on the call and how the persona behaves.
struct Context {
    call_id: String,
    call_sid: String,
    user_id: uuid::Uuid,
    prices: PriceTable,
    max_minutes: u32,
    voice_id: String,
    system_prompt: String,
    greeting: String,
    /// The greeting that follows up on an open item (synthesised per call).
    follow_up: Option<String>,
    /// Remembered facts not already in the prompt, with their local vectors, for each turn.
    recall: Vec<(String, Vec<f32>)>,
    endpointing_ms: u32,
    silence_reminder: Duration,
    silence_hangup: Duration,
}

async fn load_context(voice: &Voice, call_id: &str, call_sid: &str) -> anyhow::Result<Context> {
    let (call, _) = voice
        .store
        .load::<Call>(call_id)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let user_id = call
        .user_id
        .ok_or_else(|| anyhow::anyhow!("no call {call_id}"))?;
    let persona_id = call
        .persona_id
        .clone()
        .ok_or_else(|| anyhow::anyhow!("call {call_id} has no persona"))?;
    let (persona, _) = voice
        .store
        .load::<Persona>(&persona_id)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (pref, _) = voice
        .store
        .load::<Preference>(&preference_id(user_id, &persona_id))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let custom = pref.customization.unwrap_or_default();
    let mut system_prompt = format!(
        "{}\n\nYou are on a phone call. Speak naturally in short sentences, one or two at a time; \
         no lists, no markdown, no emoji.",
        persona.system_prompt
    );
    if let Some(extra) = custom.custom_prompt {
        system_prompt.push_str(&format!(
            "\n\nThe caller asked you to keep in mind: {extra}"
        ));
    }
    let (follow_up, recall) = if custom.memory_enabled {
        let memory = load_memory(voice, user_id, &persona_id).await?;
        if let Some(section) = &memory.section {
            system_prompt.push_str("\n\n");
            system_prompt.push_str(section);
        }
        let follow_up = memory.open_items.last().map(|item| {
            format!(
                "{} Last time you mentioned {}. How did it go?",
                persona.greeting.trim_end(),
                item.trim_end_matches('.')
            )
        });
        (follow_up, memory.recall)
    } else {
        (None, Vec::new())
    };
    let tt = persona.turn_taking;
    Ok(Context {
        call_id: call_id.to_string(),
        call_sid: call_sid.to_string(),
        user_id,
        prices: call.prices.unwrap_or(PriceTable::LAUNCH),
        max_minutes: call.max_minutes.max(1),
        voice_id: custom.voice_override.unwrap_or(persona.voice_id),
        system_prompt,
        greeting: persona.greeting,
        follow_up,
        recall,
        endpointing_ms: tt.endpointing_ms,
        silence_reminder: Duration::from_millis(tt.silence_reminder_ms as u64),
        silence_hangup: Duration::from_millis(tt.silence_hangup_ms as u64),
    })
}

struct LoadedMemory {
    section: Option<String>,
    open_items: Vec<String>,
    recall: Vec<(String, Vec<f32>)>,
}

/// What this persona remembers of this user, from the read models: the prompt's memory section
/// (within the token budget) and the facts left out of it, with vectors for per-turn recall.
async fn load_memory(
    voice: &Voice,
    user_id: uuid::Uuid,
    persona_id: &str,
) -> anyhow::Result<LoadedMemory> {
    let cmb_projections::memory::ForPrompt {
        summary,
        open_items,
        facts,
    } = cmb_projections::memory::for_prompt(voice.store.pool(), user_id, persona_id).await?;
    let section = cmb_domain::memory::prompt::memory_section(
        summary.as_deref(),
        &open_items,
        &facts,
        voice.memory_prompt_tokens,
    );
    let carried = section.as_ref().map(|(_, c)| c.clone()).unwrap_or_default();
    // Ranked per turn with the local hashed vectors: microseconds, no network call.
    let recall = facts
        .into_iter()
        .filter(|(id, _)| !carried.contains(id))
        .map(|(_, text)| {
            let v = cmb_domain::memory::embed::embed(&text);
            (text, v)
        })
        .collect();
    Ok(LoadedMemory {
        section: section.map(|(s, _)| s),
        open_items,
        recall,
    })
}

/// Usage of one reply, kept outside its task so a cancelled reply is still billed.
#[derive(Default, Debug, Clone)]
struct Usage {
    provider: &'static str,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// Counted from the deltas when the provider's usage never came (a cancelled stream).
    words: u64,
    tts_chars: u64,
}

enum Pipe {
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
    Done {
        turn: u64,
    },
    Failed {
        turn: u64,
        reason: String,
    },
}

struct Reply {
    turn: u64,
    task: JoinHandle<()>,
    text: String,
    endpoint_at: Instant,
    timings: TurnTimings,
    provider: &'static str,
    fell_back: bool,
    usage: Arc<Mutex<Usage>>,
    /// A fixed phrase (greeting, reminder), not an LLM reply.
    phrase: bool,
    /// Its task has sent everything it will send.
    done: bool,
    /// The writer has played everything it was given so far.
    idle: bool,
}

/// Words that acknowledge without taking the turn.
fn is_backchannel(text: &str) -> bool {
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
fn heard_prefix(text: &str, chars: usize) -> String {
    if chars >= text.chars().count() {
        return text.to_string();
    }
    let cut: String = text.chars().take(chars).collect();
    match cut.rfind(char::is_whitespace) {
        Some(i) => cut[..i].trim_end().to_string(),
        None => String::new(),
    }
}

/// Splits complete sentences off the front of `buffer`.
fn take_sentences(buffer: &mut String) -> Option<String> {
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

fn ms(from: Instant, to: Instant) -> u32 {
    to.saturating_duration_since(from)
        .as_millis()
        .min(u32::MAX as u128) as u32
}

fn parse(msg: &Message) -> Option<Value> {
    match msg {
        Message::Text(t) => serde_json::from_str(t).ok(),
        _ => None,
    }
}

/// Runs the session until Twilio stops the stream (or the socket goes).
pub async fn run(voice: Arc<Voice>, socket: WebSocket) -> anyhow::Result<()> {
    let (sink, mut inbound) = socket.split();
    // `connected`, then `start` with the stream and call ids and our parameters.
    let (stream_sid, call_sid, params) = loop {
        let Some(msg) = inbound.next().await else {
            return Ok(());
        };
        let Some(v) = parse(&msg?) else { continue };
        match v["event"].as_str() {
            Some("start") => {
                let start = &v["start"];
                break (
                    start["streamSid"]
                        .as_str()
                        .or(v["streamSid"].as_str())
                        .unwrap_or("")
                        .to_string(),
                    start["callSid"].as_str().unwrap_or("").to_string(),
                    start["customParameters"].clone(),
                );
            }
            Some("stop") => return Ok(()),
            _ => continue,
        }
    };
    let call_id = match params["call_id"].as_str() {
        Some(id) => id.to_string(),
        None => cmb_projections::calls::id_by_sid(voice.store.pool(), &call_sid)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no call for stream of {call_sid}"))?
            .to_string(),
    };
    let ctx = load_context(&voice, &call_id, &call_sid).await?;
    tracing::info!(call = %call_id, %stream_sid, "voice session started");
    Session::new(voice, ctx, sink, stream_sid)
        .run(inbound)
        .await
}

struct Session {
    voice: Arc<Voice>,
    ctx: Context,
    out: mpsc::Sender<Out>,
    sent_rx: mpsc::Receiver<Sent>,
    pipe_tx: mpsc::Sender<Pipe>,
    pipe_rx: mpsc::Receiver<Pipe>,
    current_turn: Arc<AtomicU64>,
    next_turn: u64,
    reply: Option<Reply>,
    /// Frames of each turn Twilio has played (from echoed marks).
    heard_frames: HashMap<u64, u64>,
    history: Vec<ChatMessage>,
    transcript: Vec<Line>,
    pending: String,
    pending_started: Option<Instant>,
    last_activity: Instant,
    reminded: bool,
    warned: bool,
    ending: Option<String>,
    goodbye_turn: Option<u64>,
    hung_up: bool,
    started: Instant,
    next_budget_check: Instant,
    turns: u32,
    barge_ins: u32,
    early_replies: u32,
    greeting_ms: Option<u32>,
    barge_in_stop_ms: Option<u32>,
    usage: Vec<Usage>,
    timings: Vec<(u32, TurnTimings, bool, &'static str, bool)>,
    writer: JoinHandle<()>,
}

impl Session {
    fn new(
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
            goodbye_turn: None,
            hung_up: false,
            started: Instant::now(),
            next_budget_check: Instant::now() + Duration::from_secs(15),
            turns: 0,
            barge_ins: 0,
            early_replies: 0,
            greeting_ms: None,
            barge_in_stop_ms: None,
            usage: Vec::new(),
            timings: Vec::new(),
            writer,
        }
    }

    /// What the caller heard of `reply`: the frames Twilio acknowledged with marks, as text.
    fn heard(&self, reply: &Reply) -> String {
        let frames = self.heard_frames.get(&reply.turn).copied().unwrap_or(0);
        heard_prefix(&reply.text, (frames * 20 / MS_PER_CHAR) as usize)
    }

    fn new_turn(&mut self) -> u64 {
        let turn = self.next_turn;
        self.next_turn += 1;
        self.current_turn.store(turn, Ordering::Release);
        turn
    }

    fn speaking(&self) -> bool {
        self.reply.is_some()
    }

    async fn run(
        mut self,
        mut inbound: futures::stream::SplitStream<WebSocket>,
    ) -> anyhow::Result<()> {
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
        let stt = self.voice.deepgram.connect(&stt_options).await;
        let (stt_audio, mut stt_events) = match stt {
            Ok(s) => (Some(s.audio), s.events),
            Err(e) => {
                tracing::error!(call = %self.ctx.call_id, error = %e, "speech-to-text unavailable");
                let (_tx, rx) = mpsc::channel(1);
                (None, rx)
            }
        };
        let mut stt_audio = stt_audio;
        let greeting = self.ctx.greeting.clone();
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

        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut billed_secs = None;
        let reason = loop {
            tokio::select! {
                msg = inbound.next() => {
                    let Some(Ok(msg)) = msg else { break "stream closed".to_string() };
                    let Some(v) = parse(&msg) else { continue };
                    match v["event"].as_str() {
                        Some("media") => {
                            if let (Some(tx), Some(payload)) = (&stt_audio, v["media"]["payload"].as_str()) {
                                if let Ok(audio) = BASE64.decode(payload) {
                                    let _ = tx.try_send(Bytes::from(audio));
                                }
                            }
                        }
                        Some("mark") => {
                            if let Some((turn, frames)) = v["mark"]["name"].as_str().and_then(|n| n.split_once(':')) {
                                if let (Ok(turn), Ok(frames)) = (turn.parse::<u64>(), frames.parse::<u64>()) {
                                    let heard = self.heard_frames.entry(turn).or_default();
                                    *heard = (*heard).max(frames);
                                }
                            }
                        }
                        Some("stop") => break self.ending.clone().unwrap_or_else(|| "caller hung up".into()),
                        _ => {}
                    }
                }
                Some(event) = stt_events.recv() => {
                    if let SttEvent::Closed { billed_secs: secs } = event {
                        billed_secs = Some(secs);
                        continue;
                    }
                    self.on_stt(event).await;
                }
                Some(p) = self.pipe_rx.recv() => self.on_pipe(p).await,
                Some(s) = self.sent_rx.recv() => self.on_sent(s).await,
                _ = tick.tick() => self.on_tick().await,
            }
        };
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

    async fn on_stt(&mut self, event: SttEvent) {
        match event {
            SttEvent::SpeechStarted { .. } => {
                if self.pending_started.is_none() {
                    self.pending_started = Some(Instant::now());
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
                if self.pending_started.is_none() {
                    self.pending_started = Some(Instant::now());
                }
                self.last_activity = Instant::now();
                self.reminded = false;
                if self.speaking() {
                    if is_backchannel(&text) {
                        return; // "mm-hmm" while the persona talks: let it talk.
                    }
                    self.barge_in().await;
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

    /// The caller spoke over the persona: stop the audio at once, cancel the reply, keep what
    /// was heard.
    async fn barge_in(&mut self) {
        let heard_at = Instant::now();
        let Some(reply) = self.reply.take() else {
            return;
        };
        let _ = self.out.send(Out::Clear).await;
        let stop = ms(heard_at, Instant::now());
        self.barge_in_stop_ms = Some(self.barge_in_stop_ms.unwrap_or(0).max(stop));
        metrics::histogram!("cmb_voice_barge_in_stop_ms").record(stop as f64);
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
    fn close_reply(&mut self, reply: Reply, heard: String, interrupted: bool) {
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

    async fn end_of_caller_turn(&mut self) {
        let text = std::mem::take(&mut self.pending);
        let started = self.pending_started.take();
        if text.is_empty() || self.ending.is_some() {
            return;
        }
        let endpoint_at = Instant::now();
        self.transcript.push(Line {
            speaker: "caller",
            text: text.clone(),
            cut_off: false,
            at: chrono::Utc::now(),
        });
        // The caller went on after we had started answering: that answer was early.
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
        if let Some(note) = recalled {
            // For this reply only, just before what the caller said.
            messages.insert(messages.len() - 1, ChatMessage::new("system", &note));
        }
        let turn = self.new_turn();
        let usage = Arc::new(Mutex::new(Usage::default()));
        let task = tokio::spawn(respond(
            self.voice.clone(),
            turn,
            messages,
            self.ctx.voice_id.clone(),
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
                ..Default::default()
            },
            provider: self.voice.llm.provider(),
            fell_back: false,
            usage,
            phrase: false,
            done: false,
            idle: true,
        });
    }

    /// The remembered facts most relevant to what the caller just said, as a note for the
    /// reply; measured, since it sits on the turn's latency path.
    fn recall(&self, text: &str) -> Option<String> {
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
    async fn speak_phrase(&mut self, text: &str) -> u64 {
        self.speak(text, None).await
    }

    /// Says `text` as its own turn: `audio` when it was synthesised for this call already,
    /// else the cached (or once synthesised) phrase.
    async fn speak(&mut self, text: &str, audio: Option<Bytes>) -> u64 {
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
                    let _ = out.send(Out::Audio { turn, audio }).await;
                    let _ = out.send(Out::Mark { turn }).await;
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
            let _ = pipe.send(Pipe::Done { turn }).await;
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
        });
        turn
    }

    async fn on_pipe(&mut self, p: Pipe) {
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
            Pipe::Failed { turn, reason } if turn == reply.turn => {
                tracing::warn!(call = %self.ctx.call_id, turn, %reason, "reply failed");
            }
            Pipe::Done { turn } if turn == reply.turn => {
                // The audio is queued; the reply is over once it has played.
                reply.done = true;
                if reply.idle || reply.timings.tts_first_byte_ms.is_none() {
                    self.reply_over().await;
                }
            }
            _ => {}
        }
    }

    /// The current reply has been said in full.
    async fn reply_over(&mut self) {
        let Some(reply) = self.reply.take() else {
            return;
        };
        let turn = reply.turn;
        self.close_reply(reply, String::new(), false);
        self.last_activity = Instant::now();
        if self.goodbye_turn == Some(turn) {
            self.hang_up().await;
        }
    }

    async fn on_sent(&mut self, s: Sent) {
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
            Sent::Drained { turn, .. } => {
                if let Some(reply) = self.reply.as_mut().filter(|r| r.turn == turn) {
                    reply.idle = true;
                    if reply.done {
                        self.reply_over().await;
                    }
                }
            }
        }
    }

    /// Whether the call may go on for another minute within the user's daily and monthly
    /// limits (the hold was checked against them; the limits may have changed since).
    async fn budget_allows(&self, elapsed: Duration) -> anyhow::Result<bool> {
        let price = self
            .ctx
            .prices
            .call_price((elapsed.as_secs() + 60) as u32)
            .0;
        let call_id = uuid::Uuid::parse_str(&self.ctx.call_id)?;
        Ok(crate::usecases::budget::allows(
            &self.voice.store,
            self.ctx.user_id,
            call_id,
            self.voice.clock.now(),
            price,
        )
        .await?)
    }

    async fn hang_up(&mut self) {
        if self.hung_up {
            return;
        }
        self.hung_up = true;
        if let Err(e) = self.voice.twilio.hang_up(&self.ctx.call_sid).await {
            tracing::warn!(call = %self.ctx.call_id, error = %e, "hang-up failed");
        }
    }

    async fn say_goodbye(&mut self, reason: &str, text: &str) {
        if self.ending.is_some() {
            return;
        }
        tracing::info!(call = %self.ctx.call_id, reason, "ending the call");
        self.ending = Some(reason.to_string());
        let turn = self.speak_phrase(text).await;
        self.goodbye_turn = Some(turn);
    }

    async fn on_tick(&mut self) {
        let now = Instant::now();
        if self.hung_up {
            return;
        }
        // The paid duration is a hard cap: a warning a minute before, then goodbye.
        let cap = Duration::from_secs(self.ctx.max_minutes as u64 * 60);
        let elapsed = now.duration_since(self.started);
        if elapsed + Duration::from_secs(4) >= cap {
            self.say_goodbye(
                "paid duration reached",
                "That's our time for today. Talk soon, bye!",
            )
            .await;
            return;
        }
        if now >= self.next_budget_check {
            self.next_budget_check = now + Duration::from_secs(15);
            match self.budget_allows(elapsed).await {
                Ok(true) => {}
                Ok(false) => {
                    self.say_goodbye(
                        "budget reached",
                        "We've reached the spending limit you set, so I'll say goodbye for now. Bye!",
                    )
                    .await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(call = %self.ctx.call_id, error = %e, "budget check failed")
                }
            }
        }
        // The warning waits for the persona to finish what it is saying.
        if !self.warned
            && !self.speaking()
            && self.ending.is_none()
            && elapsed + self.voice.settings.warning_before_end >= cap
        {
            self.warned = true;
            self.speak_phrase("Just so you know, we have about a minute left.")
                .await;
        }
        if self.speaking() || !self.pending.is_empty() || self.ending.is_some() {
            return;
        }
        let silent = now.duration_since(self.last_activity);
        if silent >= self.ctx.silence_hangup {
            self.say_goodbye(
                "silence",
                "It sounds like you've stepped away. I'll let you go. Bye for now!",
            )
            .await;
        } else if silent >= self.ctx.silence_reminder && !self.reminded {
            self.reminded = true;
            self.speak_phrase("Are you still there?").await;
        }
    }

    /// Records turns, costs and the transcript; closes the writer.
    async fn finish(mut self, reason: String, billed_secs: Option<f64>) -> anyhow::Result<()> {
        if let Some(reply) = self.reply.take() {
            reply.task.abort();
            let heard = self.heard(&reply);
            let whole = heard.len() >= reply.text.len();
            self.close_reply(reply, heard, !whole);
        }
        let _ = self.out.send(Out::Close).await;
        let _ = (&mut self.writer).await;
        let store = &self.voice.store;
        let ctx_cmd = CommandContext::for_request(
            uuid::Uuid::new_v4().to_string(),
            Actor::Worker("voice".into()),
        );
        let id = self.ctx.call_id.clone();
        let record = |command: CallCommand| {
            let ctx = ctx_cmd.clone();
            let id = id.clone();
            async move {
                if let Err(e) = store.execute::<Call>(&id, command, &ctx).await {
                    tracing::error!(call = %id, error = %e, "recording the voice session failed");
                }
            }
        };
        for (turn, timings, interrupted, provider, fell_back) in self.timings.clone() {
            record(CallCommand::RecordTurn {
                turn,
                timings,
                interrupted,
                llm_provider: provider.to_string(),
                fell_back,
            })
            .await;
        }
        // Costs as used: audio seconds, tokens per provider, characters.
        let p = self.ctx.prices;
        let audio_secs = billed_secs.unwrap_or_else(|| self.started.elapsed().as_secs_f64());
        record(CallCommand::RecordCost(p.cost(
            CostKind::DeepgramStreamingStt,
            audio_secs.ceil() as i64,
            billed_secs.is_none(),
        )))
        .await;
        let mut tokens: HashMap<LlmProvider, (i64, bool)> = HashMap::new();
        let mut chars = 0i64;
        for u in &self.usage {
            chars += u.tts_chars as i64;
            let Some(llm) = LlmProvider::from_name(u.provider) else {
                continue;
            };
            let (n, estimated) = if u.prompt_tokens + u.completion_tokens > 0 {
                ((u.prompt_tokens + u.completion_tokens) as i64, false)
            } else {
                ((u.words * 4).div_ceil(3) as i64, true)
            };
            let entry = tokens.entry(llm).or_default();
            entry.0 += n;
            entry.1 |= estimated;
        }
        for (llm, (n, estimated)) in tokens {
            record(CallCommand::RecordCost(p.cost(
                CostKind::ChatTokens(llm),
                n,
                estimated,
            )))
            .await;
        }
        if chars > 0 {
            record(CallCommand::RecordCost(p.cost(
                CostKind::TtsCharacters,
                chars,
                true,
            )))
            .await;
        }
        // The transcript first: the session's end event says everything is recorded.
        let call_uuid = uuid::Uuid::parse_str(&self.ctx.call_id)?;
        transcripts::save(store.pool(), call_uuid, &self.transcript).await?;
        record(CallCommand::RecordSessionEnd {
            turns: self.turns,
            barge_ins: self.barge_ins,
            early_replies: self.early_replies,
            reason: reason.clone(),
            greeting_ms: self.greeting_ms,
            barge_in_stop_ms: self.barge_in_stop_ms,
            first_audio_ms: {
                let mut e2e: Vec<u32> = self
                    .timings
                    .iter()
                    .filter_map(|t| t.1.first_audio_ms)
                    .collect();
                e2e.sort_unstable();
                let at = |p: f64| e2e[((e2e.len() - 1) as f64 * p).round() as usize];
                (!e2e.is_empty()).then(|| [at(0.5), at(0.9), at(0.99)])
            },
        })
        .await;
        tracing::info!(call = %self.ctx.call_id, turns = self.turns, barge_ins = self.barge_ins, %reason, "voice session ended");
        Ok(())
    }
}

/// One reply: LLM (with fallback) streamed sentence by sentence into TTS, audio to the writer.
async fn respond(
    voice: Arc<Voice>,
    turn: u64,
    messages: Vec<ChatMessage>,
    voice_id: String,
    out: mpsc::Sender<Out>,
    pipe: mpsc::Sender<Pipe>,
    usage: Arc<Mutex<Usage>>,
) {
    let request = ChatRequest {
        messages,
        max_tokens: voice.settings.max_reply_tokens,
        temperature: 0.7,
    };
    // Open TTS while the LLM thinks.
    let tts = voice
        .elevenlabs
        .stream_tts(&voice_id, &voice.settings.tts_model);
    let llm = first_token(&voice, &request);
    let (tts, llm) = tokio::join!(tts, llm);
    let (provider, mut rx, first, fell_back) = match llm {
        Ok(v) => v,
        Err(e) => {
            let _ = pipe.send(Pipe::Failed { turn, reason: e }).await;
            let _ = pipe.send(Pipe::Done { turn }).await;
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
            let _ = pipe
                .send(Pipe::Failed {
                    turn,
                    reason: format!("text-to-speech: {e}"),
                })
                .await;
            let _ = pipe.send(Pipe::Done { turn }).await;
            return;
        }
    };
    let text_tx = tts.text;
    let mut audio_rx = tts.audio;
    // Audio pump: TTS audio → the writer, a mark after each chunk.
    let pump_out = out.clone();
    let pump_pipe = pipe.clone();
    let pump = tokio::spawn(async move {
        let mut first = true;
        while let Some(a) = audio_rx.recv().await {
            match a {
                TtsAudio::Chunk(audio) => {
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
                    let _ = pump_pipe
                        .send(Pipe::Failed {
                            turn,
                            reason: format!("text-to-speech: {e}"),
                        })
                        .await;
                    break;
                }
            }
        }
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
    loop {
        while let Some(sentence) = take_sentences(&mut buffer) {
            let chunk = send_text(&mut said, &sentence);
            let _ = pipe
                .send(Pipe::Text {
                    turn,
                    text: said.trim().to_string(),
                })
                .await;
            if text_tx.send(chunk).await.is_err() {
                break;
            }
        }
        match rx.recv().await {
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
    let rest = buffer.trim().to_string();
    if !rest.is_empty() {
        let chunk = send_text(&mut said, &rest);
        let _ = pipe
            .send(Pipe::Text {
                turn,
                text: said.trim().to_string(),
            })
            .await;
        let _ = text_tx.send(chunk).await;
    }
    drop(text_tx);
    let _ = pump.await;
    let _ = pipe.send(Pipe::Done { turn }).await;
}

/// The primary LLM's stream up to its first token, or the fallback's when the primary fails
/// or is later than the bound. Returns (provider, stream, first text, fell back).
async fn first_token(
    voice: &Voice,
    request: &ChatRequest,
) -> Result<(&'static str, mpsc::Receiver<LlmChunk>, String, bool), String> {
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
    let bound = voice.settings.first_token_timeout;
    match attempt(&voice.llm, request, bound).await {
        Ok((rx, first)) => Ok((voice.llm.provider(), rx, first, false)),
        Err(primary) => {
            metrics::counter!("cmb_voice_llm_fallbacks_total").increment(1);
            let Some(fallback) = &voice.fallback else {
                return Err(primary);
            };
            tracing::warn!(error = %primary, "LLM fallback for this turn");
            attempt(fallback, request, Duration::from_secs(10))
                .await
                .map(|(rx, first)| (fallback.provider(), rx, first, true))
                .map_err(|e| format!("{primary}; then {e}"))
        }
    }
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
