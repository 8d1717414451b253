//! Accounts over HTTP against real Postgres and NATS: registration and sign-in with any
//! password the policy allows, revocation across a restart, lockout (per account and client
//! address), rate limits, profile.

use crate::common;

#[path = "account_lifecycle.rs"]
mod lifecycle;

#[path = "account_workos.rs"]
mod workos;

#[path = "account_export.rs"]
mod export;

#[path = "account_erasure.rs"]
mod erasure;

#[path = "account_privacy.rs"]
mod privacy;

use std::time::Duration;

use common::{Api, TestEnv, PASSWORD};
use serde_json::json;

#[tokio::test]
async fn passwords_with_any_punctuation_or_script_work_end_to_end() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    for password in [
        r#"Aa1!"\{}$"#,
        "Ünïcødé9§x",
        "Пароль1$пароль",
        "Emoji🙂Pass1",
        "Sp ace'; DROP TABLE users;--1A",
    ] {
        let (user, profile) = api.register(password).await;
        let email = profile["email"].as_str().unwrap().to_string();
        let login = user
            .elsewhere()
            .post(
                "/api/auth/login",
                json!({ "email": email, "password": password }),
            )
            .await;
        assert_eq!(login.status, 200, "{password}: {login:?}");
        assert_eq!(login.body["user"]["id"], profile["id"]);
        let mut wrong = password.to_string();
        wrong.pop();
        let refused = user
            .elsewhere()
            .post(
                "/api/auth/login",
                json!({ "email": email, "password": wrong }),
            )
            .await;
        assert_eq!(refused.status, 401, "{password}: {refused:?}");
    }
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn registration_validates_normalises_and_refuses_duplicates() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let body = |email: &str, password: &str, phone: &str| json!({ "name": "Jo", "email": email, "password": password, "phone": phone });
    for (bad, field) in [
        (
            body("jo@example.com", "weakpass", "+14155550100"),
            "password",
        ),
        (
            body("jo@example.com", "NoSymbol123", "+14155550100"),
            "password",
        ),
        (body("not-an-email", PASSWORD, "+14155550100"), "email"),
        (body("jo@example.com", PASSWORD, "4155550100"), "phone"),
    ] {
        let reply = api.elsewhere().post("/api/auth/register", bad).await;
        assert_eq!(reply.status, 400, "{reply:?}");
        assert_eq!(reply.field(), field, "{reply:?}");
    }

    let first = api
        .elsewhere()
        .post(
            "/api/auth/register",
            body("  Jo.Smith@Example.COM ", PASSWORD, "+14155550100"),
        )
        .await;
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!(first.body["user"]["email"], "jo.smith@example.com");

    let same_email = api
        .elsewhere()
        .post(
            "/api/auth/register",
            body("JO.SMITH@example.com", PASSWORD, "+14155550101"),
        )
        .await;
    assert_eq!(same_email.status, 409, "{same_email:?}");
    assert_eq!(same_email.field(), "email");
    let same_phone = api
        .elsewhere()
        .post(
            "/api/auth/register",
            body("other@example.com", PASSWORD, "+14155550100"),
        )
        .await;
    assert_eq!(same_phone.status, 409, "{same_phone:?}");
    assert_eq!(same_phone.field(), "phone");

    // The refused registration of other@ released its email claim: it can register now.
    let other = api
        .elsewhere()
        .post(
            "/api/auth/register",
            body("other@example.com", PASSWORD, "+14155550102"),
        )
        .await;
    assert_eq!(other.status, 201, "{other:?}");

    // Profile: a taken email is refused; a free one moves the claim.
    let jo = api.with_token(first.body["token"].as_str().unwrap());
    let taken = jo
        .put("/api/user/profile", json!({ "email": "Other@example.com" }))
        .await;
    assert_eq!(taken.status, 409, "{taken:?}");
    let moved = jo
        .put(
            "/api/user/profile",
            json!({ "email": "jo@new.example", "name": "Joanna" }),
        )
        .await;
    assert_eq!(moved.status, 200, "{moved:?}");
    assert_eq!(moved.body["user"]["email"], "jo@new.example");
    assert_eq!(moved.body["user"]["name"], "Joanna");
    let me = jo.get("/api/auth/me").await;
    assert_eq!(me.body["user"]["email"], "jo@new.example");
    let login_old = api
        .elsewhere()
        .post(
            "/api/auth/login",
            json!({ "email": "jo.smith@example.com", "password": PASSWORD }),
        )
        .await;
    assert_eq!(login_old.status, 401);
    let reuse_old = api
        .elsewhere()
        .post(
            "/api/auth/register",
            body("jo.smith@example.com", PASSWORD, "+14155550103"),
        )
        .await;
    assert_eq!(
        reuse_old.status, 201,
        "the old email was released: {reuse_old:?}"
    );
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_revoked_token_stays_refused_after_a_restart_and_forged_ones_never_pass() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    let email = profile["email"].as_str().unwrap().to_string();
    let second = api
        .elsewhere()
        .post(
            "/api/auth/login",
            json!({ "email": email, "password": PASSWORD }),
        )
        .await;
    let second_token = second.body["token"].as_str().unwrap().to_string();

    assert_eq!(user.get("/api/auth/me").await.status, 200);
    let out = user.post("/api/auth/logout", json!({})).await;
    assert_eq!(out.status, 200, "{out:?}");
    let me = user.get("/api/auth/me").await;
    assert_eq!(me.status, 401, "{me:?}");
    assert_eq!(
        user.post("/api/contacts", json!({ "persona_id": "brad_001" }))
            .await
            .status,
        401,
        "refused everywhere, not only at /me"
    );
    app.stop().await;

    let app = env.spawn_app().await;
    let user = Api::new(app.addr).with_token(user.token.as_deref().unwrap());
    assert_eq!(user.get("/api/auth/me").await.status, 401);
    // The other session of the same user is untouched.
    let other = user.with_token(&second_token);
    assert_eq!(other.get("/api/auth/me").await.status, 200);

    // Tampered, unsigned and foreign-algorithm tokens.
    let mut tampered = second_token.clone();
    tampered.pop();
    tampered.push(if second_token.ends_with('A') {
        'B'
    } else {
        'A'
    });
    assert_eq!(
        user.with_token(&tampered).get("/api/auth/me").await.status,
        401
    );
    let parts: Vec<&str> = second_token.split('.').collect();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        parts[1]
    );
    assert_eq!(user.with_token(&none).get("/api/auth/me").await.status, 401);
    let hs512 = format!(
        "{}.{}.{}",
        b64.encode(r#"{"alg":"HS512","typ":"JWT"}"#),
        parts[1],
        parts[2]
    );
    assert_eq!(
        user.with_token(&hs512).get("/api/auth/me").await.status,
        401
    );
    assert_eq!(
        user.with_token("garbage").get("/api/auth/me").await.status,
        401
    );
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn ten_failures_from_one_address_lock_it_out_and_unknown_emails_look_the_same() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (_, profile) = api.register(PASSWORD).await;
    let email = profile["email"].as_str().unwrap().to_string();
    let unknown = "nobody@example.com";
    // A stranger at one address: nine failures through the sign-in use case (over HTTP the
    // per-address limit, 5 a minute, would make this take two minutes), the tenth over HTTP.
    let stranger = api.elsewhere();
    let client = callmeback::serve::http::client_ip::ClientIp(stranger.ip.parse().unwrap())
        .pseudonym(app.state.config.jwt_secret.expose());
    for who in [email.as_str(), unknown] {
        let who = cmb_domain::values::Email::parse(who).unwrap();
        for _ in 1..10 {
            let failed = callmeback::usecases::accounts::sign_in(
                &app.state.store,
                &who,
                "Wr0ng!pass".into(),
                &client,
                chrono::Utc::now(),
                |id| cmb_domain::CommandContext::for_request("test", cmb_domain::Actor::User(id)),
            )
            .await;
            assert!(failed.is_err());
        }
    }
    for who in [email.as_str(), unknown] {
        let reply = stranger
            .post(
                "/api/auth/login",
                json!({ "email": who, "password": "Wr0ng!pass" }),
            )
            .await;
        assert_eq!(reply.status, 401, "the tenth for {who}: {reply:?}");
        assert_eq!(reply.body["error"]["message"], "invalid email or password");
    }
    for who in [email.as_str(), unknown] {
        let reply = stranger
            .post(
                "/api/auth/login",
                json!({ "email": who, "password": PASSWORD }),
            )
            .await;
        assert_eq!(reply.status, 429, "{who}: {reply:?}");
        assert_eq!(reply.code(), "account_locked");
        let retry: u64 = reply.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry > 0 && retry <= 30 * 60, "retry after {retry}");
    }
    // The owner, from an address that has not failed, signs in meanwhile; an unknown email
    // from there is just wrong, not locked.
    let owner = api.elsewhere();
    let reply = owner
        .post(
            "/api/auth/login",
            json!({ "email": email, "password": PASSWORD }),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let reply = owner
        .post(
            "/api/auth/login",
            json!({ "email": unknown, "password": PASSWORD }),
        )
        .await;
    assert_eq!(reply.status, 401, "{reply:?}");
    // The stranger's lock is theirs alone: still locked after the owner's success.
    let reply = stranger
        .post(
            "/api/auth/login",
            json!({ "email": email, "password": PASSWORD }),
        )
        .await;
    assert_eq!(reply.code(), "account_locked", "{reply:?}");
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    // Login: 5 per minute per IP.
    let statuses: Vec<u16> = futures::future::join_all((0..6).map(|_| {
        api.post(
            "/api/auth/login",
            json!({ "email": "x@example.com", "password": "Wr0ng!pass" }),
        )
    }))
    .await
    .iter()
    .map(|r| r.status)
    .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        5,
        "{statuses:?}"
    );
    let limited = api
        .post(
            "/api/auth/login",
            json!({ "email": "x@example.com", "password": "Wr0ng!pass" }),
        )
        .await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.code(), "rate_limited");
    assert!(limited.headers.contains_key("retry-after"));
    // Another address is not affected.
    let elsewhere = api
        .elsewhere()
        .post(
            "/api/auth/login",
            json!({ "email": "x@example.com", "password": "Wr0ng!pass" }),
        )
        .await;
    assert_eq!(elsewhere.status, 401);

    // Register: 3 per hour per IP.
    let reg = api.elsewhere();
    for i in 0..4 {
        let reply = reg
            .post(
                "/api/auth/register",
                json!({ "name": "R", "email": format!("r{i}-{}@example.com", env.id), "password": PASSWORD, "phone": format!("+1555000{i:04}") }),
            )
            .await;
        assert_eq!(
            reply.status,
            if i < 3 { 201 } else { 429 },
            "{i}: {reply:?}"
        );
    }

    // Signed in, limits count per user, wherever the requests come from: /me is 30 per minute.
    // (Windows are whole minutes: start early in one, so all 31 requests fall in it.)
    let second = chrono::Utc::now().timestamp() % 60;
    if second > 45 {
        tokio::time::sleep(Duration::from_secs((61 - second) as u64)).await;
    }
    let (user, _) = api.register(PASSWORD).await;
    for i in 0..30 {
        let reply = user.elsewhere().get("/api/auth/me").await;
        assert_eq!(reply.status, 200, "{i}: {reply:?}");
    }
    assert_eq!(user.elsewhere().get("/api/auth/me").await.status, 429);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn bad_bodies_get_a_json_4xx_naming_the_field_never_a_500() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, _) = api.register(PASSWORD).await;

    let raw = |body: &'static str| {
        user.request(reqwest::Method::POST, "/api/personas")
            .header("content-type", "application/json")
            .body(body)
    };
    let malformed = user.send(raw("{\"name\": ")).await;
    assert_eq!(malformed.status, 400, "{malformed:?}");
    assert_eq!(malformed.code(), "malformed_json");
    let wrong_type = user
        .send(raw(
            r#"{"name": 5, "description": "d", "voice": "v", "system_prompt": "p"}"#,
        ))
        .await;
    assert_eq!(wrong_type.status, 400, "{wrong_type:?}");
    assert_eq!(wrong_type.field(), "name");
    let missing = user.send(raw(r#"{"name": "Some Name"}"#)).await;
    assert_eq!(missing.status, 400, "{missing:?}");
    assert_eq!(missing.field(), "description");
    let not_json = user
        .send(
            user.request(reqwest::Method::POST, "/api/contacts")
                .body("persona_id=brad_001"),
        )
        .await;
    assert_eq!(not_json.status, 415, "{not_json:?}");
    let huge = format!(r#"{{"persona_id": "{}"}}"#, "x".repeat(1024 * 1024 + 10));
    let too_large = user
        .send(
            user.request(reqwest::Method::POST, "/api/contacts")
                .header("content-type", "application/json")
                .body(huge),
        )
        .await;
    assert_eq!(too_large.status, 413, "{too_large:?}");
    let bad_query = user.get("/api/personas?page=first").await;
    assert_eq!(bad_query.status, 400, "{bad_query:?}");
    assert_eq!(bad_query.field(), "page");
    let nowhere = user.get("/api/nothing-here").await;
    assert_eq!(nowhere.status, 404);
    assert_eq!(nowhere.code(), "not_found");
    let login_missing = api
        .elsewhere()
        .post("/api/auth/login", json!({ "email": "a@b.co" }))
        .await;
    assert_eq!(login_missing.status, 400);
    assert_eq!(login_missing.field(), "password");

    // The service is fine afterwards.
    assert_eq!(user.get("/api/auth/me").await.status, 200);
    let docs = api.get("/api/openapi.json").await;
    assert_eq!(docs.status, 200);
    for path in [
        "/api/auth/register",
        "/api/auth/login",
        "/api/auth/logout",
        "/api/auth/me",
        "/api/user/profile",
        "/api/personas",
        "/api/personas/{id}",
        "/api/personas/{id}/customization",
        "/api/contacts",
        "/api/contacts/{persona_id}",
    ] {
        assert!(docs.body["paths"][path].is_object(), "{path} is documented");
    }
    let page = api.get("/docs").await;
    assert_eq!(page.status, 200);
    assert!(page
        .body
        .as_str()
        .unwrap_or("")
        .contains("/api/openapi.json"));
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn seed_is_idempotent_and_its_demo_user_signs_in_with_100_credits() {
    let env = TestEnv::new();
    let _ = env.backbone().await;
    for _ in 0..2 {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_callmeback"))
            .arg("seed")
            .env_clear()
            .envs(&env.vars)
            .output()
            .await
            .expect("seed runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(callmeback::ops::seed::DEMO_PASSWORD),
            "{stdout}"
        );
        assert!(stdout.contains("credits:         100"), "{stdout}");
    }
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let login = api
        .post(
            "/api/auth/login",
            json!({ "email": callmeback::ops::seed::DEMO_EMAIL, "password": callmeback::ops::seed::DEMO_PASSWORD }),
        )
        .await;
    assert_eq!(login.status, 200, "{login:?}");
    let user = api.with_token(login.body["token"].as_str().unwrap());
    let credits = common::eventually(std::time::Duration::from_secs(10), || async {
        let me = user.get("/api/auth/me").await;
        (me.body["user"]["credits"] == 100).then_some(())
    })
    .await;
    assert!(credits.is_some(), "the demo user has 100 credits, once");
    app.stop().await;
    env.cleanup().await;
}
