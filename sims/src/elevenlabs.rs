//! ElevenLabs simulator: `GET /v1/voices/{voice_id}` over the premade voices, and text-to-speech
//! in 8 kHz μ-law over HTTP (`POST /v1/text-to-speech/{voice_id}[/stream]`), the stream-input
//! WebSocket and the multi-context one (`multi-stream-input`: contexts by `context_id`, at most
//! five open on a socket, as ElevenLabs allows). The "speech" is a voiced tone, each character
//! spoken for a time of its own (vowels longer, spaces shorter, punctuation a pause; about 55 ms
//! a character by default, deliberately not the 65 ms our product once assumed), produced in
//! 100 ms chunks faster than real time, with ElevenLabs' per-chunk character alignment, so that
//! durations, pacing, billing and what a caller heard of a cut reply can be checked.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::Faults;

mod audio;
mod multi;
#[cfg(test)]
use audio::audio_frame_open;
use audio::{audio_message, speak, spoken};
use multi::{multi_stream_input, next_json, refuse};

/// The base speech rate, milliseconds a character (`SIM_ELEVENLABS_TTS_MS_PER_CHAR`).
pub const DEFAULT_MS_PER_CHAR: f64 = 50.0;

/// How long the simulator speaks `c` at base rate `base` (ms a character).
pub fn char_ms(c: char, base: f64) -> u64 {
    let factor = match c.to_ascii_lowercase() {
        c if c.is_whitespace() => 0.6,
        ',' | ';' | ':' => 2.5,
        '.' | '!' | '?' => 3.5,
        'a' | 'e' | 'i' | 'o' | 'u' => 1.4,
        _ => 0.9,
    };
    (base * factor).round().max(1.0) as u64
}

/// Each character of `text` with its start and duration (ms) as the simulator speaks it.
pub fn timings(text: &str, base: f64) -> Vec<(char, u64, u64)> {
    let mut at = 0;
    text.chars()
        .map(|c| {
            let d = char_ms(c, base);
            at += d;
            (c, at - d, d)
        })
        .collect()
}

/// Milliseconds of speech for `text` at base rate `base`.
pub fn speech_ms(text: &str, base: f64) -> u64 {
    text.chars().map(|c| char_ms(c, base)).sum()
}
/// Audio per chunk (100 ms).
const CHUNK_SAMPLES: usize = 800;
const CHUNK_MS: u64 = 100;
/// Buffered characters that start a generation without a trigger.
const GENERATE_AT_CHARS: usize = 50;
/// ElevenLabs closes an idle stream-input socket after 20 s.
const INACTIVITY: Duration = Duration::from_secs(20);
const TONE_HZ: f64 = 220.0;

/// Speed and failures of speech synthesis.
#[derive(Debug, Clone)]
pub struct TtsSettings {
    /// Delay before the first audio of a synthesis.
    pub first_byte: Duration,
    /// How much faster than real time audio is produced.
    pub realtime_factor: f32,
    /// Every n-th synthesis (HTTP request or WebSocket) fails (0: never).
    pub fail_every: u64,
    /// The base speech rate, ms a character (see [`char_ms`]).
    pub ms_per_char: f64,
    /// A multi-context socket breaks (an error, then close 1011) after sending this many
    /// audio messages, mid-reply (0: never).
    pub break_after_chunks: u64,
}

impl Default for TtsSettings {
    fn default() -> Self {
        TtsSettings {
            first_byte: Duration::from_millis(120),
            realtime_factor: 4.0,
            fail_every: 0,
            ms_per_char: DEFAULT_MS_PER_CHAR,
            break_after_chunks: 0,
        }
    }
}

impl TtsSettings {
    /// `SIM_ELEVENLABS_TTS_FIRST_BYTE_MS` (120), `SIM_ELEVENLABS_TTS_SPEED` (4.0),
    /// `SIM_ELEVENLABS_TTS_FAIL_EVERY` (0), `SIM_ELEVENLABS_TTS_MS_PER_CHAR` (50),
    /// `SIM_ELEVENLABS_TTS_BREAK_AFTER_CHUNKS` (0).
    pub fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Self {
        let d = TtsSettings::default();
        TtsSettings {
            first_byte: get("SIM_ELEVENLABS_TTS_FIRST_BYTE_MS")
                .and_then(|v| v.trim().parse().ok())
                .map(Duration::from_millis)
                .unwrap_or(d.first_byte),
            realtime_factor: get("SIM_ELEVENLABS_TTS_SPEED")
                .and_then(|v| v.trim().parse::<f32>().ok())
                .filter(|f| *f > 0.0 && f.is_finite())
                .unwrap_or(d.realtime_factor),
            fail_every: get("SIM_ELEVENLABS_TTS_FAIL_EVERY")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(d.fail_every),
            ms_per_char: get("SIM_ELEVENLABS_TTS_MS_PER_CHAR")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|f| *f >= 1.0 && f.is_finite())
                .unwrap_or(d.ms_per_char),
            break_after_chunks: get("SIM_ELEVENLABS_TTS_BREAK_AFTER_CHUNKS")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(d.break_after_chunks),
        }
    }

    /// Time to produce one 100 ms chunk.
    fn chunk_time(&self) -> Duration {
        Duration::from_secs_f64(CHUNK_MS as f64 / 1000.0 / f64::from(self.realtime_factor))
    }
    /// How long the next chunk takes to come: the first byte's latency for a context's first
    /// chunk, then one chunk's production time.
    fn wait_for_chunk(&self, first: &mut bool) -> Duration {
        if std::mem::take(first) {
            self.first_byte
        } else {
            self.chunk_time()
        }
    }
}

/// ElevenLabs' premade voices (id, name, gender, accent).
pub const VOICES: &[(&str, &str, &str, &str)] = &[
    ("21m00Tcm4TlvDq8ikWAM", "Rachel", "female", "american"),
    ("AZnzlk1XvdvUeBnXmlld", "Domi", "female", "american"),
    ("EXAVITQu4vr4xnSDxMaL", "Sarah", "female", "american"),
    ("ErXwobaYiN019PkySvjV", "Antoni", "male", "american"),
    ("MF3mGyEYCl7XYWbV9V6O", "Elli", "female", "american"),
    ("TxGEqnHWrfWFTfGW9XjX", "Josh", "male", "american"),
    ("VR6AewLTigWG4xSOukaG", "Arnold", "male", "american"),
    ("pNInz6obpgDQGcFmaJgB", "Adam", "male", "american"),
    ("yoZ06aMxZJJ28mfd3POQ", "Sam", "male", "american"),
];

/// The simulator, with counters for tests.
#[derive(Clone)]
pub struct ElevenLabsSim {
    shared: Arc<Shared>,
}

struct Shared {
    faults: Faults,
    tts: TtsSettings,
    characters: AtomicU64,
    syntheses: AtomicU64,
    open_sockets: AtomicU64,
    sockets_opened: AtomicU64,
    contexts_opened: AtomicU64,
}

type Sim = ElevenLabsSim;

/// Voices, and text-to-speech with the default [`TtsSettings`].
pub fn router(faults: Faults) -> Router {
    ElevenLabsSim::new(faults, TtsSettings::default()).router()
}

impl ElevenLabsSim {
    pub fn new(faults: Faults, tts: TtsSettings) -> Self {
        ElevenLabsSim {
            shared: Arc::new(Shared {
                faults,
                tts,
                characters: AtomicU64::new(0),
                syntheses: AtomicU64::new(0),
                open_sockets: AtomicU64::new(0),
                sockets_opened: AtomicU64::new(0),
                contexts_opened: AtomicU64::new(0),
            }),
        }
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/voices/{voice_id}", get(voice))
            .route("/v1/text-to-speech/{voice_id}", post(synthesize))
            .route("/v1/text-to-speech/{voice_id}/stream", post(synthesize))
            .route(
                "/v1/text-to-speech/{voice_id}/stream-input",
                get(stream_input),
            )
            .route(
                "/v1/text-to-speech/{voice_id}/multi-stream-input",
                get(multi_stream_input),
            )
            .with_state(self.clone())
    }

    /// Characters billed so far (HTTP texts and WebSocket chunks, without the `" "` and `""`
    /// sentinels).
    pub fn characters_total(&self) -> u64 {
        self.shared.characters.load(Ordering::Relaxed)
    }

    /// Syntheses started (HTTP requests and WebSocket streams past their init), failed ones
    /// included.
    pub fn syntheses(&self) -> u64 {
        self.shared.syntheses.load(Ordering::Relaxed)
    }

    /// Counts one synthesis; says whether it must fail.
    fn next_synthesis_fails(&self) -> bool {
        let n = self.shared.syntheses.fetch_add(1, Ordering::Relaxed) + 1;
        let every = self.shared.tts.fail_every;
        every > 0 && n.is_multiple_of(every)
    }
}

fn detail(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({ "detail": { "status": code, "message": message } })),
    )
        .into_response()
}

async fn voice(State(sim): State<Sim>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if sim.shared.faults.apply().await {
        return detail(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "injected failure",
        );
    }
    let key = headers
        .get("xi-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if key.is_empty() {
        return detail(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "missing xi-api-key header",
        );
    }
    match VOICES.iter().find(|v| v.0 == id) {
        Some((voice_id, name, gender, accent)) => Json(json!({
            "voice_id": voice_id,
            "name": name,
            "category": "premade",
            "labels": { "gender": gender, "accent": accent },
            "description": null,
            "preview_url": format!("https://storage.googleapis.com/eleven-public-prod/premade/voices/{voice_id}/preview.mp3"),
            "samples": null,
            "settings": { "stability": 0.5, "similarity_boost": 0.75, "style": 0.0, "use_speaker_boost": true, "speed": 1.0 },
            "available_for_tiers": [],
        }))
        .into_response(),
        None => detail(
            StatusCode::BAD_REQUEST,
            "voice_not_found",
            &format!("A voice with the voice_id {id} was not found."),
        ),
    }
}

fn api_key(headers: &HeaderMap) -> &str {
    headers
        .get("xi-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[derive(serde::Deserialize)]
struct SpeechParams {
    output_format: Option<String>,
}

async fn synthesize(
    State(sim): State<Sim>,
    headers: HeaderMap,
    Path(voice_id): Path<String>,
    Query(params): Query<SpeechParams>,
    body: Bytes,
) -> Response {
    if api_key(&headers).is_empty() {
        return detail(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "missing xi-api-key header",
        );
    }
    if let Err((error, message)) = check_voice(&voice_id, params.output_format.as_deref()) {
        return detail(StatusCode::BAD_REQUEST, error, &message);
    }
    let text = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("text").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_default();
    if text.trim().is_empty() {
        return detail(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_text",
            "text must not be empty",
        );
    }
    if sim.next_synthesis_fails() {
        return detail(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_server_error",
            "injected failure",
        );
    }
    let characters = text.chars().count() as u64;
    sim.shared
        .characters
        .fetch_add(characters, Ordering::Relaxed);
    let tts = sim.shared.tts.clone();
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        tokio::time::sleep(tts.first_byte).await;
        let mut sample = 0;
        for (i, chunk) in speak(&text, &mut sample, tts.ms_per_char)
            .into_iter()
            .enumerate()
        {
            if i > 0 {
                tokio::time::sleep(tts.chunk_time()).await;
            }
            if tx.send(Bytes::from(chunk.audio)).await.is_err() {
                return;
            }
        }
    });
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    }));
    (
        [
            (header::CONTENT_TYPE, "audio/basic".to_string()),
            (
                header::HeaderName::from_static("character-cost"),
                characters.to_string(),
            ),
            (
                header::HeaderName::from_static("request-id"),
                uuid::Uuid::new_v4().simple().to_string(),
            ),
        ],
        body,
    )
        .into_response()
}

/// The voice exists and the audio asked for is the one this simulator makes: `Err((error
/// code, message))` as ElevenLabs words them otherwise.
pub(super) fn check_voice(
    voice_id: &str,
    output_format: Option<&str>,
) -> Result<(), (&'static str, String)> {
    if !VOICES.iter().any(|v| v.0 == voice_id) {
        let message = format!("A voice with the voice_id {voice_id} was not found.");
        return Err(("voice_not_found", message));
    }
    if output_format.is_some_and(|f| f != "ulaw_8000") {
        let message = "this simulator only produces ulaw_8000".to_string();
        return Err(("invalid_output_format", message));
    }
    Ok(())
}

async fn stream_input(
    State(sim): State<Sim>,
    headers: HeaderMap,
    Path(voice_id): Path<String>,
    Query(params): Query<SpeechParams>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let key = api_key(&headers).to_string();
    upgrade_counted(upgrade, sim, move |sim, socket| async move {
        run_stream_input(&sim, socket, key, voice_id, params).await
    })
}

/// Upgrades to a WebSocket with small buffers (hundreds of simulated voices in one benchmark
/// process) and runs `session` on it, counting the socket while it is open.
pub(super) fn upgrade_counted<F, Fut>(upgrade: WebSocketUpgrade, sim: Sim, session: F) -> Response
where
    F: FnOnce(Sim, WebSocket) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let upgrade = upgrade
        .read_buffer_size(cmb_providers::WS_BUFFER)
        .write_buffer_size(cmb_providers::WS_BUFFER);
    upgrade.on_upgrade(move |socket| async move {
        let shared = sim.shared.clone();
        shared.open_sockets.fetch_add(1, Ordering::Relaxed);
        shared.sockets_opened.fetch_add(1, Ordering::Relaxed);
        session(sim, socket).await;
        shared.open_sockets.fetch_sub(1, Ordering::Relaxed);
    })
}

async fn run_stream_input(
    sim: &Sim,
    mut socket: WebSocket,
    header_key: String,
    voice_id: String,
    params: SpeechParams,
) {
    let Some(init) = next_json(&mut socket).await else {
        return;
    };
    if init.get("text").and_then(Value::as_str) != Some(" ") {
        return refuse(
            &mut socket,
            1008,
            "invalid_request",
            "the first message must have text \" \"",
        )
        .await;
    }
    let key_in_message = ["xi_api_key", "xi-api-key"].iter().any(|k| {
        init.get(*k)
            .and_then(Value::as_str)
            .is_some_and(|v| !v.is_empty())
    });
    if header_key.is_empty() && !key_in_message {
        return refuse(&mut socket, 1008, "invalid_api_key", "no xi-api-key given").await;
    }
    if let Err((error, message)) = check_voice(&voice_id, params.output_format.as_deref()) {
        return refuse(&mut socket, 1008, error, &message).await;
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
    let tts = sim.shared.tts.clone();
    let mut buffer = String::new();
    let mut sample: u64 = 0;
    let mut first = true;
    loop {
        let Some(message) = next_json(&mut socket).await else {
            return;
        };
        let text = message.get("text").and_then(Value::as_str).unwrap_or(" ");
        let last = text.is_empty();
        if text != " " && !last {
            sim.shared
                .characters
                .fetch_add(text.chars().count() as u64, Ordering::Relaxed);
            buffer.push_str(text);
        }
        let triggered = ["try_trigger_generation", "flush"]
            .iter()
            .any(|k| message.get(*k).and_then(Value::as_bool) == Some(true));
        if (last || triggered || buffer.chars().count() >= GENERATE_AT_CHARS)
            && !buffer.trim().is_empty()
        {
            let speech = spoken(&std::mem::take(&mut buffer), &mut sample, tts.ms_per_char);
            for frame in &speech.frames {
                tokio::time::sleep(tts.wait_for_chunk(&mut first)).await;
                if socket
                    .send(audio_message(frame, "isFinal", "false"))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        if last {
            let _ = socket
                .send(Message::Text(json!({ "isFinal": true }).to_string().into()))
                .await;
            let _ = socket.send(Message::Close(None)).await;
            return;
        }
    }
}

#[cfg(test)]
mod tests;
