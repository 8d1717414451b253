//! The abuse limits' settings: where and how often calls may ring, which proxies' forwarded
//! addresses are believed, and how much work the server takes on at once.

use std::net::IpAddr;
use std::time::Duration;

use cmb_domain::destination::DestinationPolicy;

/// A setting that does not parse: its name and why (`config` makes a `ConfigError` of it).
#[derive(Debug)]
pub struct ConfigError {
    pub name: &'static str,
    pub message: String,
}
use crate::usecases::calls::dials::{CallPolicy, DEFAULT_NUMBER_PER_DAY, DEFAULT_USER_PER_DAY};

/// An address block (`10.0.0.0/8`, `2001:db8::/32`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or CIDR block"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { network, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer may reach an IPv6 socket as `::ffff:a.b.c.d`.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// The abuse limits (README "Security").
#[derive(Debug, Clone)]
pub struct Limits {
    /// `CALL_ALLOWED_COUNTRIES`, `CALL_BLOCKED_PREFIXES`, `CALL_NUMBER_DAILY_LIMIT`,
    /// `CALL_USER_DAILY_LIMIT`.
    pub calls: CallPolicy,
    /// `TRUSTED_PROXIES`: the proxies whose `X-Forwarded-For` is believed. Empty: the client
    /// is the socket's peer.
    pub trusted_proxies: Vec<Cidr>,
    /// `PASSWORD_HASH_CONCURRENCY`: password hashes computed at once (default two per core).
    pub password_hashers: usize,
    /// `PASSWORD_HASH_QUEUE`: hashes that may wait for a hasher; beyond, 503.
    pub password_queue: usize,
    /// `REQUEST_TIMEOUT_MS`: every request's deadline.
    pub request_timeout: Duration,
    /// `HTTP_MAX_CONCURRENT_REQUESTS`: requests handled at once per instance; beyond, 503.
    pub max_concurrent_requests: usize,
}

fn number<T>(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: T,
    min: T,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
    T::Err: std::fmt::Display,
{
    let value = match get(name) {
        None => default,
        Some(v) => v.trim().parse().map_err(|e: T::Err| ConfigError {
            name,
            message: e.to_string(),
        })?,
    };
    if value < min {
        return Err(ConfigError {
            name,
            message: format!("{value}: at least {min}"),
        });
    }
    Ok(value)
}

/// Reads the limits from `get`.
pub fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<Limits, ConfigError> {
    let destinations = DestinationPolicy::parse(
        get("CALL_ALLOWED_COUNTRIES").as_deref(),
        get("CALL_BLOCKED_PREFIXES").as_deref(),
    )
    .map_err(|message| ConfigError {
        // Whichever list is wrong says so in its message.
        name: if DestinationPolicy::parse(get("CALL_ALLOWED_COUNTRIES").as_deref(), None).is_err() {
            "CALL_ALLOWED_COUNTRIES"
        } else {
            "CALL_BLOCKED_PREFIXES"
        },
        message,
    })?;
    let trusted_proxies = get("TRUSTED_PROXIES")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse().map_err(|message| ConfigError {
                name: "TRUSTED_PROXIES",
                message,
            })
        })
        .collect::<Result<_, _>>()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(Limits {
        calls: CallPolicy {
            destinations,
            number_per_day: number(get, "CALL_NUMBER_DAILY_LIMIT", DEFAULT_NUMBER_PER_DAY, 1)?,
            user_per_day: number(get, "CALL_USER_DAILY_LIMIT", DEFAULT_USER_PER_DAY, 1)?,
        },
        trusted_proxies,
        password_hashers: number(get, "PASSWORD_HASH_CONCURRENCY", 2 * cores, 1)?,
        password_queue: number(get, "PASSWORD_HASH_QUEUE", 256, 0)?,
        request_timeout: Duration::from_millis(number(get, "REQUEST_TIMEOUT_MS", 15_000, 100)?),
        max_concurrent_requests: number(get, "HTTP_MAX_CONCURRENT_REQUESTS", 1024, 1)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn limits(vars: &[(&str, &str)]) -> Result<Limits, ConfigError> {
        let vars: HashMap<_, _> = vars.iter().copied().collect();
        from_lookup(&|k| vars.get(k).map(|v| v.to_string()))
    }

    #[test]
    fn blocks_contain_their_addresses_only() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one: Cidr = "192.0.2.7".parse().unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nowhere", "::/129", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_and_bad_values() {
        let l = limits(&[]).unwrap();
        assert_eq!(l.calls, CallPolicy::default());
        assert!(l.trusted_proxies.is_empty());
        assert_eq!(l.request_timeout, Duration::from_secs(15));
        for (name, value) in [
            ("CALL_ALLOWED_COUNTRIES", "USA"),
            ("CALL_BLOCKED_PREFIXES", "900"),
            ("CALL_NUMBER_DAILY_LIMIT", "0"),
            ("TRUSTED_PROXIES", "10.0.0.0/40"),
            ("PASSWORD_HASH_CONCURRENCY", "many"),
        ] {
            assert_eq!(limits(&[(name, value)]).unwrap_err().name, name, "{value}");
        }
    }
}
