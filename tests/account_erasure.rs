//! Erasing an account (`DELETE /api/user`): a fresh sign-in or the password, then sign-in and
//! every token fail, the transcripts and memory of the user's calls are deleted, the email is
//! free again, and the money events stay. (A module of `accounts` in the suite.)

use std::time::Duration;

use serde_json::json;

use super::common::{eventually, grant, persona_body, Api, TestEnv, PASSWORD};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_account_cannot_sign_in_and_its_transcripts_are_gone() {
    let said = "my account number is four four two";
    let env = TestEnv::new()
        .set("SIM_TWILIO_RING_MS", "100")
        .set("SIM_TWILIO_CALL_SECONDS", "6")
        .set("SIM_TWILIO_CALLER_TURNS", "1000:3000")
        .set("SIM_DEEPGRAM_SCRIPT", said);
    let app = env.spawn_app().await;
    let pool = app.state.pool.clone();
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    let id = profile["id"].as_str().unwrap().to_string();
    let email = profile["email"].as_str().unwrap().to_string();
    grant(&app, &profile, 100).await;
    let persona = user
        .post("/api/personas", persona_body("Erase Buddy", false))
        .await;
    assert_eq!(persona.status, 201, "{persona:?}");
    let persona_id = persona.body["persona"]["id"].as_str().unwrap().to_string();
    let call = user
        .post(
            "/api/call",
            json!({ "persona_id": persona_id, "use_credits": true, "duration": 2 }),
        )
        .await;
    assert_eq!(call.status, 201, "{call:?}");
    let call_id = call.body["call"]["id"].as_str().unwrap().to_string();
    let lines = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM call_transcripts WHERE call_id = $1::uuid",
        )
        .bind(&call_id)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let heard = eventually(Duration::from_secs(90), || async {
        (lines().await > 0).then_some(())
    })
    .await;
    assert!(heard.is_some(), "the call's transcript was saved");
    let money = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM events WHERE aggregate_type IN ('wallet', 'call')
               AND (aggregate_id = $1 OR aggregate_id = $2)",
        )
        .bind(&id)
        .bind(&call_id)
        .fetch_one(&pool)
        .await
        .unwrap()
    };

    // The wrong password erases nothing.
    let wrong = user
        .delete_json("/api/user", json!({ "password": "Wr0ng!password" }))
        .await;
    assert_eq!(wrong.status, 403, "{wrong:?}");
    assert_eq!(wrong.code(), "wrong_password");
    assert_eq!(user.get("/api/auth/me").await.status, 200);

    let money_before = money().await;
    let erased = user
        .delete_json("/api/user", json!({ "password": PASSWORD }))
        .await;
    assert_eq!(erased.status, 200, "{erased:?}");
    assert!(erased.body["transcript_lines"].as_u64().unwrap() > 0);
    assert_eq!(lines().await, 0, "the transcript is deleted");

    // Signed out everywhere, and no way back in.
    for path in ["/api/auth/me", "/api/user/export", "/api/calls"] {
        assert_eq!(user.get(path).await.status, 401, "{path}");
    }
    let login = api
        .elsewhere()
        .post(
            "/api/auth/login",
            json!({ "email": email, "password": PASSWORD }),
        )
        .await;
    assert_eq!(login.status, 401, "{login:?}");
    let claims: i64 =
        sqlx::query_scalar("SELECT count(*) FROM identity_claims WHERE user_id = $1::uuid")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(claims, 0);
    // The read models forget the user; memory is cleared.
    let gone = eventually(Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM rm_users WHERE id = $1::uuid)
                  + (SELECT count(*) FROM rm_memory_facts WHERE user_id = $1::uuid)
                  + (SELECT count(*) FROM rm_memory_summary WHERE user_id = $1::uuid)",
        )
        .bind(&id)
        .fetch_one(&pool)
        .await
        .unwrap();
        (n == 0).then_some(())
    })
    .await;
    assert!(gone.is_some(), "the read models still hold the user");
    // The erasure event says nothing personal; the money events are all still there.
    let erasure: String = sqlx::query_scalar(
        "SELECT payload::text FROM events WHERE aggregate_id = $1 AND event_type = 'UserErased'",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        !erasure.contains('@') && !erasure.contains(&email),
        "{erasure}"
    );
    assert!(money().await >= money_before);
    // The email is free for a new account.
    let again = api
        .elsewhere()
        .post(
            "/api/auth/register",
            json!({ "name": "Someone New", "email": email, "password": PASSWORD,
                    "phone": format!("+1{:010}", rand::random::<u64>() % 10_000_000_000) }),
        )
        .await;
    assert_eq!(again.status, 201, "{again:?}");
    assert_ne!(again.body["user"]["id"], profile["id"]);
    app.stop().await;
    env.cleanup().await;
}
