//! Stripe: customers, card payment methods, manual-capture PaymentIntents, refunds, and webhook
//! signatures, on async-stripe's typed requests and objects (`stripe_core`, `stripe_payment`,
//! `stripe_shared`: Customer, PaymentMethod, PaymentIntent, Refund, Event). The requests are
//! sent by our own reqwest client through the library's `StripeClient` trait ([`Call`]), so
//! that our retry loop keeps the caller's idempotency key on every attempt (the library's own
//! strategies mint theirs) and the base URL is ours (`STRIPE_BASE_URL`: Stripe or
//! `cmb_sims::stripe`, which answers with the same objects).

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use stripe_client_core::{
    CustomizedStripeRequest, RequestBuilder, StripeClient, StripeClientErr, StripeMethod,
};
use stripe_core::customer::{CreateCustomer, DeleteCustomer, UpdateCustomer};
use stripe_core::payment_intent::{
    CancelPaymentIntent, CapturePaymentIntent, CreatePaymentIntent as CreateIntent,
    CreatePaymentIntentOffSession, RetrievePaymentIntent,
};
use stripe_core::refund::CreateRefund;
use stripe_payment::payment_method::{
    AttachPaymentMethod, DetachPaymentMethod, ListPaymentMethod, ListPaymentMethodType,
};
use stripe_shared::PaymentIntentCaptureMethod;

mod webhook;
pub use webhook::{sign_webhook, verify_webhook, WebhookError, WebhookEvent};

pub const DEFAULT_BASE_URL: &str = "https://api.stripe.com";
/// Retries after the first attempt, on network errors, 429 and 5xx, with the same key.
const MAX_RETRIES: u32 = 2;

/// The API version we speak: the one async-stripe's types are generated for. The simulator
/// reports the same in its answers and events.
pub fn api_version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| stripe_shared::version::VERSION.as_str().to_string())
}

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

impl StripeClientErr for StripeError {
    /// An answer that is not the object the request promises (async-stripe's types).
    fn deserialize_err(msg: impl std::fmt::Display) -> Self {
        unreadable("response", &msg.to_string())
    }
}

/// One request through our client: async-stripe builds it and reads the answer into its
/// types; [`Stripe::send`] sends it, with `idempotency_key` on every attempt of a POST.
struct Call<'a> {
    stripe: &'a Stripe,
    idempotency_key: Option<&'a str>,
}

impl StripeClient for Call<'_> {
    type Err = StripeError;

    fn execute(
        &self,
        req: CustomizedStripeRequest,
    ) -> impl std::future::Future<Output = Result<Bytes, StripeError>> + Send {
        let (req, _) = req.into_pieces();
        self.stripe.send(req, self.idempotency_key)
    }
}

impl Stripe {
    pub fn new(http: reqwest::Client, base_url: &str, secret_key: &str) -> Self {
        Stripe {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            secret_key: secret_key.to_string(),
        }
    }

    fn call<'a>(&'a self, idempotency_key: Option<&'a str>) -> Call<'a> {
        Call {
            stripe: self,
            idempotency_key,
        }
    }

    pub async fn create_customer(
        &self,
        email: &str,
        name: &str,
        user_id: &str,
        idempotency_key: &str,
    ) -> Result<Customer, StripeError> {
        let metadata = HashMap::from([("user_id".to_string(), user_id.to_string())]);
        let customer = CreateCustomer::new()
            .email(email)
            .name(name)
            .metadata(metadata)
            .send(&self.call(Some(idempotency_key)))
            .await?;
        Ok(Customer {
            id: customer.id.to_string(),
        })
    }

    /// Deletes the customer (an erased user's): Stripe detaches its payment methods and
    /// forgets its email and name; its payments stay in Stripe's own records.
    pub async fn delete_customer(&self, customer: &str) -> Result<(), StripeError> {
        DeleteCustomer::new(segment(customer))
            .send(&self.call(None))
            .await
            .map(|_| ())
    }

    pub async fn attach_payment_method(
        &self,
        payment_method: &str,
        customer: &str,
    ) -> Result<PaymentMethod, StripeError> {
        let pm = AttachPaymentMethod::new(segment(payment_method))
            .customer(customer)
            .send(&self.call(None))
            .await?;
        Ok(payment_method_of(pm))
    }

    pub async fn detach_payment_method(
        &self,
        payment_method: &str,
    ) -> Result<PaymentMethod, StripeError> {
        let pm = DetachPaymentMethod::new(segment(payment_method))
            .send(&self.call(None))
            .await?;
        Ok(payment_method_of(pm))
    }

    /// Sets the customer's `invoice_settings[default_payment_method]`.
    pub async fn set_default_payment_method(
        &self,
        customer: &str,
        payment_method: &str,
    ) -> Result<(), StripeError> {
        let settings = stripe_core::customer::UpdateCustomerInvoiceSettings {
            default_payment_method: Some(payment_method.to_string()),
            ..Default::default()
        };
        UpdateCustomer::new(segment(customer))
            .invoice_settings(settings)
            .send(&self.call(None))
            .await
            .map(|_| ())
    }

    /// The customer's cards (`type=card`, first 100).
    pub async fn list_payment_methods(
        &self,
        customer: &str,
    ) -> Result<Vec<PaymentMethod>, StripeError> {
        let list = ListPaymentMethod::new()
            .customer(customer)
            .type_(ListPaymentMethodType::Card)
            .limit(100)
            .send(&self.call(None))
            .await?;
        Ok(list.data.into_iter().map(payment_method_of).collect())
    }

    /// Creates and confirms (`confirm=true`, `off_session=true`) a PaymentIntent. A refused card
    /// is `StripeError::Card`.
    pub async fn create_payment_intent(
        &self,
        req: &CreatePaymentIntent,
        idempotency_key: &str,
    ) -> Result<PaymentIntent, StripeError> {
        let mut create = CreateIntent::new(req.amount, currency(&req.currency)?)
            .customer(&req.customer)
            .payment_method(&req.payment_method)
            .confirm(true)
            .off_session(CreatePaymentIntentOffSession::Bool(true))
            .capture_method(if req.manual_capture {
                PaymentIntentCaptureMethod::Manual
            } else {
                PaymentIntentCaptureMethod::Automatic
            })
            .metadata(req.metadata.iter().cloned().collect::<HashMap<_, _>>());
        if let Some(d) = &req.description {
            create = create.description(d);
        }
        let intent = create.send(&self.call(Some(idempotency_key))).await?;
        Ok(payment_intent_of(intent))
    }

    pub async fn retrieve_payment_intent(&self, id: &str) -> Result<PaymentIntent, StripeError> {
        let intent = RetrievePaymentIntent::new(segment(id))
            .send(&self.call(None))
            .await?;
        Ok(payment_intent_of(intent))
    }

    /// Captures `amount_to_capture` (≤ the authorised amount); Stripe releases the rest.
    pub async fn capture_payment_intent(
        &self,
        id: &str,
        amount_to_capture: i64,
        idempotency_key: &str,
    ) -> Result<PaymentIntent, StripeError> {
        let intent = CapturePaymentIntent::new(segment(id))
            .amount_to_capture(amount_to_capture)
            .send(&self.call(Some(idempotency_key)))
            .await?;
        Ok(payment_intent_of(intent))
    }

    pub async fn cancel_payment_intent(
        &self,
        id: &str,
        idempotency_key: &str,
    ) -> Result<PaymentIntent, StripeError> {
        let intent = CancelPaymentIntent::new(segment(id))
            .send(&self.call(Some(idempotency_key)))
            .await?;
        Ok(payment_intent_of(intent))
    }

    /// Refunds `amount` cents of the intent's charge, or all that is left with `None`.
    pub async fn create_refund(
        &self,
        payment_intent: &str,
        amount: Option<i64>,
        idempotency_key: &str,
    ) -> Result<Refund, StripeError> {
        let mut create = CreateRefund::new().payment_intent(payment_intent);
        if let Some(a) = amount {
            create = create.amount(a);
        }
        let refund = create.send(&self.call(Some(idempotency_key))).await?;
        Ok(Refund {
            id: refund.id.to_string(),
            amount: refund.amount,
            status: refund.status.unwrap_or_default(),
            payment_intent: refund
                .payment_intent
                .map(|p| p.id().to_string())
                .unwrap_or_else(|| payment_intent.to_string()),
        })
    }

    /// Sends what async-stripe built (its path is under `/v1`; query and form already
    /// encoded) to our base URL, retrying network errors, 429 and 5xx up to `MAX_RETRIES`
    /// times (unless Stripe says `Stripe-Should-Retry: false`), with the same idempotency key
    /// on every attempt of a POST: the caller's, or a fresh one so that our own retries of
    /// this call are still safe. Error answers become [`StripeError`]s.
    async fn send(
        &self,
        req: RequestBuilder,
        idempotency_key: Option<&str>,
    ) -> Result<Bytes, StripeError> {
        let mut url = format!("{}/v1{}", self.base_url, req.path);
        if let Some(q) = req.query.as_deref().filter(|q| !q.is_empty()) {
            url.push('?');
            url.push_str(q);
        }
        let key = match req.method {
            StripeMethod::Post => Some(
                idempotency_key
                    .map(str::to_string)
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            ),
            StripeMethod::Get | StripeMethod::Delete => None,
        };
        let mut attempt = 0;
        loop {
            let last = attempt >= MAX_RETRIES;
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 * 2u64.pow(attempt - 1))).await;
            }
            attempt += 1;
            let mut request = match req.method {
                StripeMethod::Get => self.http.get(&url),
                StripeMethod::Post => self.http.post(&url),
                StripeMethod::Delete => self.http.delete(&url),
            };
            if let Some(key) = &key {
                request = request.header("Idempotency-Key", key);
            }
            if let Some(body) = &req.body {
                request = request
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(body.clone());
            }
            let sent = request
                .bearer_auth(&self.secret_key)
                .header("Stripe-Version", api_version())
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
                return Ok(body);
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

fn currency(code: &str) -> Result<stripe_types::Currency, StripeError> {
    code.parse().map_err(|_| StripeError::InvalidRequest {
        status: 400,
        code: Some("invalid_currency".into()),
        message: format!("unknown currency {code:?}"),
        param: Some("currency".into()),
    })
}

fn unreadable(what: &str, detail: &str) -> StripeError {
    StripeError::Unreachable(format!("unreadable {what} from Stripe: {detail}"))
}

fn str_of(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

fn payment_method_of(pm: stripe_shared::PaymentMethod) -> PaymentMethod {
    let card = pm.card;
    PaymentMethod {
        id: pm.id.to_string(),
        customer: pm.customer.map(|c| c.id().to_string()),
        brand: card.as_ref().map(|c| c.brand.clone()).unwrap_or_default(),
        last4: card.as_ref().map(|c| c.last4.clone()).unwrap_or_default(),
        exp_month: card.as_ref().map_or(0, |c| c.exp_month.clamp(0, 12) as u32),
        exp_year: card
            .as_ref()
            .map_or(0, |c| c.exp_year.clamp(0, 9999) as u32),
    }
}

fn payment_intent_of(pi: stripe_shared::PaymentIntent) -> PaymentIntent {
    PaymentIntent {
        id: pi.id.to_string(),
        status: pi.status.as_str().to_string(),
        amount: pi.amount,
        amount_capturable: pi.amount_capturable,
        amount_received: pi.amount_received,
        customer: pi.customer.map(|c| c.id().to_string()),
        metadata: pi.metadata,
        last_payment_error: pi.last_payment_error.map(|e| CardError {
            code: e
                .code
                .map(|c| c.as_str().to_string())
                .unwrap_or_else(|| "card_declined".into()),
            decline_code: e.decline_code,
            message: e.message.unwrap_or_default(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_secret";
    const PAYLOAD: &[u8] =
        br#"{"id":"evt_1","object":"event","type":"payment_intent.succeeded","created":1700000000,"livemode":false,"pending_webhooks":1,"data":{"object":{"id":"pi_1"}}}"#;

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
