//! ElevenLabs: voice lookup (`GET /v1/voices/{voice_id}`, header `xi-api-key`) and
//! text-to-speech in 8 kHz μ-law, the format Twilio plays: over the stream-input WebSocket for
//! a reply being written (one socket per call, a context per reply: [`TtsSession`]; or the
//! single-context socket, [`ElevenLabs::stream_tts`]), or one HTTP request for a whole text.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::ProviderError;

mod session;

pub use session::{TtsContext, TtsSession};

pub const DEFAULT_BASE_URL: &str = "https://api.elevenlabs.io";
const PROVIDER: &str = "ElevenLabs";

#[derive(Clone)]
pub struct ElevenLabs {
    http: reqwest::Client,
    base_url: String,
    api_key: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Voice {
    pub voice_id: String,
    pub name: String,
    #[serde(default)]
    pub category: Option<String>,
}

impl ElevenLabs {
    pub fn new(http: reqwest::Client, base_url: &str, api_key: &str) -> Self {
        ElevenLabs {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The voice, or `None` when ElevenLabs says there is no such voice (it answers 400 or
    /// 404 with `voice_not_found`). Retries once on a 5xx or a timeout.
    pub async fn voice(&self, voice_id: &str) -> Result<Option<Voice>, ProviderError> {
        let url = format!("{}/v1/voices/{voice_id}", self.base_url);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let sent = self
                .http
                .get(&url)
                .header("xi-api-key", &self.api_key)
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            let response = match sent {
                Ok(r) => r,
                Err(e) if attempt < 2 => {
                    tracing::debug!(error = %e, "ElevenLabs voice lookup failed; retrying");
                    continue;
                }
                Err(e) => {
                    return Err(ProviderError::Unreachable {
                        provider: PROVIDER,
                        detail: e.to_string(),
                    })
                }
            };
            let status = response.status();
            if status.is_success() {
                return response.json::<Voice>().await.map(Some).map_err(|e| {
                    ProviderError::Unreachable {
                        provider: PROVIDER,
                        detail: format!("unreadable voice: {e}"),
                    }
                });
            }
            let body = response.text().await.unwrap_or_default();
            if (status == 400 || status == 404) && body.contains("voice_not_found") {
                return Ok(None);
            }
            if status == 404 {
                return Ok(None);
            }
            if status.is_server_error() && attempt < 2 {
                continue;
            }
            return Err(ProviderError::Status {
                provider: PROVIDER,
                status: status.as_u16(),
                detail: body.chars().take(300).collect(),
            });
        }
    }
}

/// Text chunks queued towards the socket.
const TEXT_CHANNEL: usize = 32;
/// Audio messages buffered towards the consumer.
const AUDIO_CHANNEL: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A live text-to-speech stream. Send text on `text` (a sentence or a phrase at a time); drop
/// `text` to end the input; audio arrives on `audio`, ending with [`TtsAudio::Final`] or
/// [`TtsAudio::Error`]. Dropping `audio` (or the whole stream) closes the socket at once.
pub struct TtsStream {
    pub text: mpsc::Sender<String>,
    pub audio: mpsc::Receiver<TtsAudio>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TtsAudio {
    /// Raw 8 kHz μ-law, and the characters spoken in it.
    Chunk(bytes::Bytes, Alignment),
    /// All the text sent has been spoken.
    Final,
    /// The stream failed (error frame, or the socket closed early); nothing follows.
    Error(String),
}

/// ElevenLabs' `alignment` of one audio chunk: each character that starts in it, with its
/// start and duration in milliseconds from the chunk's start (empty when none came).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Alignment {
    pub chars: Vec<String>,
    pub starts_ms: Vec<u64>,
    pub durations_ms: Vec<u64>,
}

impl Alignment {
    /// `alignment` (the text as sent) of an audio message, else `normalizedAlignment`; an
    /// entry whose arrays disagree in length is ignored.
    fn of(message: &Value) -> Alignment {
        let numbers = |a: &Value, key: &str| -> Vec<u64> {
            a.get(key)
                .and_then(Value::as_array)
                .map(|v| {
                    v.iter()
                        .map(|n| n.as_f64().unwrap_or(0.0).max(0.0) as u64)
                        .collect()
                })
                .unwrap_or_default()
        };
        ["alignment", "normalizedAlignment"]
            .iter()
            .filter_map(|key| message.get(*key).filter(|a| a.is_object()))
            .map(|a| Alignment {
                chars: a
                    .get("chars")
                    .and_then(Value::as_array)
                    .map(|v| {
                        v.iter()
                            .map(|c| c.as_str().unwrap_or_default().to_string())
                            .collect()
                    })
                    .unwrap_or_default(),
                starts_ms: numbers(a, "charStartTimesMs"),
                durations_ms: numbers(a, "charDurationsMs"),
            })
            .find(|a| {
                !a.chars.is_empty()
                    && a.chars.len() == a.starts_ms.len()
                    && a.chars.len() == a.durations_ms.len()
            })
            .unwrap_or_default()
    }
}

/// Characters ElevenLabs bills for one text chunk as this client sends it (the chunk with a
/// trailing space added when it has none). The init `" "` and the closing `""` are not billed.
pub fn billed_characters(text: &str) -> u64 {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return 0;
    }
    chunk_text(text).chars().count() as u64
}

/// ElevenLabs wants every chunk to end with a space.
fn chunk_text(text: &str) -> String {
    if text.ends_with(' ') {
        text.to_string()
    } else {
        format!("{text} ")
    }
}

/// The `detail.message` (or `message`) of an ElevenLabs error body, else the body (shortened).
fn error_detail(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/detail/message")
                .or_else(|| v.get("message"))
                .or_else(|| v.get("detail"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| body.chars().take(300).collect())
}

impl ElevenLabs {
    /// Opens `…/v1/text-to-speech/{voice_id}/stream-input` (`ws://` for an `http://` base URL)
    /// and sends the init message. Each text chunk is sent with `try_trigger_generation`, or
    /// `flush` when it ends a sentence; dropping `text` sends `{"text":""}`.
    pub async fn stream_tts(
        &self,
        voice_id: &str,
        model_id: &str,
    ) -> Result<TtsStream, ProviderError> {
        let mut socket = self
            .open_socket(
                voice_id,
                "stream-input",
                &format!("model_id={model_id}&output_format=ulaw_8000"),
            )
            .await?;
        let init = json!({
            "text": " ",
            "voice_settings": { "stability": 0.5, "similarity_boost": 0.8 },
            "generation_config": { "chunk_length_schedule": [50, 90, 120, 150] },
        });
        socket
            .send(Message::text(init.to_string()))
            .await
            .map_err(|e| ProviderError::Unreachable {
                provider: PROVIDER,
                detail: format!("TTS init failed: {e}"),
            })?;

        let (text_tx, text_rx) = mpsc::channel(TEXT_CHANNEL);
        let (audio_tx, audio_rx) = mpsc::channel(AUDIO_CHANNEL);
        tokio::spawn(run_tts_socket(socket, text_rx, audio_tx));
        Ok(TtsStream {
            text: text_tx,
            audio: audio_rx,
        })
    }

    /// A text-to-speech WebSocket: `…/v1/text-to-speech/{voice_id}/{endpoint}?{query}`
    /// (`ws://` for an `http://` base URL), the key in `xi-api-key`.
    async fn open_socket(
        &self,
        voice_id: &str,
        endpoint: &str,
        query: &str,
    ) -> Result<Socket, ProviderError> {
        let ws_base = match self.base_url.split_once("://") {
            Some(("https", rest)) => format!("wss://{rest}"),
            Some(("http", rest)) => format!("ws://{rest}"),
            _ => self.base_url.clone(),
        };
        let url = format!("{ws_base}/v1/text-to-speech/{voice_id}/{endpoint}?{query}");
        let unreachable = |detail: String| ProviderError::Unreachable {
            provider: PROVIDER,
            detail,
        };
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| unreachable(format!("bad TTS URL: {e}")))?;
        let key = HeaderValue::from_str(&self.api_key)
            .map_err(|_| unreachable("the API key is not a valid header value".into()))?;
        request.headers_mut().insert("xi-api-key", key);
        let connected = tokio::time::timeout(
            CONNECT_TIMEOUT,
            // Small buffers, bounded messages, no Nagle delay on 20 ms frames.
            tokio_tungstenite::connect_async_with_config(
                request,
                Some(crate::ws_config(1 << 20)),
                true,
            ),
        )
        .await
        .map_err(|_| unreachable("TTS WebSocket connect timed out".into()))?;
        let (socket, _) = connected.map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(response) => {
                let body = response
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).to_string())
                    .unwrap_or_default();
                ProviderError::Status {
                    provider: PROVIDER,
                    status: response.status().as_u16(),
                    detail: error_detail(&body),
                }
            }
            other => unreachable(other.to_string()),
        })?;
        Ok(socket)
    }

    /// One whole text as 8 kHz μ-law (`POST /v1/text-to-speech/{voice_id}?output_format=ulaw_8000`).
    /// Anything but a 2xx with an `audio/*` body is an error — an error body is never audio.
    pub async fn synthesize(
        &self,
        voice_id: &str,
        model_id: &str,
        text: &str,
    ) -> Result<bytes::Bytes, ProviderError> {
        let url = format!(
            "{}/v1/text-to-speech/{voice_id}?output_format=ulaw_8000",
            self.base_url
        );
        let unreachable = |detail: String| ProviderError::Unreachable {
            provider: PROVIDER,
            detail,
        };
        let response = self
            .http
            .post(&url)
            .header("xi-api-key", &self.api_key)
            .header("accept", "audio/basic")
            .json(&json!({ "text": text, "model_id": model_id }))
            .send()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(ProviderError::Status {
                provider: PROVIDER,
                status: status.as_u16(),
                detail: error_detail(&body),
            });
        }
        if !content_type.starts_with("audio/") {
            // A 2xx that is not audio (a proxy's page, an error in JSON): unusable, and possibly
            // transient, so reported as if the provider could not be reached.
            let body = response.text().await.unwrap_or_default();
            return Err(unreachable(format!(
                "answered {status} with {content_type:?}, not audio: {}",
                error_detail(&body)
            )));
        }
        response
            .bytes()
            .await
            .map_err(|e| unreachable(format!("audio broke off: {e}")))
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Pumps text to the socket and audio from it until the final message, an error, or the
/// consumer dropping `audio` (then the socket is closed without waiting for anything).
async fn run_tts_socket(
    mut socket: Socket,
    mut text_rx: mpsc::Receiver<String>,
    audio_tx: mpsc::Sender<TtsAudio>,
) {
    let mut input_open = true;
    loop {
        tokio::select! {
            _ = audio_tx.closed() => break,
            text = text_rx.recv(), if input_open => {
                let message = match text {
                    Some(t) if t.trim().is_empty() => continue,
                    Some(t) => {
                        let sentence_end = t.trim_end().ends_with(['.', '!', '?']);
                        let trigger = if sentence_end { "flush" } else { "try_trigger_generation" };
                        json!({ "text": chunk_text(&t), trigger: true })
                    }
                    None => {
                        input_open = false;
                        json!({ "text": "" })
                    }
                };
                if let Err(e) = socket.send(Message::text(message.to_string())).await {
                    let _ = audio_tx.send(TtsAudio::Error(format!("TTS send failed: {e}"))).await;
                    break;
                }
            }
            incoming = socket.next() => {
                let text = match incoming {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(frame))) => {
                        let why = frame.map(|f| format!("{} {}", f.code, f.reason)).unwrap_or_default();
                        let _ = audio_tx.send(TtsAudio::Error(format!("TTS socket closed before the end {why}"))).await;
                        break;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        let _ = audio_tx.send(TtsAudio::Error(format!("TTS socket failed: {e}"))).await;
                        break;
                    }
                    None => {
                        let _ = audio_tx.send(TtsAudio::Error("TTS socket closed before the end".into())).await;
                        break;
                    }
                };
                let Ok(value) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                if let Some(audio) = value.get("audio").and_then(Value::as_str).filter(|a| !a.is_empty()) {
                    match BASE64.decode(audio) {
                        Ok(bytes) => {
                            let alignment = Alignment::of(&value);
                            if audio_tx.send(TtsAudio::Chunk(bytes.into(), alignment)).await.is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            let _ = audio_tx.send(TtsAudio::Error(format!("undecodable audio: {e}"))).await;
                            break;
                        }
                    }
                }
                if value.get("isFinal").and_then(Value::as_bool) == Some(true) {
                    let _ = audio_tx.send(TtsAudio::Final).await;
                    break;
                }
                if value.get("audio").is_none() && (value.get("error").is_some() || value.get("message").is_some()) {
                    let message = value.get("message").and_then(Value::as_str)
                        .or_else(|| value.get("error").and_then(Value::as_str))
                        .unwrap_or("TTS error").to_string();
                    let _ = audio_tx.send(TtsAudio::Error(message)).await;
                    break;
                }
            }
        }
    }
    // Best effort, bounded: a barge-in must not wait on a slow peer.
    let _ = tokio::time::timeout(Duration::from_millis(200), socket.close(None)).await;
}
