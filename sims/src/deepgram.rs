//! Deepgram simulator: live transcription on `/v1/listen` over a WebSocket, with Deepgram's
//! wire protocol (Deepgram's streaming API), so the real client in `providers::deepgram` cannot tell the
//! difference. It really listens: speech is found by frame energy in the μ-law audio (see
//! `listener`), and each utterance is "transcribed" as the next line of a script.
//!
//! Simplifications, on purpose: only μ-law 8 kHz mono is understood, `endpointing` below
//! 100 ms (or `false`) counts as 100 ms, and transcripts are whole script lines rather than
//! what was said.

mod listener;
#[cfg(test)]
mod tests;

pub use listener::{rms, silence_frames, speech_frames, ListenConfig, VOICED_RMS};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Faults;
use listener::{Heard, Listener, SAMPLES_PER_MS};

/// Deepgram closes a stream that sent neither audio nor KeepAlive for this long (`NET-0001`).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The simulator's configuration, from `SIM_DEEPGRAM_*` variables.
#[derive(Debug, Clone)]
pub struct Settings {
    /// What the long utterances of each connection say, in order (`SIM_DEEPGRAM_SCRIPT`,
    /// lines separated by `|`).
    pub script: Vec<String>,
    /// Said once the script is used up (`SIM_DEEPGRAM_DEFAULT_UTTERANCE`).
    pub default_utterance: String,
    /// A voiced burst shorter than this is "mm-hmm" and does not use up a script line
    /// (`SIM_DEEPGRAM_BACKCHANNEL_MS`, 350).
    pub backchannel_ms: u32,
    /// Delay before each message is sent (`SIM_DEEPGRAM_LATENCY_MS`).
    pub latency: Duration,
    /// Drop the socket, without a close frame, after this much audio
    /// (`SIM_DEEPGRAM_DISCONNECT_AFTER_MS`).
    pub disconnect_after: Option<Duration>,
    /// Latency of the handshake and injected 503s (`SIM_DEEPGRAM_LATENCY_MS`,
    /// `SIM_DEEPGRAM_FAIL_EVERY`).
    pub faults: Faults,
    /// A stream that sent nothing for this long is closed (`NET-0001`): Deepgram's 10 s;
    /// shorter in tests.
    pub idle_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings::from_lookup(&|_| None)
    }
}

impl Settings {
    /// A malformed number falls back to the default with a warning.
    pub fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Self {
        let number = |name: &str| {
            get(name).and_then(|v| {
                v.trim().parse::<u64>().ok().or_else(|| {
                    tracing::warn!(variable = name, value = %v, "not a number; using the default");
                    None
                })
            })
        };
        let script = get("SIM_DEEPGRAM_SCRIPT")
            .map(|s| {
                s.split('|')
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        Settings {
            script,
            default_utterance: get("SIM_DEEPGRAM_DEFAULT_UTTERANCE")
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "this is the caller speaking".into()),
            backchannel_ms: number("SIM_DEEPGRAM_BACKCHANNEL_MS")
                .map_or(350, |n| n.min(u64::from(u32::MAX)) as u32),
            latency: Duration::from_millis(number("SIM_DEEPGRAM_LATENCY_MS").unwrap_or(0)),
            disconnect_after: number("SIM_DEEPGRAM_DISCONNECT_AFTER_MS").map(Duration::from_millis),
            faults: Faults::from_lookup(get, "DEEPGRAM"),
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    open: AtomicU64,
    billed_samples: AtomicU64,
    keepalives: AtomicU64,
}

/// The simulator, with counters for tests.
#[derive(Clone)]
pub struct DeepgramSim {
    settings: Arc<Settings>,
    stats: Arc<Stats>,
}

impl DeepgramSim {
    pub fn new(settings: Settings) -> Self {
        DeepgramSim {
            settings: Arc::new(settings),
            stats: Arc::default(),
        }
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/listen", get(listen))
            .with_state(self.clone())
    }

    /// Seconds of audio of all streams that have ended (what Deepgram would bill).
    pub fn billed_seconds_total(&self) -> f64 {
        self.stats.billed_samples.load(Ordering::Relaxed) as f64 / (SAMPLES_PER_MS * 1000) as f64
    }

    /// WebSocket handshakes accepted.
    pub fn connections(&self) -> u64 {
        self.stats.connections.load(Ordering::Relaxed)
    }

    /// Streams open now (accepted and not yet closed by either side).
    pub fn open_connections(&self) -> u64 {
        self.stats.open.load(Ordering::Relaxed)
    }

    /// `KeepAlive` messages received, over all streams.
    pub fn keepalives(&self) -> u64 {
        self.stats.keepalives.load(Ordering::Relaxed)
    }
}

/// A refused handshake, as Deepgram answers it: `dg-error` header and a JSON body.
fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    let request_id = uuid::Uuid::new_v4().to_string();
    let mut response = (
        status,
        Json(json!({ "err_code": code, "err_msg": message, "request_id": request_id })),
    )
        .into_response();
    let headers = response.headers_mut();
    for (name, value) in [("dg-error", message), ("dg-request-id", &request_id)] {
        if let Ok(value) = value.parse() {
            headers.insert(name, value);
        }
    }
    response
}

async fn listen(
    State(sim): State<DeepgramSim>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    if sim.settings.faults.apply().await {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVICE_UNAVAILABLE",
            "injected failure",
        );
    }
    let key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Token "))
        .map(str::trim)
        .unwrap_or("");
    if key.is_empty() {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "INVALID_AUTH",
            "Invalid credentials.",
        );
    }
    let param = |name: &str| query.get(name).map(String::as_str);
    if param("encoding").is_some_and(|e| e != "mulaw")
        || param("sample_rate").is_some_and(|r| r != "8000")
        || param("channels").is_some_and(|c| c != "1")
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            "UNSUPPORTED_AUDIO",
            "the simulator only understands encoding=mulaw, sample_rate=8000, channels=1",
        );
    }
    let is_true = |name: &str| param(name) == Some("true");
    let config = ListenConfig {
        endpointing_ms: param("endpointing")
            .and_then(|v| v.parse().ok())
            .unwrap_or(10),
        utterance_end_ms: param("utterance_end_ms").and_then(|v| v.parse().ok()),
        interim_results: is_true("interim_results"),
        vad_events: is_true("vad_events"),
    };
    let model = param("model").unwrap_or("base").to_string();
    sim.stats.connections.fetch_add(1, Ordering::Relaxed);
    // Small buffers: hundreds of simulated streams in one benchmark process.
    upgrade
        .read_buffer_size(cmb_providers::WS_BUFFER)
        .write_buffer_size(cmb_providers::WS_BUFFER)
        .on_upgrade(move |socket| session(socket, sim, config, model))
}

/// A message to send once its latency has passed.
struct Outgoing {
    due: Instant,
    message: Message,
}

/// How a session ends.
enum End {
    /// Send this close frame after what is queued.
    Close(u16, &'static str),
    /// The client closed or went away.
    Gone,
    /// `disconnect_after`: drop the socket without a close frame (after what is queued).
    Drop,
}

async fn session(socket: WebSocket, sim: DeepgramSim, config: ListenConfig, model: String) {
    /// Counts the stream as open for as long as it runs, however it ends.
    struct Open(Arc<Stats>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
    sim.stats.open.fetch_add(1, Ordering::Relaxed);
    let _open = Open(sim.stats.clone());
    let request_id = uuid::Uuid::new_v4().to_string();
    let settings = &sim.settings;
    let (sink, mut source) = socket.split();
    let (out, out_rx) = mpsc::channel::<Outgoing>(64);
    let writer = tokio::spawn(write(sink, out_rx));
    let mut ear = Listener::new(
        config,
        &settings.script,
        &settings.default_utterance,
        settings.backchannel_ms,
    );
    let disconnect_at = settings
        .disconnect_after
        .map(|d| d.as_millis() as u64 * SAMPLES_PER_MS);
    let reply = |value: Value| Outgoing {
        due: Instant::now() + settings.latency,
        message: Message::Text(value.to_string().into()),
    };
    let mut billed = false;
    let mut bill = |ear: &Listener| {
        if !std::mem::replace(&mut billed, true) {
            sim.stats
                .billed_samples
                .fetch_add(ear.samples_received(), Ordering::Relaxed);
        }
    };

    // One idle timer for the stream, moved only when it fires early (a timer made and dropped
    // per message, 50 a second on each of hundreds of streams, costs the runtime more than
    // hearing the audio does).
    let mut last_heard = Instant::now();
    let idle_timeout = settings.idle_timeout;
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    let end = loop {
        let next = tokio::select! {
            next = source.next() => next,
            () = &mut idle => {
                let quiet_until = last_heard + idle_timeout;
                if Instant::now() >= quiet_until {
                    break End::Close(1011, "NET-0001");
                }
                idle.as_mut().reset(quiet_until);
                continue;
            }
        };
        let message = match next {
            None | Some(Err(_)) => break End::Gone,
            Some(Ok(message)) => message,
        };
        last_heard = Instant::now();
        let (heard, closing) = match message {
            Message::Binary(audio) => (ear.hear(&audio), false),
            Message::Text(text) => {
                let kind = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v.get("type")?.as_str().map(str::to_string));
                match kind.as_deref() {
                    Some("Finalize") => (ear.finalize(), false),
                    Some("CloseStream") => (ear.finalize(), true),
                    Some("KeepAlive") => {
                        sim.stats.keepalives.fetch_add(1, Ordering::Relaxed);
                        (Vec::new(), false)
                    }
                    // Anything we do not know is ignored, as Deepgram does.
                    _ => (Vec::new(), false),
                }
            }
            Message::Close(_) => break End::Gone,
            _ => (Vec::new(), false),
        };
        for h in heard {
            if out
                .send(reply(to_json(&h, &request_id, &model)))
                .await
                .is_err()
            {
                break;
            }
        }
        if closing {
            // Billed before Metadata goes out, so a client that saw it sees the total too.
            bill(&ear);
            let metadata = json!({
                "type": "Metadata",
                "transaction_key": "deprecated",
                "request_id": request_id,
                "sha256": "",
                "created": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "duration": round(ear.seconds_received()),
                "channels": 1,
                "models": [],
                "model_info": {},
            });
            let _ = out.send(reply(metadata)).await;
            break End::Close(1000, "");
        }
        if disconnect_at.is_some_and(|at| ear.samples_received() >= at) {
            break End::Drop;
        }
    };
    bill(&ear);
    match end {
        End::Close(code, reason) => {
            let close = Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            }));
            let _ = out
                .send(Outgoing {
                    due: Instant::now() + settings.latency,
                    message: close,
                })
                .await;
            drop(out);
            let _ = writer.await;
        }
        // Dropping both halves afterwards ends the TCP connection, with no close frame for
        // `Drop`: what the client sees when a network path dies.
        End::Gone | End::Drop => {
            drop(out);
            let _ = writer.await;
        }
    }
}

/// Sends each message when it is due, in order, until a close frame or a dead socket.
async fn write(mut sink: SplitSink<WebSocket, Message>, mut queue: mpsc::Receiver<Outgoing>) {
    while let Some(Outgoing { due, message }) = queue.recv().await {
        tokio::time::sleep_until(due).await;
        let closing = matches!(message, Message::Close(_));
        if sink.send(message).await.is_err() || closing {
            break;
        }
    }
}

/// Seconds, to the millisecond.
fn round(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

fn secs(samples: u64) -> f64 {
    round(samples as f64 / (SAMPLES_PER_MS * 1000) as f64)
}

fn to_json(heard: &Heard, request_id: &str, model: &str) -> Value {
    match heard {
        Heard::SpeechStarted { at } => {
            json!({ "type": "SpeechStarted", "channel": [0], "timestamp": secs(*at) })
        }
        Heard::UtteranceEnd { last_word_end } => {
            json!({ "type": "UtteranceEnd", "channel": [0, 1], "last_word_end": secs(*last_word_end) })
        }
        Heard::Transcript {
            text,
            words,
            is_final,
            speech_final,
            from_finalize,
            start,
            end,
        } => {
            let words: Vec<Value> = words
                .iter()
                .map(|w| {
                    let bare: String = w
                        .punctuated
                        .chars()
                        .filter(|c| c.is_alphanumeric() || *c == '\'' || *c == '-')
                        .collect::<String>()
                        .to_lowercase();
                    json!({
                        "word": bare,
                        "start": secs(w.start),
                        "end": secs(w.end),
                        "confidence": 0.98,
                        "punctuated_word": w.punctuated,
                    })
                })
                .collect();
            json!({
                "type": "Results",
                "channel_index": [0, 1],
                "duration": secs(end - start),
                "start": secs(*start),
                "is_final": is_final,
                "speech_final": speech_final,
                "from_finalize": from_finalize,
                "channel": { "alternatives": [{
                    "transcript": text,
                    "confidence": if text.is_empty() { 0.0 } else { 0.98 },
                    "words": words,
                }]},
                "metadata": {
                    "request_id": request_id,
                    "model_info": { "name": model, "version": "simulated", "arch": model },
                    "model_uuid": "00000000-0000-0000-0000-000000000000",
                },
            })
        }
    }
}
