//! The multi-context WebSocket (`…/multi-stream-input`): a socket per call, a context per
//! reply.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{api_key, audio_message, spoken, Sim, TtsSettings, GENERATE_AT_CHARS, INACTIVITY};

/// What the sockets did, for tests and benchmarks.
impl super::ElevenLabsSim {
    /// Stream-input sockets open right now.
    pub fn open_sockets(&self) -> u64 {
        self.shared.open_sockets.load(Ordering::Relaxed)
    }

    /// Text-to-speech sockets accepted so far (stream-input and multi-stream-input).
    pub fn sockets_opened(&self) -> u64 {
        self.shared.sockets_opened.load(Ordering::Relaxed)
    }

    /// Contexts opened on multi-stream-input sockets so far.
    pub fn contexts_opened(&self) -> u64 {
        self.shared.contexts_opened.load(Ordering::Relaxed)
    }
}

#[derive(serde::Deserialize)]
pub(super) struct MultiParams {
    output_format: Option<String>,
    inactivity_timeout: Option<u64>,
}

pub(super) async fn multi_stream_input(
    State(sim): State<Sim>,
    headers: HeaderMap,
    Path(voice_id): Path<String>,
    Query(params): Query<MultiParams>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let key = api_key(&headers).to_string();
    super::upgrade_counted(upgrade, sim, move |sim, socket| async move {
        run_multi_stream_input(&sim, socket, key, voice_id, params).await
    })
}

/// ElevenLabs refuses a sixth context open at once on one socket.
const MAX_CONTEXTS: usize = 5;

/// What a context's generator is asked to do, in order.
enum Generate {
    Speak(String),
    /// The context is closed: its final message once what was flushed before is spoken.
    Final,
}

struct Context {
    /// Text received and not yet flushed.
    buffer: String,
    generator: mpsc::UnboundedSender<Generate>,
}

/// The multi-context socket: contexts by `context_id`, each generating in turn what was
/// flushed into it (the first audio of a context after the first-byte delay, the rest faster
/// than real time), its messages tagged `contextId`; `close_context` drops the text not yet
/// flushed and ends the context with `isFinal` once its flushed text is spoken;
/// `close_socket` closes every context so, then the socket.
async fn run_multi_stream_input(
    sim: &Sim,
    mut socket: WebSocket,
    header_key: String,
    voice_id: String,
    params: MultiParams,
) {
    let inactivity = params
        .inactivity_timeout
        .map_or(INACTIVITY, |s| Duration::from_secs(s.clamp(5, 180)));
    if let Err((error, message)) = super::check_voice(&voice_id, params.output_format.as_deref()) {
        return refuse(&mut socket, 1008, error, &message).await;
    }
    let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
    let mut contexts: HashMap<String, Context> = HashMap::new();
    let mut generators: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut authorised = !header_key.is_empty();
    let tts = sim.shared.tts.clone();
    let mut audio_sent: u64 = 0;
    loop {
        let message = tokio::select! {
            outgoing = out_rx.recv() => {
                if let Some(m) = outgoing {
                    let audio = matches!(&m, Message::Text(t) if t.contains("\"audio\""));
                    if socket.send(m).await.is_err() {
                        break;
                    }
                    audio_sent += u64::from(audio);
                    if tts.break_after_chunks > 0 && audio_sent >= tts.break_after_chunks {
                        // A failure mid-reply (the injected kind): what is left is never sent.
                        for generator in &generators {
                            generator.abort();
                        }
                        return refuse(&mut socket, 1011, "internal_server_error", "injected failure mid-stream").await;
                    }
                }
                continue;
            }
            incoming = tokio::time::timeout(inactivity, socket.recv()) => match incoming {
                Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<Value>(&t) {
                    Ok(v) => v,
                    Err(_) => continue,
                },
                Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => break,
                Ok(Some(Ok(_))) => continue,
                // Idle too long: ElevenLabs closes the socket.
                Err(_) => break,
            },
        };
        if !authorised {
            authorised = ["xi_api_key", "xi-api-key"].iter().any(|k| {
                message
                    .get(*k)
                    .and_then(Value::as_str)
                    .is_some_and(|v| !v.is_empty())
            });
            if !authorised {
                return refuse(&mut socket, 1008, "invalid_api_key", "no xi-api-key given").await;
            }
        }
        if message.get("close_socket").and_then(Value::as_bool) == Some(true) {
            for (_, context) in contexts.drain() {
                let _ = context.generator.send(Generate::Final);
            }
            break;
        }
        let id = message
            .get("context_id")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        if message.get("close_context").and_then(Value::as_bool) == Some(true) {
            if let Some(context) = contexts.remove(&id) {
                let _ = context.generator.send(Generate::Final);
            }
            continue;
        }
        let text = message.get("text").and_then(Value::as_str);
        if !contexts.contains_key(&id) {
            if text.is_none() {
                continue;
            }
            if contexts.len() >= MAX_CONTEXTS {
                return refuse(
                    &mut socket,
                    1008,
                    "max_active_conversations",
                    "Maximum simultaneous contexts per WebSocket connection exceeded (5).",
                )
                .await;
            }
            if sim.next_synthesis_fails() {
                return refuse(
                    &mut socket,
                    1011,
                    "internal_server_error",
                    "injected failure",
                )
                .await;
            }
            sim.shared.contexts_opened.fetch_add(1, Ordering::Relaxed);
            let (generator, jobs) = mpsc::unbounded_channel();
            generators.push(tokio::spawn(generate(
                jobs,
                out.clone(),
                id.clone(),
                tts.clone(),
            )));
            contexts.insert(
                id.clone(),
                Context {
                    buffer: String::new(),
                    generator,
                },
            );
        }
        let Some(context) = contexts.get_mut(&id) else {
            continue;
        };
        // `" "` opens a context; `""` keeps it alive.
        if let Some(text) = text.filter(|t| *t != " " && !t.is_empty()) {
            sim.shared
                .characters
                .fetch_add(text.chars().count() as u64, Ordering::Relaxed);
            context.buffer.push_str(text);
        }
        let flush = message.get("flush").and_then(Value::as_bool) == Some(true);
        if (flush || context.buffer.chars().count() >= GENERATE_AT_CHARS)
            && !context.buffer.trim().is_empty()
        {
            let _ = context
                .generator
                .send(Generate::Speak(std::mem::take(&mut context.buffer)));
        }
    }
    // What was flushed before the close is still spoken, then the socket closes.
    drop(contexts);
    drop(out);
    let all = futures::future::join_all(generators);
    tokio::pin!(all);
    loop {
        tokio::select! {
            _ = &mut all => break,
            Some(m) = out_rx.recv() => {
                if socket.send(m).await.is_err() {
                    return;
                }
            }
        }
    }
    while let Ok(m) = out_rx.try_recv() {
        if socket.send(m).await.is_err() {
            return;
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}

/// One context's speech: each flushed text in turn, then `isFinal`.
async fn generate(
    mut jobs: mpsc::UnboundedReceiver<Generate>,
    out: mpsc::UnboundedSender<Message>,
    context: String,
    tts: TtsSettings,
) {
    let mut sample: u64 = 0;
    let mut first = true;
    let context_json = Value::from(context.as_str()).to_string();
    while let Some(job) = jobs.recv().await {
        match job {
            Generate::Speak(text) => {
                let speech = spoken(&text, &mut sample, tts.ms_per_char);
                for frame in &speech.frames {
                    tokio::time::sleep(tts.wait_for_chunk(&mut first)).await;
                    if out
                        .send(audio_message(frame, "contextId", &context_json))
                        .is_err()
                    {
                        return;
                    }
                }
            }
            Generate::Final => {
                let _ = out.send(Message::Text(
                    json!({ "isFinal": true, "contextId": context })
                        .to_string()
                        .into(),
                ));
                return;
            }
        }
    }
}

/// Sends an error frame and closes (as ElevenLabs does, e.g. 1008 on a bad key).
pub(super) async fn refuse(socket: &mut WebSocket, code: u16, error: &str, message: &str) {
    let frame = json!({ "message": message, "error": error, "code": code });
    let _ = socket.send(Message::Text(frame.to_string().into())).await;
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: error.to_string().into(),
        })))
        .await;
}

/// The next text message as JSON; `None` when the client closed or went quiet too long.
pub(super) async fn next_json(socket: &mut WebSocket) -> Option<Value> {
    loop {
        match tokio::time::timeout(INACTIVITY, socket.recv()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).ok(),
            Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) | Err(_) => return None,
            Ok(Some(Ok(_))) => continue,
        }
    }
}
