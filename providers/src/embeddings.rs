//! Text embeddings from an OpenAI-compatible `POST {base}/embeddings` (`{"model", "input"}` →
//! `data[].embedding`, `usage.prompt_tokens`). The memory worker embeds each learned fact.

use serde_json::{json, Value};

use crate::ProviderError;

pub const DEFAULT_MODEL: &str = "text-embedding-3-small";

#[derive(Clone)]
pub struct Embeddings {
    http: reqwest::Client,
    url: String,
    api_key: String,
    model: String,
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
            .json(&json!({ "model": self.model, "input": inputs }))
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status();
        let text = response.text().await.map_err(unreachable)?;
        let bad = |detail: String| ProviderError::Status {
            provider: "openai",
            status: status.as_u16(),
            detail,
        };
        if !status.is_success() {
            return Err(bad(text.chars().take(300).collect()));
        }
        let body: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut data: Vec<(u64, Vec<f32>)> = body["data"]
            .as_array()
            .ok_or_else(|| bad("no data".into()))?
            .iter()
            .map(|d| {
                let index = d["index"].as_u64().unwrap_or(0);
                let vector = d["embedding"]
                    .as_array()
                    .map(|v| {
                        v.iter()
                            .filter_map(Value::as_f64)
                            .map(|x| x as f32)
                            .collect()
                    })
                    .unwrap_or_default();
                (index, vector)
            })
            .collect();
        data.sort_by_key(|(i, _)| *i);
        if data.len() != inputs.len() {
            return Err(bad(format!(
                "{} vectors for {} inputs",
                data.len(),
                inputs.len()
            )));
        }
        Ok(Embedded {
            vectors: data.into_iter().map(|(_, v)| v).collect(),
            prompt_tokens: body["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
        })
    }
}
