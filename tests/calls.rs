//! Calls over HTTP against real Postgres and NATS and the Twilio simulator: trigger, dial,
//! callbacks, pricing, settlement of credit holds, schedules on a controllable clock.

use crate::common;

use std::time::Duration;

use cmb_domain::wallet::{Wallet, WalletCommand};
use cmb_domain::{Actor, CommandContext};
use common::{
    call_body, count_events, eventually, grant, request_call, schedule_call, wait_for_status, Api,
    TestEnv, PASSWORD,
};
use serde_json::{json, Value};

/// A test environment whose simulated calls are short.
fn env() -> TestEnv {
    TestEnv::new()
        .set("SIM_TWILIO_RING_MS", "200")
        .set("SIM_TWILIO_CALL_SECONDS", "2")
        .set("SCHEDULER_TICK_MS", "100")
        .set("READ_YOUR_WRITES_MS", "3000")
}

/// Waits (up to 5 s) for the user's balance to be `expected`; returns what it last was.
async fn settles_at(pool: &sqlx::PgPool, profile: &Value, expected: i64) -> i64 {
    eventually(Duration::from_secs(5), || async {
        let b = balance(pool, profile).await;
        (b == expected).then_some(b)
    })
    .await
    .unwrap_or(balance(pool, profile).await)
}

/// The user's balance, from the wallets read model (polling the rate-limited API would trip
/// its limits).
async fn balance(pool: &sqlx::PgPool, profile: &Value) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT balance FROM rm_wallets WHERE user_id = $1::uuid")
        .bind(profile["id"].as_str().unwrap())
        .fetch_optional(pool)
        .await
        .unwrap()
        .unwrap_or(0)
}

/// Waits (watching the read model, not the rate-limited API) for the call to reach `status`
/// and be settled (or just `status` if `settled` is false); then answers what the API shows.
async fn wait_for(pool: &sqlx::PgPool, user: &Api, id: &str, status: &str, settled: bool) -> Value {
    let reached = wait_for_status(pool, id, status, settled).await;
    if settled {
        // The timeline is a read model of its own: let it catch up too.
        eventually(Duration::from_secs(10), || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM rm_timeline WHERE aggregate_id = $1 AND event_type = 'CallSettled'",
            )
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap();
            (n == 1).then_some(())
        })
        .await;
    }
    let reply = user.get(&format!("/api/calls/{id}")).await;
    assert!(reached, "call {id} never reached {status}: {reply:?}");
    assert_eq!(reply.body["call"]["status"], status, "{reply:?}");
    reply.body
}

#[tokio::test]
async fn a_call_paid_with_credits_rings_completes_and_is_charged_exactly_its_price() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 100).await;
    assert!(eventually(Duration::from_secs(5), || async {
        (balance(&app.state.pool, &profile).await == 100).then_some(())
    })
    .await
    .is_some());

    let reply = user
        .post(
            "/api/call",
            json!({ "persona_id": "brad_001", "use_credits": true, "duration": 2 }),
        )
        .await;
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(reply.body["call"]["status"], "initiated");
    // At most 25¢ + 2 × 40¢ = $1.05 = 21 credits, held before dialling.
    assert_eq!(reply.body["hold"]["credits"], 21);
    assert_eq!(reply.body["call"]["phone_number"], profile["phone"]);
    let id = reply.body["call"]["id"].as_str().unwrap().to_string();

    let second = user
        .post(
            "/api/call",
            json!({ "persona_id": "sarah_001", "use_credits": true }),
        )
        .await;
    assert_eq!(second.status, 429, "one call at a time: {second:?}");
    assert_eq!(second.code(), "call_in_progress");

    let done = wait_for(&app.state.pool, &user, &id, "completed", true).await;
    let call = &done["call"];
    assert!(call["call_sid"].as_str().unwrap().starts_with("CA"));
    let secs = call["duration_secs"].as_i64().unwrap();
    assert!((1..=4).contains(&secs), "about 2 s answered: {secs}");
    assert_eq!(call["billed_minutes"], 1);
    assert_eq!(
        call["cost_cents"], 65,
        "25¢ connection + one started minute at 40¢"
    );
    assert_eq!(call["charged_cents"], 65);
    let balance = eventually(Duration::from_secs(5), || async {
        let c = balance(&app.state.pool, &profile).await;
        (c == 87).then_some(c)
    })
    .await;
    assert_eq!(
        balance,
        Some(87),
        "100 − 13 credits, the rest of the hold released"
    );

    // The whole story, in order, with who did what.
    let timeline: Vec<(String, String)> = done["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event_type"].as_str().unwrap().into(),
                e["actor"].as_str().unwrap().into(),
            )
        })
        .collect();
    let types: Vec<&str> = timeline.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(types.first(), Some(&"CallRequested"));
    for expected in [
        "DialAttempted",
        "CallPlaced",
        "CallEnded",
        "CostRecorded",
        "CallSettled",
    ] {
        assert!(types.contains(&expected), "{expected} in {types:?}");
    }
    let actor = |t: &str| timeline.iter().find(|(e, _)| e == t).unwrap().1.clone();
    assert!(actor("CallRequested").starts_with("user:"));
    assert_eq!(actor("DialAttempted"), "worker:dialer");
    assert_eq!(actor("CallEnded"), "webhook:twilio");
    assert_eq!(actor("CallSettled"), "worker:settlement");

    // Twilio's cost, as a cost event.
    let cost: (String, i64, i64) = sqlx::query_as(
        "SELECT service, quantity, total_micros FROM rm_call_costs
          WHERE call_id = $1::uuid AND service = 'twilio'",
    )
    .bind(&id)
    .fetch_one(&app.state.pool)
    .await
    .unwrap();
    assert_eq!(cost, ("twilio".into(), 1, 14_000));

    // Exactly one call was placed, and the user can call again.
    let sim = app.sims.twilio.as_ref().expect("the Twilio simulator runs");
    assert_eq!(sim.calls().len(), 1);
    let history = user.get("/api/calls?status=completed").await;
    assert_eq!(history.body["pagination"]["total"], 1, "{history:?}");
    assert_eq!(history.body["calls"][0]["persona_name"], "Brad");
    let usage = user.get("/api/user/usage?months=2").await;
    assert_eq!(usage.body["total"]["calls"], 1, "{usage:?}");
    assert_eq!(usage.body["total"]["minutes"], 1);
    assert_eq!(usage.body["total"]["spent_cents"], 65);
    assert_eq!(usage.body["monthly"].as_array().unwrap().len(), 2);
    let again = user
        .post(
            "/api/call",
            json!({ "persona_id": "sarah_001", "use_credits": true, "duration": 1 }),
        )
        .await;
    assert_eq!(again.status, 201, "{again:?}");
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn unanswered_busy_and_failed_calls_cost_nothing_and_release_the_hold() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 50).await;
    // The simulator's magic numbers: …0001 busy, …0002 no answer, …0003 failed.
    for (phone, status) in [
        ("+15558880001", "busy"),
        ("+15558880002", "no-answer"),
        ("+15558880003", "failed"),
    ] {
        let reply = user
            .post(
                "/api/call",
                json!({ "persona_id": "alex_001", "use_credits": true, "phone_number": phone }),
            )
            .await;
        assert_eq!(reply.status, 201, "{reply:?}");
        let id = reply.body["call"]["id"].as_str().unwrap().to_string();
        let done = wait_for(&app.state.pool, &user, &id, status, true).await;
        assert_eq!(done["call"]["cost_cents"], 0);
        assert_eq!(done["call"]["charged_cents"], 0);
    }
    assert_eq!(
        settles_at(&app.state.pool, &profile, 50).await,
        50,
        "every hold released"
    );
    let costs: i64 = sqlx::query_scalar("SELECT count(*) FROM rm_call_costs")
        .fetch_one(&app.state.pool)
        .await
        .unwrap();
    assert_eq!(costs, 0, "no answered minutes, no Twilio cost");
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn calls_need_enough_credits_and_valid_input() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 20).await;
    let poor = user
        .post(
            "/api/call",
            json!({ "persona_id": "brad_001", "use_credits": true }),
        )
        .await;
    assert_eq!(poor.status, 402, "5 minutes need 45 credits: {poor:?}");
    assert_eq!(poor.code(), "insufficient_credits");
    // (Calls are limited to 5 a minute per user, bad ones included: another user checks input.)
    let (checker, _) = api.register(PASSWORD).await;
    for (body, field) in [
        (
            json!({ "persona_id": "brad_001", "use_credits": true, "duration": 31 }),
            "duration",
        ),
        (
            json!({ "persona_id": "brad_001", "use_credits": true, "phone_number": "555" }),
            "phone_number",
        ),
        (json!({ "persona_id": "brad_001" }), "payment_intent_id"),
        (json!({ "use_credits": true }), "persona_id"),
    ] {
        let reply = checker.post("/api/call", body).await;
        assert_eq!(reply.status, 400, "{reply:?}");
        assert_eq!(reply.field(), field);
    }
    let unknown = checker
        .post(
            "/api/call",
            json!({ "persona_id": "nobody", "use_credits": true, "duration": 1 }),
        )
        .await;
    assert_eq!(unknown.status, 404);
    // Nothing was dialled and nothing is held; the user can still call.
    assert_eq!(app.sims.twilio.as_ref().unwrap().calls().len(), 0);
    let ok = user
        .post(
            "/api/call",
            json!({ "persona_id": "brad_001", "use_credits": true, "duration": 1 }),
        )
        .await;
    assert_eq!(ok.status, 201, "{ok:?}");
    // Someone else cannot see it.
    let (other, _) = api.register(PASSWORD).await;
    let id = ok.body["call"]["id"].as_str().unwrap();
    assert_eq!(other.get(&format!("/api/calls/{id}")).await.status, 404);
    assert_eq!(other.get("/api/calls").await.body["pagination"]["total"], 0);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn budgets_refuse_calls_before_any_hold_and_name_the_limit() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 500).await;
    let set = user
        .put(
            "/api/user/budget",
            json!({ "max_cost_per_call_cents": 200, "max_daily_spend_cents": 300 }),
        )
        .await;
    assert_eq!(set.status, 200, "{set:?}");
    let pricey = user
        .post(
            "/api/call",
            json!({ "persona_id": "brad_001", "use_credits": true, "duration": 5 }),
        )
        .await;
    assert_eq!(pricey.status, 402, "{pricey:?}");
    assert_eq!(pricey.code(), "budget_exceeded");
    assert_eq!(pricey.field(), "max_cost_per_call_cents");
    let id = request_call(&user, "brad_001", 4).await;
    wait_for(&app.state.pool, &user, &id, "completed", true).await;
    // 65¢ spent today; another $1.85 hold would make $2.50 — fine; a third would not.
    let id2 = request_call(&user, "brad_001", 4).await;
    wait_for(&app.state.pool, &user, &id2, "completed", true).await;
    let third = user
        .post(
            "/api/call",
            json!({ "persona_id": "brad_001", "use_credits": true, "duration": 4 }),
        )
        .await;
    assert_eq!(third.status, 402, "{third:?}");
    assert_eq!(third.field(), "max_daily_spend_cents");
    // The day's spend (130¢ of 300¢) is under the 80 % alert; a bad setting is refused.
    let bad = user
        .put("/api/user/budget", json!({ "warn_at_percent": 0 }))
        .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.field(), "warn_at_percent");
    let budget = user.get("/api/user/budget").await;
    assert_eq!(budget.body["spent"]["today_cents"], 130, "{budget:?}");
    let alert = user
        .put("/api/user/budget", json!({ "warn_at_percent": 40 }))
        .await;
    assert_eq!(alert.status, 200);
    let id3 = request_call(&user, "brad_001", 1).await;
    wait_for(&app.state.pool, &user, &id3, "completed", true).await;
    let alerts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'budget' AND event_type = 'BudgetAlertRaised'",
    )
    .fetch_one(&app.state.pool)
    .await
    .unwrap();
    assert_eq!(alerts, 1, "195¢ of 300¢ crossed 40 %, once");
    app.stop().await;
    env.cleanup().await;
}

fn at(s: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap()
        .with_timezone(&chrono::Utc)
}

#[tokio::test]
async fn scheduled_calls_fire_once_at_the_local_time_across_a_dst_change_and_restarts() {
    let env = env();
    // Saturday 13 March 2027, noon UTC; New York moves to EDT on Sunday 14 March at 02:00.
    let clock = callmeback::clock::Clock::manual(at("2027-03-13T12:00:00Z"));
    let app = env.spawn_app_with(clock.clone()).await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 100).await;
    let schedule = |time: &str, tz: Option<&str>| {
        let mut body = call_body("sarah_001", 1);
        if let Some(tz) = tz {
            body["timezone"] = json!(tz);
        }
        schedule_call(&user, body, time)
    };
    let reply = schedule("2027-03-14T09:00", Some("America/New_York")).await;
    assert_eq!(reply.status, 201, "{reply:?}");
    let call = &reply.body["call"];
    assert_eq!(call["status"], "scheduled");
    assert_eq!(
        call["scheduled_for"], "2027-03-14T13:00:00Z",
        "09:00 EDT, not EST"
    );
    assert_eq!(call["timezone"], "America/New_York");
    let id = call["id"].as_str().unwrap().to_string();

    for (time, tz, field) in [
        ("2027-03-13T12:04:00Z", None, "scheduled_time"),
        ("2027-04-13T12:01:00Z", None, "scheduled_time"),
        (
            "2027-03-14T02:30",
            Some("America/New_York"),
            "scheduled_time",
        ),
        ("2027-03-14T09:00", Some("Mars/Olympus"), "timezone"),
    ] {
        let bad = schedule(time, tz).await;
        assert_eq!(bad.status, 400, "{time}: {bad:?}");
        assert_eq!(bad.field(), field);
    }
    let listed = user.get("/api/calls/scheduled").await;
    assert_eq!(
        listed.body["calls"].as_array().unwrap().len(),
        1,
        "{listed:?}"
    );

    // A minute early: nothing happens.
    clock.set(at("2027-03-14T12:59:00Z"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(app.sims.twilio.as_ref().unwrap().calls().len(), 0);
    app.stop().await;

    // Restarted after the time: it fires, once.
    let clock = callmeback::clock::Clock::manual(at("2027-03-14T13:00:30Z"));
    let app = env.spawn_app_with(clock.clone()).await;
    let user = Api::new(app.addr).with_token(user.token.as_deref().unwrap());
    wait_for(&app.state.pool, &user, &id, "completed", true).await;
    assert_eq!(app.sims.twilio.as_ref().unwrap().calls().len(), 1);
    app.stop().await;
    let app = env.spawn_app_with(clock).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        count_events(&app.state.pool, &id, "ScheduledCallFired").await,
        1
    );
    assert_eq!(count_events(&app.state.pool, &id, "CallPlaced").await, 1);
    assert_eq!(
        app.sims.twilio.as_ref().unwrap().calls().len(),
        0,
        "nothing dialled again"
    );
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn cancelling_a_scheduled_call_releases_its_hold_unless_it_is_too_late() {
    let env = env();
    let clock = callmeback::clock::Clock::manual(at("2027-01-10T10:00:00Z"));
    let app = env.spawn_app_with(clock.clone()).await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 100).await;
    let mut ids = vec![];
    for time in ["2027-01-10T11:00:00+00:00", "2027-01-10T12:30:00+01:00"] {
        let reply = schedule_call(&user, call_body("brad_001", 5), time).await;
        assert_eq!(reply.status, 201, "{reply:?}");
        ids.push(reply.body["call"]["id"].as_str().unwrap().to_string());
    }
    assert!(eventually(Duration::from_secs(5), || async {
        (balance(&app.state.pool, &profile).await == 100).then_some(())
    })
    .await
    .is_some());
    let me = user.get("/api/auth/me").await;
    assert_eq!(me.body["user"]["credits"], 100, "holds are not spent");

    let (other, other_profile) = api.register(PASSWORD).await;
    assert_eq!(
        other
            .delete(&format!("/api/calls/schedule/{}", ids[0]))
            .await
            .status,
        403
    );

    // A persona with someone's scheduled call to come cannot be deleted; once that call is
    // cancelled, it can.
    grant(&app, &other_profile, 100).await;
    let mine = user
        .post("/api/personas", common::persona_body("Morning Coach", true))
        .await;
    let persona_id = mine.body["persona"]["id"].as_str().unwrap().to_string();
    let booked = schedule_call(&other, call_body(&persona_id, 1), "2027-01-11T08:00:00Z").await;
    assert_eq!(booked.status, 201, "{booked:?}");
    let refused = user.delete(&format!("/api/personas/{persona_id}")).await;
    assert_eq!(refused.status, 409, "{refused:?}");
    assert_eq!(refused.code(), "persona_scheduled");
    let booked_id = booked.body["call"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        other
            .delete(&format!("/api/calls/schedule/{booked_id}"))
            .await
            .status,
        200
    );
    wait_for(&app.state.pool, &other, &booked_id, "canceled", false).await;
    assert_eq!(
        user.delete(&format!("/api/personas/{persona_id}"))
            .await
            .status,
        200
    );

    clock.set(at("2027-01-10T10:56:00Z"));
    let late = user
        .delete(&format!("/api/calls/schedule/{}", ids[0]))
        .await;
    assert_eq!(late.status, 400, "{late:?}");
    assert_eq!(late.code(), "too_late");
    let ok = user
        .delete(&format!("/api/calls/schedule/{}", ids[1]))
        .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.body["refund"]["credits_released"], 45);
    let cancelled = wait_for(&app.state.pool, &user, &ids[1], "canceled", true).await;
    assert_eq!(cancelled["call"]["charged_cents"], 0);
    let listed = user.get("/api/calls/scheduled?status=cancelled").await;
    assert_eq!(listed.body["calls"].as_array().unwrap().len(), 1);
    assert_eq!(
        user.delete(&format!("/api/calls/schedule/{}", ids[1]))
            .await
            .status,
        200,
        "idempotent"
    );
    let wallet: (i64, i64) =
        sqlx::query_as("SELECT balance, reserved FROM rm_wallets WHERE user_id = $1::uuid")
            .bind(profile["id"].as_str().unwrap())
            .fetch_one(&app.state.pool)
            .await
            .unwrap();
    assert_eq!(
        wallet,
        (100, 45),
        "one hold released in full, the other still held"
    );
    app.stop().await;
    env.cleanup().await;
}

/// Posts a Twilio status callback, signed with `token` (or not at all).
async fn callback(
    api: &Api,
    call_id: &str,
    params: &[(&str, &str)],
    token: Option<&str>,
) -> common::Reply {
    let path = format!("/api/twilio/callback?call_id={call_id}");
    let params: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut req = api
        .request(reqwest::Method::POST, &path)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(
            params
                .iter()
                .map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v)))
                .collect::<Vec<_>>()
                .join("&"),
        );
    if let Some(token) = token {
        let sig = cmb_providers::twilio::signature(token, &format!("{}{path}", api.base), &params);
        req = req.header("x-twilio-signature", sig);
    }
    api.send(req).await
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn forged_duplicated_and_reordered_callbacks_change_nothing() {
    // The simulator rings for a minute, so the callbacks below are the only ones that matter.
    let env = env().set("SIM_TWILIO_RING_MS", "60000");
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 100).await;
    let id = request_call(&user, "brad_001", 3).await;
    let ringing = wait_for(&app.state.pool, &user, &id, "ringing", false).await;
    let sid = ringing["call"]["call_sid"].as_str().unwrap().to_string();
    let token = callmeback::config::DEV_TWILIO_AUTH_TOKEN;
    let events_before =
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE aggregate_id = $1")
            .bind(&id)
            .fetch_one(&app.state.pool)
            .await
            .unwrap();

    let completed = [
        ("CallSid", sid.as_str()),
        ("CallStatus", "completed"),
        ("CallDuration", "61"),
        ("SequenceNumber", "3"),
    ];
    assert_eq!(
        callback(&api, &id, &completed, None).await.status,
        403,
        "unsigned"
    );
    assert_eq!(
        callback(&api, &id, &completed, Some("not-the-token"))
            .await
            .status,
        403,
        "forged"
    );
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1")
        .bind(&id)
        .fetch_one(&app.state.pool)
        .await
        .unwrap();
    assert_eq!(after, events_before, "refused callbacks record nothing");

    // Answer, then a late "ringing", then the same completion twice.
    let answered = [
        ("CallSid", sid.as_str()),
        ("CallStatus", "in-progress"),
        ("SequenceNumber", "2"),
    ];
    assert_eq!(
        callback(&api, &id, &answered, Some(token)).await.status,
        204
    );
    wait_for(&app.state.pool, &user, &id, "in-progress", false).await;
    let changes = count_events(&app.state.pool, &id, "CallStatusChanged").await;
    let late = [
        ("CallSid", sid.as_str()),
        ("CallStatus", "ringing"),
        ("SequenceNumber", "1"),
    ];
    assert_eq!(callback(&api, &id, &late, Some(token)).await.status, 204);
    assert_eq!(
        count_events(&app.state.pool, &id, "CallStatusChanged").await,
        changes,
        "never backwards"
    );
    for _ in 0..2 {
        assert_eq!(
            callback(&api, &id, &completed, Some(token)).await.status,
            204
        );
    }
    let done = wait_for(&app.state.pool, &user, &id, "completed", true).await;
    assert_eq!(done["call"]["duration_secs"], 61);
    assert_eq!(done["call"]["cost_cents"], 105, "25¢ + 2 started minutes");
    assert_eq!(done["call"]["charged_cents"], 105);
    assert_eq!(count_events(&app.state.pool, &id, "CallEnded").await, 1);
    assert_eq!(count_events(&app.state.pool, &id, "CallSettled").await, 1);
    let settled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'wallet' AND event_type = 'CreditsSettled'",
    )
    .fetch_one(&app.state.pool)
    .await
    .unwrap();
    assert_eq!(settled, 1, "charged once");
    assert_eq!(settles_at(&app.state.pool, &profile, 79).await, 79);
    // A callback for a call that does not exist.
    let stray = callback(
        &api,
        &uuid::Uuid::new_v4().to_string(),
        &completed,
        Some(token),
    )
    .await;
    assert_eq!(stray.status, 404);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_simulators_duplicated_and_reordered_callbacks_settle_a_call_once() {
    let env = env()
        .set("SIM_TWILIO_DUPLICATE_CALLBACKS", "1")
        .set("SIM_TWILIO_REORDER_CALLBACKS", "1");
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 100).await;
    let id = request_call(&user, "brad_001", 1).await;
    let done = wait_for(&app.state.pool, &user, &id, "completed", true).await;
    assert_eq!(done["call"]["charged_cents"], 65);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count_events(&app.state.pool, &id, "CallEnded").await, 1);
    let twilio_costs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'CostRecorded'
            AND payload -> 'CostRecorded' ->> 'service' = 'twilio'",
    )
    .bind(&id)
    .fetch_one(&app.state.pool)
    .await
    .unwrap();
    assert_eq!(twilio_costs, 1, "Twilio's minutes recorded once");
    assert_eq!(settles_at(&app.state.pool, &profile, 87).await, 87);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_dialer_killed_between_twilios_answer_and_recording_the_sid_places_the_call_once() {
    use cmb_sims::twilio::{Settings, TwilioSim};
    // The Twilio simulator runs here, outside the app, so it outlives the killed process.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    let mut settings = Settings::from_lookup(&|k: &str| match k {
        "SIM_TWILIO_RING_MS" => Some("3000".to_string()),
        "SIM_TWILIO_CALL_SECONDS" => Some("2".to_string()),
        // Twilio places the call; its answer is held until long after the process is gone.
        "SIM_TWILIO_HOLD_CREATE_RESPONSE_MS" => Some("60000".to_string()),
        _ => None,
    });
    settings.account_sid = "ACdeadbeefdeadbeefdeadbeefdeadbeef".into();
    settings.auth_token = "crash-test-token".into();
    let sim = TwilioSim::new(settings);
    let url = cmb_sims::serve("twilio", sim.router(), shutdown.clone(), &tasks)
        .await
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let env = env()
        .set("TWILIO_BASE_URL", &url)
        .set("TWILIO_ACCOUNT_SID", "ACdeadbeefdeadbeefdeadbeefdeadbeef")
        .set("TWILIO_AUTH_TOKEN", "crash-test-token")
        .set("HTTP_ADDR", &format!("127.0.0.1:{port}"))
        .set("PUBLIC_BASE_URL", &base)
        .set("WORKER_ACK_WAIT_MS", "1500");
    let backbone = env.backbone().await;
    let store = callmeback::backbone::store::EventStore::new(backbone.pool.clone());
    let api = Api::new(format!("127.0.0.1:{port}").parse().unwrap());
    let up = || async {
        eventually(Duration::from_secs(20), || async {
            reqwest::get(format!("{base}/healthz"))
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        })
        .await
        .expect("serve is up")
    };

    let mut first = env.spawn_process(&[]);
    up().await;
    let (user, profile) = api.register(PASSWORD).await;
    store
        .execute::<Wallet>(
            profile["id"].as_str().unwrap(),
            WalletCommand::Grant {
                credits: 100,
                reason: "test".into(),
                reference: "crash".into(),
            },
            &CommandContext::for_request("test", Actor::System),
        )
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || async {
        (balance(&backbone.pool, &profile).await == 100).then_some(())
    })
    .await
    .is_some());
    let _ = user
        .request(reqwest::Method::POST, "/api/call")
        .json(&json!({ "persona_id": "brad_001", "use_credits": true, "duration": 1 }))
        .send()
        .await;
    // Twilio has placed the call and the dialer waits for its answer: the process dies.
    eventually(Duration::from_secs(20), || async {
        (sim.calls().len() == 1).then_some(())
    })
    .await
    .expect("Twilio placed the call");
    first.kill().await.expect("the first instance is killed");
    assert_eq!(sim.calls().len(), 1, "Twilio placed it");
    let id: String =
        sqlx::query_scalar("SELECT aggregate_id FROM events WHERE event_type = 'CallRequested'")
            .fetch_one(&backbone.pool)
            .await
            .unwrap();

    let _second = env.spawn_process(&[]);
    up().await;
    let done = wait_for(&backbone.pool, &user, &id, "completed", true).await;
    assert_eq!(done["call"]["charged_cents"], 65);
    assert_eq!(sim.calls().len(), 1, "and nobody placed it again");
    let attempts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'DialAttempted'",
    )
    .bind(&id)
    .fetch_one(&backbone.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 1);
    shutdown.cancel();
    drop(_second);
    env.cleanup().await;
}

/// A dial slower than the worker's ack wait is not redelivered to another handler: the
/// dialer's runner extends the message's deadline while Twilio takes its time (here 5 ack
/// waits), so JetStream never hands the `CallRequested` out again, and Twilio is asked once.
#[tokio::test]
async fn a_dial_slower_than_the_ack_wait_is_not_redelivered() {
    let ack_wait = Duration::from_millis(600);
    let env = env()
        .set("SIM_TWILIO_HOLD_CREATE_RESPONSE_MS", "3000")
        .set("WORKER_ACK_WAIT_MS", &ack_wait.as_millis().to_string());
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 100).await;
    assert!(eventually(Duration::from_secs(5), || async {
        (balance(&app.state.pool, &profile).await == 100).then_some(())
    })
    .await
    .is_some());
    let config = env.config();
    let js = async_nats::jetstream::new(async_nats::connect(&config.nats_url).await.unwrap());
    let mut dialer = js
        .get_stream(&config.stream.stream)
        .await
        .unwrap()
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&format!(
            "{}-worker-dialer",
            config.consumer_prefix
        ))
        .await
        .unwrap();
    let id = request_call(&user, "brad_001", 1).await;
    // While Twilio holds its answer (3 s), the message is never redelivered.
    let held_until = tokio::time::Instant::now() + Duration::from_millis(3_400);
    let mut checks = 0;
    while tokio::time::Instant::now() < held_until {
        let info = dialer.info().await.unwrap().clone();
        assert_eq!(
            info.num_redelivered, 0,
            "redelivered while the first dial was still waiting for Twilio: {info:?}"
        );
        checks += 1;
        tokio::time::sleep(ack_wait / 4).await;
    }
    assert!(checks >= 10, "watched the whole dial ({checks} checks)");
    let done = wait_for(&app.state.pool, &user, &id, "completed", true).await;
    assert_eq!(done["call"]["charged_cents"], 65);
    assert_eq!(count_events(&app.state.pool, &id, "DialAttempted").await, 1);
    let placed: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT payload -> 'CallPlaced' ->> 'call_sid') FROM events
          WHERE aggregate_id = $1 AND event_type = 'CallPlaced'",
    )
    .bind(&id)
    .fetch_one(&app.state.pool)
    .await
    .unwrap();
    assert_eq!(placed, 1, "one call at Twilio");
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_scheduled_call_missed_beyond_the_grace_period_expires_and_releases_its_hold() {
    let env = env().set("SCHEDULE_GRACE_SECS", "600");
    let clock = callmeback::clock::Clock::manual(at("2027-02-01T09:00:00Z"));
    let app = env.spawn_app_with(clock).await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 100).await;
    let reply = schedule_call(&user, call_body("brad_001", 5), "2027-02-01T09:30:00Z").await;
    assert_eq!(reply.status, 201, "{reply:?}");
    let id = reply.body["call"]["id"].as_str().unwrap().to_string();
    app.stop().await;
    // Down until 20 minutes after the call's time: past the 10-minute grace.
    let app = env
        .spawn_app_with(callmeback::clock::Clock::manual(at("2027-02-01T09:50:00Z")))
        .await;
    let user = Api::new(app.addr).with_token(user.token.as_deref().unwrap());
    let done = wait_for(&app.state.pool, &user, &id, "expired", true).await;
    assert_eq!(done["call"]["charged_cents"], 0);
    assert_eq!(
        app.sims.twilio.as_ref().unwrap().calls().len(),
        0,
        "never dialled"
    );
    assert!(eventually(Duration::from_secs(5), || async {
        (balance(&app.state.pool, &profile).await == 100).then_some(())
    })
    .await
    .is_some());
    let wallet: (i64, i64) = sqlx::query_as("SELECT balance, reserved FROM rm_wallets")
        .fetch_one(&app.state.pool)
        .await
        .unwrap();
    assert_eq!(wallet, (100, 0), "the hold released in full");
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_call_twilio_keeps_refusing_fails_after_bounded_retries_and_releases_its_hold() {
    let env = env()
        .set("SIM_TWILIO_FAIL_EVERY", "1")
        .set("WORKER_ACK_WAIT_MS", "2000");
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 100).await;
    let id = request_call(&user, "brad_001", 1).await;
    let done = wait_for(&app.state.pool, &user, &id, "failed", true).await;
    assert_eq!(done["call"]["charged_cents"], 0);
    assert_eq!(count_events(&app.state.pool, &id, "DialAttempted").await, 5);
    assert_eq!(count_events(&app.state.pool, &id, "DialFailed").await, 5);
    assert!(eventually(Duration::from_secs(5), || async {
        (balance(&app.state.pool, &profile).await == 100).then_some(())
    })
    .await
    .is_some());
    app.stop().await;
    env.cleanup().await;
}
