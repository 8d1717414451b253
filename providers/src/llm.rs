//! LLM chat completions, streamed over SSE (OpenAI's chat completions API). Cerebras and OpenAI speak the same
//! wire format, so one client serves both; only the URL and the provider name differ.
//!
//! `stream` returns as soon as the status is known; a background task then turns the SSE body
//! into [`LlmChunk`]s on a bounded channel. Dropping the receiver ends that task, which drops the
//! response and with it the connection — that is how a barge-in cancels a reply.

use std::borrow::Cow;
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::json::{First, IfObject};
use crate::ProviderError;

pub const CEREBRAS_BASE_URL: &str = "https://api.cerebras.ai";
pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";

/// Chunks buffered between the SSE reader and the consumer.
const CHANNEL: usize = 64;
/// Longest silence tolerated between two pieces of the stream (heartbeats count) before it is
/// declared stalled.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(8);
/// Upper bound of a whole completion, headers to `[DONE]`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub max_tokens: u32,
    pub temperature: f32,
}

/// One piece of a streamed completion.
#[derive(Debug, Clone, PartialEq)]
pub enum LlmChunk {
    /// Text to append to the reply.
    Delta(String),
    /// Token counts (may be missing when a stream is interrupted).
    Usage {
        prompt_tokens: u32,
        completion_tokens: u32,
    },
    /// `data: [DONE]`: the reply is complete.
    Done,
    /// The stream broke off (error event, stall, connection lost, unreadable data); nothing
    /// follows.
    Error(String),
}

#[derive(Clone)]
pub struct Llm {
    http: reqwest::Client,
    url: String,
    api_key: String,
    model: String,
    provider: &'static str,
    idle_timeout: Duration,
}

impl Llm {
    /// Cerebras: `base_url` without `/v1` (e.g. [`CEREBRAS_BASE_URL`]).
    pub fn cerebras(http: reqwest::Client, base_url: &str, api_key: &str, model: &str) -> Self {
        let url = format!("{}/v1/chat/completions", base_url.trim_end_matches('/'));
        Llm::with_url(http, url, api_key, model, "cerebras")
    }

    /// OpenAI: `base_url` ends in `/v1` (e.g. [`OPENAI_BASE_URL`]), as in OpenAI's SDKs.
    pub fn openai(http: reqwest::Client, base_url: &str, api_key: &str, model: &str) -> Self {
        let url = format!("{}/chat/completions", base_url.trim_end_matches('/'));
        Llm::with_url(http, url, api_key, model, "openai")
    }

    fn with_url(
        http: reqwest::Client,
        url: String,
        api_key: &str,
        model: &str,
        provider: &'static str,
    ) -> Self {
        Llm {
            http,
            url,
            api_key: api_key.to_string(),
            model: model.to_string(),
            provider,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }

    /// How long the stream may stay silent before it ends with [`LlmChunk::Error`].
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }

    /// `"cerebras"` or `"openai"`.
    pub fn provider(&self) -> &'static str {
        self.provider
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// Starts a streamed completion; returns once the response status is known. A non-2xx
    /// answer is [`ProviderError::Status`] with the body's `error.message`.
    pub async fn stream(
        &self,
        req: &ChatRequest,
    ) -> Result<mpsc::Receiver<LlmChunk>, ProviderError> {
        let body = json!({
            "model": self.model,
            "messages": req.messages,
            "stream": true,
            "max_completion_tokens": req.max_tokens,
            "temperature": req.temperature,
            "stream_options": { "include_usage": true },
        });
        let response = self
            .http
            .post(&self.url)
            .bearer_auth(&self.api_key)
            .header("accept", "text/event-stream")
            .timeout(REQUEST_TIMEOUT)
            .json(&body)
            .send()
            .await
            .map_err(|e| ProviderError::Unreachable {
                provider: self.provider,
                detail: e.to_string(),
            })?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(ProviderError::Status {
                provider: self.provider,
                status: status.as_u16(),
                detail: error_message(&text),
            });
        }
        let (tx, rx) = mpsc::channel(CHANNEL);
        let idle = self.idle_timeout;
        tokio::spawn(async move {
            tokio::select! {
                // The consumer went away: stop reading; dropping the body drops the connection.
                _ = tx.closed() => {}
                _ = read_sse(response, &tx, idle) => {}
            }
        });
        Ok(rx)
    }
}

/// The `error.message` of an OpenAI-style error body, else the body itself (shortened).
fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| body.chars().take(300).collect())
}

/// Reads SSE lines until `[DONE]`, an error, or the end of the body, sending chunks on `tx`.
async fn read_sse(response: reqwest::Response, tx: &mpsc::Sender<LlmChunk>, idle: Duration) {
    let mut body = response.bytes_stream();
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        let next = match tokio::time::timeout(idle, body.next()).await {
            Ok(next) => next,
            Err(_) => {
                let _ = tx
                    .send(LlmChunk::Error(format!(
                        "stream stalled: nothing for {} ms",
                        idle.as_millis()
                    )))
                    .await;
                return;
            }
        };
        let bytes = match next {
            Some(Ok(bytes)) => bytes,
            Some(Err(e)) => {
                let _ = tx.send(LlmChunk::Error(format!("stream broke: {e}"))).await;
                return;
            }
            None => {
                let _ = tx
                    .send(LlmChunk::Error("stream ended before [DONE]".into()))
                    .await;
                return;
            }
        };
        buffer.extend_from_slice(&bytes);
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            match parse_line(line.trim_end_matches(['\n', '\r'])) {
                Line::Skip => {}
                Line::Chunks(chunks) => {
                    for chunk in chunks {
                        let last = matches!(chunk, LlmChunk::Done | LlmChunk::Error(_));
                        if tx.send(chunk).await.is_err() || last {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// A streamed chunk object, only the fields we use, read in one pass borrowed from the line (a
/// delta with escapes in it is copied once): the first choice's `delta.content`, `usage`, and an
/// `error` (rare, so kept whole to quote it). Any of them may be missing or `null`.
#[derive(Deserialize)]
struct StreamChunk<'a> {
    #[serde(default)]
    error: Option<Value>,
    #[serde(borrow, default)]
    choices: Option<First<Choice<'a>>>,
    #[serde(default)]
    usage: Option<IfObject<TokenCounts>>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct TokenCounts {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

enum Line {
    Skip,
    Chunks(Vec<LlmChunk>),
}

/// One SSE line: blank lines, `:` comments (heartbeats) and other fields are skipped; a `data:`
/// line is `[DONE]` or a chunk object.
fn parse_line(line: &str) -> Line {
    let Some(data) = line.strip_prefix("data:") else {
        return Line::Skip;
    };
    let data = data.trim();
    if data.is_empty() {
        return Line::Skip;
    }
    if data == "[DONE]" {
        return Line::Chunks(vec![LlmChunk::Done]);
    }
    let chunk: StreamChunk = match serde_json::from_str(data) {
        Ok(c) => c,
        Err(e) => return Line::Chunks(vec![LlmChunk::Error(format!("unreadable chunk: {e}"))]),
    };
    if let Some(error) = chunk.error {
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| error.to_string());
        return Line::Chunks(vec![LlmChunk::Error(message)]);
    }
    let mut chunks = Vec::new();
    if let Some(content) = chunk
        .choices
        .and_then(|c| c.0)
        .and_then(|c| c.delta)
        .and_then(|d| d.content)
        .filter(|c| !c.is_empty())
    {
        chunks.push(LlmChunk::Delta(content.into_owned()));
    }
    // Usage may come on any chunk (Cerebras sometimes puts it on the last content chunk).
    if let Some(usage) = chunk.usage.and_then(|u| u.0) {
        let count = |n: Option<u64>| n.unwrap_or(0) as u32;
        chunks.push(LlmChunk::Usage {
            prompt_tokens: count(usage.prompt_tokens),
            completion_tokens: count(usage.completion_tokens),
        });
    }
    Line::Chunks(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(line: &str) -> Vec<LlmChunk> {
        match parse_line(line) {
            Line::Skip => vec![],
            Line::Chunks(c) => c,
        }
    }

    #[test]
    fn sse_lines() {
        assert!(chunks(": heartbeat").is_empty());
        assert!(chunks("").is_empty());
        assert!(chunks("event: message").is_empty());
        assert_eq!(chunks("data: [DONE]"), vec![LlmChunk::Done]);
        let role = r#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}"#;
        assert!(chunks(role).is_empty());
        let delta =
            r#"data:{"choices":[{"index":0,"delta":{"content":"Hi "},"finish_reason":null}]}"#;
        assert_eq!(chunks(delta), vec![LlmChunk::Delta("Hi ".into())]);
        let last = r#"data: {"choices":[{"index":0,"delta":{"content":"there."},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#;
        assert_eq!(
            chunks(last),
            vec![
                LlmChunk::Delta("there.".into()),
                LlmChunk::Usage {
                    prompt_tokens: 7,
                    completion_tokens: 2
                }
            ]
        );
        // Escapes in a delta are read; `null`s and later choices are skipped.
        let escaped = r#"data: {"choices":[{"delta":{"content":"say \"hi\"\n"},"logprobs":null},{"delta":{"content":"no"}}],"usage":null}"#;
        assert_eq!(
            chunks(escaped),
            vec![LlmChunk::Delta("say \"hi\"\n".into())]
        );
        let usage_only =
            r#"data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":null}}"#;
        assert_eq!(
            chunks(usage_only),
            vec![LlmChunk::Usage {
                prompt_tokens: 5,
                completion_tokens: 0
            }]
        );
        assert_eq!(
            chunks(r#"data: {"error":{"code":500}}"#),
            vec![LlmChunk::Error(r#"{"code":500}"#.into())]
        );
        assert!(matches!(
            chunks("data: {nope").as_slice(),
            [LlmChunk::Error(_)]
        ));
        let err = r#"data: {"error":{"message":"overloaded","type":"server_error"}}"#;
        assert_eq!(chunks(err), vec![LlmChunk::Error("overloaded".into())]);
        assert_eq!(
            error_message(r#"{"error":{"message":"bad key"}}"#),
            "bad key"
        );
        assert_eq!(error_message("plain"), "plain");
    }
}
