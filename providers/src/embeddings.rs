//! Text embeddings from an OpenAI-compatible `POST {base}/embeddings` (`{"model", "input"}` →
//! `data[].embedding`, `usage.prompt_tokens`). The memory worker embeds each learned fact, the
//! knowledge worker each passage, and a call the caller's words several times a turn: the
//! response (a few kilobytes of numbers per vector) is read straight into typed structs, each
//! vector a `Vec<f32>`, without a `serde_json::Value` tree in between.

use serde::{Deserialize, Serialize};

use crate::ProviderError;

pub const DEFAULT_MODEL: &str = "text-embedding-3-small";

#[derive(Clone)]
pub struct Embeddings {
    http: reqwest::Client,
    url: String,
    api_key: String,
    model: String,
}

/// The request body.
#[derive(Serialize)]
struct Request<'a> {
    model: &'a str,
    input: &'a [String],
}

/// The parts of the response that are used.
#[derive(Deserialize)]
struct Response {
    data: Vec<Datum>,
    #[serde(default)]
    usage: Usage,
}

#[derive(Deserialize)]
struct Datum {
    /// The input's position (OpenAI answers in order, but says which is which).
    #[serde(default)]
    index: usize,
    embedding: Vec<f32>,
}

#[derive(Deserialize, Default)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u64,
}

/// Vectors in input order, and the input tokens billed.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: u64,
}

impl Embeddings {
    /// `base_url` ends in `/v1`, as for OpenAI's chat client.
    pub fn new(http: reqwest::Client, base_url: &str, api_key: &str, model: &str) -> Self {
        Embeddings {
            http,
            url: format!("{}/embeddings", base_url.trim_end_matches('/')),
            api_key: api_key.to_string(),
            model: model.to_string(),
        }
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub async fn embed(&self, inputs: &[String]) -> Result<Embedded, ProviderError> {
        let unreachable = |e: reqwest::Error| ProviderError::Unreachable {
            provider: "openai",
            detail: e.to_string(),
        };
        if inputs.is_empty() {
            return Ok(Embedded {
                vectors: vec![],
                prompt_tokens: 0,
            });
        }
        let response = self
            .http
            .post(&self.url)
            .bearer_auth(&self.api_key)
            .json(&Request {
                model: &self.model,
                input: inputs,
            })
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status();
        let body = response.bytes().await.map_err(unreachable)?;
        let bad = |detail: String| ProviderError::Status {
            provider: "openai",
            status: status.as_u16(),
            detail,
        };
        if !status.is_success() {
            return Err(bad(String::from_utf8_lossy(&body)
                .chars()
                .take(300)
                .collect()));
        }
        let mut body: Response = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        if body.data.len() != inputs.len() {
            return Err(bad(format!(
                "{} vectors for {} inputs",
                body.data.len(),
                inputs.len()
            )));
        }
        body.data.sort_by_key(|d| d.index);
        Ok(Embedded {
            vectors: body.data.into_iter().map(|d| d.embedding).collect(),
            prompt_tokens: body.usage.prompt_tokens,
        })
    }
}
