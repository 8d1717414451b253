//! Stripe: customers, card payment methods, manual-capture PaymentIntents, refunds, and webhook
//! signatures. Speaks Stripe's wire protocol directly (form bodies with bracket notation,
//! `Authorization: Bearer sk_…`, `Idempotency-Key`, `Stripe-Version`), so the same client talks
//! to Stripe or to `cmb_sims::stripe`.
//!
//! Written on reqwest rather than async-stripe 1.0-rc: that crate compiles ~240k lines of
//! generated types whatever features are chosen, brings its own hyper client, and its retry
//! strategies mint their own idempotency keys, while we want the caller's key on every retry.

use std::collections::HashMap;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

pub const DEFAULT_BASE_URL: &str = "https://api.stripe.com";
/// The API version we speak; the simulator reports the same in its events.
pub const API_VERSION: &str = "2023-10-16";
/// Retries after the first attempt, on network errors, 429 and 5xx, with the same key.
const MAX_RETRIES: u32 = 2;

#[derive(Clone)]
pub struct Stripe {
    http: reqwest::Client,
    base_url: String,
    secret_key: String,
}

impl std::fmt::Debug for Stripe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stripe")
            .field("base_url", &self.base_url)
            .field("secret_key", &"<redacted>")
            .finish()
    }
}

/// What to charge: `amount` in cents of `currency` ("usd"), confirmed off session at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatePaymentIntent {
    pub amount: i64,
    pub currency: String,
    pub customer: String,
    pub payment_method: String,
    /// `capture_method=manual`: authorise now, capture the final amount later.
    pub manual_capture: bool,
    pub metadata: Vec<(String, String)>,
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customer {
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentMethod {
    pub id: String,
    pub customer: Option<String>,
    pub brand: String,
    pub last4: String,
    pub exp_month: u32,
    pub exp_year: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentIntent {
    pub id: String,
    /// `requires_capture`, `succeeded`, `canceled`, `requires_payment_method`, …
    pub status: String,
    pub amount: i64,
    pub amount_capturable: i64,
    pub amount_received: i64,
    pub customer: Option<String>,
    pub metadata: HashMap<String, String>,
    pub last_payment_error: Option<CardError>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    pub id: String,
    pub amount: i64,
    pub status: String,
    pub payment_intent: String,
}

/// Why a card was refused: `code` (`card_declined`, …) and the issuer's `decline_code`
/// (`generic_decline`, `insufficient_funds`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardError {
    pub code: String,
    pub decline_code: Option<String>,
    pub message: String,
}

impl std::fmt::Display for CardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.decline_code {
            Some(d) => write!(f, "{} ({d}): {}", self.code, self.message),
            None => write!(f, "{}: {}", self.code, self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    /// HTTP 402, `type: card_error`: the card was refused; our API answers 402 with the reason.
    #[error("card refused: {0}")]
    Card(CardError),
    /// Stripe understood the request and refused it (4xx other than card errors).
    #[error("Stripe refused the request ({status}): {message}")]
    InvalidRequest {
        status: u16,
        code: Option<String>,
        message: String,
        param: Option<String>,
    },
    /// Network error, timeout, 429 or 5xx after retries: safe to retry with the same key.
    #[error("Stripe could not be reached: {0}")]
    Unreachable(String),
}

impl StripeError {
    /// Whether the same request (with the same idempotency key) may succeed later.
    pub fn retryable(&self) -> bool {
        matches!(self, StripeError::Unreachable(_))
    }
}

type Form = Vec<(String, String)>;

fn field(k: &str, v: impl ToString) -> (String, String) {
    (k.to_string(), v.to_string())
}

impl Stripe {
    pub fn new(http: reqwest::Client, base_url: &str, secret_key: &str) -> Self {
        Stripe {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            secret_key: secret_key.to_string(),
        }
    }

    pub async fn create_customer(
        &self,
        email: &str,
        name: &str,
        user_id: &str,
        idempotency_key: &str,
    ) -> Result<Customer, StripeError> {
        let form = vec![
            field("email", email),
            field("name", name),
            field("metadata[user_id]", user_id),
        ];
        let v = self
            .post("/v1/customers", form, Some(idempotency_key))
            .await?;
        Ok(Customer {
            id: required_str(&v, "id", "customer")?,
        })
    }

    /// Deletes the customer (an erased user's): Stripe detaches its payment methods and
    /// forgets its email and name; its payments stay in Stripe's own records.
    pub async fn delete_customer(&self, customer: &str) -> Result<(), StripeError> {
        let url = format!("{}/v1/customers/{}", self.base_url, segment(customer));
        self.send(|| self.http.delete(&url)).await.map(|_| ())
    }

    pub async fn attach_payment_method(
        &self,
        payment_method: &str,
        customer: &str,
    ) -> Result<PaymentMethod, StripeError> {
        let path = format!("/v1/payment_methods/{}/attach", segment(payment_method));
        let v = self
            .post(&path, vec![field("customer", customer)], None)
            .await?;
        parse_payment_method(&v)
    }

    pub async fn detach_payment_method(
        &self,
        payment_method: &str,
    ) -> Result<PaymentMethod, StripeError> {
        let path = format!("/v1/payment_methods/{}/detach", segment(payment_method));
        let v = self.post(&path, Vec::new(), None).await?;
        parse_payment_method(&v)
    }

    /// Sets the customer's `invoice_settings[default_payment_method]`.
    pub async fn set_default_payment_method(
        &self,
        customer: &str,
        payment_method: &str,
    ) -> Result<(), StripeError> {
        let path = format!("/v1/customers/{}", segment(customer));
        let form = vec![field(
            "invoice_settings[default_payment_method]",
            payment_method,
        )];
        self.post(&path, form, None).await.map(|_| ())
    }

    /// The customer's cards (`type=card`, first 100).
    pub async fn list_payment_methods(
        &self,
        customer: &str,
    ) -> Result<Vec<PaymentMethod>, StripeError> {
        let query = [("customer", customer), ("type", "card"), ("limit", "100")];
        let v = self.get("/v1/payment_methods", &query).await?;
        let data = v
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| unreadable("payment method list", "no data"))?;
        data.iter().map(parse_payment_method).collect()
    }

    /// Creates and confirms (`confirm=true`, `off_session=true`) a PaymentIntent. A refused card
    /// is `StripeError::Card`.
    pub async fn create_payment_intent(
        &self,
        req: &CreatePaymentIntent,
        idempotency_key: &str,
    ) -> Result<PaymentIntent, StripeError> {
        let mut form = vec![
            field("amount", req.amount),
            field("currency", &req.currency),
            field("customer", &req.customer),
            field("payment_method", &req.payment_method),
            field("payment_method_types[]", "card"),
            field("confirm", "true"),
            field("off_session", "true"),
            field(
                "capture_method",
                if req.manual_capture {
                    "manual"
                } else {
                    "automatic"
                },
            ),
        ];
        if let Some(d) = &req.description {
            form.push(field("description", d));
        }
        for (k, v) in &req.metadata {
            form.push((format!("metadata[{k}]"), v.clone()));
        }
        let v = self
            .post("/v1/payment_intents", form, Some(idempotency_key))
            .await?;
        parse_payment_intent(&v)
    }

    pub async fn retrieve_payment_intent(&self, id: &str) -> Result<PaymentIntent, StripeError> {
        let path = format!("/v1/payment_intents/{}", segment(id));
        let v = self.get(&path, &[]).await?;
        parse_payment_intent(&v)
    }

    /// Captures `amount_to_capture` (≤ the authorised amount); Stripe releases the rest.
    pub async fn capture_payment_intent(
        &self,
        id: &str,
        amount_to_capture: i64,
        idempotency_key: &str,
    ) -> Result<PaymentIntent, StripeError> {
        let path = format!("/v1/payment_intents/{}/capture", segment(id));
        let form = vec![field("amount_to_capture", amount_to_capture)];
        let v = self.post(&path, form, Some(idempotency_key)).await?;
        parse_payment_intent(&v)
    }

    pub async fn cancel_payment_intent(
        &self,
        id: &str,
        idempotency_key: &str,
    ) -> Result<PaymentIntent, StripeError> {
        let path = format!("/v1/payment_intents/{}/cancel", segment(id));
        let v = self.post(&path, Vec::new(), Some(idempotency_key)).await?;
        parse_payment_intent(&v)
    }

    /// Refunds `amount` cents of the intent's charge, or all that is left with `None`.
    pub async fn create_refund(
        &self,
        payment_intent: &str,
        amount: Option<i64>,
        idempotency_key: &str,
    ) -> Result<Refund, StripeError> {
        let mut form = vec![field("payment_intent", payment_intent)];
        if let Some(a) = amount {
            form.push(field("amount", a));
        }
        let v = self
            .post("/v1/refunds", form, Some(idempotency_key))
            .await?;
        Ok(Refund {
            id: required_str(&v, "id", "refund")?,
            amount: v.get("amount").and_then(Value::as_i64).unwrap_or(0),
            status: str_of(&v, "status").unwrap_or_default(),
            payment_intent: expandable_id(v.get("payment_intent"))
                .unwrap_or_else(|| payment_intent.to_string()),
        })
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, StripeError> {
        let url = format!("{}{path}", self.base_url);
        self.send(|| self.http.get(&url).query(query)).await
    }

    /// A POST with the caller's idempotency key, or a fresh one so that our own retries of
    /// this call are still safe.
    async fn post(
        &self,
        path: &str,
        form: Form,
        idempotency_key: Option<&str>,
    ) -> Result<Value, StripeError> {
        let url = format!("{}{path}", self.base_url);
        let key = idempotency_key
            .map(str::to_string)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        self.send(|| {
            self.http
                .post(&url)
                .header("Idempotency-Key", &key)
                .form(&form)
        })
        .await
    }

    /// Sends the request, retrying network errors, 429 and 5xx up to `MAX_RETRIES` times
    /// (unless Stripe says `Stripe-Should-Retry: false`); maps error bodies.
    async fn send(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Value, StripeError> {
        let mut attempt = 0;
        loop {
            let last = attempt >= MAX_RETRIES;
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 * 2u64.pow(attempt - 1))).await;
            }
            attempt += 1;
            let sent = build()
                .bearer_auth(&self.secret_key)
                .header("Stripe-Version", API_VERSION)
                .send()
                .await;
            let response = match sent {
                Ok(r) => r,
                Err(e) if !last => {
                    tracing::debug!(error = %e, attempt, "Stripe request failed; retrying");
                    continue;
                }
                Err(e) => return Err(StripeError::Unreachable(e.to_string())),
            };
            let status = response.status();
            let should_retry = response
                .headers()
                .get("Stripe-Should-Retry")
                .and_then(|v| v.to_str().ok())
                .map(|v| v == "true");
            let body = match response.bytes().await {
                Ok(b) => b,
                Err(e) if !last => {
                    tracing::debug!(error = %e, attempt, "Stripe response cut short; retrying");
                    continue;
                }
                Err(e) => return Err(StripeError::Unreachable(e.to_string())),
            };
            if status.is_success() {
                return serde_json::from_slice(&body)
                    .map_err(|e| unreadable("response", &e.to_string()));
            }
            let transient = status.is_server_error() || status.as_u16() == 429;
            if transient && !last && should_retry != Some(false) {
                tracing::debug!(%status, attempt, "Stripe answered a transient error; retrying");
                continue;
            }
            return Err(error_from(status.as_u16(), &body, transient));
        }
    }
}

/// Maps an error answer: `{"error":{"type","code","decline_code","message","param"}}`.
fn error_from(status: u16, body: &[u8], transient: bool) -> StripeError {
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let error = parsed.get("error").cloned().unwrap_or(Value::Null);
    let message = str_of(&error, "message")
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(300).collect());
    if transient {
        return StripeError::Unreachable(format!("{status}: {message}"));
    }
    let kind = str_of(&error, "type");
    if status == 402 || kind.as_deref() == Some("card_error") {
        return StripeError::Card(CardError {
            code: str_of(&error, "code").unwrap_or_else(|| "card_declined".into()),
            decline_code: str_of(&error, "decline_code"),
            message,
        });
    }
    StripeError::InvalidRequest {
        status,
        code: str_of(&error, "code"),
        message,
        param: str_of(&error, "param"),
    }
}

/// Ids go into paths; keep them from adding segments or queries.
fn segment(id: &str) -> String {
    id.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect()
}

fn unreadable(what: &str, detail: &str) -> StripeError {
    StripeError::Unreachable(format!("unreadable {what} from Stripe: {detail}"))
}

fn str_of(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

fn required_str(v: &Value, key: &str, what: &str) -> Result<String, StripeError> {
    str_of(v, key).ok_or_else(|| unreadable(what, &format!("no {key}")))
}

/// A reference that is an id, or the object itself when expanded.
fn expandable_id(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("id").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn parse_payment_method(v: &Value) -> Result<PaymentMethod, StripeError> {
    let card = v.get("card").cloned().unwrap_or(Value::Null);
    let number = |k: &str| card.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
    Ok(PaymentMethod {
        id: required_str(v, "id", "payment method")?,
        customer: expandable_id(v.get("customer")),
        brand: str_of(&card, "brand").unwrap_or_default(),
        last4: str_of(&card, "last4").unwrap_or_default(),
        exp_month: number("exp_month"),
        exp_year: number("exp_year"),
    })
}

fn parse_card_error(v: &Value) -> Option<CardError> {
    if !v.is_object() {
        return None;
    }
    Some(CardError {
        code: str_of(v, "code").unwrap_or_else(|| "card_declined".into()),
        decline_code: str_of(v, "decline_code"),
        message: str_of(v, "message").unwrap_or_default(),
    })
}

fn parse_payment_intent(v: &Value) -> Result<PaymentIntent, StripeError> {
    let cents = |k: &str| v.get(k).and_then(Value::as_i64).unwrap_or(0);
    let metadata = v
        .get("metadata")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(PaymentIntent {
        id: required_str(v, "id", "payment intent")?,
        status: required_str(v, "status", "payment intent")?,
        amount: cents("amount"),
        amount_capturable: cents("amount_capturable"),
        amount_received: cents("amount_received"),
        customer: expandable_id(v.get("customer")),
        metadata,
        last_payment_error: v.get("last_payment_error").and_then(parse_card_error),
    })
}

// ---------------------------------------------------------------------------------------------
// Webhooks

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
    let event: Value = serde_json::from_slice(payload)
        .map_err(|e| WebhookError::MalformedPayload(e.to_string()))?;
    let text = |k: &str| {
        str_of(&event, k).ok_or_else(|| WebhookError::MalformedPayload(format!("no {k}")))
    };
    Ok(WebhookEvent {
        id: text("id")?,
        kind: text("type")?,
        created: event.get("created").and_then(Value::as_i64).unwrap_or(0),
        object: event
            .get("data")
            .and_then(|d| d.get("object"))
            .cloned()
            .ok_or_else(|| WebhookError::MalformedPayload("no data.object".into()))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_secret";
    const PAYLOAD: &[u8] =
        br#"{"id":"evt_1","type":"payment_intent.succeeded","created":1700000000,"data":{"object":{"id":"pi_1"}}}"#;

    #[test]
    fn a_signed_event_verifies() {
        let header = sign_webhook(SECRET, PAYLOAD, 1_700_000_000);
        let event = verify_webhook(SECRET, PAYLOAD, &header, 1_700_000_010, 300).unwrap();
        assert_eq!(event.id, "evt_1");
        assert_eq!(event.kind, "payment_intent.succeeded");
        assert_eq!(event.created, 1_700_000_000);
        assert_eq!(event.object["id"], "pi_1");
    }

    #[test]
    fn tampering_a_wrong_secret_and_staleness_are_rejected() {
        let header = sign_webhook(SECRET, PAYLOAD, 1_700_000_000);
        let tampered = String::from_utf8_lossy(PAYLOAD).replace("pi_1", "pi_2");
        assert_eq!(
            verify_webhook(SECRET, tampered.as_bytes(), &header, 1_700_000_000, 300),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify_webhook("whsec_other", PAYLOAD, &header, 1_700_000_000, 300),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify_webhook(SECRET, PAYLOAD, &header, 1_700_000_301, 300),
            Err(WebhookError::Stale { age_secs: 301 })
        );
        assert!(verify_webhook(SECRET, PAYLOAD, &header, 1_700_000_300, 300).is_ok());
        for bad in [
            "",
            "t=abc,v1=00",
            "v1=00",
            "t=1700000000",
            "t=1700000000,v1=zz",
        ] {
            assert!(verify_webhook(SECRET, PAYLOAD, bad, 1_700_000_000, 300).is_err());
        }
    }

    #[test]
    fn any_matching_v1_passes_and_v0_is_ignored() {
        let good = sign_webhook(SECRET, PAYLOAD, 1_700_000_000);
        let v1 = good.split_once("v1=").unwrap().1;
        let header = format!("t=1700000000,v1={},v1={v1},v0=abc", "0".repeat(64));
        assert!(verify_webhook(SECRET, PAYLOAD, &header, 1_700_000_000, 300).is_ok());
        let only_v0 = format!("t=1700000000,v0={v1}");
        assert!(verify_webhook(SECRET, PAYLOAD, &only_v0, 1_700_000_000, 300).is_err());
    }

    #[test]
    fn error_bodies_map_to_kinds() {
        let card = br#"{"error":{"type":"card_error","code":"card_declined","decline_code":"insufficient_funds","message":"no"}}"#;
        match error_from(402, card, false) {
            StripeError::Card(e) => {
                assert_eq!(e.decline_code.as_deref(), Some("insufficient_funds"))
            }
            other => panic!("{other:?}"),
        }
        let e = error_from(
            400,
            br#"{"error":{"type":"invalid_request_error","param":"amount","message":"x"}}"#,
            false,
        );
        assert!(
            matches!(&e, StripeError::InvalidRequest { status: 400, param: Some(p), .. } if p == "amount")
        );
        assert!(!e.retryable());
        assert!(error_from(503, b"<html>", true).retryable());
    }
}
