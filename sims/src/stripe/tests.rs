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

    let (customer, pm) = customer_with(&t.stripe, "pm_card_chargeDeclinedInsufficientFunds").await;
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
        assert_eq!(raw["api_version"], api_version());
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
