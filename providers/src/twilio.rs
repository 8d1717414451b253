//! Twilio Programmable Voice: place an outbound call, hang it up, look it up, and check the
//! `X-Twilio-Signature` on the webhooks Twilio sends us.
//!
//! The REST API is form-encoded with PascalCase names, answers JSON with snake_case names, and
//! authenticates with HTTP Basic `AccountSid:AuthToken` (Twilio's REST API). The same client
//! talks to api.twilio.com or to `cmb_sims::twilio`, which differ only in the base URL.
//!
//! Nothing here retries a call creation on its own: a create that timed out may still have
//! placed the call, and ringing someone twice is worse than a late retry. The caller decides,
//! with [`ProviderError::retryable`] and [`Twilio::list_calls_to`] to find a call it may already
//! have placed.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha1::Sha1;

use crate::ProviderError;

pub mod stream;

pub const DEFAULT_BASE_URL: &str = "https://api.twilio.com";
const PROVIDER: &str = "Twilio";
const API_VERSION: &str = "2010-04-01";

/// The Twilio REST client for one account. Cheap to clone (the HTTP client is shared).
#[derive(Clone)]
pub struct Twilio {
    http: reqwest::Client,
    base_url: String,
    account_sid: String,
    auth_token: String,
}

impl std::fmt::Debug for Twilio {
    /// The auth token is a secret: it never goes into logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Twilio")
            .field("base_url", &self.base_url)
            .field("account_sid", &self.account_sid)
            .finish_non_exhaustive()
    }
}

/// What we ask Twilio to do when placing a call.
#[derive(Debug, Clone)]
pub struct CreateCall {
    /// E.164 number to ring.
    pub to: String,
    /// Our Twilio number, E.164.
    pub from: String,
    /// Where Twilio fetches the TwiML once the call is answered (POST).
    pub url: String,
    /// Where Twilio posts the status callbacks (POST).
    pub status_callback: String,
    /// Twilio hangs up by itself after this many seconds, whatever happens on our side.
    pub time_limit_secs: u32,
}

/// A Call resource as Twilio returns it (only the fields we use).
#[derive(Debug, Clone, Deserialize)]
pub struct CallResource {
    pub sid: String,
    pub status: String,
    pub to: String,
    pub from: String,
    /// Seconds, as a string; null until the call has ended.
    #[serde(default)]
    pub duration: Option<String>,
    /// Negative decimal string in `price_unit`; null until Twilio has rated the call.
    #[serde(default)]
    pub price: Option<String>,
    /// RFC 2822, e.g. `Tue, 08 Oct 2024 06:05:21 +0000`.
    #[serde(default)]
    pub date_created: Option<String>,
}

/// Twilio's error body: `{"code","message","more_info","status"}`.
#[derive(Debug, Deserialize)]
struct TwilioError {
    #[serde(default)]
    code: Option<u64>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CallList {
    #[serde(default)]
    calls: Vec<CallResource>,
}

impl Twilio {
    pub fn new(http: reqwest::Client, base_url: &str, account_sid: &str, auth_token: &str) -> Self {
        Twilio {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            account_sid: account_sid.to_string(),
            auth_token: auth_token.to_string(),
        }
    }

    pub fn account_sid(&self) -> &str {
        &self.account_sid
    }

    /// The auth token, to check the signatures of the webhooks of this account.
    pub fn auth_token(&self) -> &str {
        &self.auth_token
    }

    fn calls_url(&self) -> String {
        format!(
            "{}/{API_VERSION}/Accounts/{}/Calls.json",
            self.base_url, self.account_sid
        )
    }

    fn call_url(&self, call_sid: &str) -> String {
        format!(
            "{}/{API_VERSION}/Accounts/{}/Calls/{call_sid}.json",
            self.base_url, self.account_sid
        )
    }

    /// Places an outbound call. Twilio fetches `url` (POST) when the callee answers and posts
    /// every progress event (initiated, ringing, answered, completed) to `status_callback`.
    /// Not retried here: see the module docs.
    pub async fn create_call(&self, call: &CreateCall) -> Result<CallResource, ProviderError> {
        let time_limit = call.time_limit_secs.to_string();
        let mut form: Vec<(&str, &str)> = vec![
            ("To", &call.to),
            ("From", &call.from),
            ("Url", &call.url),
            ("Method", "POST"),
            ("StatusCallback", &call.status_callback),
            ("StatusCallbackMethod", "POST"),
        ];
        // A repeated key, as Twilio wants it; without it Twilio sends only the final event.
        for event in ["initiated", "ringing", "answered", "completed"] {
            form.push(("StatusCallbackEvent", event));
        }
        form.push(("TimeLimit", &time_limit));
        let response = self
            .send(self.http.post(self.calls_url()).form(&form))
            .await?;
        let created = read_json::<CallResource>(response).await?;
        tracing::info!(call_sid = %created.sid, status = %created.status, "Twilio call created");
        Ok(created)
    }

    /// Hangs up a call (`Status=completed`). Hanging up a call that has already ended is not an
    /// error: the call is over either way, which is what the caller wants.
    pub async fn hang_up(&self, call_sid: &str) -> Result<(), ProviderError> {
        let response = self
            .http
            .post(self.call_url(call_sid))
            .form(&[("Status", "completed")]);
        match self.send(response).await {
            Ok(_) => Ok(()),
            // 21220: "Invalid call state" — the call is no longer in progress.
            Err(ProviderError::Status {
                status: 400,
                detail,
                ..
            }) if detail.contains("21220") => {
                tracing::debug!(%call_sid, "Twilio call already ended");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The call, or `None` when Twilio does not know it.
    pub async fn fetch_call(&self, call_sid: &str) -> Result<Option<CallResource>, ProviderError> {
        match self.send(self.http.get(self.call_url(call_sid))).await {
            Ok(response) => read_json::<CallResource>(response).await.map(Some),
            Err(ProviderError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The calls to `to` created on or after that UTC day, newest first (Twilio's first page,
    /// up to 100) — to find a call placed just before a crash, before placing it again.
    pub async fn list_calls_to(
        &self,
        to: &str,
        started_on_or_after: chrono::NaiveDate,
    ) -> Result<Vec<CallResource>, ProviderError> {
        let day = started_on_or_after.format("%Y-%m-%d").to_string();
        let query = [("To", to), ("StartTime>=", &day), ("PageSize", "100")];
        let response = self
            .send(self.http.get(self.calls_url()).query(&query))
            .await?;
        Ok(read_json::<CallList>(response).await?.calls)
    }

    /// Sends with Basic auth; a non-2xx answer becomes `ProviderError::Status` with Twilio's
    /// message and code in the detail.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ProviderError> {
        let response = request
            .basic_auth(&self.account_sid, Some(&self.auth_token))
            .send()
            .await
            .map_err(|e| ProviderError::Unreachable {
                provider: PROVIDER,
                detail: e.to_string(),
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        let detail = match serde_json::from_str::<TwilioError>(&body) {
            Ok(TwilioError {
                code,
                message: Some(message),
            }) => match code {
                Some(code) => format!("{message} (code {code})"),
                None => message,
            },
            _ => body.chars().take(300).collect(),
        };
        tracing::warn!(status = status.as_u16(), %detail, "Twilio refused a request");
        Err(ProviderError::Status {
            provider: PROVIDER,
            status: status.as_u16(),
            detail,
        })
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
) -> Result<T, ProviderError> {
    response
        .json::<T>()
        .await
        .map_err(|e| ProviderError::Unreachable {
            provider: PROVIDER,
            detail: format!("unreadable answer: {e}"),
        })
}

/// The `X-Twilio-Signature` of a form-encoded POST to `url`: base64(HMAC-SHA1(auth_token,
/// url + each param's key and value, sorted by key)). Repeated keys count once per distinct
/// value, values sorted, as in Twilio's own validators.
pub fn signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    BASE64.encode(signing_mac(auth_token, url, params).finalize().into_bytes())
}

/// Whether `header` is the signature Twilio would have sent. Compared in constant time (the
/// MAC's own `verify_slice`), so a forger learns nothing from timing. Also accepts the URL with
/// its default port added or removed, as Twilio's validators do, since a proxy in front of us
/// may have changed that part of the URL.
pub fn verify_signature(
    auth_token: &str,
    url: &str,
    params: &[(String, String)],
    header: &str,
) -> bool {
    let Ok(expected) = BASE64.decode(header.trim()) else {
        return false;
    };
    url_variants(url).iter().any(|candidate| {
        signing_mac(auth_token, candidate, params)
            .verify_slice(&expected)
            .is_ok()
    })
}

fn signing_mac(auth_token: &str, url: &str, params: &[(String, String)]) -> Hmac<Sha1> {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(auth_token.as_bytes())
        .expect("HMAC accepts any key length");
    mac.update(url.as_bytes());
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    sorted.dedup();
    for (key, value) in sorted {
        mac.update(key.as_bytes());
        mac.update(value.as_bytes());
    }
    mac
}

/// `url` itself, plus the same URL with the scheme's default port removed (if present) or added
/// (if absent).
fn url_variants(url: &str) -> Vec<String> {
    let mut variants = vec![url.to_string()];
    let Some((scheme, rest)) = url.split_once("://") else {
        return variants;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "https" | "wss" => "443",
        "http" | "ws" => "80",
        _ => return variants,
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    // The host part after any user-info; IPv6 hosts are bracketed, so look after the `]`.
    let host_start = authority.rfind('@').map_or(0, |i| i + 1);
    let host_port = &authority[host_start..];
    let port_colon = host_port
        .rfind(':')
        .filter(|&i| !host_port[i..].contains(']'));
    match port_colon {
        Some(i) if &host_port[i + 1..] == default_port => {
            let without = format!("{}{}", &authority[..host_start], &host_port[..i]);
            variants.push(format!("{scheme}://{without}{tail}"));
        }
        Some(_) => {}
        None => variants.push(format!("{scheme}://{authority}:{default_port}{tail}")),
    }
    variants
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of twilio.com/docs/usage/security. The page has been published with
    /// two caller numbers over the years, each with its own signature; both are checked.
    fn example_params_with(caller: &str) -> Vec<(String, String)> {
        [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", caller),
            ("Digits", "1234"),
            ("From", caller),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn example_params() -> Vec<(String, String)> {
        example_params_with("+12349013030")
    }

    #[test]
    fn signature_matches_twilios_documented_examples() {
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        for (caller, expected) in [
            ("+14158675310", "GvWf1cFY/Q7PnoempGyD5oXAezc="),
            ("+12349013030", "0/KCTR6DLpKmkAf8muzZqo1nDgQ="),
        ] {
            let mut params = example_params_with(caller);
            params.reverse(); // the order they arrive in must not matter
            assert_eq!(signature("12345", url, &params), expected);
            assert!(verify_signature("12345", url, &params, expected));
        }
    }

    #[test]
    fn verify_rejects_tampering_and_garbage() {
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let mut params = example_params();
        let good = signature("12345", url, &params);
        assert!(!verify_signature("54321", url, &params, &good));
        assert!(!verify_signature(
            "12345",
            "https://mycompany.com/other",
            &params,
            &good
        ));
        assert!(!verify_signature("12345", url, &params, "not base64 !!"));
        assert!(!verify_signature("12345", url, &params, ""));
        params[2].1 = "9999".into();
        assert!(!verify_signature("12345", url, &params, &good));
    }

    #[test]
    fn verify_accepts_the_default_port_added_or_removed() {
        let params = example_params();
        let plain = signature("t", "https://example.com/hook?x=1", &params);
        assert!(verify_signature(
            "t",
            "https://example.com:443/hook?x=1",
            &params,
            &plain
        ));
        let with_port = signature("t", "https://example.com:443/hook", &params);
        assert!(verify_signature(
            "t",
            "https://example.com/hook",
            &params,
            &with_port
        ));
        assert!(!verify_signature(
            "t",
            "https://example.com:8443/hook?x=1",
            &params,
            &plain
        ));
    }

    #[test]
    fn retryable_errors() {
        let status = |status| ProviderError::Status {
            provider: PROVIDER,
            status,
            detail: String::new(),
        };
        assert!(ProviderError::Unreachable {
            provider: PROVIDER,
            detail: String::new()
        }
        .retryable());
        assert!(status(503).retryable());
        assert!(status(500).retryable());
        assert!(status(429).retryable());
        assert!(!status(401).retryable());
        assert!(!status(400).retryable());
        assert!(!status(404).retryable());
    }
}
