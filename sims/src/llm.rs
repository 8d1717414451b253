//! LLM simulator: `POST /v1/chat/completions` streamed as SSE exactly as Cerebras and OpenAI do
//! (OpenAI's chat completions API), one type run twice under different names. The reply is made up
//! deterministically from the last user message and streamed a word at a time at a set pace, so
//! latency, cancellation and token accounting can be tested without either provider.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::Faults;

/// How long a stalled request stays silent after its headers.
const STALL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Settings {
    /// `"CEREBRAS"` or `"OPENAI"`: the prefix of the variables, and the flavour of the stream.
    pub name: &'static str,
    /// Delay from the request to the first token.
    pub first_token: Duration,
    pub tokens_per_sec: u32,
    /// A fixed reply instead of the generated one.
    pub reply: Option<String>,
    /// The answer to memory extraction requests (`SIM_<NAME>_EXTRACTION_REPLY`), when no
    /// scripted one is queued (see [`LlmSim::set_extraction_reply`]).
    pub extraction_reply: Option<String>,
    /// Every n-th request answers 500 with an OpenAI-style error (0: never).
    pub fail_every: u64,
    /// Every n-th request sends its headers, then nothing for 10 s (0: never).
    pub stall_every: u64,
    /// Latency before the answer (`SIM_<NAME>_LATENCY_MS`); its own failures are not used.
    pub faults: Faults,
}

impl Settings {
    /// `SIM_<NAME>_FIRST_TOKEN_MS` (150), `SIM_<NAME>_TOKENS_PER_SEC` (400), `SIM_<NAME>_REPLY`,
    /// `SIM_<NAME>_FAIL_EVERY`, `SIM_<NAME>_STALL_EVERY`, `SIM_<NAME>_LATENCY_MS`.
    pub fn from_lookup(name: &'static str, get: &impl Fn(&str) -> Option<String>) -> Self {
        let number = |suffix: &str, default: u64| {
            get(&format!("SIM_{name}_{suffix}"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(default)
        };
        Settings {
            name,
            first_token: Duration::from_millis(number("FIRST_TOKEN_MS", 150)),
            tokens_per_sec: number("TOKENS_PER_SEC", 400).clamp(1, 100_000) as u32,
            reply: get(&format!("SIM_{name}_REPLY")).filter(|r| !r.trim().is_empty()),
            extraction_reply: get(&format!("SIM_{name}_EXTRACTION_REPLY"))
                .filter(|r| !r.trim().is_empty()),
            fail_every: number("FAIL_EVERY", 0),
            stall_every: number("STALL_EVERY", 0),
            // FAIL_EVERY belongs to this simulator's own 500s, not to `Faults`' 503s.
            faults: Faults::new(Duration::from_millis(number("LATENCY_MS", 0)), 0),
        }
    }
}

#[derive(Clone)]
pub struct LlmSim {
    shared: Arc<Shared>,
}

struct Shared {
    settings: Settings,
    requests: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    active_streams: AtomicU64,
    /// Scripted answers to extraction requests, consumed in order.
    extraction_replies: Mutex<VecDeque<String>>,
    /// Every chat request's messages, (role, content), in arrival order.
    log: Mutex<Vec<Vec<(String, String)>>>,
    embedding_tokens: AtomicU64,
    /// Embeddings requests answered (a batch is one).
    embedding_requests: AtomicU64,
}

/// Whether a conversation asks for a memory extraction: its instructions ask for JSON with
/// the extraction's keys. The simulator reads the request as a model would; the product sends
/// nothing meant only for it.
pub fn is_extraction(messages: &[(String, String)]) -> bool {
    messages.iter().any(|(role, content)| {
        role == "system" && content.contains("\"closed_items\"") && content.contains("\"facts\"")
    })
}
/// What an extraction request gets when nothing was scripted: nothing learned.
const EMPTY_EXTRACTION: &str = r#"{"facts":[],"summary":"","open_items":[],"closed_items":[]}"#;

impl LlmSim {
    pub fn new(settings: Settings) -> Self {
        LlmSim {
            shared: Arc::new(Shared {
                settings,
                requests: AtomicU64::new(0),
                prompt_tokens: AtomicU64::new(0),
                completion_tokens: AtomicU64::new(0),
                active_streams: AtomicU64::new(0),
                extraction_replies: Mutex::new(VecDeque::new()),
                log: Mutex::new(Vec::new()),
                embedding_tokens: AtomicU64::new(0),
                embedding_requests: AtomicU64::new(0),
            }),
        }
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(completions))
            .route("/v1/embeddings", post(embeddings))
            .with_state(self.clone())
    }

    /// Requests received on the completions route, whatever their outcome.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Tokens actually sent (a cancelled stream stops counting).
    pub fn completion_tokens_total(&self) -> u64 {
        self.shared.completion_tokens.load(Ordering::Relaxed)
    }

    pub fn prompt_tokens_total(&self) -> u64 {
        self.shared.prompt_tokens.load(Ordering::Relaxed)
    }

    /// The next extraction requests answer these, in order (then the default again).
    pub fn set_extraction_reply(&self, replies: Vec<String>) {
        *self.shared.extraction_replies.lock().expect("replies") = replies.into();
    }

    /// Every chat request received so far: its messages as (role, content).
    pub fn requests_log(&self) -> Vec<Vec<(String, String)>> {
        self.shared.log.lock().expect("log").clone()
    }

    /// Input tokens of every embeddings request.
    pub fn embedding_tokens_total(&self) -> u64 {
        self.shared.embedding_tokens.load(Ordering::Relaxed)
    }

    /// Embeddings requests answered (a batch of inputs is one request).
    pub fn embedding_requests(&self) -> u64 {
        self.shared.embedding_requests.load(Ordering::Relaxed)
    }

    /// Streams being written right now.
    pub fn active_streams(&self) -> u64 {
        self.shared.active_streams.load(Ordering::Relaxed)
    }
}

/// The reply the simulator gives to these messages (without a `SIM_<NAME>_REPLY` override).
/// Like a model, it answers from the context it was given for the turn: when a system message
/// after the first (the instructions) holds a sentence sharing at least two meaningful words
/// with the caller's last message, the reply says that sentence.
pub fn reply_for(messages: &[(String, String)]) -> String {
    let last_user = messages
        .iter()
        .rev()
        .find(|(role, _)| role == "user")
        .map(|(_, content)| content.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    if last_user.is_empty() {
        return "Hi, it's me. I was just thinking about you. How has your day been?".into();
    }
    if let Some(sentence) = from_context(messages, &last_user) {
        return format!("Good question. {sentence} Does that help?");
    }
    format!("Got it: \"{last_user}\". That sounds important to you. Tell me more about it.")
}

/// Words of three letters or more, lower-cased, a final "s" dropped, but for a few that carry
/// no subject.
fn meaningful(text: &str) -> Vec<String> {
    const EMPTY: &[&str] = &[
        "about", "and", "are", "but", "can", "could", "did", "doe", "for", "from", "had", "ha",
        "have", "her", "hi", "how", "it", "not", "our", "should", "than", "that", "the", "them",
        "then", "there", "they", "thi", "this", "wa", "was", "were", "what", "when", "which",
        "who", "why", "will", "with", "would", "you", "your",
    ];
    text.split(|c: char| !c.is_alphanumeric())
        .map(|w| {
            let w = w.to_lowercase();
            match w.strip_suffix('s') {
                Some(stem) if stem.len() >= 3 && !stem.ends_with('s') => stem.to_string(),
                _ => w,
            }
        })
        .filter(|w| w.chars().count() >= 3 && !EMPTY.contains(&w.as_str()))
        .collect()
}

/// The context sentence sharing the most meaningful words (two at least) with `question`.
fn from_context(messages: &[(String, String)], question: &str) -> Option<String> {
    let asked = meaningful(question);
    let first_system = messages.iter().position(|(role, _)| role == "system");
    let mut best: Option<(usize, String)> = None;
    for (i, (role, content)) in messages.iter().enumerate() {
        if role != "system" || Some(i) == first_system {
            continue;
        }
        for sentence in content.split_inclusive(['.', '!', '?', '\n']) {
            let sentence = sentence.trim();
            let sentence = sentence.rsplit("] ").next().unwrap_or(sentence).trim();
            let mut shared: Vec<String> = meaningful(sentence)
                .into_iter()
                .filter(|w| asked.contains(w))
                .collect();
            shared.sort();
            shared.dedup();
            if shared.len() >= 2 && best.as_ref().is_none_or(|(n, _)| shared.len() > *n) {
                best = Some((shared.len(), sentence.to_string()));
            }
        }
    }
    best.map(|(_, s)| s)
}

/// Words in all messages × 4/3, rounded: a rough tokenizer.
fn prompt_tokens(messages: &[(String, String)]) -> u64 {
    let words: u64 = messages
        .iter()
        .map(|(_, c)| c.split_whitespace().count() as u64)
        .sum();
    (words * 4 + 1) / 3
}

fn error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({
            "error": { "message": message, "type": kind, "param": null, "code": code }
        })),
    )
        .into_response()
}

fn parse_messages(body: &Value) -> Option<Vec<(String, String)>> {
    let messages = body.get("messages")?.as_array()?;
    let parsed = messages
        .iter()
        .map(|m| {
            Some((
                m.get("role")?.as_str()?.to_string(),
                m.get("content")?.as_str()?.to_string(),
            ))
        })
        .collect::<Option<Vec<_>>>()?;
    (!parsed.is_empty()).then_some(parsed)
}

async fn completions(State(sim): State<LlmSim>, headers: HeaderMap, body: Bytes) -> Response {
    let shared = &sim.shared;
    let settings = &shared.settings;
    settings.faults.apply().await;
    let n = shared.requests.fetch_add(1, Ordering::Relaxed) + 1;

    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .trim();
    if key.is_empty() {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "Incorrect API key provided.",
        );
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
            "The request body is not valid JSON.",
        );
    };
    let Some(messages) = parse_messages(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_value",
            "'messages' must be a non-empty array of {role, content}.",
        );
    };
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "unsupported_value",
            "This simulator only streams: set 'stream': true.",
        );
    }
    if settings.fail_every > 0 && n.is_multiple_of(settings.fail_every) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            "The server had an error while processing your request (injected failure).",
        );
    }

    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("llama-3.3-70b")
        .to_string();
    let max_tokens = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let prompt = prompt_tokens(&messages);
    shared.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
    shared.log.lock().expect("log").push(messages.clone());
    let extraction = is_extraction(&messages);
    let reply = if extraction {
        let scripted = shared
            .extraction_replies
            .lock()
            .expect("replies")
            .pop_front();
        scripted
            .or_else(|| settings.extraction_reply.clone())
            .unwrap_or_else(|| EMPTY_EXTRACTION.to_string())
    } else {
        settings
            .reply
            .clone()
            .unwrap_or_else(|| reply_for(&messages))
    };
    let stall = settings.stall_every > 0 && n.is_multiple_of(settings.stall_every);

    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let job = Job {
        sim: sim.clone(),
        model,
        reply,
        max_tokens,
        include_usage,
        prompt,
        stall,
    };
    tokio::spawn(async move {
        job.sim
            .shared
            .active_streams
            .fetch_add(1, Ordering::Relaxed);
        let sim = job.sim.clone();
        job.run(tx).await;
        sim.shared.active_streams.fetch_sub(1, Ordering::Relaxed);
    });
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    }));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `POST /v1/embeddings`: `{"model", "input": string | [string]}` → OpenAI's shape, with the
/// deterministic hashed vectors of [`cmb_domain::memory::embed`].
async fn embeddings(State(sim): State<LlmSim>, headers: HeaderMap, body: Bytes) -> Response {
    sim.shared.settings.faults.apply().await;
    let authorised = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|k| !k.trim().is_empty());
    if !authorised {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "Incorrect API key provided.",
        );
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
            "The request body is not valid JSON.",
        );
    };
    let inputs: Vec<String> = match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) && !a.is_empty() => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_value",
                "'input' must be a string or a non-empty array of strings.",
            )
        }
    };
    let tokens: u64 = inputs
        .iter()
        .map(|t| (t.split_whitespace().count() as u64 * 4).div_ceil(3))
        .sum();
    sim.shared
        .embedding_tokens
        .fetch_add(tokens, Ordering::Relaxed);
    sim.shared
        .embedding_requests
        .fetch_add(1, Ordering::Relaxed);
    let data: Vec<EmbeddingDatum> = inputs
        .iter()
        .enumerate()
        .map(|(index, t)| EmbeddingDatum {
            object: "embedding",
            index,
            embedding: cmb_domain::memory::embed::embed(t),
        })
        .collect();
    Json(EmbeddingList {
        object: "list",
        data,
        model: body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("text-embedding-3-small"),
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    })
    .into_response()
}

/// An embeddings answer, written from typed fields so that each vector's numbers are `f32`s
/// in the fewest digits that read back the same (`-0.0069292835`), as OpenAI writes them,
/// rather than the seventeen digits of the `f64` a `serde_json::Value` would hold them as.
#[derive(serde::Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<EmbeddingDatum>,
    model: &'a str,
    usage: EmbeddingUsage,
}

#[derive(serde::Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

#[derive(serde::Serialize)]
struct EmbeddingDatum {
    object: &'static str,
    index: usize,
    embedding: Vec<f32>,
}

/// One streamed completion.
struct Job {
    sim: LlmSim,
    model: String,
    reply: String,
    max_tokens: u64,
    include_usage: bool,
    prompt: u64,
    stall: bool,
}

impl Job {
    /// Writes the stream; returns early once the client is gone (the body, hence `tx`'s
    /// receiver, is dropped with the connection).
    async fn run(self, tx: mpsc::Sender<Bytes>) {
        let settings = &self.sim.shared.settings;
        let cerebras = settings.name == "CEREBRAS";
        let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
        let created = chrono::Utc::now().timestamp();
        let chunk = |delta: Value, finish: Option<&str>| {
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created,
                "model": self.model, "system_fingerprint": "fp_simulator",
                "choices": [{ "index": 0, "delta": delta, "finish_reason": finish, "logprobs": null }],
                "usage": null,
            })
        };
        let send = |event: String| {
            let tx = tx.clone();
            async move { tx.send(Bytes::from(event)).await.is_ok() }
        };
        let data = |v: Value| format!("data: {v}\n\n");

        if cerebras && !send(": heartbeat\n\n".into()).await {
            return;
        }
        if self.stall {
            tokio::time::sleep(STALL).await;
        }
        tokio::time::sleep(settings.first_token).await;
        let pace = Duration::from_secs_f64(1.0 / f64::from(settings.tokens_per_sec));
        let role = chunk(json!({ "role": "assistant", "content": "" }), None);
        if !send(data(role)).await {
            return;
        }
        let mut sent: u64 = 0;
        let mut finish = "stop";
        for (i, token) in self.reply.split_inclusive(' ').enumerate() {
            if sent >= self.max_tokens {
                finish = "length";
                break;
            }
            if i > 0 {
                tokio::time::sleep(pace).await;
            }
            if !send(data(chunk(json!({ "content": token }), None))).await {
                return;
            }
            sent += 1;
            self.sim
                .shared
                .completion_tokens
                .fetch_add(1, Ordering::Relaxed);
        }
        if !send(data(chunk(json!({}), Some(finish)))).await {
            return;
        }
        if self.include_usage {
            let mut usage = json!({
                "id": id, "object": "chat.completion.chunk", "created": created,
                "model": self.model, "system_fingerprint": "fp_simulator", "choices": [],
                "usage": {
                    "prompt_tokens": self.prompt, "completion_tokens": sent,
                    "total_tokens": self.prompt + sent,
                    "prompt_tokens_details": { "cached_tokens": 0 },
                },
            });
            if cerebras {
                let total = settings.first_token.as_secs_f64() + sent as f64 * pace.as_secs_f64();
                usage["time_info"] = json!({
                    "queue_time": 0.0001, "prompt_time": 0.001,
                    "completion_time": total, "total_time": total, "created": created,
                });
            }
            if !send(data(usage)).await {
                return;
            }
        }
        send("data: [DONE]\n\n".into()).await;
    }
}

#[cfg(test)]
mod tests;
