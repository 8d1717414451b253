//! Who is asking, for per-IP limits and lockouts: the socket's peer, unless the peer is one of
//! `TRUSTED_PROXIES`; then the right-most `X-Forwarded-For` address that is not a trusted
//! proxy (each proxy appends the address it was reached from, so everything left of that is
//! whatever the client chose to write). IPv6 clients are counted per /64, the block one
//! subscriber usually gets, so rotating addresses inside it buys nothing.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::HeaderMap;

use crate::config::limits::Cidr;
use crate::serve::http::error::ApiError;
use crate::serve::http::state::AppState;

/// The client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Ok(ClientIp::of(state, &parts.headers, &parts.extensions))
    }
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The client behind `peer`, given the `X-Forwarded-For` headers (in order) and the trusted
/// proxies.
pub fn resolve<'a>(
    peer: IpAddr,
    forwarded_for: impl Iterator<Item = &'a str>,
    trusted: &[Cidr],
) -> IpAddr {
    let peer = canonical(peer);
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let hops: Vec<&str> = forwarded_for.flat_map(|h| h.split(',')).collect();
    let mut nearest = peer;
    for hop in hops.iter().rev() {
        // `for=`-less plain addresses; a port or brackets are tolerated.
        let hop = hop.trim().trim_start_matches('[');
        let parsed = hop
            .parse::<IpAddr>()
            .ok()
            .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
            .or_else(|| {
                hop.split_once(']')
                    .and_then(|(ip, _)| ip.parse::<IpAddr>().ok())
            });
        match parsed.map(canonical) {
            Some(ip) if is_trusted(ip) => nearest = ip,
            Some(ip) => return ip,
            // Garbage where an address should be: the nearest proxy we know stands for it.
            None => return nearest,
        }
    }
    nearest
}

impl ClientIp {
    pub fn of(
        state: &AppState,
        headers: &HeaderMap,
        extensions: &axum::http::Extensions,
    ) -> ClientIp {
        let peer = extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok());
        ClientIp(resolve(
            peer,
            forwarded,
            &state.config.limits.trusted_proxies,
        ))
    }

    /// A stable key for this client that does not show its address (HMAC-SHA256 of
    /// [`limit_key`](Self::limit_key) under `secret`, 16 hex digits): what the event log
    /// records of who failed to sign in.
    pub fn pseudonym(&self, secret: &str) -> String {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(self.limit_key().as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..8])
    }

    /// What per-IP limits count: the address, or its /64 for IPv6.
    pub fn limit_key(&self) -> String {
        match self.0 {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => {
                let net = u128::from(v6) & (u128::MAX << 64);
                format!("{}/64", Ipv6Addr::from(net))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client() {
        let got = resolve(ip("203.0.113.9"), ["1.2.3.4"].into_iter(), &[]);
        assert_eq!(got, ip("203.0.113.9"));
    }

    #[test]
    fn a_peer_that_is_not_trusted_cannot_name_another_client() {
        let trusted = cidrs(&["10.0.0.0/8"]);
        let got = resolve(ip("203.0.113.9"), ["1.2.3.4"].into_iter(), &trusted);
        assert_eq!(got, ip("203.0.113.9"));
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        let trusted = cidrs(&["10.0.0.0/8", "192.168.1.1"]);
        // The client wrote 1.2.3.4 itself; the first proxy saw 198.51.100.7.
        let got = resolve(
            ip("10.0.0.2"),
            ["1.2.3.4, 198.51.100.7", "192.168.1.1"].into_iter(),
            &trusted,
        );
        assert_eq!(got, ip("198.51.100.7"));
        // Every hop trusted: the left-most.
        let got = resolve(ip("10.0.0.2"), ["10.9.9.9, 10.1.1.1"].into_iter(), &trusted);
        assert_eq!(got, ip("10.9.9.9"));
        // No header at all: the proxy itself.
        assert_eq!(
            resolve(ip("10.0.0.2"), std::iter::empty(), &trusted),
            ip("10.0.0.2")
        );
        // Garbage in the client's place: the nearest proxy.
        let got = resolve(ip("10.0.0.2"), ["1.2.3.4, junk"].into_iter(), &trusted);
        assert_eq!(got, ip("10.0.0.2"));
        // Ports and brackets.
        let got = resolve(ip("10.0.0.2"), ["[2001:db8::1]:443"].into_iter(), &trusted);
        assert_eq!(got, ip("2001:db8::1"));
        let got = resolve(ip("10.0.0.2"), ["198.51.100.7:5000"].into_iter(), &trusted);
        assert_eq!(got, ip("198.51.100.7"));
    }

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        let a = ClientIp(ip("2001:db8:1:2:aaaa::1")).limit_key();
        let b = ClientIp(ip("2001:db8:1:2:bbbb::9")).limit_key();
        let c = ClientIp(ip("2001:db8:1:3::1")).limit_key();
        assert_eq!(a, "2001:db8:1:2::/64");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(ClientIp(ip("198.51.100.7")).limit_key(), "198.51.100.7");
        assert_eq!(
            resolve(ip("::ffff:198.51.100.7"), std::iter::empty(), &[]),
            ip("198.51.100.7")
        );
    }
}
