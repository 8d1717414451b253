//! One text-to-speech socket per call: ElevenLabs' multi-context WebSocket
//! (`…/multi-stream-input`), a context per reply.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::{chunk_text, Alignment, ElevenLabs, Socket, TtsAudio, AUDIO_CHANNEL, PROVIDER};
use crate::ProviderError;

/// Seconds ElevenLabs keeps an idle multi-context socket open (`inactivity_timeout`, at most
/// 180): a call's socket outlives the pauses between replies; after a longer silence it is
/// opened again for the next reply.
const SESSION_INACTIVITY_SECS: u32 = 180;
const COMMANDS: usize = 64;

/// One text-to-speech socket for a whole call (`…/multi-stream-input`, ElevenLabs'
/// multi-context WebSocket): opened with the call, each reply a context of its own on it
/// (`context_id`), its text flushed and the context closed when the reply's text is all sent
/// (`flush`, then `close_context`), or closed at once when the caller barges in; the socket
/// is closed (`close_socket`) when the last handle goes. Should ElevenLabs close it (idle
/// too long, an error), the next reply opens another.
#[derive(Clone)]
pub struct TtsSession {
    inner: Arc<SessionInner>,
}

struct SessionInner {
    client: ElevenLabs,
    voice_id: String,
    model_id: String,
    socket: tokio::sync::Mutex<Option<mpsc::Sender<Command>>>,
    /// Sockets opened so far.
    opened: AtomicU64,
}

enum Command {
    Open {
        context: String,
        audio: mpsc::Sender<TtsAudio>,
    },
    Text {
        context: String,
        text: String,
    },
    /// All the text is sent: generate the rest, then the context's final message.
    End {
        context: String,
    },
    /// Nobody listens any more (a barge-in): close the context, drop its audio.
    Cancel {
        context: String,
    },
}

/// The text side of one context (one reply). Dropped before [`TtsContext::end`], the context is
/// cancelled: ElevenLabs stops it and its late audio is dropped.
pub struct TtsContext {
    id: String,
    commands: mpsc::Sender<Command>,
    ended: bool,
}

impl TtsContext {
    /// Sends a chunk of text (a sentence ending with `.`, `!` or `?` is flushed at once).
    /// Fails when the socket is gone.
    pub async fn send(&self, text: &str) -> Result<(), ProviderError> {
        self.commands
            .send(Command::Text {
                context: self.id.clone(),
                text: text.to_string(),
            })
            .await
            .map_err(|_| socket_gone())
    }

    /// No more text: the rest is generated, then [`TtsAudio::Final`] comes.
    pub async fn end(mut self) {
        self.ended = true;
        let _ = self
            .commands
            .send(Command::End {
                context: self.id.clone(),
            })
            .await;
    }
}

impl Drop for TtsContext {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.commands.try_send(Command::Cancel {
                context: std::mem::take(&mut self.id),
            });
        }
    }
}

fn socket_gone() -> ProviderError {
    ProviderError::Unreachable {
        provider: PROVIDER,
        detail: "the text-to-speech socket closed".into(),
    }
}

impl TtsSession {
    /// A session for one call; nothing is opened until [`TtsSession::open`] or the first
    /// context.
    pub fn new(client: ElevenLabs, voice_id: &str, model_id: &str) -> Self {
        TtsSession {
            inner: Arc::new(SessionInner {
                client,
                voice_id: voice_id.to_string(),
                model_id: model_id.to_string(),
                socket: tokio::sync::Mutex::new(None),
                opened: AtomicU64::new(0),
            }),
        }
    }

    /// Opens the socket now (at the start of a call, so the first reply does not wait for
    /// it), unless it is open already.
    pub async fn open(&self) -> Result<(), ProviderError> {
        self.commands().await.map(|_| ())
    }

    /// Sockets this session has opened.
    pub fn sockets_opened(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }

    async fn commands(&self) -> Result<mpsc::Sender<Command>, ProviderError> {
        let mut socket = self.inner.socket.lock().await;
        if let Some(commands) = socket.as_ref().filter(|c| !c.is_closed()) {
            return Ok(commands.clone());
        }
        let opened = self
            .inner
            .client
            .open_socket(
                &self.inner.voice_id,
                "multi-stream-input",
                &format!(
                    "model_id={}&output_format=ulaw_8000&inactivity_timeout={SESSION_INACTIVITY_SECS}",
                    self.inner.model_id
                ),
            )
            .await?;
        self.inner.opened.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(COMMANDS);
        tokio::spawn(run_multi_socket(opened, rx));
        *socket = Some(tx.clone());
        Ok(tx)
    }

    /// A new context named `id` (unique within the call, e.g. the reply's turn): its text
    /// side, and its audio, which ends with [`TtsAudio::Final`] or [`TtsAudio::Error`].
    pub async fn context(
        &self,
        id: &str,
    ) -> Result<(TtsContext, mpsc::Receiver<TtsAudio>), ProviderError> {
        let commands = self.commands().await?;
        let (audio_tx, audio_rx) = mpsc::channel(AUDIO_CHANNEL);
        commands
            .send(Command::Open {
                context: id.to_string(),
                audio: audio_tx,
            })
            .await
            .map_err(|_| socket_gone())?;
        Ok((
            TtsContext {
                id: id.to_string(),
                commands,
                ended: false,
            },
            audio_rx,
        ))
    }
}

/// A server message of the multi-context socket, read borrowed (the audio's base64 is not
/// copied before it is decoded).
#[derive(Deserialize)]
struct ServerMessage<'a> {
    #[serde(default, borrow)]
    audio: Option<Cow<'a, str>>,
    #[serde(default, rename = "isFinal")]
    is_final: Option<bool>,
    #[serde(default, borrow, rename = "contextId", alias = "context_id")]
    context_id: Option<Cow<'a, str>>,
    #[serde(default)]
    alignment: Option<WireAlignment>,
    #[serde(default, rename = "normalizedAlignment")]
    normalized_alignment: Option<WireAlignment>,
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    message: Option<Value>,
}

#[derive(Deserialize)]
struct WireAlignment {
    #[serde(default)]
    chars: Vec<String>,
    #[serde(default, rename = "charStartTimesMs")]
    starts: Vec<f64>,
    #[serde(default, rename = "charDurationsMs")]
    durations: Vec<f64>,
}

impl WireAlignment {
    fn usable(self) -> Option<Alignment> {
        let ok = !self.chars.is_empty()
            && self.chars.len() == self.starts.len()
            && self.chars.len() == self.durations.len();
        let ms = |v: Vec<f64>| v.into_iter().map(|n| n.max(0.0) as u64).collect();
        ok.then(|| Alignment {
            chars: self.chars,
            starts_ms: ms(self.starts),
            durations_ms: ms(self.durations),
        })
    }
}

/// Runs a call's socket: commands out, each context's audio to its own receiver, until the
/// session goes (then `close_socket`) or the socket does (then each open context gets an
/// error).
async fn run_multi_socket(mut socket: Socket, mut commands: mpsc::Receiver<Command>) {
    let mut contexts: Vec<(String, mpsc::Sender<TtsAudio>)> = Vec::new();
    let failure: Option<String> = loop {
        tokio::select! {
            command = commands.recv() => {
                let message = match command {
                    None => {
                        let _ = socket.send(Message::text(r#"{"close_socket":true}"#)).await;
                        break None;
                    }
                    Some(Command::Open { context, audio }) => {
                        let init = json!({
                            "text": " ",
                            "context_id": context,
                            "voice_settings": { "stability": 0.5, "similarity_boost": 0.8 },
                            "generation_config": { "chunk_length_schedule": [50, 90, 120, 150] },
                        });
                        contexts.push((context, audio));
                        init
                    }
                    Some(Command::Text { context, text }) => {
                        if text.trim().is_empty() {
                            continue;
                        }
                        let flush = text.trim_end().ends_with(['.', '!', '?']);
                        json!({ "text": chunk_text(&text), "context_id": context, "flush": flush })
                    }
                    Some(Command::End { context }) => {
                        let flush = json!({ "context_id": context, "flush": true });
                        if let Err(e) = socket.send(Message::text(flush.to_string())).await {
                            break Some(format!("TTS send failed: {e}"));
                        }
                        json!({ "context_id": context, "close_context": true })
                    }
                    Some(Command::Cancel { context }) => {
                        contexts.retain(|(c, _)| *c != context);
                        json!({ "context_id": context, "close_context": true })
                    }
                };
                if let Err(e) = socket.send(Message::text(message.to_string())).await {
                    break Some(format!("TTS send failed: {e}"));
                }
            }
            incoming = socket.next() => {
                let text = match incoming {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(frame))) => {
                        break Some(format!(
                            "TTS socket closed {}",
                            frame.map(|f| format!("{} {}", f.code, f.reason)).unwrap_or_default()
                        ));
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => break Some(format!("TTS socket failed: {e}")),
                    None => break Some("TTS socket closed".into()),
                };
                let Ok(message) = serde_json::from_str::<ServerMessage>(&text) else {
                    continue;
                };
                let Some(context) = message.context_id.as_deref() else {
                    if message.audio.is_none() && (message.error.is_some() || message.message.is_some()) {
                        let why = [&message.message, &message.error]
                            .into_iter()
                            .flatten()
                            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                            .next()
                            .unwrap_or_default();
                        break Some(format!("TTS error: {why}"));
                    }
                    continue;
                };
                // A cancelled context's late audio has nobody to go to.
                let Some(i) = contexts.iter().position(|(c, _)| c == context) else {
                    continue;
                };
                if let Some(audio) = message.audio.as_deref().filter(|a| !a.is_empty()) {
                    let chunk = match BASE64.decode(audio) {
                        Ok(bytes) => {
                            let alignment = message
                                .alignment
                                .and_then(WireAlignment::usable)
                                .or_else(|| message.normalized_alignment.and_then(WireAlignment::usable))
                                .unwrap_or_default();
                            TtsAudio::Chunk(bytes.into(), alignment)
                        }
                        Err(e) => TtsAudio::Error(format!("undecodable audio: {e}")),
                    };
                    let failed = matches!(chunk, TtsAudio::Error(_));
                    if contexts[i].1.send(chunk).await.is_err() || failed {
                        let (context, _) = contexts.remove(i);
                        let close = json!({ "context_id": context, "close_context": true });
                        if let Err(e) = socket.send(Message::text(close.to_string())).await {
                            break Some(format!("TTS send failed: {e}"));
                        }
                    }
                    continue;
                }
                if message.is_final == Some(true) {
                    let (_, audio) = contexts.remove(i);
                    let _ = audio.send(TtsAudio::Final).await;
                }
            }
        }
    };
    // No more commands: the session opens another socket for its next context.
    commands.close();
    let why = failure.unwrap_or_else(|| "the text-to-speech session closed".into());
    tracing::debug!(reason = %why, "text-to-speech socket ended");
    while let Ok(command) = commands.try_recv() {
        if let Command::Open { context, audio } = command {
            contexts.push((context, audio));
        }
    }
    for (_, audio) in contexts {
        let _ = audio.send(TtsAudio::Error(why.clone())).await;
    }
    // Best effort, bounded: a hang-up must not wait on a slow peer.
    let _ = tokio::time::timeout(Duration::from_millis(200), socket.close(None)).await;
}
