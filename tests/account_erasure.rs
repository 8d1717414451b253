//! Erasing an account (`DELETE /api/user`): a fresh sign-in or the password, then sign-in and
//! every token fail, the transcripts and memory of the user's calls are deleted, the personas
//! they made go with their knowledge (another user's call with one of them is cancelled and
//! stays in that user's history), the email is free again, and the money events stay. (A
//! module of `accounts` in the suite.)

use std::time::Duration;

use serde_json::json;

use super::common::{
    add_document, create_persona, erase, eventually, request_call, schedule_call, transcript_lines,
    user_with_credits, wait_for_status, wait_for_transcript, Api, TestEnv, PASSWORD,
};

const DOCUMENT: &str = "# Opening hours\n\nThe Quillfeather bakery opens at seven.";

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
    let (user, profile) = user_with_credits(&app, &api, 100).await;
    let id = profile["id"].as_str().unwrap().to_string();
    let email = profile["email"].as_str().unwrap().to_string();
    // A public persona of theirs, with a document, that another user books a call with.
    let persona_id = create_persona(&user, "Erase Buddy", true).await;
    let document = add_document(&user, &persona_id, "Hours", DOCUMENT).await;
    let (other, _) = user_with_credits(&app, &api, 100).await;
    let later = (chrono::Utc::now() + chrono::Duration::hours(3)).to_rfc3339();
    let booked = schedule_call(
        &other,
        json!({ "persona_id": persona_id, "use_credits": true, "duration": 2 }),
        &later,
    )
    .await;
    assert_eq!(booked.status, 201, "{booked:?}");
    let booked = booked.body["call"]["id"].as_str().unwrap().to_string();
    let call_id = request_call(&user, &persona_id, 2).await;
    assert!(
        wait_for_transcript(&pool, &call_id, None).await,
        "the call's transcript was saved"
    );
    let indexed = eventually(Duration::from_secs(60), || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM knowledge_passages WHERE persona_id = $1")
                .bind(&persona_id)
                .fetch_one(&pool)
                .await
                .unwrap();
        (n > 0).then_some(())
    })
    .await;
    assert!(indexed.is_some(), "the document was indexed");
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
    let erased = erase(&user).await;
    assert_eq!(erased.status, 200, "{erased:?}");
    assert!(erased.body["transcript_lines"].as_u64().unwrap() > 0);
    assert_eq!(erased.body["finished"], true, "{erased:?}");
    assert_eq!(erased.body["personas_deleted"], 1, "{erased:?}");
    assert_eq!(erased.body["calls_cancelled"], 1, "{erased:?}");
    assert_eq!(
        transcript_lines(&pool, &call_id, None).await,
        0,
        "the transcript is deleted"
    );

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

    // The persona is deleted with its knowledge: recorded, read models and texts gone.
    for kind in ["KnowledgeDocumentRemoved", "PersonaDeleted"] {
        assert_eq!(
            super::common::count_events(&pool, &persona_id, kind).await,
            1,
            "{kind}"
        );
    }
    let persona_gone = eventually(Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM rm_personas WHERE id = $1)
                  + (SELECT count(*) FROM rm_persona_knowledge WHERE persona_id = $1)
                  + (SELECT count(*) FROM knowledge_documents WHERE persona_id = $1)
                  + (SELECT count(*) FROM knowledge_passages WHERE persona_id = $1)
                  + (SELECT count(*) FROM persona_name_claims WHERE owner = $2)",
        )
        .bind(&persona_id)
        .bind(&id)
        .fetch_one(&pool)
        .await
        .unwrap();
        (n == 0).then_some(())
    })
    .await;
    assert!(
        persona_gone.is_some(),
        "the persona or its knowledge stayed"
    );
    let document_text: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM knowledge_documents WHERE document_id = $1 OR body LIKE '%Quillfeather%'",
    )
    .bind(&document)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(document_text, 0);
    // The other user's call with it was cancelled, and stays in their history.
    assert!(
        wait_for_status(&pool, &booked, "canceled", true).await,
        "the other user's scheduled call was not cancelled"
    );
    let theirs = other.get(&format!("/api/calls/{booked}")).await;
    assert_eq!(theirs.status, 200, "{theirs:?}");
    assert_eq!(theirs.body["call"]["persona_id"], persona_id.as_str());
    assert_eq!(other.get("/api/calls").await.status, 200);
    assert_eq!(
        other
            .get(&format!("/api/personas/{persona_id}"))
            .await
            .status,
        404
    );
    let again = other
        .post(
            "/api/call",
            json!({ "persona_id": persona_id, "use_credits": true, "duration": 2 }),
        )
        .await;
    assert!(
        again.status == 404 || again.status == 400,
        "a call with the deleted persona: {again:?}"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stripe_customer_stripe_failed_to_delete_is_deleted_by_the_retries() {
    let env = TestEnv::new().set("ERASURE_RETRY_MS", "500");
    let app = env.spawn_app().await;
    let pool = app.state.pool.clone();
    let api = Api::new(app.addr);
    let (user, profile) = user_with_credits(&app, &api, 10).await;
    let id = profile["id"].as_str().unwrap().to_string();
    let attached = user
        .post(
            "/api/user/payment-method",
            json!({ "payment_method_id": "pm_card_visa" }),
        )
        .await;
    assert_eq!(attached.status, 201, "{attached:?}");
    let customer: String = sqlx::query_scalar(
        "SELECT payload -> 'StripeCustomerCreated' ->> 'customer_id' FROM events
          WHERE aggregate_id = $1 AND event_type = 'StripeCustomerCreated'",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    let stripe = app.sims.stripe.as_ref().unwrap();
    let row = || async {
        sqlx::query_as::<_, (i32, Option<String>, bool)>(
            "SELECT attempts, last_error, finished_at IS NOT NULL FROM erasures
              WHERE user_id = $1::uuid",
        )
        .bind(&id)
        .fetch_one(&pool)
        .await
        .unwrap()
    };

    // Stripe is down: the account is erased all the same, the customer is left to the retries.
    stripe.set_unavailable(true);
    let erased = erase(&user).await;
    assert_eq!(erased.status, 200, "{erased:?}");
    assert_eq!(erased.body["stripe_customer_deleted"], false, "{erased:?}");
    assert_eq!(erased.body["finished"], false, "{erased:?}");
    assert_eq!(user.get("/api/auth/me").await.status, 401);
    assert_ne!(stripe.customer(&customer).unwrap()["deleted"], true);
    assert_eq!(stripe.cards_of(&customer), 1);
    // The worker tries again (and fails again) while Stripe stays down.
    let retried = eventually(Duration::from_secs(60), || async {
        let (attempts, error, finished) = row().await;
        assert!(!finished, "finished while Stripe was down");
        (attempts >= 2).then_some(error)
    })
    .await
    .expect("the erasure was retried");
    assert!(
        retried.as_deref().unwrap_or("").contains("Stripe"),
        "{retried:?}"
    );

    // Stripe is back: the next retry deletes the customer and finishes the erasure.
    stripe.set_unavailable(false);
    let finished = eventually(Duration::from_secs(90), || async {
        let (_, error, finished) = row().await;
        finished.then_some(error)
    })
    .await;
    assert_eq!(
        finished,
        Some(None),
        "the erasure finished without an error"
    );
    let at_stripe = stripe.customer(&customer).unwrap();
    assert_eq!(at_stripe["deleted"], true, "{at_stripe}");
    assert_eq!(stripe.cards_of(&customer), 0);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_takes_a_sign_in_from_the_last_15_minutes_or_the_password() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, _) = api.register(PASSWORD).await;
    // The same session, as if signed in 16 minutes ago: refused without the password.
    let stale = {
        use callmeback::serve::http::auth::decode_token;
        let secret = &env.vars["JWT_SECRET"];
        let mut claims = decode_token(secret, user.token.as_deref().unwrap()).unwrap();
        claims.iat -= 16 * 60;
        user.with_token(
            &jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap(),
        )
    };
    let refused = stale.delete_json("/api/user", json!({})).await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(refused.code(), "reauthentication_required");
    assert_eq!(user.get("/api/auth/me").await.status, 200, "nothing erased");
    // The fresh sign-in itself is enough.
    let erased = user.delete_json("/api/user", json!({})).await;
    assert_eq!(erased.status, 200, "{erased:?}");
    assert_eq!(user.get("/api/auth/me").await.status, 401);
    app.stop().await;
    env.cleanup().await;
}
