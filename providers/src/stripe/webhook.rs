//! Stripe's webhook signatures: the `Stripe-Signature` header (`t=…,v1=…`, HMAC-SHA256 over
//! `"{t}.{payload}"` keyed with the endpoint's secret) made and checked, and the verified
//! payload read as a typed `stripe_shared::Event`.

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// A verified webhook event: `type` as `kind`, `data.object` as `object`.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookEvent {
    pub id: String,
    pub kind: String,
    pub created: i64,
    pub object: Value,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    #[error("Stripe-Signature header is malformed")]
    MalformedHeader,
    #[error("no v1 signature matches the payload")]
    BadSignature,
    #[error("signature timestamp is {age_secs}s away from now")]
    Stale { age_secs: i64 },
    #[error("webhook payload is not an event: {0}")]
    MalformedPayload(String),
}

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &str, payload: &[u8], timestamp: i64) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    mac
}

/// The `Stripe-Signature` header for `payload`: `t=<unix>,v1=<hex hmac-sha256>`, keyed with the
/// whole secret string (`whsec_…`) over `"{t}.{payload}"`.
pub fn sign_webhook(secret: &str, payload: &[u8], timestamp: i64) -> String {
    let signature = hex::encode(mac(secret, payload, timestamp).finalize().into_bytes());
    format!("t={timestamp},v1={signature}")
}

/// Checks a `Stripe-Signature` header (any matching `v1`, compared in constant time; `v0` and
/// unknown schemes ignored), rejects timestamps more than `tolerance_secs` from `now`, and
/// parses the event.
pub fn verify_webhook(
    secret: &str,
    payload: &[u8],
    header: &str,
    now: i64,
    tolerance_secs: i64,
) -> Result<WebhookEvent, WebhookError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        let Some((k, v)) = part.trim().split_once('=') else {
            continue;
        };
        match k {
            "t" => timestamp = v.parse::<i64>().ok(),
            "v1" => signatures.push(v),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(WebhookError::MalformedHeader)?;
    if signatures.is_empty() {
        return Err(WebhookError::MalformedHeader);
    }
    let expected = mac(secret, payload, timestamp);
    let matched = signatures.iter().any(|s| {
        hex::decode(s)
            .map(|bytes| expected.clone().verify_slice(&bytes).is_ok())
            .unwrap_or(false)
    });
    if !matched {
        return Err(WebhookError::BadSignature);
    }
    let age_secs = now.saturating_sub(timestamp);
    if age_secs.saturating_abs() > tolerance_secs {
        return Err(WebhookError::Stale { age_secs });
    }
    let text = std::str::from_utf8(payload)
        .map_err(|_| WebhookError::MalformedPayload("not UTF-8".into()))?;
    let event: stripe_shared::Event = miniserde::json::from_str(text).map_err(|_| {
        WebhookError::MalformedPayload(
            "not a Stripe Event (id, type, created, data.object…)".into(),
        )
    })?;
    let object = serde_json::from_str(&miniserde::json::to_string(&event.data.object))
        .map_err(|e| WebhookError::MalformedPayload(e.to_string()))?;
    Ok(WebhookEvent {
        id: event.id.to_string(),
        kind: event.type_.as_str().to_string(),
        created: event.created,
        object,
    })
}
