//! The JetStream side of the event log.
//!
//! - [`contract`]: subjects, headers and body of each event message (the README's "Message
//!   contract"); analysts and other services depend on it, so it only ever grows.
//! - [`stream`]: the one stream that keeps every event, on file storage, for years.
//! - [`publish`]: publication that keeps per-aggregate order even when some publishes fail.
//! - [`consume`]: durable pull consumers shared by every instance, and their lag.
//! - [`replay`]: an ordered reader over a range of the stream.

pub mod consume;
pub mod contract;
pub mod publish;
pub mod replay;
pub mod stream;

pub use contract::{decode_message, encode, ContractError};
pub use stream::{ensure_stream, StreamSettings};

/// Connects to NATS with a name that shows up in `nats server report connections`.
pub async fn connect(
    url: &str,
    name: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(std::time::Duration::from_secs(5))
        .connect(url)
        .await
}
