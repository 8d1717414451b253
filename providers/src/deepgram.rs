//! Deepgram live speech-to-text (`/v1/listen` over a WebSocket, Deepgram's streaming API): raw 8 kHz
//! μ-law in, transcripts out. A background task owns the socket so callers only see two
//! channels: audio they push, events they read.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::json::{First, IfObject};
use crate::ProviderError;

mod live;

pub const DEFAULT_BASE_URL: &str = "https://api.deepgram.com";

const PROVIDER: &str = "deepgram";
/// Deepgram closes a socket that sent nothing for 10 s; we keep it alive well before that.
const KEEPALIVE_AFTER: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long we wait for the final Metadata after CloseStream before giving up on the socket.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// 50 frames of 20 ms: one second of Twilio audio in flight at most.
const AUDIO_BUFFER: usize = 50;
const EVENT_BUFFER: usize = 64;
/// μ-law at 8 kHz, mono: one byte per sample.
const BYTES_PER_SECOND: f64 = 8000.0;

/// What we ask Deepgram for, besides the fixed audio format (μ-law, 8 kHz, mono).
#[derive(Debug, Clone)]
pub struct SttOptions {
    /// For example `nova-2`.
    pub model: String,
    /// For example `en`.
    pub language: String,
    /// Silence after speech that ends an utterance (`speech_final`).
    pub endpointing_ms: u32,
    /// Gap in words after which Deepgram sends `UtteranceEnd`.
    pub utterance_end_ms: u32,
}

impl Default for SttOptions {
    fn default() -> Self {
        SttOptions {
            model: "nova-2".into(),
            language: "en".into(),
            endpointing_ms: 300,
            utterance_end_ms: 1000,
        }
    }
}

/// A client of Deepgram's live transcription.
#[derive(Clone)]
pub struct Deepgram {
    /// `ws://` or `wss://` plus host (and any path prefix), without a trailing slash.
    ws_base: String,
    api_key: String,
}

/// One open transcription stream.
pub struct SttStream {
    /// Raw μ-law 8 kHz audio (Twilio's 160-byte frames) to send as binary messages. Dropping it
    /// sends `{"type":"CloseStream"}` and the stream ends after the final Metadata.
    pub audio: mpsc::Sender<Bytes>,
    pub events: mpsc::Receiver<SttEvent>,
}

/// What Deepgram tells us. Times are seconds of audio since the stream began.
#[derive(Debug, Clone, PartialEq)]
pub enum SttEvent {
    SpeechStarted {
        timestamp: f64,
    },
    /// A `Results` message with a non-empty transcript.
    Transcript {
        text: String,
        is_final: bool,
        speech_final: bool,
        start: f64,
        duration: f64,
    },
    UtteranceEnd {
        last_word_end: f64,
    },
    /// The last event. `billed_secs` is the final Metadata's `duration` (seconds of audio
    /// Deepgram bills); when the socket ended without one, the seconds of audio we sent.
    Closed {
        billed_secs: f64,
    },
    Error(String),
}

impl Deepgram {
    /// `base_url` is the HTTP(S) address (`https://api.deepgram.com` or a simulator); the
    /// WebSocket address is the same host with `wss`/`ws`.
    pub fn new(base_url: &str, api_key: &str) -> Self {
        let base = base_url.trim().trim_end_matches('/');
        let ws_base = if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            base.to_string()
        };
        Deepgram {
            ws_base,
            api_key: api_key.to_string(),
        }
    }

    /// The `/v1/listen` address for these options.
    fn listen_url(&self, opts: &SttOptions) -> String {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("encoding", "mulaw")
            .append_pair("sample_rate", "8000")
            .append_pair("channels", "1")
            .append_pair("interim_results", "true")
            .append_pair("punctuate", "true")
            .append_pair("smart_format", "true")
            .append_pair("vad_events", "true")
            .append_pair("endpointing", &opts.endpointing_ms.to_string())
            .append_pair("utterance_end_ms", &opts.utterance_end_ms.to_string())
            .append_pair("model", &opts.model)
            .append_pair("language", &opts.language)
            .finish();
        format!("{}/v1/listen?{query}", self.ws_base)
    }

    /// Opens a stream (up to three attempts while the error is retryable). A refused
    /// handshake is a `Status` error (401 for a bad key, 5xx retryable); anything that kept us
    /// from a handshake is `Unreachable`. Once open, the stream outlives its socket: should
    /// Deepgram drop it mid-call, a new one is opened (with backoff) and the last seconds of
    /// audio not yet transcribed are sent again (see `live`).
    pub async fn connect(&self, opts: &SttOptions) -> Result<SttStream, ProviderError> {
        let mut attempt = 0;
        let socket = loop {
            attempt += 1;
            match self.open(opts).await {
                Ok(socket) => break socket,
                Err(e) if e.retryable() && attempt < 3 => {
                    tracing::warn!(error = %e, attempt, "Deepgram refused the stream; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let (audio_tx, audio_rx) = mpsc::channel(AUDIO_BUFFER);
        let (events_tx, events_rx) = mpsc::channel(EVENT_BUFFER);
        tokio::spawn(live::supervise(
            self.clone(),
            opts.clone(),
            socket,
            audio_rx,
            events_tx,
        ));
        Ok(SttStream {
            audio: audio_tx,
            events: events_rx,
        })
    }

    /// One WebSocket to `/v1/listen`.
    async fn open(&self, opts: &SttOptions) -> Result<Socket, ProviderError> {
        let unreachable = |detail: String| ProviderError::Unreachable {
            provider: PROVIDER,
            detail,
        };
        let mut request = self
            .listen_url(opts)
            .into_client_request()
            .map_err(|e| unreachable(format!("invalid address: {e}")))?;
        let auth = HeaderValue::from_str(&format!("Token {}", self.api_key))
            .map_err(|_| unreachable("the API key is not a valid header value".into()))?;
        request.headers_mut().insert("Authorization", auth);

        let connected = tokio::time::timeout(
            CONNECT_TIMEOUT,
            // Small buffers, bounded messages, no Nagle delay on 20 ms frames.
            tokio_tungstenite::connect_async_with_config(
                request,
                Some(crate::ws_config(64 * 1024)),
                true,
            ),
        )
        .await
        .map_err(|_| unreachable("timed out opening the WebSocket".into()))?;
        let (socket, _) = connected.map_err(|e| match e {
            WsError::Http(response) => {
                let header = response
                    .headers()
                    .get("dg-error")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let body = response
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned());
                ProviderError::Status {
                    provider: PROVIDER,
                    status: response.status().as_u16(),
                    detail: header.or(body).unwrap_or_default(),
                }
            }
            other => unreachable(other.to_string()),
        })?;
        Ok(socket)
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How one socket ended.
struct Ended {
    /// `Ok(Some(secs))`: the final Metadata came; `Ok(None)`: closed cleanly after
    /// CloseStream; `Err`: the socket failed.
    outcome: Result<Option<f64>, String>,
    /// Seconds of audio sent on it.
    sent_secs: f64,
    /// Our side had finished (the audio channel closed) before it ended.
    input_closed: bool,
}

/// Audio frames written with one flush at most, when they queued up while the socket's task
/// waited for a core.
const BATCH_FRAMES: usize = 16;

/// Runs one socket: `replay` first, then the audio as it comes (each frame also kept in
/// `recent`), events to `events`, until the stream ends the way the protocol says or fails.
async fn run(
    socket: Socket,
    audio: &mut mpsc::Receiver<Bytes>,
    events: &mpsc::Sender<SttEvent>,
    recent: &mut live::Recent,
    replay: Vec<Bytes>,
) -> Ended {
    let (mut sink, mut source) = socket.split();
    let mut audio_open = true;
    let mut sent_bytes: u64 = 0;
    let mut last_sent = Instant::now();
    let mut close_deadline: Option<Instant> = None;
    let text = |s: &'static str| Message::Text(s.into());
    // One timer, armed once per KeepAlive period rather than per audio frame: when it fires
    // and audio went out since, it is pushed back to `last_sent + KEEPALIVE_AFTER`.
    let keepalive = tokio::time::sleep(KEEPALIVE_AFTER);
    tokio::pin!(keepalive);
    // Armed once CloseStream is sent (a timer made in the loop would be one per frame).
    let closing = tokio::time::sleep(CLOSE_TIMEOUT);
    tokio::pin!(closing);
    recent.connection_starts(replay.iter().map(|f| f.len() as u64).sum());
    for frame in replay {
        sent_bytes += frame.len() as u64;
        if let Err(e) = sink.feed(Message::Binary(frame)).await {
            return Ended {
                outcome: Err(format!("replaying audio failed: {e}")),
                sent_secs: sent_bytes as f64 / BYTES_PER_SECOND,
                input_closed: false,
            };
        }
    }
    if let Err(e) = sink.flush().await {
        return Ended {
            outcome: Err(format!("replaying audio failed: {e}")),
            sent_secs: sent_bytes as f64 / BYTES_PER_SECOND,
            input_closed: false,
        };
    }
    let outcome: Result<Option<f64>, String> = loop {
        tokio::select! {
            frame = audio.recv(), if audio_open => match frame {
                // A zero-length binary frame makes Deepgram close the socket.
                Some(frame) if frame.is_empty() => {}
                Some(frame) => {
                    // The frames queued meanwhile (this task ran late) go in the same write:
                    // one flush for all of them, none held back for a later one.
                    let mut next = Some(frame);
                    let mut fed = 0;
                    let mut failed = None;
                    while let Some(frame) = next.take() {
                        if !frame.is_empty() {
                            sent_bytes += frame.len() as u64;
                            recent.push(frame.clone());
                            if let Err(e) = sink.feed(Message::Binary(frame)).await {
                                failed = Some(e);
                                break;
                            }
                        }
                        fed += 1;
                        if fed < BATCH_FRAMES {
                            next = audio.try_recv().ok();
                        }
                    }
                    if let Some(e) = failed {
                        break Err(format!("sending audio failed: {e}"));
                    }
                    if let Err(e) = sink.flush().await {
                        break Err(format!("sending audio failed: {e}"));
                    }
                    last_sent = Instant::now();
                }
                None => {
                    audio_open = false;
                    close_deadline = Some(Instant::now() + CLOSE_TIMEOUT);
                    closing.as_mut().reset(Instant::now() + CLOSE_TIMEOUT);
                    if let Err(e) = sink.send(text(r#"{"type":"CloseStream"}"#)).await {
                        break Err(format!("sending CloseStream failed: {e}"));
                    }
                }
            },
            _ = &mut keepalive, if audio_open => {
                let due = last_sent + KEEPALIVE_AFTER;
                if Instant::now() < due {
                    keepalive.as_mut().reset(due);
                    continue;
                }
                if let Err(e) = sink.send(text(r#"{"type":"KeepAlive"}"#)).await {
                    break Err(format!("sending KeepAlive failed: {e}"));
                }
                last_sent = Instant::now();
                keepalive.as_mut().reset(last_sent + KEEPALIVE_AFTER);
            }
            _ = &mut closing, if close_deadline.is_some() => {
                break Err("no Metadata after CloseStream".into());
            }
            message = source.next() => match message {
                Some(Ok(Message::Text(body))) => match parse_message(&body) {
                    Some(Incoming::Event(event)) => {
                        if let SttEvent::Transcript { is_final: true, start, duration, .. } = &event {
                            recent.transcribed_until(start + duration);
                        }
                        // A reader that went away does not stop us closing the stream properly.
                        let _ = events.send(event).await;
                    }
                    Some(Incoming::Metadata { duration }) => break Ok(Some(duration)),
                    None => tracing::debug!(message = %body, "ignored a Deepgram message"),
                },
                Some(Ok(Message::Close(frame))) => {
                    let normal = frame.as_ref().is_none_or(|f| f.code == CloseCode::Normal);
                    if close_deadline.is_some() && normal {
                        break Ok(None);
                    }
                    break Err(match frame {
                        Some(f) => format!("Deepgram closed the stream: {} {}", u16::from(f.code), f.reason),
                        None => "Deepgram closed the stream".into(),
                    });
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break Err(format!("the stream broke: {e}")),
                None => break Err("the stream ended without a close".into()),
            },
        }
    };
    // Best effort: answer or start the closing handshake, but never hang on a dead peer.
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    Ended {
        outcome,
        sent_secs: sent_bytes as f64 / BYTES_PER_SECOND,
        input_closed: !audio_open,
    }
}

/// A server message we act on.
#[derive(Debug, Clone, PartialEq)]
enum Incoming {
    Event(SttEvent),
    Metadata { duration: f64 },
}

/// A Deepgram server message, only the fields we use, read in one pass borrowed from the text
/// (a transcript with escapes in it is the one thing copied). Numbers and flags may be missing
/// or `null` (read as 0 and false).
#[derive(Deserialize)]
struct ServerMessage<'a> {
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
    #[serde(default)]
    is_final: Option<bool>,
    #[serde(default)]
    speech_final: Option<bool>,
    #[serde(default)]
    start: Option<f64>,
    #[serde(default)]
    duration: Option<f64>,
    #[serde(default)]
    timestamp: Option<f64>,
    #[serde(default)]
    last_word_end: Option<f64>,
    /// An object in `Results`, an array of channel indexes elsewhere.
    #[serde(borrow, default)]
    channel: IfObject<Channel<'a>>,
    #[serde(borrow, default)]
    description: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    message: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    variant: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Channel<'a> {
    #[serde(borrow, default)]
    alternatives: First<Alternative<'a>>,
}

#[derive(Deserialize)]
struct Alternative<'a> {
    #[serde(borrow)]
    transcript: Cow<'a, str>,
}

/// Reads one server message; `None` for anything we do not use (including empty transcripts
/// and malformed JSON).
fn parse_message(body: &str) -> Option<Incoming> {
    let message: ServerMessage = serde_json::from_str(body).ok()?;
    let number = |n: Option<f64>| n.unwrap_or(0.0);
    let event = match message.kind.as_ref() {
        "Results" => {
            let alternative = message.channel.0?.alternatives.0?;
            let text = alternative.transcript.trim();
            if text.is_empty() {
                return None;
            }
            let is_final = message.is_final.unwrap_or(false);
            SttEvent::Transcript {
                text: text.to_string(),
                is_final,
                // Only ever true on a final result.
                speech_final: is_final && message.speech_final.unwrap_or(false),
                start: number(message.start),
                duration: number(message.duration),
            }
        }
        "SpeechStarted" => SttEvent::SpeechStarted {
            timestamp: number(message.timestamp),
        },
        "UtteranceEnd" => SttEvent::UtteranceEnd {
            last_word_end: number(message.last_word_end),
        },
        "Metadata" => {
            return Some(Incoming::Metadata {
                duration: number(message.duration),
            })
        }
        "Error" => {
            let described = [message.description, message.message, message.variant]
                .into_iter()
                .flatten()
                .find(|s| !s.is_empty());
            SttEvent::Error(format!(
                "Deepgram: {}",
                described.as_deref().unwrap_or("unknown error")
            ))
        }
        _ => return None,
    };
    Some(Incoming::Event(event))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_address_follows_the_http_one() {
        let opts = SttOptions {
            model: "nova-2".into(),
            language: "en".into(),
            endpointing_ms: 300,
            utterance_end_ms: 1000,
        };
        let url = Deepgram::new(DEFAULT_BASE_URL, "k").listen_url(&opts);
        assert!(url.starts_with("wss://api.deepgram.com/v1/listen?encoding=mulaw&sample_rate=8000&channels=1&interim_results=true"));
        assert!(url.contains("&endpointing=300&utterance_end_ms=1000&model=nova-2&language=en"));
        let local = Deepgram::new("http://127.0.0.1:9/", "k").listen_url(&opts);
        assert!(local.starts_with("ws://127.0.0.1:9/v1/listen?"));
    }

    #[test]
    fn parses_server_messages() {
        let results = r#"{"type":"Results","channel_index":[0,1],"duration":1.02,"start":3.5,
            "is_final":true,"speech_final":true,"channel":{"alternatives":[{"transcript":"hello there","confidence":0.99}]},
            "metadata":{"request_id":"x"}}"#;
        assert_eq!(
            parse_message(results),
            Some(Incoming::Event(SttEvent::Transcript {
                text: "hello there".into(),
                is_final: true,
                speech_final: true,
                start: 3.5,
                duration: 1.02
            }))
        );
        // speech_final may be missing; it defaults to false.
        let interim = r#"{"type":"Results","start":0,"duration":0.5,"is_final":false,
            "channel":{"alternatives":[{"transcript":"hel"}]}}"#;
        assert!(matches!(
            parse_message(interim),
            Some(Incoming::Event(SttEvent::Transcript {
                is_final: false,
                speech_final: false,
                ..
            }))
        ));
        let silence =
            r#"{"type":"Results","is_final":true,"channel":{"alternatives":[{"transcript":""}]}}"#;
        assert_eq!(parse_message(silence), None);
        assert_eq!(
            parse_message(r#"{"type":"SpeechStarted","channel":[0,1],"timestamp":1.44}"#),
            Some(Incoming::Event(SttEvent::SpeechStarted { timestamp: 1.44 }))
        );
        assert_eq!(
            parse_message(r#"{"type":"UtteranceEnd","channel":[0,1],"last_word_end":2.08}"#),
            Some(Incoming::Event(SttEvent::UtteranceEnd {
                last_word_end: 2.08
            }))
        );
        assert_eq!(
            parse_message(r#"{"type":"Metadata","request_id":"x","duration":12.3,"channels":1}"#),
            Some(Incoming::Metadata { duration: 12.3 })
        );
        assert_eq!(
            parse_message(r#"{"type":"Error","variant":"v","description":"bad audio"}"#),
            Some(Incoming::Event(SttEvent::Error(
                "Deepgram: bad audio".into()
            )))
        );
        // Escapes in a transcript are read (copied); words and other fields are skipped.
        let escaped = r#"{"type":"Results","is_final":null,"start":1,"duration":null,
            "channel":{"alternatives":[{"transcript":" \"caf\u00e9\" ","words":[{"word":"x","start":1.0}]},{"transcript":"other"}]}}"#;
        assert_eq!(
            parse_message(escaped),
            Some(Incoming::Event(SttEvent::Transcript {
                text: "\"café\"".into(),
                is_final: false,
                speech_final: false,
                start: 1.0,
                duration: 0.0
            }))
        );
        assert_eq!(
            parse_message(r#"{"type":"Error","description":"","message":"bad key"}"#),
            Some(Incoming::Event(SttEvent::Error("Deepgram: bad key".into())))
        );
        assert_eq!(
            parse_message(r#"{"type":"Error"}"#),
            Some(Incoming::Event(SttEvent::Error(
                "Deepgram: unknown error".into()
            )))
        );
        for junk in [
            "",
            "not json",
            "[]",
            r#"{"type":7}"#,
            r#"{"type":"Results"}"#,
            r#"{"type":"Results","channel":{"alternatives":[]}}"#,
            r#"{"type":"Whatever"}"#,
        ] {
            assert_eq!(parse_message(junk), None, "{junk}");
        }
    }
}
