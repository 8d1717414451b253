//! Money paths (issue 13): refunds and disputes of credit packs and of calls' captures, sent
//! signed by the Stripe simulator; debt; redelivered webhooks; and sensitive changes that need
//! a fresh sign-in or the password.

use crate::common;

use std::time::Duration;

use callmeback::app::Running;
use common::{eventually, Api, TestEnv, PASSWORD};
use serde_json::{json, Value};

fn env() -> TestEnv {
    TestEnv::new()
        .set("SIM_TWILIO_RING_MS", "200")
        .set("SIM_TWILIO_CALL_SECONDS", "2")
        .set("SIM_TWILIO_CALLER_TURNS", "0:60000")
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

/// The user's credits (`balance`, `available`, `debt`) once `ready` holds, within 30 s.
async fn credits_when(user: &Api, ready: impl Fn(&Value) -> bool) -> Value {
    let found = eventually(Duration::from_secs(30), || async {
        let credits = user.get("/api/user/billing").await.body["credits"].clone();
        ready(&credits).then_some(credits)
    })
    .await;
    match found {
        Some(credits) => credits,
        None => panic!(
            "credits never as expected; now {}",
            user.get("/api/user/billing").await.body
        ),
    }
}

/// Events of `event_type` in the store for aggregate `id`.
async fn count(app: &Running, event_type: &str, id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = $1 AND aggregate_id = $2")
        .bind(event_type)
        .bind(id)
        .fetch_one(&app.state.pool)
        .await
        .unwrap()
}

/// Resends Stripe's event `id` and waits until our endpoint accepted it again.
async fn redeliver(app: &Running, id: &str) {
    let sim = app.sims.stripe.as_ref().unwrap();
    let before = sim.webhooks_delivered();
    assert!(sim.resend(id), "the simulator knows event {id}");
    let again = eventually(Duration::from_secs(30), || async {
        (sim.webhooks_delivered() > before).then_some(())
    })
    .await;
    assert!(again.is_some(), "the resent event was delivered");
}

#[tokio::test]
async fn a_refunded_pack_takes_its_credits_back_and_the_rest_is_debt_that_blocks_calls() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, profile) = card_user(&api, "pm_card_visa").await;
    let bought = user
        .post("/api/user/credits", json!({ "credits": 100 }))
        .await;
    assert_eq!(bought.status, 201, "{bought:?}");
    let pi = bought.body["payment_intent_id"]
        .as_str()
        .unwrap()
        .to_string();
    // 45 credits held for a scheduled call of 5 minutes.
    let when = (chrono::Utc::now() + chrono::Duration::hours(2)).to_rfc3339();
    let scheduled = user
        .post(
            "/api/calls/schedule",
            json!({ "persona_id": "brad_001", "use_credits": true, "duration": 5, "scheduled_time": when }),
        )
        .await;
    assert_eq!(scheduled.status, 201, "{scheduled:?}");
    let scheduled_id = scheduled.body["call"]["id"].as_str().unwrap().to_string();

    // The whole pack refunded at Stripe: the 55 free credits are taken, 45 are owed.
    let refund = app
        .state
        .stripe
        .create_refund(&pi, None, "test-refund-1")
        .await
        .expect("refunded");
    assert_eq!(refund.amount, 500);
    let credits = credits_when(&user, |c| c["debt"] == 45).await;
    assert_eq!(credits["balance"], 45, "{credits}");
    assert_eq!(credits["available"], 0, "{credits}");

    // No new call while in debt, on credits or on a card, with a clear 402.
    let on_credits = user
        .post(
            "/api/call",
            json!({ "persona_id": "brad_001", "use_credits": true, "duration": 1 }),
        )
        .await;
    assert_eq!(on_credits.status, 402, "{on_credits:?}");
    assert_eq!(on_credits.code(), "debt_outstanding");
    assert!(
        on_credits.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("45 credits"),
        "{on_credits:?}"
    );
    let intent = user
        .post(
            "/api/user/create-payment-intent",
            json!({ "estimated_duration": 1 }),
        )
        .await;
    assert_eq!(intent.status, 201, "{intent:?}");
    let on_card = user
        .post(
            "/api/call",
            json!({ "persona_id": "brad_001", "payment_intent_id": intent.body["payment_intent_id"] }),
        )
        .await;
    assert_eq!(on_card.status, 402, "{on_card:?}");
    assert_eq!(on_card.code(), "debt_outstanding");

    // Stripe delivers the refund again: nothing more is taken.
    let sim = app.sims.stripe.as_ref().unwrap();
    let refunded = sim.events("charge.refunded");
    assert_eq!(refunded.len(), 1);
    redeliver(&app, refunded[0]["id"].as_str().unwrap()).await;
    let wallet = profile["id"].as_str().unwrap();
    assert_eq!(count(&app, "CreditsRevoked", wallet).await, 1);
    let credits = user.get("/api/user/billing").await.body["credits"].clone();
    assert_eq!(
        (credits["balance"].clone(), credits["debt"].clone()),
        (json!(45), json!(45)),
        "{credits}"
    );

    // Cancelling the scheduled call frees its 45 credits, which pay the debt.
    let cancel = user
        .delete(&format!("/api/calls/schedule/{scheduled_id}"))
        .await;
    assert_eq!(cancel.status, 200, "{cancel:?}");
    let credits = credits_when(&user, |c| c["debt"] == 0).await;
    assert_eq!(credits["balance"], 0, "{credits}");
    let events: Vec<String> = sqlx::query_scalar(
        "SELECT event_type FROM events WHERE aggregate_type = 'wallet' AND aggregate_id = $1
          ORDER BY sequence",
    )
    .bind(wallet)
    .fetch_all(&app.state.pool)
    .await
    .unwrap();
    assert_eq!(
        events,
        [
            "CreditsGranted",
            "CreditsReserved",
            "CreditsRevoked",
            "CreditsReleased",
            "DebtPaid"
        ]
    );
    // The read model agrees, once it has caught up.
    let rm = eventually(Duration::from_secs(30), || async {
        let row: Option<(i64, i64, i64)> = sqlx::query_as(
            "SELECT balance, reserved, debt FROM rm_wallets WHERE user_id = $1::uuid",
        )
        .bind(wallet)
        .fetch_optional(&app.state.pool)
        .await
        .unwrap();
        row.filter(|r| *r == (0, 0, 0))
    })
    .await;
    assert!(rm.is_some(), "rm_wallets settles at 0/0/0");
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_disputed_pack_takes_its_credits_back_once() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    // Stripe's test card whose charges the cardholder disputes.
    let (user, profile) = card_user(&api, "pm_card_createDispute").await;
    let bought = user
        .post("/api/user/credits", json!({ "credits": 100 }))
        .await;
    assert_eq!(bought.status, 201, "{bought:?}");
    let credits = credits_when(&user, |c| c["balance"] == 0).await;
    assert_eq!(credits["debt"], 0, "nothing was spent: {credits}");
    let sim = app.sims.stripe.as_ref().unwrap();
    let disputes = sim.events("charge.dispute.created");
    assert_eq!(disputes.len(), 1);
    assert_eq!(disputes[0]["data"]["object"]["amount"], 500);
    redeliver(&app, disputes[0]["id"].as_str().unwrap()).await;
    let wallet = profile["id"].as_str().unwrap();
    assert_eq!(count(&app, "CreditsRevoked", wallet).await, 1);
    assert_eq!(
        count(
            &app,
            "StripeEventReceived",
            disputes[0]["id"].as_str().unwrap()
        )
        .await,
        1,
        "the event recorded once"
    );
    app.stop().await;
    env.cleanup().await;
}

/// A call of one minute paid by `pm`, settled (captured at Stripe): its id and intent.
async fn card_call(app: &Running, api: &Api, pm: &str) -> (String, String) {
    let (user, _) = card_user(api, pm).await;
    let intent = user
        .post(
            "/api/user/create-payment-intent",
            json!({ "estimated_duration": 1 }),
        )
        .await;
    assert_eq!(intent.status, 201, "{intent:?}");
    let pi = intent.body["payment_intent_id"]
        .as_str()
        .unwrap()
        .to_string();
    let call = user
        .post(
            "/api/call",
            json!({ "persona_id": "brad_001", "payment_intent_id": pi }),
        )
        .await;
    assert_eq!(call.status, 201, "{call:?}");
    let id = call.body["call"]["id"].as_str().unwrap().to_string();
    let settled = eventually(Duration::from_secs(60), || async {
        (count(app, "CallSettled", &id).await == 1).then_some(())
    })
    .await;
    assert!(settled.is_some(), "call {id} settled");
    (id, pi)
}

async fn reconcile(env: &TestEnv) -> Value {
    common::callmeback_json(
        env,
        &[
            "replay",
            "--source",
            "postgres",
            "--format",
            "json",
            "reconcile",
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_and_a_dispute_of_calls_are_recorded_on_them_and_reconciled() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (refunded, pi) = card_call(&app, &api, "pm_card_visa").await;
    let (disputed, _) = card_call(&app, &api, "pm_card_createDispute").await;

    // The first call is refunded in two parts; the second is disputed on capture.
    let stripe = &app.state.stripe;
    stripe
        .create_refund(&pi, Some(25), "test-refund-a")
        .await
        .unwrap();
    stripe
        .create_refund(&pi, None, "test-refund-b")
        .await
        .unwrap();
    let recorded = eventually(Duration::from_secs(30), || async {
        let reversals: Vec<(String, i64)> = sqlx::query_as(
            "SELECT aggregate_id, (payload -> 'PaymentReversed' ->> 'amount_cents')::bigint
               FROM events WHERE event_type = 'PaymentReversed' ORDER BY aggregate_id, sequence",
        )
        .fetch_all(&app.state.pool)
        .await
        .unwrap();
        (reversals.len() == 3).then_some(reversals)
    })
    .await
    .expect("two refunds and a dispute recorded");
    let mut expected = vec![
        (refunded.clone(), 25),
        (refunded.clone(), 40),
        (disputed.clone(), 65),
    ];
    expected.sort();
    let mut got = recorded;
    got.sort();
    assert_eq!(got, expected);

    // Every event delivered again: nothing more recorded.
    let sim = app.sims.stripe.as_ref().unwrap();
    for kind in ["charge.refunded", "charge.dispute.created"] {
        for e in sim.events(kind) {
            redeliver(&app, e["id"].as_str().unwrap()).await;
        }
    }
    assert_eq!(count(&app, "PaymentReversed", &refunded).await, 2);
    assert_eq!(count(&app, "PaymentReversed", &disputed).await, 1);

    // The call's payment says so: refunded, how much (as its detail shows it).
    let payment = eventually(Duration::from_secs(30), || async {
        let id = uuid::Uuid::parse_str(&refunded).unwrap();
        let user: uuid::Uuid = sqlx::query_scalar("SELECT user_id FROM rm_calls WHERE id = $1")
            .bind(id)
            .fetch_one(&app.state.pool)
            .await
            .unwrap();
        let call = cmb_projections::calls::view(&app.state.pool, id.into(), user.into())
            .await
            .unwrap()
            .unwrap();
        let payment = serde_json::to_value(call.payment()).unwrap();
        (payment["refunded_cents"] == 65).then_some(payment)
    })
    .await
    .expect("the refunds shown on the call");
    assert_eq!(payment["state"], "refunded", "{payment}");
    assert_eq!(payment["captured_cents"], 65, "{payment}");

    // Reconciliation: the refund and the dispute take the revenue to 0, the dispute is flagged.
    let report = reconcile(&env).await;
    let line = |id: &str| {
        report["calls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["call_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("call {id} in {report}"))
    };
    let r = line(&refunded);
    assert_eq!(
        (
            r["charged_cents"].clone(),
            r["refunded_cents"].clone(),
            r["disputed_cents"].clone(),
            r["revenue_cents"].clone()
        ),
        (json!(65), json!(65), json!(0), json!(0)),
        "{r}"
    );
    let d = line(&disputed);
    assert_eq!(
        (
            d["charged_cents"].clone(),
            d["refunded_cents"].clone(),
            d["disputed_cents"].clone(),
            d["revenue_cents"].clone()
        ),
        (json!(65), json!(0), json!(65), json!(0)),
        "{d}"
    );
    let flagged: Vec<_> = report["anomalies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "charge_disputed")
        .map(|a| a["call_id"].clone())
        .collect();
    assert_eq!(flagged, vec![json!(disputed)]);
    // The call's timeline says so too.
    let timeline = eventually(Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM rm_timeline WHERE aggregate_id = $1 AND event_type = 'PaymentReversed'",
        )
        .bind(&refunded)
        .fetch_one(&app.state.pool)
        .await
        .unwrap();
        (n == 2).then_some(())
    })
    .await;
    assert!(timeline.is_some(), "the refunds are on the call's timeline");
    app.stop().await;
    env.cleanup().await;
}

/// The same token, issued `minutes` ago.
fn aged(env: &TestEnv, token: &str, minutes: i64) -> String {
    use callmeback::serve::http::auth::decode_token;
    let secret = &env.vars["JWT_SECRET"];
    let mut claims = decode_token(secret, token).expect("our token");
    claims.iat -= minutes * 60;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn sensitive_changes_need_a_fresh_sign_in_or_the_password() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (fresh, _) = api.register(PASSWORD).await;
    let stale = fresh.with_token(&aged(&env, fresh.token.as_deref().unwrap(), 16));
    assert_eq!(
        stale.get("/api/auth/me").await.status,
        200,
        "still signed in"
    );

    let card = json!({ "payment_method_id": "pm_card_visa" });
    let refused = stale.post("/api/user/payment-method", card.clone()).await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(refused.code(), "reauthentication_required");
    assert_eq!(refused.field(), "password");
    let mut wrong = card.clone();
    wrong["password"] = json!("Wr0ng!horse");
    let wrong = stale.post("/api/user/payment-method", wrong).await;
    assert_eq!(wrong.status, 403, "{wrong:?}");
    assert_eq!(wrong.code(), "wrong_password");
    let mut with_password = card;
    with_password["password"] = json!(PASSWORD);
    let attached = stale.post("/api/user/payment-method", with_password).await;
    assert_eq!(attached.status, 201, "{attached:?}");
    assert!(
        app.sims
            .stripe
            .as_ref()
            .unwrap()
            .payment_intents()
            .is_empty(),
        "nothing charged yet"
    );

    let refused = stale
        .post("/api/user/credits", json!({ "credits": 100 }))
        .await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(refused.code(), "reauthentication_required");
    assert!(
        app.sims
            .stripe
            .as_ref()
            .unwrap()
            .payment_intents()
            .is_empty(),
        "a refused purchase charges nothing"
    );
    let bought = stale
        .post(
            "/api/user/credits",
            json!({ "credits": 100, "password": PASSWORD }),
        )
        .await;
    assert_eq!(bought.status, 201, "{bought:?}");

    let n: u64 = rand::random::<u64>() % 10_000_000_000;
    let email = format!("moved{n}@example.com");
    let refused = stale
        .put("/api/user/profile", json!({ "email": email }))
        .await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(refused.code(), "reauthentication_required");
    let refused = stale
        .put(
            "/api/user/profile",
            json!({ "phone": format!("+1{n:010}") }),
        )
        .await;
    assert_eq!(refused.status, 403, "{refused:?}");
    // A name is not sensitive.
    let renamed = stale
        .put("/api/user/profile", json!({ "name": "Ada" }))
        .await;
    assert_eq!(renamed.status, 200, "{renamed:?}");
    let moved = stale
        .put(
            "/api/user/profile",
            json!({ "email": email, "password": PASSWORD }),
        )
        .await;
    assert_eq!(moved.status, 200, "{moved:?}");
    assert_eq!(moved.body["user"]["email"], email.as_str());
    // A fresh sign-in needs no password.
    let signed_in = api
        .elsewhere()
        .post(
            "/api/auth/login",
            json!({ "email": email, "password": PASSWORD }),
        )
        .await;
    assert_eq!(signed_in.status, 200, "{signed_in:?}");
    let again = fresh.with_token(signed_in.body["token"].as_str().unwrap());
    let bought = again
        .post("/api/user/credits", json!({ "credits": 100 }))
        .await;
    assert_eq!(bought.status, 201, "{bought:?}");
    app.stop().await;
    env.cleanup().await;
}
