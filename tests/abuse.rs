//! Toll fraud and abuse (issue 13): the destination policy at trigger, at schedule and in the
//! dialer; daily counts per number and per user; scheduled calls and the one-active-call rule;
//! the client's address behind proxies. Black-box: the app on a random port over HTTP, the
//! Twilio simulator as the phone network.

use crate::common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{eventually, grant, schedule_call, wait_for_settlement, Api, TestEnv, PASSWORD};
use serde_json::{json, Value};

fn env() -> TestEnv {
    TestEnv::new()
        .set("SIM_TWILIO_RING_MS", "200")
        .set("SIM_TWILIO_CALL_SECONDS", "2")
        .set("SCHEDULER_TICK_MS", "100")
}

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

/// The reasons recorded in the call's `DialFailed` events.
async fn dial_failures(pool: &sqlx::PgPool, id: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT payload->'DialFailed'->>'reason' FROM events
          WHERE aggregate_id = $1 AND event_type = 'DialFailed' ORDER BY sequence",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn wallet(pool: &sqlx::PgPool, profile: &Value) -> Option<(i64, i64)> {
    sqlx::query_as("SELECT balance, reserved FROM rm_wallets WHERE user_id = $1::uuid")
        .bind(profile["id"].as_str().unwrap())
        .fetch_optional(pool)
        .await
        .unwrap()
}

/// Waits until the wallet shows `balance` with nothing reserved.
async fn released(pool: &sqlx::PgPool, profile: &Value, balance: i64) -> bool {
    eventually(Duration::from_secs(30), || async {
        (wallet(pool, profile).await == Some((balance, 0))).then_some(())
    })
    .await
    .is_some()
}

fn call_to(phone: &str) -> Value {
    json!({ "persona_id": "brad_001", "use_credits": true, "duration": 1, "phone_number": phone })
}

#[tokio::test]
async fn each_blocked_destination_is_refused_at_trigger_and_at_schedule_naming_its_rule() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let later = (Utc::now() + chrono::Duration::hours(2)).to_rfc3339();
    // A user per number: calls now are limited to 5 a minute per user.
    for (phone, rule) in [
        ("+19005550123", "+1900"),  // NANP premium rate
        ("+19765550123", "+1976"),  // NANP premium rate
        ("+15005550123", "+1500"),  // NANP personal communication services
        ("+881612345678", "+881"),  // Global Mobile Satellite System
        ("+88213456789", "+882"),   // international networks
        ("+8835100012345", "+883"), // international networks
        ("+870772345678", "+870"),  // Inmarsat
        ("+18765550123", "JM"),     // +1, but Jamaica: the classic callback scam
        ("+18095550123", "DO"),     // +1, but the Dominican Republic
        ("+442079460123", "GB"),    // not an allowed country
        ("+447012345678", "+4470"), // UK personal numbering: the prefix rule comes first
        ("+9999999999", "unknown"), // no country at all
    ] {
        let (user, profile) = api.register(PASSWORD).await;
        grant(&app, &profile, 500).await;
        let now = user.post("/api/call", call_to(phone)).await;
        assert_eq!(now.status, 400, "{phone}: {now:?}");
        assert_eq!(now.code(), "destination_not_allowed", "{phone}: {now:?}");
        assert_eq!(now.field(), "phone_number", "{phone}");
        let message = now.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(rule), "{phone}: {message}");

        let scheduled = schedule_call(&user, call_to(phone), &later).await;
        assert_eq!(scheduled.status, 400, "{phone}: {scheduled:?}");
        assert_eq!(scheduled.code(), "destination_not_allowed", "{phone}");
        let reserves: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'CreditsReserved'",
        )
        .bind(profile["id"].as_str().unwrap())
        .fetch_one(&app.state.pool)
        .await
        .unwrap();
        assert_eq!(reserves, 0, "nothing held for a refused destination");
    }
    assert!(app.sims.twilio.as_ref().unwrap().calls().is_empty());
    let (user, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 500).await;

    // Allowed: the United States (the seeds' and the examples' +1 555 and +1 415 numbers, the
    // Twilio simulator's magic numbers) and Canada.
    for phone in [
        "+15555550100",
        "+14155550123",
        "+15558880001",
        "+15558880002",
        "+15558880003",
        "+14165550123",
        "+16045550123",
    ] {
        let scheduled = schedule_call(&user, call_to(phone), &later).await;
        assert_eq!(scheduled.status, 201, "{phone}: {scheduled:?}");
    }
    let now = user.post("/api/call", call_to("+14155550123")).await;
    assert_eq!(now.status, 201, "{now:?}");
    let reserves: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'CreditsReserved'",
    )
    .bind(profile["id"].as_str().unwrap())
    .fetch_one(&app.state.pool)
    .await
    .unwrap();
    assert_eq!(
        reserves, 8,
        "seven scheduled calls and one now held their price"
    );
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_operator_chooses_the_countries_and_the_blocked_prefixes() {
    let env = env()
        .set("CALL_ALLOWED_COUNTRIES", "US,GB")
        .set("CALL_BLOCKED_PREFIXES", "+1555999,+4470");
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 500).await;
    let later = (Utc::now() + chrono::Duration::hours(2)).to_rfc3339();
    for (phone, refused) in [
        ("+442079460123", None),
        ("+19005550123", None), // the defaults are replaced, not added to
        ("+447012345678", Some("+4470")),
        ("+15559990123", Some("+1555999")),
        ("+14165550123", Some("CA")),
    ] {
        let reply = schedule_call(&user, call_to(phone), &later).await;
        match refused {
            None => assert_eq!(reply.status, 201, "{phone}: {reply:?}"),
            Some(rule) => {
                assert_eq!(
                    reply.code(),
                    "destination_not_allowed",
                    "{phone}: {reply:?}"
                );
                assert!(reply.body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains(rule));
            }
        }
    }
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_dialer_checks_the_destination_again_when_a_scheduled_call_falls_due() {
    let env = env();
    let clock = callmeback::clock::Clock::manual(at("2027-05-03T08:00:00Z"));
    let app = env.spawn_app_with(clock).await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 100).await;
    let reply = schedule_call(&user, call_to("+14155550123"), "2027-05-03T09:00:00Z").await;
    assert_eq!(reply.status, 201, "{reply:?}");
    let id = reply.body["call"]["id"].as_str().unwrap().to_string();
    app.stop().await;

    // The operator blocks the range before the call falls due.
    let env = env.set("CALL_BLOCKED_PREFIXES", "+1415");
    let app = env
        .spawn_app_with(callmeback::clock::Clock::manual(at("2027-05-03T09:00:05Z")))
        .await;
    assert!(wait_for_settlement(&app.state.pool, &id, "failed").await);
    let reasons = dial_failures(&app.state.pool, &id).await;
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(reasons[0].contains("+1415"), "{reasons:?}");
    assert!(
        app.sims.twilio.as_ref().unwrap().calls().is_empty(),
        "never dialled"
    );
    assert!(released(&app.state.pool, &profile, 100).await);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_number_is_rung_at_most_n_times_a_day_across_all_users_answered_or_not() {
    let env = env().set("CALL_NUMBER_DAILY_LIMIT", "2");
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    // A stranger's number that never answers: unanswered calls cost nothing, yet count.
    let stranger = "+15551230002";
    let mut users = Vec::new();
    for _ in 0..3 {
        let (user, profile) = api.register(PASSWORD).await;
        grant(&app, &profile, 100).await;
        users.push((user, profile));
    }
    for (user, _) in &users[..2] {
        let reply = user.post("/api/call", call_to(stranger)).await;
        assert_eq!(reply.status, 201, "{reply:?}");
        let id = reply.body["call"]["id"].as_str().unwrap();
        assert!(wait_for_settlement(&app.state.pool, id, "no-answer").await);
    }
    let (third, profile) = &users[2];
    let refused = third.post("/api/call", call_to(stranger)).await;
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.code(), "number_daily_limit");
    let retry: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=86_400).contains(&retry), "until midnight UTC: {retry}");
    assert_eq!(
        wallet(&app.state.pool, profile).await,
        Some((100, 0)),
        "nothing held"
    );
    // Another number is fine for the same user.
    let other = third.post("/api/call", call_to("+15551230009")).await;
    assert_eq!(other.status, 201, "{other:?}");
    let twilio = app.sims.twilio.as_ref().unwrap();
    let placed = eventually(Duration::from_secs(30), || async {
        (twilio.calls().len() == 3).then_some(())
    })
    .await;
    assert!(placed.is_some(), "{:?}", twilio.calls());
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn unanswered_calls_count_toward_the_users_daily_call_limit() {
    let env = env().set("CALL_USER_DAILY_LIMIT", "2");
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 100).await;
    for phone in ["+15551110002", "+15552220001"] {
        let reply = user.post("/api/call", call_to(phone)).await;
        assert_eq!(reply.status, 201, "{reply:?}");
        let id = reply.body["call"]["id"].as_str().unwrap();
        let status = if phone.ends_with('2') {
            "no-answer"
        } else {
            "busy"
        };
        assert!(wait_for_settlement(&app.state.pool, id, status).await);
    }
    assert!(released(&app.state.pool, &profile, 100).await, "free calls");
    let refused = user.post("/api/call", call_to("+15553330009")).await;
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.code(), "daily_call_limit");
    assert!(refused.headers.contains_key("retry-after"));
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_scheduled_call_respects_one_active_call_and_the_daily_counts_when_it_fires() {
    let env = env()
        .set("SIM_TWILIO_CALL_SECONDS", "30")
        .set("CALL_NUMBER_DAILY_LIMIT", "1");
    let clock = callmeback::clock::Clock::manual(at("2027-06-01T10:00:00Z"));
    let app = env.spawn_app_with(clock.clone()).await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 200).await;
    let schedule = |phone: &str, time: &str| schedule_call(&user, call_to(phone), time);
    let busy_then = schedule("+15554440009", "2027-06-01T10:10:00Z").await;
    assert_eq!(busy_then.status, 201, "{busy_then:?}");
    let busy_then = busy_then.body["call"]["id"].as_str().unwrap().to_string();
    let taken = schedule("+15554440019", "2027-06-01T10:20:00Z").await;
    assert_eq!(taken.status, 201, "{taken:?}");
    let taken = taken.body["call"]["id"].as_str().unwrap().to_string();

    // A call now, still going when the first scheduled call falls due.
    let now = user.post("/api/call", call_to("+15554440029")).await;
    assert_eq!(now.status, 201, "{now:?}");
    let now = now.body["call"]["id"].as_str().unwrap().to_string();
    let twilio = app.sims.twilio.as_ref().unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            (twilio.calls().len() == 1).then_some(())
        })
        .await
        .is_some(),
        "the call now is placed"
    );
    clock.set(at("2027-06-01T10:10:01Z"));
    assert!(wait_for_settlement(&app.state.pool, &busy_then, "failed").await);
    let reasons = dial_failures(&app.state.pool, &busy_then).await;
    assert!(reasons[0].contains("in progress"), "{reasons:?}");
    assert_eq!(twilio.calls().len(), 1, "not dialled beside the call now");
    assert!(wait_for_settlement(&app.state.pool, &now, "completed").await);

    // Someone else rings the second call's number first: its one call today is used.
    let (other, other_profile) = api.register(PASSWORD).await;
    grant(&app, &other_profile, 100).await;
    let first = other.post("/api/call", call_to("+15554440019")).await;
    assert_eq!(first.status, 201, "{first:?}");
    clock.set(at("2027-06-01T10:20:01Z"));
    assert!(wait_for_settlement(&app.state.pool, &taken, "failed").await);
    let reasons = dial_failures(&app.state.pool, &taken).await;
    assert!(
        reasons[0].contains("CALL_NUMBER_DAILY_LIMIT"),
        "{reasons:?}"
    );
    assert_eq!(twilio.calls().len(), 2, "the other user's call only");
    // Both refused calls gave their holds back; the completed call was charged.
    let charged: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(charged_cents), 0)::bigint FROM rm_calls WHERE user_id = $1::uuid",
    )
    .bind(profile["id"].as_str().unwrap())
    .fetch_one(&app.state.pool)
    .await
    .unwrap();
    assert!(charged > 0);
    assert!(
        eventually(Duration::from_secs(30), || async {
            let w = wallet(&app.state.pool, &profile).await?;
            (w.1 == 0).then_some(())
        })
        .await
        .is_some(),
        "no hold left"
    );
    app.stop().await;
    env.cleanup().await;
}

/// Failed sign-ins (unknown emails, so no account locks) until the login limit (5 a minute)
/// answers 429: how many were let through. Windows are whole minutes, so a run that crosses
/// one lets up to 10 through; a limit that never applies lets all 20.
async fn logins_until_limited(api: &Api, forwarded_for: impl Fn(usize) -> String) -> usize {
    for n in 0..20 {
        let reply = api
            .send(
                api.request(reqwest::Method::POST, "/api/auth/login")
                    .header("x-forwarded-for", forwarded_for(n))
                    .json(
                        &json!({ "email": format!("nobody{n}@example.com"), "password": PASSWORD }),
                    ),
            )
            .await;
        if reply.status == 429 {
            assert_eq!(reply.code(), "rate_limited", "{reply:?}");
            return n;
        }
        assert_eq!(reply.status, 401, "{reply:?}");
    }
    20
}

/// One client's limit, with a minute boundary crossed at most once.
fn limited_as_one_client(let_through: usize) -> bool {
    (5..=10).contains(&let_through)
}

/// An `Api` that sends no `X-Forwarded-For` of its own (the test sets it per request).
fn bare(app: &callmeback::app::Running) -> Api {
    let mut api = Api::new(app.addr);
    api.ip = String::new();
    api
}

#[tokio::test]
async fn a_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() {
    // Without trusted proxies, and with trusted proxies the peer is not one of: the socket's
    // address is the client, whatever the header says.
    for trusted in [None, Some("10.0.0.0/8,2001:db8::/32")] {
        let mut env = env();
        env.vars.remove("TRUSTED_PROXIES");
        if let Some(trusted) = trusted {
            env = env.set("TRUSTED_PROXIES", trusted);
        }
        let app = env.spawn_app().await;
        let let_through = logins_until_limited(&bare(&app), |n| format!("198.51.100.{n}")).await;
        assert!(
            limited_as_one_client(let_through),
            "{trusted:?}: {let_through}"
        );
        app.stop().await;
        env.cleanup().await;
    }
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_right_most_untrusted_address_is_the_client() {
    let env = env().set("TRUSTED_PROXIES", "127.0.0.1,::1,10.0.0.0/8");
    let app = env.spawn_app().await;
    let api = bare(&app);
    // The client writes what it likes on the left; the proxies append what they saw.
    let let_through =
        logins_until_limited(&api, |n| format!("203.0.113.{n}, 198.51.100.77, 10.0.0.5")).await;
    assert!(
        limited_as_one_client(let_through),
        "as 198.51.100.77: {let_through}"
    );
    // Another client behind the same proxy has a limit of its own.
    let let_through = logins_until_limited(&api, |_| "198.51.100.78, 10.0.0.5".to_string()).await;
    assert!(limited_as_one_client(let_through), "{let_through}");
    // IPv6: one /64 is one client, however many of its addresses it uses.
    let let_through = logins_until_limited(&api, |n| format!("2001:db8:7:7::{:x}", n + 1)).await;
    assert!(limited_as_one_client(let_through), "per /64: {let_through}");
    let let_through = logins_until_limited(&api, |_| "2001:db8:7:8::1".to_string()).await;
    assert!(
        limited_as_one_client(let_through),
        "the next /64: {let_through}"
    );
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_call_paid_by_card_is_not_scheduled_beyond_what_its_authorisation_lasts() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    let attached = user
        .post(
            "/api/user/payment-method",
            json!({ "payment_method_id": "pm_card_visa" }),
        )
        .await;
    assert_eq!(attached.status, 201, "{attached:?}");
    let intent = |user: Api| async move {
        let intent = user
            .post(
                "/api/user/create-payment-intent",
                json!({ "estimated_duration": 1 }),
            )
            .await;
        assert_eq!(intent.status, 201, "{intent:?}");
        intent.body["payment_intent_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let schedule = |pi: Option<String>, days: i64| {
        let at = (Utc::now() + chrono::Duration::days(days)).to_rfc3339();
        let mut body = json!({ "persona_id": "brad_001", "duration": 1 });
        match pi {
            Some(pi) => body["payment_intent_id"] = json!(pi),
            None => body["use_credits"] = json!(true),
        }
        schedule_call(&user, body, &at)
    };
    // Card authorisations lapse after about 7 days: refused beyond 6, before any hold.
    let far = schedule(Some(intent(user.clone()).await), 8).await;
    assert_eq!(far.status, 400, "{far:?}");
    assert_eq!(far.field(), "scheduled_time");
    assert!(far.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("card"));
    let near = schedule(Some(intent(user.clone()).await), 5).await;
    assert_eq!(near.status, 201, "{near:?}");
    // Credits do not lapse: 20 days ahead is fine.
    grant(&app, &profile, 100).await;
    let credits = schedule(None, 20).await;
    assert_eq!(credits.status, 201, "{credits:?}");
    app.stop().await;
    env.cleanup().await;
}

/// `n` sign-ins at once (wrong passwords of unknown emails, each from its own address): the
/// error codes of the answers that were not 401, with whether each carried `Retry-After`.
async fn burst_of_sign_ins(app: &callmeback::app::Running, n: usize) -> Vec<(u16, String, bool)> {
    let api = Api::new(app.addr);
    let replies = futures::future::join_all((0..n).map(|i| {
        let who = api.elsewhere();
        async move {
            who.post(
                "/api/auth/login",
                json!({ "email": format!("burst{i}@example.com"), "password": PASSWORD }),
            )
            .await
        }
    }))
    .await;
    replies
        .into_iter()
        .filter(|r| r.status != 401)
        .map(|r| {
            (
                r.status,
                r.code().to_string(),
                r.headers.contains_key("retry-after"),
            )
        })
        .collect()
}

// Each case in a test of its own: the hashing pool is the process's, set by the first app.

#[tokio::test]
async fn a_full_password_hashing_queue_answers_503_busy_with_retry_after() {
    // One hasher, nobody waiting: a burst of sign-ins is refused at once beyond it.
    let env = env()
        .set("PASSWORD_HASH_CONCURRENCY", "1")
        .set("PASSWORD_HASH_QUEUE", "0");
    let app = env.spawn_app().await;
    let refused = burst_of_sign_ins(&app, 12).await;
    assert!(!refused.is_empty(), "a burst of 12 on one hasher");
    for (status, code, retry_after) in &refused {
        assert_eq!((*status, code.as_str(), *retry_after), (503, "busy", true));
    }
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_request_past_its_deadline_answers_503_timeout() {
    // A deadline shorter than a queue of hashes: 503 timeout.
    let env = env()
        .set("PASSWORD_HASH_CONCURRENCY", "1")
        .set("REQUEST_TIMEOUT_MS", "100");
    let app = env.spawn_app().await;
    let late = burst_of_sign_ins(&app, 12).await;
    assert!(
        !late.is_empty(),
        "twelve hashes in a row take longer than 100 ms"
    );
    for (status, code, retry_after) in &late {
        assert_eq!(
            (*status, code.as_str(), *retry_after),
            (503, "timeout", true)
        );
    }
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn requests_over_the_concurrency_cap_answer_503_overloaded() {
    // One request at a time: the others are shed at once.
    let env = env().set("HTTP_MAX_CONCURRENT_REQUESTS", "1");
    let app = env.spawn_app().await;
    let shed = burst_of_sign_ins(&app, 12).await;
    assert!(!shed.is_empty(), "twelve at once on a cap of one");
    for (status, code, retry_after) in &shed {
        assert_eq!(
            (*status, code.as_str(), *retry_after),
            (503, "overloaded", true)
        );
    }
    app.stop().await;
    env.cleanup().await;
}
