//! Stripe simulator: a stateful slice of Stripe's API (customers, card payment methods,
//! PaymentIntents with manual capture, refunds), with Stripe's idempotency rules and signed
//! webhooks, so that payment flows — declines, partial captures, retries — run without Stripe.
//!
//! Requests are form-encoded with bracket notation; answers and errors are shaped like
//! Stripe's (`{"error":{"type","code","decline_code","message","param"}}`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::Faults;
use cmb_providers::stripe::{sign_webhook, API_VERSION};

pub const DEV_WEBHOOK_SECRET: &str = "whsec_callmeback_development";
/// Events waiting for delivery; beyond this they are dropped with a warning.
const WEBHOOK_QUEUE: usize = 1024;
/// Stripe's minimum charge in USD.
const MIN_USD_CENTS: i64 = 50;

#[derive(Debug, Clone)]
pub struct Settings {
    pub webhook_secret: String,
    pub webhook_url: Option<String>,
    pub faults: Faults,
}

impl Settings {
    /// `STRIPE_WEBHOOK_SECRET` (else `DEV_WEBHOOK_SECRET`), `SIM_STRIPE_WEBHOOK_URL`,
    /// `SIM_STRIPE_LATENCY_MS`, `SIM_STRIPE_FAIL_EVERY`.
    pub fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Self {
        let non_empty = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        Settings {
            webhook_secret: non_empty("STRIPE_WEBHOOK_SECRET")
                .unwrap_or_else(|| DEV_WEBHOOK_SECRET.to_string()),
            webhook_url: non_empty("SIM_STRIPE_WEBHOOK_URL"),
            faults: Faults::from_lookup(get, "STRIPE"),
        }
    }
}

#[derive(Clone)]
pub struct StripeSim {
    shared: Arc<Shared>,
}

struct Shared {
    faults: Faults,
    webhook_secret: String,
    webhook_url: Arc<Mutex<Option<String>>>,
    state: Mutex<Ledger>,
}

/// How a test card behaves when charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Succeeds,
    Declined,
    InsufficientFunds,
}

#[derive(Debug, Clone, Copy)]
struct TestCard {
    brand: &'static str,
    last4: &'static str,
    behaviour: Behaviour,
}

const VISA: TestCard = TestCard {
    brand: "visa",
    last4: "4242",
    behaviour: Behaviour::Succeeds,
};
const MASTERCARD: TestCard = TestCard {
    brand: "mastercard",
    last4: "4444",
    behaviour: Behaviour::Succeeds,
};
const DECLINED: TestCard = TestCard {
    brand: "visa",
    last4: "0002",
    behaviour: Behaviour::Declined,
};
const INSUFFICIENT: TestCard = TestCard {
    brand: "visa",
    last4: "9995",
    behaviour: Behaviour::InsufficientFunds,
};

fn test_token(id: &str) -> Option<TestCard> {
    match id {
        "pm_card_visa" => Some(VISA),
        "pm_card_mastercard" => Some(MASTERCARD),
        "pm_card_chargeDeclined" => Some(DECLINED),
        "pm_card_chargeDeclinedInsufficientFunds" => Some(INSUFFICIENT),
        _ => None,
    }
}

fn test_number(number: &str) -> Option<TestCard> {
    let digits: String = number.chars().filter(char::is_ascii_digit).collect();
    match digits.as_str() {
        "4242424242424242" => Some(VISA),
        "5555555555554444" => Some(MASTERCARD),
        "4000000000000002" => Some(DECLINED),
        "4000000000009995" => Some(INSUFFICIENT),
        _ => None,
    }
}

struct Card {
    id: String,
    seq: u64,
    created: i64,
    customer: Option<String>,
    card: TestCard,
}

impl Card {
    fn json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "payment_method",
            "type": "card",
            "created": self.created,
            "customer": self.customer,
            "livemode": false,
            "metadata": {},
            "billing_details": { "address": null, "email": null, "name": null, "phone": null },
            "card": {
                "brand": self.card.brand,
                "last4": self.card.last4,
                "exp_month": 12,
                "exp_year": 2034,
                "funding": "credit",
                "country": "US",
            },
        })
    }
}

struct Intent {
    id: String,
    created: i64,
    amount: i64,
    currency: String,
    customer: Option<String>,
    payment_method: Option<String>,
    capture_method: String,
    status: &'static str,
    amount_capturable: i64,
    amount_received: i64,
    amount_refunded: i64,
    metadata: BTreeMap<String, String>,
    description: Option<String>,
    last_payment_error: Option<Value>,
    latest_charge: Option<String>,
    canceled_at: Option<i64>,
    cancellation_reason: Option<String>,
}

impl Intent {
    fn json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "payment_intent",
            "amount": self.amount,
            "amount_capturable": self.amount_capturable,
            "amount_received": self.amount_received,
            "currency": self.currency,
            "capture_method": self.capture_method,
            "confirmation_method": "automatic",
            "client_secret": format!("{}_secret_sim", self.id),
            "created": self.created,
            "livemode": false,
            "customer": self.customer,
            "payment_method": self.payment_method,
            "payment_method_types": ["card"],
            "latest_charge": self.latest_charge,
            "last_payment_error": self.last_payment_error,
            "next_action": null,
            "metadata": self.metadata,
            "description": self.description,
            "status": self.status,
            "canceled_at": self.canceled_at,
            "cancellation_reason": self.cancellation_reason,
        })
    }

    fn charge_json(&self) -> Value {
        json!({
            "id": self.latest_charge,
            "object": "charge",
            "amount": self.amount,
            "amount_captured": self.amount_received,
            "amount_refunded": self.amount_refunded,
            "captured": self.amount_received > 0,
            "refunded": self.amount_received > 0 && self.amount_refunded >= self.amount_received,
            "currency": self.currency,
            "customer": self.customer,
            "payment_intent": self.id,
            "payment_method": self.payment_method,
            "status": "succeeded",
            "paid": true,
            "livemode": false,
        })
    }
}

/// A saved answer to an idempotent request.
struct Saved {
    endpoint: String,
    params: Vec<(String, String)>,
    status: StatusCode,
    body: Value,
}

#[derive(Default)]
struct Ledger {
    seq: u64,
    customers: HashMap<String, Value>,
    cards: HashMap<String, Card>,
    intents: Vec<Intent>,
    saved: HashMap<String, Saved>,
    captured_cents: i64,
    refunded_cents: i64,
    replays: u64,
    webhooks: Option<mpsc::Sender<Value>>,
}

/// A Stripe error answer.
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    decline_code: Option<&'static str>,
    message: String,
    param: Option<&'static str>,
    /// Boxed to keep `Result<_, ApiError>` small.
    payment_intent: Option<Box<Value>>,
}

impl ApiError {
    fn invalid(code: Option<&'static str>, param: Option<&'static str>, message: String) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code,
            decline_code: None,
            message,
            param,
            payment_intent: None,
        }
    }

    fn missing(param: &'static str, what: &str, id: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            ..ApiError::invalid(
                Some("resource_missing"),
                Some(param),
                format!("No such {what}: '{id}'"),
            )
        }
    }

    fn body(&self) -> Value {
        let mut error = json!({
            "type": self.kind,
            "message": self.message,
            "doc_url": self.code.map(|c| format!("https://stripe.com/docs/error-codes/{}", c.replace('_', "-"))),
        });
        for (k, v) in [
            ("code", self.code),
            ("decline_code", self.decline_code),
            ("param", self.param),
        ] {
            if let Some(v) = v {
                error[k] = json!(v);
            }
        }
        if let Some(pi) = &self.payment_intent {
            error["payment_intent"] = (**pi).clone();
        }
        json!({ "error": error })
    }
}

type Params = Vec<(String, String)>;
type Outcome = Result<Value, ApiError>;

fn param<'a>(p: &'a Params, key: &str) -> Option<&'a str> {
    p.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn flag(p: &Params, key: &str) -> Result<bool, ApiError> {
    match param(p, key) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(bad_param(key, other)),
    }
}

fn cents(p: &Params, key: &'static str) -> Result<Option<i64>, ApiError> {
    match param(p, key) {
        None => Ok(None),
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| *n > 0)
            .map(Some)
            .ok_or_else(|| {
                ApiError::invalid(
                    Some("parameter_invalid_integer"),
                    Some(key),
                    format!("Invalid positive integer: {v}"),
                )
            }),
    }
}

fn bad_param(key: &str, value: &str) -> ApiError {
    ApiError::invalid(
        Some("parameter_invalid_empty"),
        None,
        format!("Invalid value for {key}: {value}"),
    )
}

/// `metadata[k]=v` pairs.
fn metadata(p: &Params) -> BTreeMap<String, String> {
    p.iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("metadata[")
                .and_then(|k| k.strip_suffix(']'))
                .map(|k| (k.to_string(), v.clone()))
        })
        .collect()
}

fn random_id(prefix: &str) -> String {
    let tail: String = rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("{prefix}_{tail}")
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl StripeSim {
    pub fn new(settings: Settings) -> Self {
        StripeSim {
            shared: Arc::new(Shared {
                faults: settings.faults,
                webhook_secret: settings.webhook_secret,
                webhook_url: Arc::new(Mutex::new(settings.webhook_url)),
                state: Mutex::default(),
            }),
        }
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/customers", post(create_customer))
            .route(
                "/v1/customers/{id}",
                get(get_customer).post(update_customer),
            )
            .route("/v1/payment_methods", get(list_payment_methods))
            .route("/v1/payment_methods/{id}/attach", post(attach))
            .route("/v1/payment_methods/{id}/detach", post(detach))
            .route("/v1/payment_intents", post(create_intent))
            .route("/v1/payment_intents/{id}", get(get_intent))
            .route("/v1/payment_intents/{id}/capture", post(capture))
            .route("/v1/payment_intents/{id}/cancel", post(cancel))
            .route("/v1/refunds", post(create_refund))
            .with_state(self.clone())
    }

    /// Where signed events are POSTed from now on.
    pub fn set_webhook_url(&self, url: &str) {
        *lock(&self.shared.webhook_url) = Some(url.to_string());
    }

    /// The current state of every PaymentIntent, oldest first.
    pub fn payment_intents(&self) -> Vec<Value> {
        self.ledger().intents.iter().map(Intent::json).collect()
    }

    /// Cents captured minus cents refunded, over all intents.
    pub fn charges_captured_cents(&self) -> i64 {
        let l = self.ledger();
        l.captured_cents - l.refunded_cents
    }

    /// How many requests were answered from a saved idempotent response.
    pub fn idempotent_replays(&self) -> u64 {
        self.ledger().replays
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        lock(&self.shared.state)
    }

    /// Latency, injected failures and authentication shared by every endpoint.
    async fn admit(&self, headers: &HeaderMap) -> Result<(), Response> {
        if self.shared.faults.apply().await {
            let error = ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "api_error",
                message: "injected failure".into(),
                ..ApiError::invalid(None, None, String::new())
            };
            return Err(respond(error.status, error.body(), &[]));
        }
        let key = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
            .trim();
        if key.len() <= 3 || !key.starts_with("sk_") {
            let error = ApiError {
                status: StatusCode::UNAUTHORIZED,
                ..ApiError::invalid(
                    None,
                    None,
                    "Invalid API Key provided. Send `Authorization: Bearer sk_test_…`.".into(),
                )
            };
            return Err(respond(error.status, error.body(), &[]));
        }
        Ok(())
    }

    async fn read(&self, headers: &HeaderMap, query: Option<String>, op: ReadOp) -> Response {
        if let Err(r) = self.admit(headers).await {
            return r;
        }
        let params: Params =
            serde_urlencoded::from_str(query.as_deref().unwrap_or("")).unwrap_or_default();
        let outcome = op(&mut self.ledger(), &params);
        match outcome {
            Ok(body) => respond(StatusCode::OK, body, &[]),
            Err(e) => respond(e.status, e.body(), &[]),
        }
    }

    /// A POST: authentication, form parsing, then Stripe's idempotency rules around `op`.
    async fn write(
        &self,
        headers: &HeaderMap,
        endpoint: String,
        body: &[u8],
        op: WriteOp,
    ) -> Response {
        if let Err(r) = self.admit(headers).await {
            return r;
        }
        let params: Params = match serde_urlencoded::from_bytes(body) {
            Ok(p) => p,
            Err(e) => {
                let error = ApiError::invalid(None, None, format!("Invalid form body: {e}"));
                return respond(error.status, error.body(), &[]);
            }
        };
        let key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // Compared without regard to order, as Stripe compares parameters, not bodies.
        let mut sorted = params.clone();
        sorted.sort();
        let mut ledger = self.ledger();
        if let Some(key) = &key {
            if key.len() > 255 {
                let error = ApiError::invalid(
                    None,
                    None,
                    "Idempotency keys are at most 255 characters.".into(),
                );
                return respond(error.status, error.body(), &[]);
            }
            if let Some(saved) = ledger.saved.get(key) {
                if saved.endpoint != endpoint || saved.params != sorted {
                    let error = ApiError {
                        kind: "idempotency_error",
                        ..ApiError::invalid(
                            None,
                            None,
                            format!(
                                "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{key}' if you meant to execute a different request."
                            ),
                        )
                    };
                    return respond(error.status, error.body(), &[]);
                }
                let (status, body) = (saved.status, saved.body.clone());
                ledger.replays += 1;
                return respond(
                    status,
                    body,
                    &[("Idempotency-Key", key), ("Idempotent-Replayed", "true")],
                );
            }
        }
        let mut events = Vec::new();
        let outcome = op(&mut ledger, &params, &mut events);
        let (status, body) = match outcome {
            Ok(body) => (StatusCode::OK, body),
            Err(e) => (e.status, e.body()),
        };
        // Like Stripe, save what the endpoint answered once it ran (successes and card
        // errors), not requests refused before running.
        if let Some(key) = &key {
            if status.is_success() || status == StatusCode::PAYMENT_REQUIRED {
                ledger.saved.insert(
                    key.clone(),
                    Saved {
                        endpoint,
                        params: sorted,
                        status,
                        body: body.clone(),
                    },
                );
            }
        }
        for (kind, object) in events {
            self.emit(&mut ledger, kind, object, key.as_deref());
        }
        drop(ledger);
        let mut extra = Vec::new();
        if let Some(key) = &key {
            extra.push(("Idempotency-Key", key.as_str()));
        }
        respond(status, body, &extra)
    }

    /// Queues a signed event for the webhook URL, if there is one; a single task delivers them
    /// in order.
    fn emit(&self, ledger: &mut Ledger, kind: &'static str, object: Value, key: Option<&str>) {
        if lock(&self.shared.webhook_url).is_none() {
            return;
        }
        let event = json!({
            "id": random_id("evt"),
            "object": "event",
            "api_version": API_VERSION,
            "created": now(),
            "livemode": false,
            "pending_webhooks": 1,
            "request": { "id": random_id("req"), "idempotency_key": key },
            "type": kind,
            "data": { "object": object },
        });
        if ledger.webhooks.is_none() {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            let (tx, rx) = mpsc::channel(WEBHOOK_QUEUE);
            runtime.spawn(deliver(
                rx,
                self.shared.webhook_url.clone(),
                self.shared.webhook_secret.clone(),
            ));
            ledger.webhooks = Some(tx);
        }
        if let Some(tx) = &ledger.webhooks {
            if tx.try_send(event).is_err() {
                tracing::warn!(kind, "Stripe simulator webhook queue full; event dropped");
            }
        }
    }
}

/// A poisoned lock only means a panic elsewhere; the data is still consistent enough for a
/// simulator.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

type ReadOp = fn(&mut Ledger, &Params) -> Outcome;
type Events = Vec<(&'static str, Value)>;
type WriteOp = Box<dyn FnOnce(&mut Ledger, &Params, &mut Events) -> Outcome + Send>;

fn respond(status: StatusCode, body: Value, headers: &[(&str, &str)]) -> Response {
    let mut response = (status, Json(body)).into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&random_id("req")) {
        h.insert("request-id", v);
    }
    h.insert("stripe-version", HeaderValue::from_static(API_VERSION));
    for (k, v) in headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.insert(name, value);
        }
    }
    response
}

/// Delivers events one after another, a little after they happened, retrying a few times.
async fn deliver(mut rx: mpsc::Receiver<Value>, url: Arc<Mutex<Option<String>>>, secret: String) {
    let http = cmb_providers::http_client();
    while let Some(event) = rx.recv().await {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let Some(target) = lock(&url).clone() else {
            continue;
        };
        let payload = event.to_string();
        for attempt in 1..=3u64 {
            let signature = sign_webhook(&secret, payload.as_bytes(), now());
            let sent = http
                .post(&target)
                .header("content-type", "application/json")
                .header("Stripe-Signature", signature)
                .body(payload.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => break,
                Ok(r) => tracing::debug!(status = %r.status(), attempt, "webhook refused"),
                Err(e) => tracing::debug!(error = %e, attempt, "webhook not delivered"),
            }
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Handlers

async fn create_customer(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let op: WriteOp = Box::new(|l, p, _| {
        let customer = json!({
            "id": random_id("cus"),
            "object": "customer",
            "created": now(),
            "email": param(p, "email"),
            "name": param(p, "name"),
            "description": param(p, "description"),
            "metadata": metadata(p),
            "invoice_settings": { "default_payment_method": null },
            "livemode": false,
        });
        l.customers.insert(
            customer["id"].as_str().unwrap_or_default().to_string(),
            customer.clone(),
        );
        Ok(customer)
    });
    sim.write(&headers, "POST /v1/customers".into(), &body, op)
        .await
}

async fn get_customer(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = sim.admit(&headers).await {
        return r;
    }
    let found = sim.ledger().customers.get(&id).cloned();
    match found {
        Some(body) => respond(StatusCode::OK, body, &[]),
        None => {
            let e = ApiError::missing("id", "customer", &id);
            respond(e.status, e.body(), &[])
        }
    }
}

async fn update_customer(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let endpoint = format!("POST /v1/customers/{id}");
    let op: WriteOp = Box::new(move |l, p, _| {
        let default_pm = param(p, "invoice_settings[default_payment_method]");
        if let Some(pm) = default_pm.filter(|pm| !pm.is_empty()) {
            let attached = l.cards.get(pm).map(|c| c.customer.as_deref() == Some(&id));
            match attached {
                None => return Err(ApiError::missing("invoice_settings[default_payment_method]", "PaymentMethod", pm)),
                Some(false) => {
                    return Err(ApiError::invalid(
                        None,
                        Some("invoice_settings[default_payment_method]"),
                        format!("The customer does not have a payment method with the ID {pm}. The payment method must be attached to the customer."),
                    ))
                }
                Some(true) => {}
            }
        }
        let customer = l
            .customers
            .get_mut(&id)
            .ok_or_else(|| ApiError::missing("id", "customer", &id))?;
        for key in ["email", "name", "description"] {
            if let Some(v) = param(p, key) {
                customer[key] = json!(v);
            }
        }
        for (k, v) in metadata(p) {
            customer["metadata"][k] = json!(v);
        }
        if let Some(pm) = default_pm {
            customer["invoice_settings"]["default_payment_method"] = if pm.is_empty() {
                Value::Null
            } else {
                json!(pm)
            };
        }
        Ok(customer.clone())
    });
    sim.write(&headers, endpoint, &body, op).await
}

async fn list_payment_methods(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    sim.read(&headers, query, |l, p| {
        if let Some(kind) = param(p, "type").filter(|t| *t != "card") {
            return Ok(json!({ "object": "list", "data": [], "has_more": false, "url": "/v1/payment_methods", "type": kind }));
        }
        let customer = param(p, "customer");
        let limit = param(p, "limit")
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(10)
            .clamp(1, 100);
        if let Some(c) = customer {
            if !l.customers.contains_key(c) {
                return Err(ApiError::missing("customer", "customer", c));
            }
        }
        let mut cards: Vec<&Card> = l
            .cards
            .values()
            .filter(|c| c.customer.is_some() && c.customer.as_deref() == customer.or(c.customer.as_deref()))
            .collect();
        cards.sort_by_key(|c| std::cmp::Reverse(c.seq));
        let has_more = cards.len() > limit;
        let data: Vec<Value> = cards.iter().take(limit).map(|c| c.json()).collect();
        Ok(json!({ "object": "list", "data": data, "has_more": has_more, "url": "/v1/payment_methods" }))
    })
    .await
}

/// A new payment method for a test token or raw test card number.
fn new_card(l: &mut Ledger, card: TestCard, customer: Option<String>) -> String {
    l.seq += 1;
    let id = random_id("pm");
    l.cards.insert(
        id.clone(),
        Card {
            id: id.clone(),
            seq: l.seq,
            created: now(),
            customer,
            card,
        },
    );
    id
}

async fn attach(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let endpoint = format!("POST /v1/payment_methods/{id}/attach");
    let op: WriteOp = Box::new(move |l, p, events| {
        let customer = param(p, "customer")
            .ok_or_else(|| {
                ApiError::invalid(
                    Some("parameter_missing"),
                    Some("customer"),
                    "Missing required param: customer.".into(),
                )
            })?
            .to_string();
        if !l.customers.contains_key(&customer) {
            return Err(ApiError::missing("customer", "customer", &customer));
        }
        let pm_id =
            if let Some(card) = test_token(&id) {
                new_card(l, card, Some(customer.clone()))
            } else {
                let card = l
                    .cards
                    .get_mut(&id)
                    .ok_or_else(|| ApiError::missing("payment_method", "PaymentMethod", &id))?;
                match &card.customer {
                    Some(c) if *c != customer => return Err(ApiError::invalid(
                        None,
                        Some("payment_method"),
                        "The payment method you provided has already been attached to a customer."
                            .into(),
                    )),
                    _ => card.customer = Some(customer.clone()),
                }
                id.clone()
            };
        let json = l.cards.get(&pm_id).map(Card::json).unwrap_or_default();
        events.push(("payment_method.attached", json.clone()));
        Ok(json)
    });
    sim.write(&headers, endpoint, &body, op).await
}

async fn detach(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let endpoint = format!("POST /v1/payment_methods/{id}/detach");
    let op: WriteOp = Box::new(move |l, _, events| {
        let card = l
            .cards
            .get_mut(&id)
            .ok_or_else(|| ApiError::missing("payment_method", "PaymentMethod", &id))?;
        let Some(customer) = card.customer.take() else {
            return Err(ApiError::invalid(
                None,
                None,
                "The payment method you provided is not attached to a customer so detachment is impossible.".into(),
            ));
        };
        let json = card.json();
        if let Some(c) = l.customers.get_mut(&customer) {
            if c["invoice_settings"]["default_payment_method"] == json!(id) {
                c["invoice_settings"]["default_payment_method"] = Value::Null;
            }
        }
        events.push(("payment_method.detached", json.clone()));
        Ok(json)
    });
    sim.write(&headers, endpoint, &body, op).await
}

fn find_intent<'a>(l: &'a mut Ledger, id: &str) -> Result<&'a mut Intent, ApiError> {
    l.intents
        .iter_mut()
        .find(|i| i.id == id)
        .ok_or_else(|| ApiError::missing("intent", "payment_intent", id))
}

async fn create_intent(State(sim): State<StripeSim>, headers: HeaderMap, body: Bytes) -> Response {
    let op: WriteOp = Box::new(|l, p, events| {
        let amount = cents(p, "amount")?.ok_or_else(|| {
            ApiError::invalid(
                Some("parameter_missing"),
                Some("amount"),
                "Missing required param: amount.".into(),
            )
        })?;
        let currency = param(p, "currency")
            .ok_or_else(|| {
                ApiError::invalid(
                    Some("parameter_missing"),
                    Some("currency"),
                    "Missing required param: currency.".into(),
                )
            })?
            .to_ascii_lowercase();
        if currency == "usd" && amount < MIN_USD_CENTS {
            return Err(ApiError::invalid(
                Some("amount_too_small"),
                Some("amount"),
                "Amount must be at least $0.50 usd".into(),
            ));
        }
        let capture_method = param(p, "capture_method")
            .unwrap_or("automatic")
            .to_string();
        if !["automatic", "automatic_async", "manual"].contains(&capture_method.as_str()) {
            return Err(bad_param("capture_method", &capture_method));
        }
        let confirm = flag(p, "confirm")?;
        let off_session = flag(p, "off_session")?;
        if off_session && !confirm {
            return Err(ApiError::invalid(
                None,
                Some("off_session"),
                "off_session can only be used when confirm=true.".into(),
            ));
        }
        let customer = param(p, "customer").map(str::to_string);
        if let Some(c) = &customer {
            if !l.customers.contains_key(c) {
                return Err(ApiError::missing("customer", "customer", c));
            }
        }
        let raw_number = param(p, "payment_method_data[card][number]").or(param(p, "card[number]"));
        let payment_method = match (param(p, "payment_method"), raw_number) {
            (_, Some(number)) => {
                let card = test_number(number).ok_or_else(|| ApiError {
                    status: StatusCode::PAYMENT_REQUIRED,
                    kind: "card_error",
                    code: Some("incorrect_number"),
                    decline_code: None,
                    message: "Your card number is incorrect.".into(),
                    param: Some("number"),
                    payment_intent: None,
                })?;
                Some(new_card(l, card, None))
            }
            (Some(token), None) if test_token(token).is_some() => {
                let card = test_token(token).unwrap_or(VISA);
                Some(new_card(l, card, None))
            }
            (Some(id), None) => {
                let card = l
                    .cards
                    .get(id)
                    .ok_or_else(|| ApiError::missing("payment_method", "PaymentMethod", id))?;
                if card.customer.is_some() && card.customer != customer {
                    return Err(ApiError::invalid(
                        None,
                        Some("payment_method"),
                        format!("The provided PaymentMethod {id} belongs to another customer."),
                    ));
                }
                Some(id.to_string())
            }
            (None, None) => None,
        };
        let mut intent = Intent {
            id: random_id("pi"),
            created: now(),
            amount,
            currency,
            customer,
            payment_method: payment_method.clone(),
            capture_method: capture_method.clone(),
            status: if payment_method.is_some() {
                "requires_confirmation"
            } else {
                "requires_payment_method"
            },
            amount_capturable: 0,
            amount_received: 0,
            amount_refunded: 0,
            metadata: metadata(p),
            description: param(p, "description").map(str::to_string),
            last_payment_error: None,
            latest_charge: None,
            canceled_at: None,
            cancellation_reason: None,
        };
        if !confirm {
            let json = intent.json();
            l.intents.push(intent);
            return Ok(json);
        }
        let Some(pm) = payment_method else {
            return Err(ApiError::invalid(
                Some("payment_intent_unexpected_state"),
                Some("payment_method"),
                "You cannot confirm this PaymentIntent because it's missing a payment method."
                    .into(),
            ));
        };
        let card = l
            .cards
            .get(&pm)
            .map(|c| (c.card, c.json()))
            .unwrap_or((VISA, Value::Null));
        let decline = match card.0.behaviour {
            Behaviour::Succeeds => None,
            Behaviour::Declined => Some(("generic_decline", "Your card was declined.")),
            Behaviour::InsufficientFunds => {
                Some(("insufficient_funds", "Your card has insufficient funds."))
            }
        };
        if let Some((decline_code, message)) = decline {
            intent.status = "requires_payment_method";
            intent.payment_method = None;
            intent.last_payment_error = Some(json!({
                "type": "card_error",
                "code": "card_declined",
                "decline_code": decline_code,
                "message": message,
                "payment_method": card.1,
            }));
            let json = intent.json();
            l.intents.push(intent);
            events.push(("payment_intent.payment_failed", json.clone()));
            return Err(ApiError {
                status: StatusCode::PAYMENT_REQUIRED,
                kind: "card_error",
                code: Some("card_declined"),
                decline_code: Some(decline_code),
                message: message.into(),
                param: None,
                payment_intent: Some(Box::new(json)),
            });
        }
        intent.latest_charge = Some(random_id("ch"));
        if capture_method == "manual" {
            intent.status = "requires_capture";
            intent.amount_capturable = amount;
            events.push(("payment_intent.amount_capturable_updated", intent.json()));
        } else {
            intent.status = "succeeded";
            intent.amount_received = amount;
            l.captured_cents += amount;
            events.push(("payment_intent.succeeded", intent.json()));
        }
        let json = intent.json();
        l.intents.push(intent);
        Ok(json)
    });
    sim.write(&headers, "POST /v1/payment_intents".into(), &body, op)
        .await
}

async fn get_intent(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = sim.admit(&headers).await {
        return r;
    }
    let outcome = find_intent(&mut sim.ledger(), &id).map(|i| i.json());
    match outcome {
        Ok(body) => respond(StatusCode::OK, body, &[]),
        Err(e) => respond(e.status, e.body(), &[]),
    }
}

fn unexpected_state(intent: &Intent, action: &str) -> ApiError {
    ApiError {
        payment_intent: Some(Box::new(intent.json())),
        ..ApiError::invalid(
            Some("payment_intent_unexpected_state"),
            None,
            format!(
                "This PaymentIntent could not be {action} because it has a status of {}.",
                intent.status
            ),
        )
    }
}

async fn capture(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let endpoint = format!("POST /v1/payment_intents/{id}/capture");
    let op: WriteOp = Box::new(move |l, p, events| {
        let requested = cents(p, "amount_to_capture")?;
        let intent = find_intent(l, &id)?;
        if intent.status != "requires_capture" {
            return Err(unexpected_state(intent, "captured"));
        }
        let amount = requested.unwrap_or(intent.amount_capturable);
        if amount > intent.amount_capturable {
            return Err(ApiError::invalid(
                Some("amount_too_large"),
                Some("amount_to_capture"),
                format!(
                    "The amount to capture ({amount}) is greater than the amount capturable ({}).",
                    intent.amount_capturable
                ),
            ));
        }
        for (k, v) in metadata(p) {
            intent.metadata.insert(k, v);
        }
        intent.status = "succeeded";
        intent.amount_received = amount;
        intent.amount_capturable = 0;
        let json = intent.json();
        l.captured_cents += amount;
        events.push(("payment_intent.succeeded", json.clone()));
        Ok(json)
    });
    sim.write(&headers, endpoint, &body, op).await
}

async fn cancel(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let endpoint = format!("POST /v1/payment_intents/{id}/cancel");
    let op: WriteOp = Box::new(move |l, p, events| {
        let reason = param(p, "cancellation_reason").map(str::to_string);
        if let Some(r) = &reason {
            if ![
                "duplicate",
                "fraudulent",
                "requested_by_customer",
                "abandoned",
            ]
            .contains(&r.as_str())
            {
                return Err(bad_param("cancellation_reason", r));
            }
        }
        let intent = find_intent(l, &id)?;
        let cancellable = [
            "requires_payment_method",
            "requires_confirmation",
            "requires_action",
            "requires_capture",
        ];
        if !cancellable.contains(&intent.status) {
            return Err(unexpected_state(intent, "canceled"));
        }
        intent.status = "canceled";
        intent.amount_capturable = 0;
        intent.canceled_at = Some(now());
        intent.cancellation_reason = reason;
        let json = intent.json();
        events.push(("payment_intent.canceled", json.clone()));
        Ok(json)
    });
    sim.write(&headers, endpoint, &body, op).await
}

async fn create_refund(State(sim): State<StripeSim>, headers: HeaderMap, body: Bytes) -> Response {
    let op: WriteOp = Box::new(|l, p, events| {
        let requested = cents(p, "amount")?;
        let reason = param(p, "reason").map(str::to_string);
        let intent = match (param(p, "payment_intent"), param(p, "charge")) {
            (Some(pi), _) => find_intent(l, pi)?,
            (None, Some(ch)) => l
                .intents
                .iter_mut()
                .find(|i| i.latest_charge.as_deref() == Some(ch))
                .ok_or_else(|| ApiError::missing("charge", "charge", ch))?,
            (None, None) => {
                return Err(ApiError::invalid(
                    Some("parameter_missing"),
                    Some("payment_intent"),
                    "One of the following params should be provided for this request: payment_intent or charge.".into(),
                ))
            }
        };
        if intent.status != "succeeded" || intent.amount_received == 0 {
            return Err(unexpected_state(intent, "refunded"));
        }
        let left = intent.amount_received - intent.amount_refunded;
        if left == 0 {
            return Err(ApiError::invalid(
                Some("charge_already_refunded"),
                None,
                format!(
                    "Charge {} has already been refunded.",
                    intent.latest_charge.as_deref().unwrap_or_default()
                ),
            ));
        }
        let amount = requested.unwrap_or(left);
        if amount > left {
            return Err(ApiError::invalid(
                Some("amount_too_large"),
                Some("amount"),
                format!(
                    "Refund amount ({amount}) is greater than unrefunded amount on charge ({left})"
                ),
            ));
        }
        intent.amount_refunded += amount;
        let refund = json!({
            "id": random_id("re"),
            "object": "refund",
            "amount": amount,
            "currency": intent.currency,
            "charge": intent.latest_charge,
            "payment_intent": intent.id,
            "reason": reason,
            "status": "succeeded",
            "created": now(),
            "metadata": metadata(p),
        });
        events.push(("charge.refunded", intent.charge_json()));
        l.refunded_cents += amount;
        Ok(refund)
    });
    sim.write(&headers, "POST /v1/refunds".into(), &body, op)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use cmb_providers::stripe::{verify_webhook, CreatePaymentIntent, Stripe, StripeError};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    struct Running {
        sim: StripeSim,
        stripe: Stripe,
        base: String,
        stop: CancellationToken,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    async fn start(faults: Faults) -> Running {
        let sim = StripeSim::new(Settings {
            webhook_secret: DEV_WEBHOOK_SECRET.into(),
            webhook_url: None,
            faults,
        });
        let stop = CancellationToken::new();
        let base = crate::serve("stripe", sim.router(), stop.clone(), &TaskTracker::new())
            .await
            .unwrap();
        let stripe = Stripe::new(cmb_providers::http_client(), &base, "sk_test_123");
        Running {
            sim,
            stripe,
            base,
            stop,
        }
    }

    fn intent(customer: &str, pm: &str, amount: i64, manual: bool) -> CreatePaymentIntent {
        CreatePaymentIntent {
            amount,
            currency: "usd".into(),
            customer: customer.into(),
            payment_method: pm.into(),
            manual_capture: manual,
            metadata: vec![("call_id".into(), "call-1".into())],
            description: Some("Call Me Back call".into()),
        }
    }

    async fn customer_with(stripe: &Stripe, token: &str) -> (String, String) {
        let key = uuid::Uuid::new_v4().to_string();
        let customer = stripe
            .create_customer("ada@example.com", "Ada", "user-1", &key)
            .await
            .unwrap();
        let pm = stripe
            .attach_payment_method(token, &customer.id)
            .await
            .unwrap();
        (customer.id, pm.id)
    }

    #[tokio::test]
    async fn customers_keep_cards_and_a_default() {
        let t = start(Faults::default()).await;
        let (customer, visa) = customer_with(&t.stripe, "pm_card_visa").await;
        assert!(visa.starts_with("pm_") && visa != "pm_card_visa");
        let master = t
            .stripe
            .attach_payment_method("pm_card_mastercard", &customer)
            .await
            .unwrap();
        assert_eq!(
            (master.brand.as_str(), master.last4.as_str()),
            ("mastercard", "4444")
        );
        assert_eq!(master.customer.as_deref(), Some(customer.as_str()));
        t.stripe
            .set_default_payment_method(&customer, &visa)
            .await
            .unwrap();
        let listed = t.stripe.list_payment_methods(&customer).await.unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].id, master.id, "newest first, like Stripe");
        assert_eq!(
            (listed[1].brand.as_str(), listed[1].last4.as_str()),
            ("visa", "4242")
        );
        assert!(listed[1].exp_year > 2025 && (1..=12).contains(&listed[1].exp_month));
        let stored: Value = cmb_providers::http_client()
            .get(format!("{}/v1/customers/{customer}", t.base))
            .bearer_auth("sk_test_123")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            stored["invoice_settings"]["default_payment_method"],
            json!(visa)
        );
        assert_eq!(stored["metadata"]["user_id"], "user-1");

        let detached = t.stripe.detach_payment_method(&master.id).await.unwrap();
        assert_eq!(detached.customer, None);
        assert_eq!(
            t.stripe
                .list_payment_methods(&customer)
                .await
                .unwrap()
                .len(),
            1
        );
        let again = t
            .stripe
            .detach_payment_method(&master.id)
            .await
            .unwrap_err();
        assert!(matches!(
            again,
            StripeError::InvalidRequest { status: 400, .. }
        ));
        let unknown = t
            .stripe
            .set_default_payment_method(&customer, "pm_nope")
            .await;
        assert!(matches!(
            unknown,
            Err(StripeError::InvalidRequest { status: 404, .. })
        ));
    }

    #[tokio::test]
    async fn manual_capture_takes_part_once_and_releases_the_rest() {
        let t = start(Faults::default()).await;
        let (customer, pm) = customer_with(&t.stripe, "pm_card_visa").await;
        let pi = t
            .stripe
            .create_payment_intent(&intent(&customer, &pm, 265, true), "hold-1")
            .await
            .unwrap();
        assert_eq!(pi.status, "requires_capture");
        assert_eq!(
            (pi.amount, pi.amount_capturable, pi.amount_received),
            (265, 265, 0)
        );
        assert_eq!(
            pi.metadata.get("call_id").map(String::as_str),
            Some("call-1")
        );
        assert_eq!(pi.customer.as_deref(), Some(customer.as_str()));

        let captured = t
            .stripe
            .capture_payment_intent(&pi.id, 185, "capture-1")
            .await
            .unwrap();
        assert_eq!(captured.status, "succeeded");
        assert_eq!(
            (captured.amount_received, captured.amount_capturable),
            (185, 0)
        );
        let replayed = t
            .stripe
            .capture_payment_intent(&pi.id, 185, "capture-1")
            .await
            .unwrap();
        assert_eq!(replayed, captured);
        assert_eq!(t.sim.idempotent_replays(), 1);
        assert_eq!(t.sim.charges_captured_cents(), 185);

        let reused = t
            .stripe
            .capture_payment_intent(&pi.id, 200, "capture-1")
            .await
            .unwrap_err();
        assert!(matches!(
            reused,
            StripeError::InvalidRequest { status: 400, .. }
        ));
        let twice = t
            .stripe
            .capture_payment_intent(&pi.id, 185, "capture-2")
            .await
            .unwrap_err();
        assert!(
            matches!(&twice, StripeError::InvalidRequest { code: Some(c), .. } if c == "payment_intent_unexpected_state")
        );
        assert_eq!(t.sim.charges_captured_cents(), 185);

        let other = t
            .stripe
            .create_payment_intent(&intent(&customer, &pm, 300, true), "hold-2")
            .await
            .unwrap();
        let too_much = t
            .stripe
            .capture_payment_intent(&other.id, 301, "capture-3")
            .await
            .unwrap_err();
        assert!(
            matches!(&too_much, StripeError::InvalidRequest { status: 400, param: Some(p), .. } if p == "amount_to_capture")
        );
        let canceled = t
            .stripe
            .cancel_payment_intent(&other.id, "cancel-1")
            .await
            .unwrap();
        assert_eq!(
            (canceled.status.as_str(), canceled.amount_capturable),
            ("canceled", 0)
        );

        let refund = t
            .stripe
            .create_refund(&pi.id, Some(100), "refund-1")
            .await
            .unwrap();
        assert_eq!((refund.amount, refund.status.as_str()), (100, "succeeded"));
        assert_eq!(refund.payment_intent, pi.id);
        assert_eq!(t.sim.charges_captured_cents(), 85);
        let rest = t
            .stripe
            .create_refund(&pi.id, None, "refund-2")
            .await
            .unwrap();
        assert_eq!(rest.amount, 85);
        assert!(t
            .stripe
            .create_refund(&pi.id, None, "refund-3")
            .await
            .is_err());
        assert_eq!(t.sim.charges_captured_cents(), 0);

        let read = t.stripe.retrieve_payment_intent(&pi.id).await.unwrap();
        assert_eq!(read.amount_received, 185);
        assert_eq!(t.sim.payment_intents().len(), 2);

        let automatic = t
            .stripe
            .create_payment_intent(&intent(&customer, &pm, 500, false), "auto-1")
            .await
            .unwrap();
        assert_eq!(
            (automatic.status.as_str(), automatic.amount_received),
            ("succeeded", 500)
        );
    }

    #[tokio::test]
    async fn declined_cards_are_card_errors() {
        let t = start(Faults::default()).await;
        let (customer, pm) = customer_with(&t.stripe, "pm_card_chargeDeclined").await;
        let err = t
            .stripe
            .create_payment_intent(&intent(&customer, &pm, 265, true), "declined-1")
            .await
            .unwrap_err();
        let StripeError::Card(card) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(card.code, "card_declined");
        assert_eq!(card.decline_code.as_deref(), Some("generic_decline"));
        assert!(!err.retryable());
        let stored = t.sim.payment_intents();
        assert_eq!(stored[0]["status"], "requires_payment_method");
        assert_eq!(
            stored[0]["last_payment_error"]["decline_code"],
            "generic_decline"
        );

        let (customer, pm) =
            customer_with(&t.stripe, "pm_card_chargeDeclinedInsufficientFunds").await;
        let err = t
            .stripe
            .create_payment_intent(&intent(&customer, &pm, 265, true), "declined-2")
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StripeError::Card(c) if c.decline_code.as_deref() == Some("insufficient_funds"))
        );

        // Raw test card numbers, as Stripe's test mode takes them.
        let raw = |number: &'static str, key: &'static str| {
            cmb_providers::http_client()
                .post(format!("{}/v1/payment_intents", t.base))
                .bearer_auth("sk_test_123")
                .header("Idempotency-Key", key)
                .form(&[
                    ("amount", "265"),
                    ("currency", "usd"),
                    ("confirm", "true"),
                    ("capture_method", "manual"),
                    ("payment_method_data[card][number]", number),
                ])
                .send()
        };
        assert_eq!(
            raw("4242424242424242", "raw-1").await.unwrap().status(),
            200
        );
        let declined = raw("4000000000000002", "raw-2").await.unwrap();
        assert_eq!(declined.status(), 402);
        let body: Value = declined.json().await.unwrap();
        assert_eq!(body["error"]["type"], "card_error");
        assert_eq!(
            body["error"]["payment_intent"]["status"],
            "requires_payment_method"
        );
        assert_eq!(
            raw("4000000000009995", "raw-3").await.unwrap().status(),
            402
        );
        let replay = raw("4000000000000002", "raw-2").await.unwrap();
        assert_eq!(replay.status(), 402);
        assert_eq!(replay.headers()["idempotent-replayed"], "true");
    }

    #[tokio::test]
    async fn a_bad_key_is_refused_and_not_retryable() {
        let t = start(Faults::default()).await;
        for key in ["pk_test_123", "", "sk_"] {
            let stripe = Stripe::new(cmb_providers::http_client(), &t.base, key);
            let err = stripe
                .create_customer("a@example.com", "A", "u", "k")
                .await
                .unwrap_err();
            assert!(matches!(
                err,
                StripeError::InvalidRequest { status: 401, .. }
            ));
            assert!(!err.retryable());
        }
    }

    #[tokio::test]
    async fn injected_failures_are_retried_with_the_same_key() {
        let t = start(Faults::new(Duration::ZERO, 2)).await;
        // Request 1 passes; request 2 (the intent) fails with a 503 and its retry passes.
        let customer = t
            .stripe
            .create_customer("a@example.com", "A", "u", "c-1")
            .await
            .unwrap();
        let req = intent(&customer.id, "pm_card_visa", 265, true);
        let first = t.stripe.create_payment_intent(&req, "pi-1").await.unwrap();
        assert_eq!(first.status, "requires_capture");
        // Request 4 fails, its retry is answered from the saved response.
        let again = t.stripe.create_payment_intent(&req, "pi-1").await.unwrap();
        assert_eq!(again, first);
        assert_eq!(t.sim.idempotent_replays(), 1);
        assert_eq!(t.sim.payment_intents().len(), 1);

        let down = start(Faults::new(Duration::ZERO, 1)).await;
        let err = down
            .stripe
            .create_customer("a@example.com", "A", "u", "c-1")
            .await
            .unwrap_err();
        assert!(matches!(err, StripeError::Unreachable(_)));
        assert!(err.retryable());
    }

    #[tokio::test]
    async fn webhooks_arrive_signed_and_in_order() {
        let t = start(Faults::default()).await;
        let (tx, mut rx) = mpsc::channel::<(HeaderMap, Bytes)>(64);
        let receiver = Router::new().route(
            "/webhooks/stripe",
            post(move |headers: HeaderMap, body: Bytes| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send((headers, body)).await;
                    StatusCode::OK
                }
            }),
        );
        let url = crate::serve("receiver", receiver, t.stop.clone(), &TaskTracker::new())
            .await
            .unwrap();
        t.sim.set_webhook_url(&format!("{url}/webhooks/stripe"));

        let (customer, pm) = customer_with(&t.stripe, "pm_card_visa").await;
        let pi = t
            .stripe
            .create_payment_intent(&intent(&customer, &pm, 265, true), "w-1")
            .await
            .unwrap();
        t.stripe
            .capture_payment_intent(&pi.id, 185, "w-2")
            .await
            .unwrap();
        t.stripe
            .create_refund(&pi.id, Some(85), "w-3")
            .await
            .unwrap();
        let held = t
            .stripe
            .create_payment_intent(&intent(&customer, &pm, 100, true), "w-4")
            .await
            .unwrap();
        t.stripe
            .cancel_payment_intent(&held.id, "w-5")
            .await
            .unwrap();
        let declined = t
            .stripe
            .attach_payment_method("pm_card_chargeDeclined", &customer)
            .await
            .unwrap();
        let _ = t
            .stripe
            .create_payment_intent(&intent(&customer, &declined.id, 100, true), "w-6")
            .await;
        t.stripe.detach_payment_method(&declined.id).await.unwrap();

        let mut kinds = Vec::new();
        while kinds.len() < 9 {
            let (headers, body) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("a webhook within 5 s")
                .unwrap();
            let signature = headers["stripe-signature"].to_str().unwrap();
            let event = verify_webhook(DEV_WEBHOOK_SECRET, &body, signature, now(), 300).unwrap();
            assert!(event.id.starts_with("evt_"));
            let raw: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(raw["livemode"], false);
            assert_eq!(raw["api_version"], API_VERSION);
            if event.kind == "payment_intent.succeeded" {
                assert_eq!(event.object["amount_received"], 185);
            }
            if event.kind == "charge.refunded" {
                assert_eq!(event.object["amount_refunded"], 85);
            }
            assert!(verify_webhook("whsec_wrong", &body, signature, now(), 300).is_err());
            kinds.push(event.kind);
        }
        assert_eq!(
            kinds,
            [
                "payment_method.attached",
                "payment_intent.amount_capturable_updated",
                "payment_intent.succeeded",
                "charge.refunded",
                "payment_intent.amount_capturable_updated",
                "payment_intent.canceled",
                "payment_method.attached",
                "payment_intent.payment_failed",
                "payment_method.detached",
            ]
        );
    }

    #[tokio::test]
    async fn bad_input_is_an_error_not_a_panic() {
        let t = start(Faults::default()).await;
        let http = cmb_providers::http_client();
        for (path, body) in [
            ("/v1/payment_intents", "amount=abc&currency=usd"),
            ("/v1/payment_intents", "amount=10&currency=usd"),
            (
                "/v1/payment_intents",
                "amount=100&currency=usd&confirm=true",
            ),
            (
                "/v1/payment_intents",
                "amount=100&currency=usd&confirm=maybe",
            ),
            ("/v1/payment_intents", "%%%"),
            ("/v1/payment_intents/pi_missing/capture", ""),
            (
                "/v1/payment_methods/pm_card_visa/attach",
                "customer=cus_missing",
            ),
            ("/v1/refunds", ""),
            ("/v1/customers/cus_missing", "name=x"),
        ] {
            let r = http
                .post(format!("{}{path}", t.base))
                .bearer_auth("sk_test_123")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body)
                .send()
                .await
                .unwrap();
            assert!(
                r.status().is_client_error(),
                "{path} {body}: {}",
                r.status()
            );
            let v: Value = r.json().await.unwrap();
            assert!(v["error"]["message"].is_string(), "{v}");
        }
        assert!(t.sim.payment_intents().is_empty());
    }

    #[test]
    fn settings_read_the_environment() {
        let env = |k: &str| match k {
            "SIM_STRIPE_FAIL_EVERY" => Some("3".to_string()),
            _ => None,
        };
        let s = Settings::from_lookup(&env);
        assert_eq!(s.webhook_secret, DEV_WEBHOOK_SECRET);
        assert_eq!(s.faults.fail_every, 3);
        let env = |k: &str| (k == "STRIPE_WEBHOOK_SECRET").then(|| "whsec_x".to_string());
        assert_eq!(Settings::from_lookup(&env).webhook_secret, "whsec_x");
    }
}
