//! ElevenLabs: voice lookup (`GET /v1/voices/{voice_id}`, header `xi-api-key`).

use std::time::Duration;

use serde::Deserialize;

use super::ProviderError;

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
