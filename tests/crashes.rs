//! Load and crashes made boring (issue 14): a committed command is answered with what it
//! produced when its read model is late; the dialer places a call once when two deliveries are
//! handled at the same time, and once when it is killed after recording its attempt or after
//! Twilio's answer; a call request killed between any two of its steps leaves nothing held (the
//! sweeper gives the hold and the slot back, and says why); settlement killed midway settles
//! once.

use crate::common;

use std::time::Duration;

use callmeback::backbone::store::EventStore;
use cmb_domain::wallet::{Wallet, WalletCommand};
use cmb_domain::{Actor, CommandContext};
use common::{eventually, grant, request_call, Api, TestEnv, PASSWORD};
use serde_json::json;

fn env() -> TestEnv {
    TestEnv::new()
        .set("SIM_TWILIO_RING_MS", "200")
        .set("SIM_TWILIO_CALL_SECONDS", "2")
}

#[tokio::test]
async fn a_committed_command_is_answered_with_what_it_produced_when_the_read_model_is_late() {
    // No wait for the read models at all: every answer is built from the command's result.
    let env = env().set("READ_YOUR_WRITES_MS", "0");
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    assert!(profile["id"].as_str().is_some(), "{profile}");
    grant(&app, &profile, 100).await;

    let persona = user
        .post("/api/personas", common::persona_body("Late Reader", false))
        .await;
    assert_eq!(persona.status, 201, "{persona:?}");
    let persona_id = persona.body["persona"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        persona.headers["location"].to_str().unwrap(),
        format!("/api/personas/{persona_id}")
    );
    assert_eq!(persona.body["persona"]["name"], "Late Reader");

    let reply = user
        .post(
            "/api/call",
            json!({ "persona_id": "brad_001", "use_credits": true, "duration": 5 }),
        )
        .await;
    assert_eq!(reply.status, 201, "{reply:?}");
    let call = &reply.body["call"];
    let id = call["id"].as_str().unwrap().to_string();
    assert_eq!(
        reply.headers["location"].to_str().unwrap(),
        format!("/api/calls/{id}")
    );
    assert_eq!(call["persona_id"], "brad_001");
    assert_eq!(call["duration_minutes"], 5);
    assert_eq!(call["payment_method"], "credits");
    assert!(call["max_price_cents"].as_i64().unwrap() > 0, "{reply:?}");
    assert!(reply.body["hold"]["credits"].as_i64().unwrap() > 0);
    // And the read model catches up to the same call.
    let shown = eventually(Duration::from_secs(30), || async {
        let r = user.get(&format!("/api/calls/{id}")).await;
        (r.status == 200).then_some(r)
    })
    .await
    .expect("the call shows up");
    assert_eq!(
        shown.body["call"]["max_price_cents"],
        call["max_price_cents"]
    );
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn two_deliveries_handled_at_once_place_the_call_at_twilio_once() {
    use callmeback::serve::workers::dialer::Dialer;
    use cmb_sims::twilio::{Settings, TwilioSim};
    let shutdown = tokio_util::sync::CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    // Twilio takes its time to answer, so both handlers are at work together.
    let mut settings = Settings::from_lookup(&|k: &str| match k {
        "SIM_TWILIO_RING_MS" => Some("300".to_string()),
        "SIM_TWILIO_CALL_SECONDS" => Some("2".to_string()),
        "SIM_TWILIO_LATENCY_MS" => Some("1500".to_string()),
        _ => None,
    });
    settings.account_sid = "ACfeedfacefeedfacefeedfacefeedface".into();
    settings.auth_token = "twice-token".into();
    let sim = TwilioSim::new(settings);
    let url = cmb_sims::serve("twilio", sim.router(), shutdown.clone(), &tasks)
        .await
        .unwrap();
    let env = env()
        .set("TWILIO_BASE_URL", &url)
        .set("TWILIO_ACCOUNT_SID", "ACfeedfacefeedfacefeedfacefeedface")
        .set("TWILIO_AUTH_TOKEN", "twice-token");
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 100).await;
    let id = request_call(&user, "brad_001", 1).await;
    // The same delivery, handled a second time while the app's dialer works on it.
    let requested = eventually(Duration::from_secs(30), || async {
        common::read_stream(&env)
            .await
            .into_iter()
            .find(|e| e.aggregate_id == id && e.event_type == "CallRequested")
    })
    .await
    .expect("CallRequested on the stream");
    let second = Dialer {
        store: app.state.store.clone(),
        twilio: cmb_providers::twilio::Twilio::new(
            reqwest::Client::new(),
            &url,
            "ACfeedfacefeedfacefeedfacefeedface",
            "twice-token",
        ),
        from: app.state.config.twilio.phone_number.clone(),
        public_base_url: app.state.config.public_base_url.clone(),
        clock: app.state.clock.clone(),
        policy: app.state.config.limits.calls.clone(),
    };
    let (a, b) = tokio::join!(second.handle(requested.clone()), second.handle(requested));
    a.expect("the first extra delivery is handled");
    b.expect("the second extra delivery is handled");
    let placed = eventually(Duration::from_secs(30), || async {
        let sid: Option<String> = sqlx::query_scalar(
            "SELECT payload -> 'CallPlaced' ->> 'call_sid' FROM events
              WHERE aggregate_id = $1 AND event_type = 'CallPlaced'",
        )
        .bind(&id)
        .fetch_optional(&app.state.pool)
        .await
        .unwrap();
        sid
    })
    .await
    .expect("the call is placed");
    // Let any handler that would dial again do so before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sim.calls().len(), 1, "Twilio was asked once");
    assert_eq!(sim.calls()[0].sid, placed);
    let attempts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'DialAttempted'",
    )
    .bind(&id)
    .fetch_one(&app.state.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 1);
    app.stop().await;
    shutdown.cancel();
    env.cleanup().await;
}

/// `callmeback serve` processes on one port, one after another, with a Stripe simulator outside
/// them (its intents outlive a killed process, as Stripe's do).
struct Serve {
    env: TestEnv,
    base: String,
    api: Api,
    stripe: cmb_sims::stripe::StripeSim,
    /// Twilio outside the processes too, when a test kills the dialer (see [`Serve::with_twilio`]).
    twilio: Option<cmb_sims::twilio::TwilioSim>,
    shutdown: tokio_util::sync::CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

const KILL_TWILIO_SID: &str = "ACdeadbeefdeadbeefdeadbeefdeadbeef";
const KILL_TWILIO_TOKEN: &str = "kill-token";

impl Serve {
    /// With a Twilio simulator outside the processes whose calls ring for `ring_ms` (its calls
    /// outlive a killed process, as Twilio's do).
    async fn with_twilio(ring_ms: u64) -> Serve {
        let mut serve = Serve::new().await;
        let mut settings = cmb_sims::twilio::Settings::from_lookup(&|k: &str| match k {
            "SIM_TWILIO_RING_MS" => Some(ring_ms.to_string()),
            "SIM_TWILIO_CALL_SECONDS" => Some("2".to_string()),
            _ => None,
        });
        settings.account_sid = KILL_TWILIO_SID.into();
        settings.auth_token = KILL_TWILIO_TOKEN.into();
        let sim = cmb_sims::twilio::TwilioSim::new(settings);
        let url = cmb_sims::serve("twilio", sim.router(), serve.shutdown.clone(), &serve.tasks)
            .await
            .unwrap();
        serve.env = serve
            .env
            .set("TWILIO_BASE_URL", &url)
            .set("TWILIO_ACCOUNT_SID", KILL_TWILIO_SID)
            .set("TWILIO_AUTH_TOKEN", KILL_TWILIO_TOKEN);
        serve.twilio = Some(sim);
        serve
    }

    async fn new() -> Serve {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let base = format!("http://127.0.0.1:{port}");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let tasks = tokio_util::task::TaskTracker::new();
        let stripe = cmb_sims::stripe::StripeSim::new(cmb_sims::stripe::Settings {
            webhook_secret: callmeback::config::DEV_STRIPE_WEBHOOK_SECRET.into(),
            webhook_url: Some(format!("{base}/api/stripe/webhook")),
            faults: cmb_sims::Faults::new(Duration::ZERO, 0),
        });
        let url = cmb_sims::serve("stripe", stripe.router(), shutdown.clone(), &tasks)
            .await
            .unwrap();
        let env = env()
            .set("HTTP_ADDR", &format!("127.0.0.1:{port}"))
            .set("PUBLIC_BASE_URL", &base)
            .set("CALL_REQUEST_GRACE_SECS", "2")
            // A message the killed process held is redelivered to the next one soon.
            .set("WORKER_ACK_WAIT_MS", "5000")
            .set("STRIPE_BASE_URL", &url)
            .set("STRIPE_SECRET_KEY", "sk_test_crashes");
        let api = Api::new(format!("127.0.0.1:{port}").parse().unwrap());
        Serve {
            env,
            base,
            api,
            stripe,
            twilio: None,
            shutdown,
            tasks,
        }
    }

    /// A `serve` process, up (its `/healthz` answers), crashing at `crash_at` if given.
    async fn start(&self, crash_at: Option<&str>) -> tokio::process::Child {
        let extra: Vec<(&str, &str)> = crash_at.map(|s| ("CMB_CRASH_AT", s)).into_iter().collect();
        let child = self.env.spawn_process(&extra);
        let base = &self.base;
        eventually(Duration::from_secs(60), || async {
            reqwest::get(format!("{base}/healthz"))
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        })
        .await
        .expect("serve is up");
        child
    }

    /// The intent `pi` at the simulator.
    fn intent(&self, pi: &str) -> serde_json::Value {
        self.stripe
            .payment_intents()
            .into_iter()
            .find(|i| i["id"] == pi)
            .expect("the intent")
    }

    async fn stop(self, mut last: tokio::process::Child) {
        last.kill().await.unwrap();
        self.shutdown.cancel();
        self.env.cleanup().await;
    }
}

/// How a crash test's call is paid.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Pay {
    Credits,
    Card,
}

/// A user with 100 credits, or a card and an authorised intent for a call of one minute: the
/// client, the user id, and the body of `POST /api/call`.
async fn payer(serve: &Serve, store: &EventStore, pay: Pay) -> (Api, String, serde_json::Value) {
    let (user, profile) = serve.api.register(PASSWORD).await;
    let user_id = profile["id"].as_str().unwrap().to_string();
    let body = match pay {
        Pay::Credits => {
            store
                .execute::<Wallet>(
                    &user_id,
                    WalletCommand::Grant {
                        credits: 100,
                        reason: "test".into(),
                        reference: "crash".into(),
                    },
                    &CommandContext::for_request("test", Actor::System),
                )
                .await
                .unwrap();
            json!({ "persona_id": "brad_001", "use_credits": true, "duration": 1 })
        }
        Pay::Card => {
            let card = user
                .post(
                    "/api/user/payment-method",
                    json!({ "payment_method_id": "pm_card_visa" }),
                )
                .await;
            assert_eq!(card.status, 201, "{card:?}");
            let intent = user
                .post(
                    "/api/user/create-payment-intent",
                    json!({ "estimated_duration": 1 }),
                )
                .await;
            assert_eq!(intent.status, 201, "{intent:?}");
            json!({ "persona_id": "brad_001", "payment_intent_id": intent.body["payment_intent_id"] })
        }
    };
    (user, user_id, body)
}

/// A call request killed at `step`: after a restart, nothing stays held (or, once the call
/// exists, the request is simply complete).
async fn killed_at(step: &str, pay: Pay) {
    let serve = Serve::new().await;
    let backbone = serve.env.backbone().await;
    let pool = backbone.pool.clone();
    let store = EventStore::new(pool.clone());

    let mut first = serve.start(Some(step)).await;
    let (user, user_id, body) = payer(&serve, &store, pay).await;
    let answer = user
        .request(reqwest::Method::POST, "/api/call")
        .json(&body)
        .send()
        .await;
    assert!(answer.is_err(), "the process died before answering");
    let status = first.wait().await.unwrap();
    assert_eq!(status.code(), Some(86), "it died at the crash point {step}");
    let (call_id, opened): (uuid::Uuid, bool) = sqlx::query_as(
        "SELECT call_id, closed_at IS NULL FROM call_requests WHERE user_id = $1::uuid",
    )
    .bind(&user_id)
    .fetch_one(&pool)
    .await
    .expect("the request's journal row");
    assert!(opened, "left open by the crash");

    let second = serve.start(None).await;
    let outcome = eventually(Duration::from_secs(60), || async {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT outcome FROM call_requests WHERE call_id = $1",
        )
        .bind(call_id)
        .fetch_one(&pool)
        .await
        .unwrap()
    })
    .await
    .expect("the sweeper closes the request");
    let (wallet, _) = store.load::<Wallet>(&user_id).await.unwrap();
    let slot: i64 = sqlx::query_scalar("SELECT count(*) FROM active_calls WHERE call_id = $1")
        .bind(call_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    if step == "request.after_call" {
        // The call exists: the request is complete, and its hold and slot are the call's.
        assert_eq!(outcome, "requested");
    } else {
        assert!(outcome.starts_with("swept:"), "{outcome}");
        assert_eq!(slot, 0, "the active-call slot is free");
        match pay {
            Pay::Credits => {
                assert!(wallet.holds.is_empty(), "no credits held: {wallet:?}");
                assert_eq!(wallet.balance, 100);
            }
            Pay::Card => {
                let pi = body["payment_intent_id"].as_str().unwrap();
                let intent = serve.intent(pi);
                if step == "request.after_hold" {
                    // The intent was bound to the call: its authorisation is given back.
                    assert!(outcome.contains(&format!("{pi} cancelled")), "{outcome}");
                    assert_eq!(intent["status"], "canceled", "{intent}");
                } else {
                    // Never bound: it may still pay for another call.
                    assert_eq!(intent["status"], "requires_capture", "{intent}");
                }
            }
        }
        // And the user can call again at once.
        let again = match pay {
            Pay::Credits => body.clone(),
            Pay::Card => payer_intent(&user).await,
        };
        let again = user.post("/api/call", again).await;
        assert_eq!(again.status, 201, "{again:?}");
    }
    serve.stop(second).await;
}

/// An erasure killed at `step` (after `UserErased` is recorded): the request gets no answer,
/// and after a restart the `erasures` worker finishes it — the Stripe customer deleted, the
/// claims released, the persona and its document gone, the key destroyed.
async fn erasure_killed_at(step: &str) {
    let mut serve = Serve::new().await;
    serve.env = serve.env.set("ERASURE_RETRY_MS", "500");
    let backbone = serve.env.backbone().await;
    let pool = backbone.pool.clone();

    let mut first = serve.start(Some(step)).await;
    let (user, user_id, _) = payer(&serve, &EventStore::new(pool.clone()), Pay::Card).await;
    let persona_id = common::create_persona(&user, "Erased Midway", true).await;
    common::add_document(
        &user,
        &persona_id,
        "Notes",
        "# Notes\n\nThe heron nests by the weir.",
    )
    .await;
    let customer: String = sqlx::query_scalar(
        "SELECT payload -> 'StripeCustomerCreated' ->> 'customer_id' FROM events
          WHERE aggregate_id = $1 AND event_type = 'StripeCustomerCreated'",
    )
    .bind(&user_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    let answer = user
        .request(reqwest::Method::DELETE, "/api/user")
        .json(&json!({ "password": PASSWORD }))
        .send()
        .await;
    assert!(answer.is_err(), "the process died before answering");
    let status = first.wait().await.unwrap();
    assert_eq!(status.code(), Some(86), "it died at the crash point {step}");
    assert_eq!(
        common::count_events(&pool, &user_id, "UserErased").await,
        1,
        "the account recorded its erasure before the crash"
    );
    assert_ne!(serve.stripe.customer(&customer).unwrap()["deleted"], true);
    let left = |pool: sqlx::PgPool, user_id: String, persona_id: String| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT (SELECT count(*) FROM identity_claims WHERE user_id = $1::uuid)
                  + (SELECT count(*) FROM knowledge_documents WHERE persona_id = $2)
                  + (SELECT count(*) FROM data_keys WHERE user_id = $1::uuid AND key IS NOT NULL)
                  + (SELECT count(*) FROM erasures WHERE user_id = $1::uuid AND finished_at IS NULL)",
        )
        .bind(&user_id)
        .bind(&persona_id)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert!(
        left(pool.clone(), user_id.clone(), persona_id.clone()).await > 0,
        "the crash left clean-up to do"
    );

    let second = serve.start(None).await;
    let done = eventually(Duration::from_secs(90), || async {
        (left(pool.clone(), user_id.clone(), persona_id.clone()).await == 0).then_some(())
    })
    .await;
    assert!(
        done.is_some(),
        "the erasure was not finished after the restart"
    );
    let at_stripe = serve.stripe.customer(&customer).unwrap();
    assert_eq!(at_stripe["deleted"], true, "{at_stripe}");
    assert_eq!(serve.stripe.cards_of(&customer), 0);
    assert_eq!(
        common::count_events(&pool, &persona_id, "PersonaDeleted").await,
        1
    );
    assert_eq!(
        common::count_events(&pool, &user_id, "UserErased").await,
        1,
        "erased once"
    );
    serve.stop(second).await;
}

#[tokio::test]
async fn an_erasure_killed_after_recording_it_is_finished_after_a_restart() {
    erasure_killed_at("erasure.after_recorded").await;
}

#[tokio::test]
async fn an_erasure_killed_after_deleting_the_personas_is_finished_after_a_restart() {
    erasure_killed_at("erasure.after_personas").await;
}

/// The body of a card call of one minute, with a new intent on the user's card.
async fn payer_intent(user: &Api) -> serde_json::Value {
    let intent = user
        .post(
            "/api/user/create-payment-intent",
            json!({ "estimated_duration": 1 }),
        )
        .await;
    assert_eq!(intent.status, 201, "{intent:?}");
    json!({ "persona_id": "brad_001", "payment_intent_id": intent.body["payment_intent_id"] })
}

#[tokio::test]
async fn a_call_request_killed_after_its_journal_row_leaves_nothing_held() {
    killed_at("request.after_journal", Pay::Credits).await;
}

#[tokio::test]
async fn a_call_request_killed_after_claiming_the_slot_leaves_nothing_held() {
    killed_at("request.after_claim", Pay::Credits).await;
}

#[tokio::test]
async fn a_call_request_killed_after_holding_the_credits_leaves_nothing_held() {
    killed_at("request.after_hold", Pay::Credits).await;
}

#[tokio::test]
async fn a_call_request_killed_after_the_card_hold_has_it_cancelled_by_the_sweeper() {
    killed_at("request.after_hold", Pay::Card).await;
}

#[tokio::test]
async fn a_call_request_killed_after_the_call_was_requested_completes() {
    killed_at("request.after_call", Pay::Credits).await;
}

/// The settlement worker killed at `step` of settling a completed call of one minute: after a
/// restart the redelivered `CallEnded` finishes it, and the user pays its price exactly once.
async fn settlement_killed_at(step: &str, pay: Pay) {
    let serve = Serve::new().await;
    let backbone = serve.env.backbone().await;
    let pool = backbone.pool.clone();
    let store = EventStore::new(pool.clone());
    let mut first = serve.start(Some(step)).await;
    let (user, user_id, body) = payer(&serve, &store, pay).await;
    let call = user.post("/api/call", body.clone()).await;
    assert_eq!(call.status, 201, "{call:?}");
    let id = call.body["call"]["id"].as_str().unwrap().to_string();
    let status = tokio::time::timeout(Duration::from_secs(90), first.wait())
        .await
        .expect("the process dies settling the call")
        .unwrap();
    assert_eq!(status.code(), Some(86), "it died at the crash point {step}");
    let count = |event_type: &'static str| {
        let pool = pool.clone();
        let id = id.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM events WHERE aggregate_type = 'call' AND aggregate_id = $1
                  AND event_type = $2",
            )
            .bind(&id)
            .bind(event_type)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(count("CallEnded").await, 1);
    let settled_before = count("CallSettled").await;
    assert_eq!(
        settled_before,
        i64::from(step == "settle.after_record"),
        "{step}"
    );

    let second = serve.start(None).await;
    let done = eventually(Duration::from_secs(60), || async {
        let slot: i64 =
            sqlx::query_scalar("SELECT count(*) FROM active_calls WHERE call_id = $1::uuid")
                .bind(&id)
                .fetch_one(&pool)
                .await
                .unwrap();
        (count("CallSettled").await == 1 && slot == 0).then_some(())
    })
    .await;
    assert!(
        done.is_some(),
        "settled once and the slot freed after the restart"
    );
    let settled: (i64, i64) = sqlx::query_as(
        "SELECT (payload -> 'CallSettled' ->> 'charged_cents')::bigint,
                (payload -> 'CallSettled' ->> 'released_cents')::bigint
           FROM events WHERE aggregate_id = $1 AND event_type = 'CallSettled'",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    match pay {
        Pay::Credits => {
            assert_eq!(settled, (65, 0), "13 credits of the 13 held");
            let (wallet, _) = store.load::<Wallet>(&user_id).await.unwrap();
            assert!(wallet.holds.is_empty(), "{wallet:?}");
            assert_eq!(wallet.balance, 87, "charged 13 credits once: {wallet:?}");
        }
        Pay::Card => {
            assert_eq!(settled, (65, 0));
            let intent = serve.intent(body["payment_intent_id"].as_str().unwrap());
            assert_eq!(intent["status"], "succeeded", "{intent}");
            assert_eq!(intent["amount_received"], 65);
            assert_eq!(serve.stripe.charges_captured_cents(), 65, "captured once");
        }
    }
    serve.stop(second).await;
}

#[tokio::test]
async fn settlement_killed_after_taking_the_credits_settles_once_after_a_restart() {
    settlement_killed_at("settle.after_hold", Pay::Credits).await;
}

#[tokio::test]
async fn settlement_killed_after_capturing_the_card_settles_once_after_a_restart() {
    settlement_killed_at("settle.after_hold", Pay::Card).await;
}

#[tokio::test]
async fn settlement_killed_after_recording_it_frees_the_slot_after_a_restart() {
    settlement_killed_at("settle.after_record", Pay::Credits).await;
}

/// The dialer killed at `step` of placing a call paid with credits: after a restart the
/// redelivered `CallRequested` has the call placed at Twilio exactly once (found there, when
/// Twilio had already answered the killed process), and the call ends and is settled once.
async fn dialer_killed_at(step: &str) {
    // After Twilio's answer the call rings on while no process is up, long enough for the
    // next one to start, find the call at Twilio and take its answered callback.
    let ring_ms = if step == "dialer.after_twilio" {
        45_000
    } else {
        300
    };
    let serve = Serve::with_twilio(ring_ms).await;
    let twilio = serve.twilio.clone().expect("Twilio outside");
    let backbone = serve.env.backbone().await;
    let pool = backbone.pool.clone();
    let store = EventStore::new(pool.clone());
    let mut first = serve.start(Some(step)).await;
    let (user, user_id, body) = payer(&serve, &store, Pay::Credits).await;
    // The dialer may kill the process before the answer is out: the call is in the journal.
    let answer = user
        .request(reqwest::Method::POST, "/api/call")
        .json(&body)
        .send()
        .await;
    let id: String =
        sqlx::query_scalar("SELECT call_id::text FROM call_requests WHERE user_id = $1::uuid")
            .bind(&user_id)
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("the call's journal row ({answer:?}): {e}"));
    let status = tokio::time::timeout(Duration::from_secs(90), first.wait())
        .await
        .expect("the process dies placing the call")
        .unwrap();
    assert_eq!(status.code(), Some(86), "it died at the crash point {step}");
    let asked_before = twilio.calls().len();
    assert_eq!(
        asked_before,
        usize::from(step == "dialer.after_twilio"),
        "Twilio asked before the crash at {step}"
    );
    let count = |event_type: &'static str| {
        let pool = pool.clone();
        let id = id.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM events WHERE aggregate_type = 'call' AND aggregate_id = $1
                  AND event_type = $2",
            )
            .bind(&id)
            .bind(event_type)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(count("DialAttempted").await, 1, "the attempt was recorded");
    assert_eq!(count("CallPlaced").await, 0, "its outcome was not");

    let second = serve.start(None).await;
    let settled = eventually(Duration::from_secs(150), || async {
        (count("CallSettled").await == 1).then_some(())
    })
    .await;
    assert!(
        settled.is_some(),
        "placed, ended and settled after the restart (Twilio: {:?})",
        twilio
            .calls()
            .iter()
            .map(|c| (&c.sid, &c.status))
            .collect::<Vec<_>>()
    );
    let calls = twilio.calls();
    assert_eq!(calls.len(), 1, "Twilio was asked for the call once");
    let placed: String = sqlx::query_scalar(
        "SELECT payload -> 'CallPlaced' ->> 'call_sid' FROM events
          WHERE aggregate_id = $1 AND event_type = 'CallPlaced'",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        placed, calls[0].sid,
        "the call Twilio placed is the one recorded"
    );
    assert_eq!(count("CallPlaced").await, 1);
    // Killed before asking Twilio, the first attempt is found missing there and a second one
    // dials; killed after, the first attempt's call is found and recorded.
    let attempts = if step == "dialer.after_attempt" { 2 } else { 1 };
    assert_eq!(count("DialAttempted").await, attempts);
    let (wallet, _) = store.load::<Wallet>(&user_id).await.unwrap();
    assert!(wallet.holds.is_empty(), "{wallet:?}");
    assert_eq!(wallet.balance, 87, "charged 13 credits once: {wallet:?}");
    serve.stop(second).await;
}

#[tokio::test]
async fn a_dialer_killed_after_recording_its_attempt_places_the_call_once_after_a_restart() {
    dialer_killed_at("dialer.after_attempt").await;
}

#[tokio::test]
async fn a_dialer_killed_after_twilios_answer_places_the_call_once_after_a_restart() {
    dialer_killed_at("dialer.after_twilio").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_limits_deletions_and_the_scheduler_do_not_wait_for_the_calls_read_model() {
    use callmeback::usecases::calls::request::{PayWith, Request};
    use callmeback::usecases::calls::schedule::{schedule, ScheduleError, MAX_SCHEDULED};
    use sqlx::Connection;
    let start = chrono::Utc::now();
    let clock = callmeback::clock::Clock::manual(start);
    let env = env()
        .set("READ_YOUR_WRITES_MS", "0")
        .set("SCHEDULER_TICK_MS", "100");
    let app = env.spawn_app_with(clock.clone()).await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 1000).await;
    let (busy, busy_profile) = api.register(PASSWORD).await;
    grant(&app, &busy_profile, 1000).await;
    drop(busy);
    let set = user
        .put("/api/user/budget", json!({ "max_daily_spend_cents": 300 }))
        .await;
    assert_eq!(set.status, 200, "{set:?}");

    // The calls projector is stuck: nothing reaches rm_calls while this transaction lives
    // (readers still read).
    let mut stall = sqlx::PgConnection::connect(&env.vars["DATABASE_URL"])
        .await
        .unwrap();
    let mut stall = stall.begin().await.unwrap();
    sqlx::query("LOCK TABLE rm_calls IN EXCLUSIVE MODE")
        .execute(&mut *stall)
        .await
        .unwrap();

    // A scheduled call holds $2.25 of the $3.00 a day.
    let when = (start + chrono::Duration::minutes(6)).to_rfc3339();
    let scheduled = user
        .post(
            "/api/calls/schedule",
            json!({ "persona_id": "brad_001", "use_credits": true, "duration": 5, "scheduled_time": when }),
        )
        .await;
    assert_eq!(scheduled.status, 201, "{scheduled:?}");
    let id = scheduled.body["call"]["id"].as_str().unwrap().to_string();
    // Another $1.05 would break the day's budget, although rm_calls has not seen the first.
    let over = user
        .post(
            "/api/call",
            json!({ "persona_id": "brad_001", "use_credits": true, "duration": 2 }),
        )
        .await;
    assert_eq!(over.status, 402, "{over:?}");
    assert_eq!(over.code(), "budget_exceeded");
    // A persona with a scheduled call waiting is not deleted, though rm_calls has no such call.
    let persona = user
        .post(
            "/api/personas",
            common::persona_body("Ledger Friend", false),
        )
        .await;
    assert_eq!(persona.status, 201, "{persona:?}");
    let persona_id = persona.body["persona"]["id"].as_str().unwrap().to_string();
    let with_persona = user
        .post(
            "/api/calls/schedule",
            json!({ "persona_id": persona_id, "use_credits": true, "duration": 1, "scheduled_time": (start + chrono::Duration::hours(3)).to_rfc3339() }),
        )
        .await;
    assert_eq!(
        with_persona.status, 201,
        "$0.65 more is within the day: {with_persona:?}"
    );
    let kept = user.delete(&format!("/api/personas/{persona_id}")).await;
    assert_eq!(kept.status, 409, "{kept:?}");
    assert_eq!(kept.code(), "persona_scheduled");

    // The waiting-calls limit counts calls rm_calls has not seen either.
    let busy_id: uuid::Uuid = busy_profile["id"].as_str().unwrap().parse().unwrap();
    let ctx = CommandContext::for_request("test", Actor::User(busy_id.into()));
    let later = start + chrono::Duration::hours(2);
    let ask = || Request {
        user_id: busy_id.into(),
        phone: None,
        persona_id: "alex_001".into(),
        minutes: Some(1),
        pay_with: PayWith::Credits,
        scheduled: None,
    };
    for n in 0..MAX_SCHEDULED {
        schedule(
            &app.state.store,
            &app.state.stripe,
            &app.state.config.limits.calls,
            start,
            ask(),
            later,
            None,
            &ctx,
        )
        .await
        .unwrap_or_else(|e| panic!("scheduled call {n}: {e}"));
    }
    let refused = schedule(
        &app.state.store,
        &app.state.stripe,
        &app.state.config.limits.calls,
        start,
        ask(),
        later,
        None,
        &ctx,
    )
    .await;
    assert!(
        matches!(refused, Err(ScheduleError::TooMany)),
        "{refused:?}"
    );
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM rm_calls")
        .fetch_one(&app.state.pool)
        .await
        .unwrap();
    assert_eq!(seen, 0, "the read model is still stuck");

    // The scheduler finds the first call due and fires it.
    clock.advance(chrono::Duration::minutes(10));
    let fired = eventually(Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'ScheduledCallFired'",
        )
        .bind(&id)
        .fetch_one(&app.state.pool)
        .await
        .unwrap();
        (n == 1).then_some(())
    })
    .await;
    assert!(
        fired.is_some(),
        "the due call fired while rm_calls was stuck"
    );

    // Unstuck, the read model catches up with all of it.
    stall.rollback().await.unwrap();
    let caught_up = eventually(Duration::from_secs(60), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM rm_calls")
            .fetch_one(&app.state.pool)
            .await
            .unwrap();
        (n == MAX_SCHEDULED + 2).then_some(())
    })
    .await;
    assert!(caught_up.is_some(), "rm_calls caught up");
    app.stop().await;
    env.cleanup().await;
}
