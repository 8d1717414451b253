//! The account's lifecycle over HTTP: change the password (every other session ends), sign out
//! everywhere, forgot/reset by email through the SMTP simulator (the development mailbox).
//! (A module of `accounts` in the suite.)

use std::time::Duration;

use callmeback::app::Running;
use serde_json::json;

use super::common::{self, eventually, Api, TestEnv, PASSWORD};
const NEW_PASSWORD: &str = "N3w!battery-staple";

async fn sign_in(api: &Api, email: &str, password: &str) -> common::Reply {
    api.elsewhere()
        .post(
            "/api/auth/login",
            json!({ "email": email, "password": password }),
        )
        .await
}

/// The reset code in the newest message to `email`, waiting (bounded) for it to arrive.
async fn reset_code(app: &Running, email: &str, nth: usize) -> String {
    let smtp = app.sims.smtp.clone().expect("the SMTP simulator runs");
    let body = eventually(Duration::from_secs(30), || {
        let smtp = smtp.clone();
        async move { smtp.messages_to(email).get(nth).map(|m| m.body.clone()) }
    })
    .await
    .unwrap_or_else(|| panic!("no reset email #{nth} for {email}"));
    let at = body.find("token=").expect("a link with a token") + "token=".len();
    body[at..]
        .split_whitespace()
        .next()
        .expect("the token")
        .to_string()
}

#[tokio::test]
async fn changing_the_password_signs_out_every_other_session() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (first, profile) = api.register(PASSWORD).await;
    let email = profile["email"].as_str().unwrap().to_string();
    let login = sign_in(&api, &email, PASSWORD).await;
    assert_eq!(login.status, 200, "{login:?}");
    let second = api.with_token(login.body["token"].as_str().unwrap());

    let wrong = first
        .post(
            "/api/auth/password",
            json!({ "current_password": "Wr0ng!password", "new_password": NEW_PASSWORD }),
        )
        .await;
    assert_eq!(wrong.status, 403, "{wrong:?}");
    assert_eq!(wrong.code(), "wrong_password");
    let weak = first
        .post(
            "/api/auth/password",
            json!({ "current_password": PASSWORD, "new_password": "weakpass" }),
        )
        .await;
    assert_eq!(weak.status, 400, "{weak:?}");
    assert_eq!(weak.field(), "new_password");
    let anonymous = api
        .post(
            "/api/auth/password",
            json!({ "current_password": PASSWORD, "new_password": NEW_PASSWORD }),
        )
        .await;
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    // Nothing changed so far: both sessions work.
    assert_eq!(second.get("/api/auth/me").await.status, 200);

    let changed = first
        .post(
            "/api/auth/password",
            json!({ "current_password": PASSWORD, "new_password": NEW_PASSWORD }),
        )
        .await;
    assert_eq!(changed.status, 200, "{changed:?}");
    let third = api.with_token(changed.body["token"].as_str().expect("a new token"));
    for old in [&first, &second] {
        let refused = old.get("/api/auth/me").await;
        assert_eq!(
            refused.status, 401,
            "an old session still works: {refused:?}"
        );
    }
    let me = third.get("/api/auth/me").await;
    assert_eq!(me.status, 200, "{me:?}");
    assert_eq!(me.body["user"]["id"], profile["id"]);
    assert_eq!(sign_in(&api, &email, PASSWORD).await.status, 401);
    assert_eq!(sign_in(&api, &email, NEW_PASSWORD).await.status, 200);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn signing_out_everywhere_ends_every_session_and_sign_in_still_works() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (first, profile) = api.register(PASSWORD).await;
    let email = profile["email"].as_str().unwrap().to_string();
    let second = api.with_token(
        sign_in(&api, &email, PASSWORD).await.body["token"]
            .as_str()
            .unwrap(),
    );
    let (other_user, _) = api.register(PASSWORD).await;

    let out = second.post("/api/auth/logout-all", json!({})).await;
    assert_eq!(out.status, 200, "{out:?}");
    for old in [&first, &second] {
        assert_eq!(old.get("/api/auth/me").await.status, 401);
    }
    // Someone else's sessions are not touched.
    assert_eq!(other_user.get("/api/auth/me").await.status, 200);
    // A sign-in after it gives a working token, on every instance and after a restart.
    let again = sign_in(&api, &email, PASSWORD).await;
    assert_eq!(again.status, 200, "{again:?}");
    let fresh = api.with_token(again.body["token"].as_str().unwrap());
    assert_eq!(fresh.get("/api/auth/me").await.status, 200);
    app.stop().await;
    let app = env.spawn_app().await;
    let restarted = |a: &Api| {
        let mut a = a.clone();
        a.base = format!("http://{}", app.addr);
        a
    };
    assert_eq!(restarted(&first).get("/api/auth/me").await.status, 401);
    assert_eq!(restarted(&fresh).get("/api/auth/me").await.status, 200);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_forgotten_password_is_reset_once_by_an_emailed_link() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (session, profile) = api.register(PASSWORD).await;
    let email = profile["email"].as_str().unwrap().to_string();

    // The same answer whether or not the email has an account.
    let unknown = api
        .elsewhere()
        .post(
            "/api/auth/password/forgot",
            json!({ "email": "nobody-here@example.com" }),
        )
        .await;
    let known = api
        .elsewhere()
        .post("/api/auth/password/forgot", json!({ "email": email }))
        .await;
    assert_eq!(unknown.status, 202, "{unknown:?}");
    assert_eq!((known.status, &known.body), (unknown.status, &unknown.body));
    let bad = api
        .elsewhere()
        .post("/api/auth/password/forgot", json!({ "email": "nope" }))
        .await;
    assert_eq!((bad.status, bad.field()), (400, "email"), "{bad:?}");

    let token = reset_code(&app, &email, 0).await;
    let smtp = app.sims.smtp.clone().unwrap();
    assert!(smtp.messages_to("nobody-here@example.com").is_empty());

    // A wrong token, or a weak password, changes nothing and spends nothing.
    let wrong = api
        .elsewhere()
        .post(
            "/api/auth/password/reset",
            json!({ "token": "not-a-real-token", "new_password": NEW_PASSWORD }),
        )
        .await;
    assert_eq!((wrong.status, wrong.code()), (400, "invalid_reset_token"));
    let weak = api
        .elsewhere()
        .post(
            "/api/auth/password/reset",
            json!({ "token": token, "new_password": "weakpass" }),
        )
        .await;
    assert_eq!((weak.status, weak.field()), (400, "new_password"));
    assert_eq!(session.get("/api/auth/me").await.status, 200);

    let reset = api
        .elsewhere()
        .post(
            "/api/auth/password/reset",
            json!({ "token": token, "new_password": NEW_PASSWORD }),
        )
        .await;
    assert_eq!(reset.status, 200, "{reset:?}");
    assert_eq!(session.get("/api/auth/me").await.status, 401);
    assert_eq!(sign_in(&api, &email, PASSWORD).await.status, 401);
    assert_eq!(sign_in(&api, &email, NEW_PASSWORD).await.status, 200);

    let reused = api
        .elsewhere()
        .post(
            "/api/auth/password/reset",
            json!({ "token": token, "new_password": "An0ther!password" }),
        )
        .await;
    assert_eq!((reused.status, reused.code()), (400, "invalid_reset_token"));
    assert_eq!(sign_in(&api, &email, NEW_PASSWORD).await.status, 200);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn reset_links_expire_and_a_new_one_voids_nothing_until_used() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (_, profile) = api.register(PASSWORD).await;
    let email = profile["email"].as_str().unwrap().to_string();
    let forgot = || async {
        let r = api
            .elsewhere()
            .post("/api/auth/password/forgot", json!({ "email": email }))
            .await;
        assert_eq!(r.status, 202, "{r:?}");
    };
    forgot().await;
    let first = reset_code(&app, &email, 0).await;
    forgot().await;
    let second = reset_code(&app, &email, 1).await;
    assert_ne!(first, second);
    // The first link has expired (its row is aged, as the clock would).
    sqlx::query(
        "UPDATE password_resets SET expires_at = now() - interval '1 second'
                  WHERE created_at = (SELECT min(created_at) FROM password_resets)",
    )
    .execute(&app.state.pool)
    .await
    .unwrap();
    let expired = api
        .elsewhere()
        .post(
            "/api/auth/password/reset",
            json!({ "token": first, "new_password": NEW_PASSWORD }),
        )
        .await;
    assert_eq!(
        (expired.status, expired.code()),
        (400, "invalid_reset_token")
    );
    let ok = api
        .elsewhere()
        .post(
            "/api/auth/password/reset",
            json!({ "token": second, "new_password": NEW_PASSWORD }),
        )
        .await;
    assert_eq!(ok.status, 200, "{ok:?}");

    // Only a hash of a token is stored.
    let stored: Vec<String> = sqlx::query_scalar("SELECT token_hash FROM password_resets")
        .fetch_all(&app.state.pool)
        .await
        .unwrap();
    assert!(stored.iter().all(|h| *h != first && *h != second));

    // Asking is rate limited per address.
    let from = api.elsewhere();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(
            from.post("/api/auth/password/forgot", json!({ "email": email }))
                .await
                .status,
        );
    }
    assert_eq!(statuses, [202, 202, 202, 202, 202, 429]);
    app.stop().await;
    env.cleanup().await;
}
