//! The JetStream side of the event log.
//!
//! - [`contract`]: subjects, headers and body of each event message (the README's "Message
//!   contract"); analysts and other services depend on it, so it only ever grows.
//! - [`stream`]: the one stream that keeps every event, on file storage, for years.
//! - [`publish`]: publication that keeps per-aggregate order even when some publishes fail.
//! - [`consume`]: durable pull consumers shared by every instance, and their lag.
//! - [`replay`]: an ordered reader over a range of the stream.
//! - [`wire`]: a minimal NATS protocol connection that reads deliveries in place (replays).

pub mod consume;
pub mod contract;
pub mod publish;
pub mod replay;
pub mod stream;
pub mod wire;

pub use contract::{decode_message, encode, ContractError};
pub use stream::{ensure_stream, StreamSettings};

/// The servers of a `NATS_URL`: one URL or a comma-separated list, as NATS clients take it
/// (`nats://a:4222,nats://b:4222`); a bare `host:port` is read as `nats://host:port`.
pub fn server_addrs(urls: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    let addrs = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| format!("{u:?} is not a NATS server URL: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err("no NATS server given".into());
    }
    Ok(addrs)
}

/// Connects to NATS — to any of the servers of `urls` (see [`server_addrs`]), reconnecting to
/// any of them (and to the servers the cluster advertises) when the one in use goes away —
/// with a name that shows up in `nats server report connections`.
pub async fn connect(
    urls: &str,
    name: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    // The configuration checked the list already (naming what is wrong in it).
    let addrs = server_addrs(urls)
        .map_err(|_| async_nats::ConnectError::from(async_nats::ConnectErrorKind::ServerParse))?;
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(std::time::Duration::from_secs(5))
        .connect(addrs)
        .await
}

#[cfg(test)]
mod tests {
    use super::server_addrs;

    #[test]
    fn nats_url_takes_a_list_of_servers() {
        let addrs =
            server_addrs("nats://127.0.0.1:4222, nats://127.0.0.1:4223,127.0.0.1:4224").unwrap();
        let ports: Vec<u16> = addrs.iter().map(|a| a.port()).collect();
        assert_eq!(ports, [4222, 4223, 4224]);
        assert_eq!(server_addrs("nats://127.0.0.1:4222").unwrap().len(), 1);
        assert!(server_addrs("").is_err());
        assert!(server_addrs("nats://127.0.0.1:4222,http://[::1").is_err());
    }
}
