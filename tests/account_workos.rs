//! WorkOS AuthKit sign-in over HTTP, through the WorkOS simulator's hosted page (a form the test
//! posts as a browser would): a new user, a returning user, an organisation's SSO, a bad or
//! expired state, a reused or expired code, and an unverified email matching an account (refused,
//! nothing linked) beside a verified one (linked). (A module of `accounts` in the suite.)

use callmeback::app::Running;
use serde_json::{json, Value};

use super::common::{self, Api, TestEnv, PASSWORD};

/// A browser: follows no redirect by itself, so the test sees each hop.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A sign-in begun: WorkOS's hosted page and this browser's state cookie.
struct Begun {
    hosted: reqwest::Url,
    cookie: String,
}

async fn begin(api: &Api, query: &str) -> Begun {
    let r = browser()
        .get(format!("{}/api/auth/workos/authorize{query}", api.base))
        .header("x-forwarded-for", &api.ip)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302, "authorize: {:?}", r.text().await);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let set_cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let hosted = reqwest::Url::parse(&location).unwrap();
    // State and PKCE (S256): the simulator checks the verifier against this challenge.
    let query: std::collections::HashMap<_, _> = hosted.query_pairs().into_owned().collect();
    assert!(
        query.get("state").is_some_and(|s| s.len() >= 32),
        "{hosted}"
    );
    assert_eq!(
        query.get("code_challenge_method").map(String::as_str),
        Some("S256")
    );
    assert!(
        query.get("code_challenge").is_some_and(|c| c.len() == 43),
        "{hosted}"
    );
    Begun { hosted, cookie }
}

/// Fills in and posts the hosted page's form; returns where WorkOS sends the browser back.
async fn sign_in_at_workos(begun: &Begun, fields: &[(&str, &str)]) -> reqwest::Url {
    let page = browser().get(begun.hosted.clone()).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("<form method=\"post\""), "{html}");
    // The form's hidden fields are the authorize request's parameters.
    let mut form: Vec<(String, String)> = begun.hosted.query_pairs().into_owned().collect();
    form.extend(fields.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut action = begun.hosted.clone();
    action.set_query(None);
    let r = browser().post(action).form(&form).send().await.unwrap();
    assert!(
        r.status().is_redirection(),
        "hosted page: {} {:?}",
        r.status(),
        r.text().await
    );
    reqwest::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap()
}

/// The callback, as the browser calls it (with `cookie`, if any).
async fn callback(api: &Api, back: &reqwest::Url, cookie: Option<&str>) -> common::Reply {
    let path = format!("{}?{}", back.path(), back.query().unwrap_or(""));
    let mut req = api.request(reqwest::Method::GET, &path);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    api.send(req).await
}

/// `back` with its `code` replaced.
fn with_code(back: &reqwest::Url, code: &str) -> reqwest::Url {
    let mut url = back.clone();
    let pairs: Vec<(String, String)> = back
        .query_pairs()
        .into_owned()
        .map(|(k, v)| {
            if k == "code" {
                (k, code.to_string())
            } else {
                (k, v)
            }
        })
        .collect();
    url.query_pairs_mut().clear().extend_pairs(pairs);
    url
}

fn code_of(back: &reqwest::Url) -> String {
    back.query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .expect("a code")
}

fn email() -> String {
    format!("wos{}@example.com", rand::random::<u32>())
}

/// A whole AuthKit sign-in with `fields` on the hosted page.
async fn workos_sign_in(api: &Api, query: &str, fields: &[(&str, &str)]) -> common::Reply {
    let begun = begin(api, query).await;
    let back = sign_in_at_workos(&begun, fields).await;
    callback(api, &back, Some(&begun.cookie)).await
}

async fn workos_links(app: &Running) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM identity_claims WHERE kind = 'workos'")
        .fetch_one(&app.state.pool)
        .await
        .unwrap()
}

/// The user's events as stored (their personal fields sealed).
async fn user_events(app: &Running, user: &Value) -> Vec<(String, Value)> {
    sqlx::query_as(
        "SELECT event_type, payload FROM events
          WHERE aggregate_type = 'user' AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(user["id"].as_str().unwrap())
    .fetch_all(&app.state.pool)
    .await
    .unwrap()
}

/// `payload` of the user's event with its personal fields opened.
async fn opened(app: &Running, user: &Value, event_type: &str, payload: &Value) -> Value {
    let mut payload = payload.clone();
    app.state
        .store
        .keys()
        .open(
            "user",
            user["id"].as_str().unwrap(),
            event_type,
            &mut payload,
        )
        .await
        .unwrap();
    payload
}

#[tokio::test]
async fn a_new_workos_user_gets_an_account_and_signs_in_to_it_again() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let address = email();
    let fields = [
        ("email", address.as_str()),
        ("password", "hosted-page-password"),
        ("first_name", "Ada"),
        ("last_name", "Lovelace"),
    ];

    let first = workos_sign_in(&api, "", &fields).await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.body["new_account"], true);
    let user = first.body["user"].clone();
    assert_eq!(user["email"], address.as_str());
    assert_eq!(user["name"], "Ada Lovelace");
    assert_eq!(user["email_verified"], true);
    assert_eq!(user["phone"], Value::Null);
    assert_eq!(user["sign_in_methods"], json!(["workos"]));
    let session = api.with_token(first.body["token"].as_str().unwrap());
    let me = session.get("/api/auth/me").await;
    assert_eq!(me.status, 200, "{me:?}");
    assert_eq!(me.body["user"]["id"], user["id"]);
    assert_eq!(me.body["user"]["sign_in_methods"], json!(["workos"]));
    // No password to sign in with.
    let login = api
        .elsewhere()
        .post(
            "/api/auth/login",
            json!({ "email": address, "password": "hosted-page-password" }),
        )
        .await;
    assert_eq!(login.status, 401, "{login:?}");

    // The returning user: the same account, not a new one.
    let again = workos_sign_in(&api, "?provider=authkit", &fields).await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.body["new_account"], false);
    assert_eq!(again.body["user"]["id"], user["id"]);
    assert_eq!(workos_links(&app).await, 1);
    let events: Vec<String> = user_events(&app, &user)
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(
        events,
        [
            "UserRegisteredWithWorkos",
            "SignedInWithWorkos",
            // The password attempt above, counted towards the lockout like any other.
            "SignInFailed",
            "SignedInWithWorkos"
        ]
    );

    // Sign-out revokes our token and gives WorkOS's logout URL for that session.
    let out = session.post("/api/auth/logout", json!({})).await;
    assert_eq!(out.status, 200, "{out:?}");
    let logout_url = out.body["workos_logout_url"]
        .as_str()
        .expect("a WorkOS logout URL")
        .to_string();
    assert_eq!(session.get("/api/auth/me").await.status, 401);
    let ended = browser().get(&logout_url).send().await.unwrap();
    assert!(ended.status().is_success(), "{}", ended.status());
    let sims = app.sims.workos.clone().expect("the WorkOS simulator runs");
    let sid = reqwest::Url::parse(&logout_url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "session_id")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    assert!(sims.ended_sessions().contains(&sid));
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_organisation_signs_in_through_its_sso_connection() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let org = cmb_sims::workos::SSO_ORGANIZATION_ID;
    let address = format!(
        "grace{}@{}",
        rand::random::<u32>(),
        cmb_sims::workos::SSO_DOMAIN
    );

    let begun = begin(&api, &format!("?organization_id={org}")).await;
    assert_eq!(
        begun
            .hosted
            .query_pairs()
            .find(|(k, _)| k == "organization_id")
            .map(|(_, v)| v.into_owned())
            .as_deref(),
        Some(org)
    );
    let page = browser()
        .get(begun.hosted.clone())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("SSO"), "{page}");
    let back = sign_in_at_workos(&begun, &[("email", address.as_str())]).await;
    let signed = callback(&api, &back, Some(&begun.cookie)).await;
    assert_eq!(signed.status, 200, "{signed:?}");
    assert_eq!(signed.body["new_account"], true);
    let user = signed.body["user"].clone();
    assert_eq!(user["email"], address.as_str());
    let events = user_events(&app, &user).await;
    let (kind, payload) = events.last().unwrap();
    assert_eq!(kind, "SignedInWithWorkos");
    // The organisation and the WorkOS user are the user's personal data: sealed in the log.
    assert!(
        payload["SignedInWithWorkos"]["organization_id"]["$sealed"].is_string(),
        "{payload}"
    );
    let (_, registered) = &events[0];
    let workos_user = &registered["UserRegisteredWithWorkos"]["workos_user_id"];
    assert!(workos_user["$sealed"].is_string(), "{registered}");
    let payload = opened(&app, &user, kind, payload).await;
    assert_eq!(payload["SignedInWithWorkos"]["organization_id"], org);
    assert_eq!(payload["SignedInWithWorkos"]["method"], "SSO");
    let registered = opened(&app, &user, "UserRegisteredWithWorkos", registered).await;
    assert!(registered["UserRegisteredWithWorkos"]["workos_user_id"]
        .as_str()
        .is_some_and(|id| id.starts_with("user_")));

    // Outsiders are refused by the connection; malformed requests by us.
    let outsider = begin(&api, &format!("?organization_id={org}")).await;
    let mut form: Vec<(String, String)> = outsider.hosted.query_pairs().into_owned().collect();
    form.push(("email".into(), email()));
    let mut action = outsider.hosted.clone();
    action.set_query(None);
    let refused = browser().post(action).form(&form).send().await.unwrap();
    assert_eq!(refused.status(), 400);
    for (query, field) in [
        ("?organization_id=acme", "organization_id"),
        ("?provider=Google%20OAuth", "provider"),
        (
            "?organization_id=org_01SIMACMECORP&provider=GoogleOAuth",
            "provider",
        ),
    ] {
        let bad = api.get(&format!("/api/auth/workos/authorize{query}")).await;
        assert_eq!(bad.status, 400, "{query}: {bad:?}");
        assert_eq!(bad.field(), field, "{query}");
    }
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_bad_or_expired_state_and_a_reused_code_are_refused_and_link_nothing() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let address = email();
    let fields = [
        ("email", address.as_str()),
        ("password", "hosted-page-password"),
    ];
    let begun = begin(&api, "").await;
    let back = sign_in_at_workos(&begun, &fields).await;

    // No cookie (a link started by someone else), another browser's state, a state we never
    // issued: refused before the code is spent.
    let other = begin(&api, "").await;
    let forged_state = "state-we-never-issued";
    let mut forged = back.clone();
    let pairs: Vec<(String, String)> = back
        .query_pairs()
        .into_owned()
        .map(|(k, v)| {
            if k == "state" {
                (k, forged_state.to_string())
            } else {
                (k, v)
            }
        })
        .collect();
    forged.query_pairs_mut().clear().extend_pairs(pairs);
    let forged_cookie = format!("cmb_workos_state={forged_state}");
    for (url, cookie) in [
        (&back, None),
        (&back, Some(other.cookie.as_str())),
        (&forged, Some(forged_cookie.as_str())),
    ] {
        let refused = callback(&api, url, cookie).await;
        assert_eq!(refused.status, 400, "{refused:?}");
        assert_eq!(refused.code(), "invalid_state");
        assert_eq!(refused.field(), "state");
    }
    let missing = api.get("/api/auth/workos/callback?state=x").await;
    assert_eq!(missing.status, 400);
    assert_eq!(missing.field(), "code");
    let denied = api
        .get("/api/auth/workos/callback?error=access_denied&error_description=cancelled")
        .await;
    assert_eq!(denied.status, 400);
    assert_eq!(denied.code(), "workos_sign_in_failed");
    assert_eq!(workos_links(&app).await, 0);

    // The real one still works, once: the same callback again finds its state spent.
    let signed = callback(&api, &back, Some(&begun.cookie)).await;
    assert_eq!(signed.status, 200, "{signed:?}");
    let user = signed.body["user"].clone();
    let replayed = callback(&api, &back, Some(&begun.cookie)).await;
    assert_eq!(replayed.status, 400, "{replayed:?}");
    assert_eq!(replayed.code(), "invalid_state");

    // A used code under a fresh state: WorkOS refuses it, and we say so.
    let fresh = begin(&api, "").await;
    let fresh_back = sign_in_at_workos(&fresh, &fields).await;
    let reused = with_code(&fresh_back, &code_of(&back));
    let refused = callback(&api, &reused, Some(&fresh.cookie)).await;
    assert_eq!(refused.status, 400, "{refused:?}");
    assert_eq!(refused.code(), "invalid_code");
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired or is invalid"),
        "{refused:?}"
    );

    // An expired state (its ten minutes are over).
    let late = begin(&api, "").await;
    let late_back = sign_in_at_workos(&late, &fields).await;
    sqlx::query(
        "UPDATE workos_logins SET expires_at = now() - interval '1 second' WHERE used_at IS NULL",
    )
    .execute(&app.state.pool)
    .await
    .unwrap();
    let expired = callback(&api, &late_back, Some(&late.cookie)).await;
    assert_eq!(expired.status, 400, "{expired:?}");
    assert_eq!(expired.code(), "invalid_state");

    // One sign-in happened, one link exists.
    assert_eq!(workos_links(&app).await, 1);
    let sign_ins = user_events(&app, &user)
        .await
        .into_iter()
        .filter(|(t, _)| t == "SignedInWithWorkos")
        .count();
    assert_eq!(sign_ins, 1);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_expired_code_is_refused_and_links_nothing() {
    // Codes live 300 ms at this simulator (ten minutes at WorkOS).
    let env = TestEnv::new().set("SIM_WORKOS_CODE_TTL_MS", "300");
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let address = email();
    let fields = [
        ("email", address.as_str()),
        ("password", "hosted-page-password"),
    ];
    let begun = begin(&api, "").await;
    let back = sign_in_at_workos(&begun, &fields).await;
    // Waiting for the code's lifetime to pass, not for a condition: well past it.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let refused = callback(&api, &back, Some(&begun.cookie)).await;
    assert_eq!(refused.status, 400, "{refused:?}");
    assert_eq!(refused.code(), "invalid_code");
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired or is invalid"),
        "{refused:?}"
    );
    assert_eq!(workos_links(&app).await, 0);
    // A fresh code, exchanged at once, works.
    let signed = workos_sign_in(&api, "", &fields).await;
    assert_eq!(signed.status, 200, "{signed:?}");
    assert_eq!(workos_links(&app).await, 1);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_email_links_an_account_only_when_workos_verified_it() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);

    // Someone signs up at WorkOS with another person's address, unverified.
    let (victim, profile) = api.register(PASSWORD).await;
    let victim_email = profile["email"].as_str().unwrap().to_string();
    let refused = workos_sign_in(
        &api,
        "",
        &[
            ("email", victim_email.as_str()),
            ("password", "attacker-password"),
            ("email_verified", "false"),
        ],
    )
    .await;
    assert_eq!(refused.status, 409, "{refused:?}");
    assert_eq!(refused.code(), "email_unverified");
    assert_eq!(workos_links(&app).await, 0);
    let me = victim.get("/api/auth/me").await;
    assert_eq!(me.body["user"]["sign_in_methods"], json!(["password"]));
    let types: Vec<String> = user_events(&app, &profile)
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(types, ["UserRegistered"]);

    // The owner of an address WorkOS verified is linked to the account holding it.
    let (owner, profile) = api.register(PASSWORD).await;
    let owner_email = profile["email"].as_str().unwrap().to_string();
    let linked = workos_sign_in(
        &api,
        "",
        &[
            ("email", owner_email.as_str()),
            ("password", "hosted-page-password"),
        ],
    )
    .await;
    assert_eq!(linked.status, 200, "{linked:?}");
    assert_eq!(linked.body["new_account"], false);
    assert_eq!(linked.body["user"]["id"], profile["id"]);
    let me = owner.get("/api/auth/me").await;
    assert_eq!(
        me.body["user"]["sign_in_methods"],
        json!(["password", "workos"])
    );
    assert_eq!(me.body["user"]["email_verified"], true);
    assert_eq!(workos_links(&app).await, 1);
    app.stop().await;
    env.cleanup().await;
}
