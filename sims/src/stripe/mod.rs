//! Stripe simulator: a stateful slice of Stripe's API (customers, card payment methods,
//! PaymentIntents with manual capture, refunds, disputes), with Stripe's idempotency rules and
//! signed webhooks, so that payment flows — declines, partial captures, retries, refunds and
//! chargebacks — run without Stripe.
//!
//! Disputes come as in Stripe's test mode: the card `pm_card_createDispute` (number
//! `4000 0000 0000 0259`) pays, and its charge is disputed at once (`charge.dispute.created`).
//! [`StripeSim::resend`] delivers an event again, as `stripe events resend` does.
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
use cmb_providers::stripe::{api_version, sign_webhook};

mod customers;
mod payment_intents;
mod payment_methods;
mod refunds;
#[cfg(test)]
mod tests;
mod webhooks;
mod wire;

use customers::*;
use payment_intents::*;
use payment_methods::*;
use refunds::*;
use webhooks::*;
use wire::*;

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
    /// Webhook deliveries the endpoint answered with a 2xx.
    delivered: Arc<std::sync::atomic::AtomicU64>,
}

/// How a test card behaves when charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Succeeds,
    /// Pays, then the cardholder disputes the charge.
    Disputed,
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
const DISPUTED: TestCard = TestCard {
    brand: "visa",
    last4: "0259",
    behaviour: Behaviour::Disputed,
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
        "pm_card_createDispute" => Some(DISPUTED),
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
        "4000000000000259" => Some(DISPUTED),
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

    /// The dispute a [`Behaviour::Disputed`] card opens on the charge once money is received.
    fn dispute_json(&self) -> Value {
        json!({
            "id": random_id("dp"),
            "object": "dispute",
            "amount": self.amount_received,
            "charge": self.latest_charge,
            "currency": self.currency,
            "payment_intent": self.id,
            "reason": "fraudulent",
            "status": "needs_response",
            "is_charge_refundable": false,
            "created": now(),
            "livemode": false,
            "metadata": {},
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
    /// Every event emitted, in order, for [`StripeSim::resend`].
    sent: Vec<Value>,
}

impl Ledger {
    /// Whether `payment_method` is a card whose charges get disputed.
    fn disputes(&self, payment_method: Option<&str>) -> bool {
        payment_method
            .and_then(|pm| self.cards.get(pm))
            .is_some_and(|c| c.card.behaviour == Behaviour::Disputed)
    }
}

impl StripeSim {
    pub fn new(settings: Settings) -> Self {
        StripeSim {
            shared: Arc::new(Shared {
                faults: settings.faults,
                webhook_secret: settings.webhook_secret,
                webhook_url: Arc::new(Mutex::new(settings.webhook_url)),
                state: Mutex::default(),
                delivered: Arc::default(),
            }),
        }
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/customers", post(create_customer))
            .route(
                "/v1/customers/{id}",
                get(get_customer)
                    .post(update_customer)
                    .delete(delete_customer),
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

    /// Starts (`true`) or ends an outage: meanwhile every request is answered 503.
    pub fn set_unavailable(&self, down: bool) {
        self.shared.faults.set_down(down);
    }

    /// Where signed events are POSTed from now on.
    pub fn set_webhook_url(&self, url: &str) {
        *lock(&self.shared.webhook_url) = Some(url.to_string());
    }

    /// A customer as Stripe would answer it (`{"deleted": true, …}` once deleted), if it
    /// ever existed.
    pub fn customer(&self, id: &str) -> Option<Value> {
        self.ledger().customers.get(id).cloned()
    }

    /// The payment methods attached to customer `id` now.
    pub fn cards_of(&self, id: &str) -> usize {
        self.ledger()
            .cards
            .values()
            .filter(|c| c.customer.as_deref() == Some(id))
            .count()
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

    /// The events emitted so far of type `kind`, oldest first.
    pub fn events(&self, kind: &str) -> Vec<Value> {
        self.ledger()
            .sent
            .iter()
            .filter(|e| e["type"] == kind)
            .cloned()
            .collect()
    }

    /// Delivers event `event_id` again (signed anew), as `stripe events resend` does; false
    /// when no such event was emitted.
    pub fn resend(&self, event_id: &str) -> bool {
        let mut ledger = self.ledger();
        let Some(event) = ledger.sent.iter().find(|e| e["id"] == event_id).cloned() else {
            return false;
        };
        self.queue(&mut ledger, event);
        true
    }

    /// How many webhook deliveries the endpoint accepted (2xx) so far.
    pub fn webhooks_delivered(&self) -> u64 {
        self.shared
            .delivered
            .load(std::sync::atomic::Ordering::SeqCst)
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
            "api_version": api_version(),
            "created": now(),
            "livemode": false,
            "pending_webhooks": 1,
            "request": { "id": random_id("req"), "idempotency_key": key },
            "type": kind,
            "data": { "object": object },
        });
        ledger.sent.push(event.clone());
        self.queue(ledger, event);
    }

    /// Hands `event` to the delivery task (started on first use).
    fn queue(&self, ledger: &mut Ledger, event: Value) {
        let kind = event["type"].as_str().unwrap_or_default().to_string();
        if ledger.webhooks.is_none() {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            let (tx, rx) = mpsc::channel(WEBHOOK_QUEUE);
            runtime.spawn(deliver(
                rx,
                self.shared.webhook_url.clone(),
                self.shared.webhook_secret.clone(),
                self.shared.delivered.clone(),
            ));
            ledger.webhooks = Some(tx);
        }
        if let Some(tx) = &ledger.webhooks {
            if tx.try_send(event).is_err() {
                tracing::warn!(kind = %kind, "Stripe simulator webhook queue full; event dropped");
            }
        }
    }
}
