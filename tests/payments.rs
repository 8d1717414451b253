//! The money path over HTTP against the Stripe and Twilio simulators: cards, holds, capture of
//! exactly the price, releases, declines, credit packs, webhooks, concurrent holds.

use crate::common;

use std::time::Duration;

use callmeback::app::Running;
use common::{eventually, Api, TestEnv, PASSWORD};
use serde_json::{json, Value};

fn env() -> TestEnv {
    TestEnv::new()
        .set("SIM_TWILIO_RING_MS", "200")
        .set("SIM_TWILIO_CALL_SECONDS", "2")
        .set("SCHEDULER_TICK_MS", "100")
}

async fn settled(app: &Running, id: &str, status: &str) -> Value {
    let done = eventually(Duration::from_secs(20), || async {
        let row: Option<(String, Option<i64>)> =
            sqlx::query_as("SELECT status, charged_cents FROM rm_calls WHERE id = $1::uuid")
                .bind(id)
                .fetch_optional(&app.state.pool)
                .await
                .unwrap();
        row.filter(|(s, c)| s == status && c.is_some())
    })
    .await;
    assert!(done.is_some(), "call {id} never settled as {status}");
    let intent_id: Option<String> =
        sqlx::query_scalar("SELECT payment_ref FROM rm_calls WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&app.state.pool)
            .await
            .unwrap();
    let sim = app.sims.stripe.as_ref().unwrap();
    // The settlement worker answers Stripe before it records: wait for the intent to move.
    let intent = eventually(Duration::from_secs(10), || async {
        sim.payment_intents()
            .into_iter()
            .find(|pi| pi["id"].as_str() == intent_id.as_deref())
            .filter(|pi| pi["status"] != "requires_capture")
    })
    .await;
    intent.expect("the intent was captured or cancelled")
}

async fn card_user(api: &Api, pm: &str) -> (Api, Value) {
    let (user, profile) = api.register(PASSWORD).await;
    let attached = user
        .post(
            "/api/user/payment-method",
            json!({ "payment_method_id": pm }),
        )
        .await;
    assert_eq!(attached.status, 201, "{attached:?}");
    (user, profile)
}

#[tokio::test]
async fn a_card_hold_is_captured_for_exactly_the_calls_price_once() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, _) = card_user(&api, "pm_card_visa").await;
    let billing = user.get("/api/user/billing").await;
    assert_eq!(
        billing.body["payment_methods"][0]["last4"], "4242",
        "{billing:?}"
    );
    assert_eq!(billing.body["payment_methods"][0]["is_default"], true);

    let intent = user
        .post(
            "/api/user/create-payment-intent",
            json!({ "estimated_duration": 2 }),
        )
        .await;
    assert_eq!(intent.status, 201, "{intent:?}");
    assert_eq!(intent.body["amount"], 105, "25¢ + 2 × 40¢");
    assert_eq!(intent.body["status"], "requires_capture");
    let pi = intent.body["payment_intent_id"]
        .as_str()
        .unwrap()
        .to_string();

    // Too small a hold for 5 minutes.
    let short = user
        .post(
            "/api/call",
            json!({ "persona_id": "brad_001", "payment_intent_id": pi, "duration": 5 }),
        )
        .await;
    assert_eq!(short.status, 402, "{short:?}");
    assert_eq!(short.field(), "payment_intent_id");
    let call = user
        .post(
            "/api/call",
            json!({ "persona_id": "brad_001", "payment_intent_id": pi, "duration": 2 }),
        )
        .await;
    assert_eq!(call.status, 201, "{call:?}");
    assert_eq!(call.body["hold"]["method"], "card");
    let id = call.body["call"]["id"].as_str().unwrap().to_string();
    let captured = settled(&app, &id, "completed").await;
    assert_eq!(captured["status"], "succeeded");
    assert_eq!(
        captured["amount_received"], 65,
        "one started minute: 25¢ + 40¢"
    );
    let sim = app.sims.stripe.as_ref().unwrap();
    assert_eq!(sim.charges_captured_cents(), 65);

    // The same intent cannot pay for a second call.
    let again = user
        .post(
            "/api/call",
            json!({ "persona_id": "brad_001", "payment_intent_id": pi, "duration": 1 }),
        )
        .await;
    assert_eq!(again.status, 402, "{again:?}");
    // Stripe's webhooks about it arrived, signed, and were recorded once each.
    let recorded = eventually(Duration::from_secs(10), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE aggregate_type = 'stripe_event'
              AND payload -> 'StripeEventReceived' ->> 'kind' = 'payment_intent.succeeded'",
        )
        .fetch_one(&app.state.pool)
        .await
        .unwrap();
        (n >= 1).then_some(n)
    })
    .await;
    assert!(recorded.is_some(), "payment_intent.succeeded recorded");
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn declines_answer_402_and_unanswered_or_cancelled_calls_release_the_hold() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    for (pm, reason) in [
        ("pm_card_chargeDeclined", "generic_decline"),
        (
            "pm_card_chargeDeclinedInsufficientFunds",
            "insufficient_funds",
        ),
    ] {
        let (user, _) = card_user(&api, pm).await;
        let declined = user
            .post(
                "/api/user/create-payment-intent",
                json!({ "estimated_duration": 5 }),
            )
            .await;
        assert_eq!(declined.status, 402, "{declined:?}");
        assert!(
            declined.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(reason),
            "{declined:?}"
        );
    }
    assert_eq!(
        app.sims.twilio.as_ref().unwrap().calls().len(),
        0,
        "no call without a hold"
    );

    // A busy line: the hold is cancelled, nothing captured.
    let (user, _) = card_user(&api, "pm_card_visa").await;
    let pi = user
        .post(
            "/api/user/create-payment-intent",
            json!({ "estimated_duration": 1 }),
        )
        .await
        .body["payment_intent_id"]
        .as_str()
        .unwrap()
        .to_string();
    let call = user
        .post(
            "/api/call",
            json!({ "persona_id": "sarah_001", "payment_intent_id": pi, "duration": 1, "phone_number": "+15558880001" }),
        )
        .await;
    let id = call.body["call"]["id"].as_str().unwrap().to_string();
    let released = settled(&app, &id, "busy").await;
    assert_eq!(released["status"], "canceled");

    // A cancelled scheduled call: released in full.
    let pi = user
        .post(
            "/api/user/create-payment-intent",
            json!({ "estimated_duration": 1 }),
        )
        .await
        .body["payment_intent_id"]
        .as_str()
        .unwrap()
        .to_string();
    let when = (chrono::Utc::now() + chrono::Duration::hours(2)).to_rfc3339();
    let scheduled = user
        .post(
            "/api/calls/schedule",
            json!({ "persona_id": "sarah_001", "payment_intent_id": pi, "duration": 1, "scheduled_time": when }),
        )
        .await;
    assert_eq!(scheduled.status, 201, "{scheduled:?}");
    let id = scheduled.body["call"]["id"].as_str().unwrap().to_string();
    let cancel = user.delete(&format!("/api/calls/schedule/{id}")).await;
    assert_eq!(cancel.status, 200, "{cancel:?}");
    assert_eq!(cancel.body["refund"]["amount_cents"], 65);
    let released = settled(&app, &id, "canceled").await;
    assert_eq!(released["status"], "canceled");
    assert_eq!(
        app.sims.stripe.as_ref().unwrap().charges_captured_cents(),
        0
    );
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn payment_methods_credit_packs_and_webhook_signatures() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, _) = card_user(&api, "pm_card_visa").await;
    let second = user
        .post(
            "/api/user/payment-method",
            json!({ "payment_method_id": "pm_card_mastercard" }),
        )
        .await;
    assert_eq!(second.status, 201);
    assert_eq!(second.body["payment_method"]["is_default"], false);
    let visa = user.get("/api/user/billing").await.body["default_payment_method"]
        .as_str()
        .unwrap()
        .to_string();
    let mastercard = second.body["payment_method"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let refused = user
        .delete(&format!("/api/user/payment-method/{visa}"))
        .await;
    assert_eq!(refused.status, 400, "the default stays: {refused:?}");
    assert_eq!(
        user.put(
            &format!("/api/user/payment-method/{mastercard}/default"),
            json!({})
        )
        .await
        .status,
        200
    );
    assert_eq!(
        user.delete(&format!("/api/user/payment-method/{visa}"))
            .await
            .status,
        200
    );
    assert_eq!(
        user.delete("/api/user/payment-method/pm_nope").await.status,
        404
    );
    let bad = user
        .post(
            "/api/user/payment-method",
            json!({ "payment_method_id": "card_123" }),
        )
        .await;
    assert_eq!(bad.status, 400);

    // A credit pack, bought once even when the request is retried.
    for _ in 0..2 {
        let bought = user
            .post(
                "/api/user/credits",
                json!({ "credits": 100, "idempotency_key": "first-pack" }),
            )
            .await;
        assert_eq!(bought.status, 201, "{bought:?}");
        assert_eq!(bought.body["balance"], 100);
    }
    assert_eq!(
        user.post("/api/user/credits", json!({ "credits": 7 }))
            .await
            .status,
        400
    );
    assert_eq!(
        app.sims.stripe.as_ref().unwrap().charges_captured_cents(),
        500
    );

    // Webhooks: ours verify; forged and stale ones are refused and record nothing.
    let secret = callmeback::config::DEV_STRIPE_WEBHOOK_SECRET;
    let payload = json!({
        "id": "evt_test_1", "object": "event", "type": "charge.refunded", "created": chrono::Utc::now().timestamp(), "livemode": false, "pending_webhooks": 1,
        "data": { "object": { "id": "ch_1", "object": "charge", "amount_refunded": 65, "payment_intent": "pi_1" } }
    })
    .to_string();
    let post = |header: String| {
        api.send(
            api.request(reqwest::Method::POST, "/api/stripe/webhook")
                .header("stripe-signature", header)
                .header("content-type", "application/json")
                .body(payload.clone()),
        )
    };
    let now = chrono::Utc::now().timestamp();
    let forged = post(cmb_providers::stripe::sign_webhook(
        "whsec_other",
        payload.as_bytes(),
        now,
    ))
    .await;
    assert_eq!(forged.status, 400, "{forged:?}");
    let stale = post(cmb_providers::stripe::sign_webhook(
        secret,
        payload.as_bytes(),
        now - 600,
    ))
    .await;
    assert_eq!(stale.status, 400, "{stale:?}");
    assert_eq!(post(String::new()).await.status, 400);
    let first = post(cmb_providers::stripe::sign_webhook(
        secret,
        payload.as_bytes(),
        now,
    ))
    .await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.body["recorded"], true);
    let repeat = post(cmb_providers::stripe::sign_webhook(
        secret,
        payload.as_bytes(),
        now,
    ))
    .await;
    assert_eq!(
        repeat.body["recorded"], false,
        "the same event id twice changes nothing"
    );
    let recorded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = 'evt_test_1'")
            .fetch_one(&app.state.pool)
            .await
            .unwrap();
    assert_eq!(recorded, 1);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn concurrent_holds_never_take_a_balance_below_zero() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, _) = card_user(&api, "pm_card_visa").await;
    let bought = user
        .post("/api/user/credits", json!({ "credits": 100 }))
        .await;
    assert_eq!(bought.status, 201);
    // Eight scheduled calls of 5 minutes (45 credits each) at once: two fit in 100 credits.
    let when = (chrono::Utc::now() + chrono::Duration::hours(3)).to_rfc3339();
    let replies = futures::future::join_all((0..8).map(|_| {
        user.post(
            "/api/calls/schedule",
            json!({ "persona_id": "alex_001", "use_credits": true, "duration": 5, "scheduled_time": when }),
        )
    }))
    .await;
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 402).count(),
        6,
        "{statuses:?}"
    );
    let wallet = eventually(Duration::from_secs(5), || async {
        let w: Option<(i64, i64)> = sqlx::query_as("SELECT balance, reserved FROM rm_wallets")
            .fetch_optional(&app.state.pool)
            .await
            .unwrap();
        w.filter(|w| w.1 == 90)
    })
    .await;
    assert_eq!(wallet, Some((100, 90)));
    app.stop().await;
    env.cleanup().await;
}
