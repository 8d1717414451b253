//! Real clients of the providers, speaking their wire protocols. Each takes a base URL, so the
//! same client talks to the provider, a proxy, or this project's simulator.

pub mod deepgram;
pub mod elevenlabs;
pub mod email;
pub mod embeddings;
mod json;
pub mod llm;
pub mod stripe;
pub mod twilio;
pub mod workos;

/// A provider call that did not give an answer we can use.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{provider} could not be reached: {detail}")]
    Unreachable {
        provider: &'static str,
        detail: String,
    },
    #[error("{provider} answered {status}: {detail}")]
    Status {
        provider: &'static str,
        status: u16,
        detail: String,
    },
}

impl ProviderError {
    /// Whether trying again later may succeed: the provider was unreachable (or timed out),
    /// failed on its side (5xx) or asked us to slow down (429). Any other 4xx means the request
    /// itself is wrong and will fail the same way again.
    pub fn retryable(&self) -> bool {
        match self {
            ProviderError::Unreachable { .. } => true,
            ProviderError::Status { status, .. } => *status >= 500 || *status == 429,
        }
    }
}

/// One HTTP client for all providers: rustls, connection pooling, bounded timeouts.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(3))
        .timeout(std::time::Duration::from_secs(15))
        .user_agent(concat!("callmeback/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("an HTTP client with default TLS roots")
}

/// WebSocket settings for a long-lived provider stream (Deepgram, ElevenLabs, and our side of
/// Twilio's media stream): tungstenite's defaults are a 128 KiB read buffer that is zero-filled
/// before every read (snapview/tungstenite-rs#547) and a 128 KiB write buffer, per socket. These
/// streams carry small messages, so 4 KiB buffers; messages are bounded by `max_message`.
pub fn ws_config(max_message: usize) -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(WS_BUFFER)
        .write_buffer_size(WS_BUFFER)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// Read and write buffer of a provider WebSocket (see [`ws_config`]).
pub const WS_BUFFER: usize = 4096;
