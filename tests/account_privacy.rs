//! Crypto-shredding (README "Privacy"): a user's email, phone and what personas learned about
//! them are never in the event log in clear (Postgres or the stream), yet the API shows them;
//! after `DELETE /api/user` none of it, nor the transcript, is anywhere in Postgres — every
//! text column of every table searched, read models rebuilt from the stream included — and
//! the reconcile adds up to the same cents, and the Stripe customer is deleted. A migration
//! seals what an older build wrote in clear; what a call taught a persona goes with the
//! call's transcript. (A module of `accounts` in the suite.)

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;

use super::common::{
    add_document, count_events, create_persona, erase, eventually, read_stream, request_call,
    transcript_lines, user_with_credits, wait_for_event, Api, TestEnv, PASSWORD,
};

const SAID: &str = "my neighbour Bartholomew Quince keeps bees";
const FACT: &str = "Has a sister called Zenobia Marchetti";
const SUMMARY: &str = "A beekeeper's friend with a sister in Trieste.";
const OPEN_ITEM: &str = "the plumbing appointment with Gustavsson";
const PERSONA_NAME: &str = "Privacy Buddy";
const PERSONA_DESCRIPTION: &str = "Remembers the allotment by the Zwischenbrücke canal.";
const PERSONA_PROMPT: &str = "You are Privacy Buddy; ask after the Okonkwo-Haraldsen twins.";
const DOC_TITLE: &str = "Letters from Tante Wilhelmina";
const CUSTOM_PROMPT: &str = "Call me Captain Fitzwilliam-Oduya and keep it short.";
const EXTRACTED: &str = r#"{"facts":[{"text":"Has a sister called Zenobia Marchetti","kind":"person"}],"summary":"A beekeeper's friend with a sister in Trieste.","open_items":[{"text":"the plumbing appointment with Gustavsson"}],"closed_items":[]}"#;

/// Where `needle` occurs in the public schema: `table.column` of every text, varchar, json,
/// jsonb and text[] column holding it.
async fn find_anywhere(pool: &PgPool, needle: &str) -> Vec<String> {
    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text
           FROM information_schema.columns
          WHERE table_schema = 'public'
            AND data_type IN ('text', 'character varying', 'json', 'jsonb', 'ARRAY', 'bytea')
            AND table_name IN (SELECT table_name FROM information_schema.tables
                                WHERE table_schema = 'public' AND table_type = 'BASE TABLE')",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut found = Vec::new();
    for (table, column, data_type) in columns {
        // Names from the catalogue, quoted; the needle is a bound parameter. A bytea column
        // (a dead letter's body) is searched for the needle's bytes, not in its hex text.
        let holds = if data_type == "bytea" {
            format!("position(convert_to($1, 'UTF8') IN \"{column}\") > 0")
        } else {
            format!("strpos(\"{column}\"::text, $1) > 0")
        };
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{table}\" WHERE {holds}"))
            .bind(needle)
            .fetch_one(pool)
            .await
            .unwrap();
        if n > 0 {
            found.push(format!("{table}.{column}"));
        }
    }
    found
}

async fn reconcile(env: &TestEnv, source: &str) -> Value {
    let report = super::common::callmeback_json(
        env,
        &[
            "replay",
            "--source",
            source,
            "--format",
            "json",
            "reconcile",
        ],
    )
    .await;
    json!({ "calls": report["calls"], "per_user": report["per_user"],
            "per_provider": report["per_provider"], "totals": report["totals"] })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_data_is_sealed_in_the_log_and_shredded_by_erasure() {
    let env = TestEnv::new()
        .set("SIM_TWILIO_RING_MS", "100")
        .set("SIM_TWILIO_CALL_SECONDS", "6")
        .set("SIM_TWILIO_CALLER_TURNS", "1000:3000")
        .set("SIM_DEEPGRAM_SCRIPT", SAID);
    let app = env.spawn_app().await;
    let pool = app.state.pool.clone();
    let api = Api::new(app.addr);
    let (user, profile) = user_with_credits(&app, &api, 100).await;
    let id = profile["id"].as_str().unwrap().to_string();
    let email = profile["email"].as_str().unwrap().to_string();
    let phone = profile["phone"].as_str().unwrap().to_string();
    // A saved card: a customer at Stripe, created with the user's email and name.
    let attached = user
        .post(
            "/api/user/payment-method",
            json!({ "payment_method_id": "pm_card_visa" }),
        )
        .await;
    assert_eq!(attached.status, 201, "{attached:?}");
    let customer: String = sqlx::query_scalar(
        "SELECT payload -> 'StripeCustomerCreated' ->> 'customer_id' FROM events
          WHERE aggregate_type = 'billing' AND aggregate_id = $1
            AND event_type = 'StripeCustomerCreated'",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    let stripe = app.sims.stripe.as_ref().unwrap();
    assert_eq!(stripe.customer(&customer).unwrap()["email"], email.as_str());
    assert_eq!(stripe.cards_of(&customer), 1);
    // The user's own persona (named, described, prompted, given a document), and their
    // customisation of a system persona: their texts, personal like their profile.
    let persona_id = create_persona(&user, PERSONA_NAME, false).await;
    let updated = user
        .put(
            &format!("/api/personas/{persona_id}"),
            json!({ "description": PERSONA_DESCRIPTION, "system_prompt": PERSONA_PROMPT }),
        )
        .await;
    assert_eq!(updated.status, 200, "{updated:?}");
    add_document(
        &user,
        &persona_id,
        DOC_TITLE,
        "Wilhelmina wrote every week about the orchard.",
    )
    .await;
    let customized = user
        .put(
            "/api/personas/sarah_001/customization",
            json!({ "custom_prompt": CUSTOM_PROMPT }),
        )
        .await;
    assert_eq!(customized.status, 200, "{customized:?}");
    app.sims
        .cerebras
        .as_ref()
        .unwrap()
        .set_extraction_reply(vec![EXTRACTED.into()]);
    let call_id = request_call(&user, &persona_id, 2).await;

    // The call is settled and digested (fact, open item and summary projected): the persona
    // remembers, and the API shows it in clear.
    let remembered = eventually(Duration::from_secs(120), || async {
        let (settled, facts): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM events
                      WHERE aggregate_id = $1 AND event_type = 'CallSettled'),
                    (SELECT count(*) FROM rm_memory_facts WHERE user_id = $2::uuid)
                  * (SELECT count(*) FROM rm_memory_open_items WHERE user_id = $2::uuid)
                  * (SELECT count(*) FROM rm_memory_summary WHERE user_id = $2::uuid)",
        )
        .bind(&call_id)
        .bind(&id)
        .fetch_one(&pool)
        .await
        .unwrap();
        (settled == 1 && facts > 0).then_some(())
    })
    .await;
    if remembered.is_none() {
        let log: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT aggregate_id, event_type, left(payload::text, 300) FROM events
              WHERE aggregate_type IN ('memory', 'call') ORDER BY global_position",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let letters: Vec<(String, String)> =
            sqlx::query_as("SELECT consumer, error FROM dead_letters")
                .fetch_all(&pool)
                .await
                .unwrap();
        panic!("the call was not settled or its memory not projected: {log:#?} {letters:#?}");
    }
    let memory = user
        .get(&format!("/api/personas/{persona_id}/memory"))
        .await
        .body;
    assert!(memory.to_string().contains(FACT), "{memory}");
    assert!(memory.to_string().contains(OPEN_ITEM), "{memory}");
    let me = user.get("/api/auth/me").await;
    assert_eq!(me.body["user"]["email"], email.as_str(), "{me:?}");
    let shown = user.get(&format!("/api/calls/{call_id}")).await;
    assert!(shown.body.to_string().contains(&phone), "{shown:?}");
    assert!(
        transcript_lines(&pool, &call_id, None).await > 0,
        "the transcript was saved"
    );

    // Nothing personal is in the log in clear: not in Postgres, not on the stream.
    let personal = [
        email.as_str(),
        phone.as_str(),
        FACT,
        SUMMARY,
        OPEN_ITEM,
        PERSONA_NAME,
        PERSONA_DESCRIPTION,
        PERSONA_PROMPT,
        DOC_TITLE,
        CUSTOM_PROMPT,
    ];
    for needle in personal {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM events WHERE strpos(payload::text, $1) > 0")
                .bind(needle)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(n, 0, "{needle:?} is in an event in clear");
    }
    let sealed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = $1
            AND payload -> 'UserRegistered' -> 'email' ? '$sealed'",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(sealed, 1, "the registration's email is sealed");
    // The card's brand and last four digits too (its Stripe id, not personal, stays clear).
    let card: Value = sqlx::query_scalar(
        "SELECT payload -> 'PaymentMethodAttached' -> 'card' FROM events
          WHERE aggregate_type = 'billing' AND aggregate_id = $1
            AND event_type = 'PaymentMethodAttached'",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(card["brand"]["$sealed"].is_string(), "{card}");
    assert!(card["last4"]["$sealed"].is_string(), "{card}");
    assert!(card["payment_method_id"].is_string(), "{card}");
    let billing = user.get("/api/user/billing").await;
    assert!(billing.body.to_string().contains("4242"), "{billing:?}");
    let stream = read_stream(&env).await;
    let bodies: Vec<String> = stream
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect();
    assert!(
        bodies.iter().any(|b| b.contains(&id)),
        "the user's events are on the stream"
    );
    for needle in personal {
        assert!(
            !bodies.iter().any(|b| b.contains(needle)),
            "{needle:?} is on the stream in clear"
        );
    }
    let card_on_stream = stream
        .iter()
        .find(|e| e.event_type == "PaymentMethodAttached")
        .map(|e| e.payload["PaymentMethodAttached"]["card"].clone())
        .expect("the card is on the stream");
    assert!(
        card_on_stream["last4"]["$sealed"].is_string(),
        "{card_on_stream}"
    );

    let before = reconcile(&env, "postgres").await;
    assert!(
        before["per_user"][&id].is_object(),
        "the user's call is reconciled: {before}"
    );
    let live_keys = |pool: PgPool, id: String| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT (SELECT count(*) FROM data_keys WHERE user_id = $1::uuid AND key IS NOT NULL)
                  + (SELECT count(*) FROM memory_keys WHERE user_id = $1::uuid AND key IS NOT NULL)",
        )
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert!(
        live_keys(pool.clone(), id.clone()).await >= 2,
        "the user's key and their call's memory key"
    );
    let erased = erase(&user).await;
    assert_eq!(erased.status, 200, "{erased:?}");
    assert_eq!(
        live_keys(pool.clone(), id.clone()).await,
        0,
        "every key destroyed"
    );
    // The Stripe customer is deleted, its card detached.
    assert_eq!(erased.body["stripe_customer_deleted"], true, "{erased:?}");
    let at_stripe = stripe.customer(&customer).unwrap();
    assert_eq!(at_stripe["deleted"], true, "{at_stripe}");
    assert!(!at_stripe.to_string().contains(&email), "{at_stripe}");
    assert_eq!(stripe.cards_of(&customer), 0);

    // Every read model rebuilt from the stream: the erased user's fields are `[erased]`.
    let config = env.config();
    for projection in cmb_projections::all() {
        callmeback::backbone::projector::rebuild(
            &pool,
            &app.state.js,
            &config.stream,
            projection.as_ref(),
            false,
        )
        .await
        .unwrap();
    }
    let number: String = sqlx::query_scalar("SELECT phone FROM rm_calls WHERE id = $1::uuid")
        .bind(&call_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(number, cmb_domain::privacy::ERASED);

    // Nowhere in Postgres: events, read models, side tables, every text column.
    let all = [
        email.as_str(),
        phone.as_str(),
        SAID,
        FACT,
        SUMMARY,
        OPEN_ITEM,
        PERSONA_NAME,
        PERSONA_DESCRIPTION,
        PERSONA_PROMPT,
        DOC_TITLE,
        CUSTOM_PROMPT,
    ];
    let left = eventually(Duration::from_secs(30), || async {
        let mut left = Vec::new();
        for needle in all {
            for place in find_anywhere(&pool, needle).await {
                left.push(format!("{needle:?} in {place}"));
            }
        }
        left.is_empty().then_some(())
    })
    .await;
    if left.is_none() {
        let mut places = Vec::new();
        for needle in all {
            for place in find_anywhere(&pool, needle).await {
                places.push(format!("{needle:?} in {place}"));
            }
        }
        panic!("personal data left after erasure: {places:?}");
    }

    // The stream holds the same sealed copies as before: none of it in clear there either.
    let stream = read_stream(&env).await;
    for event in &stream {
        let body = serde_json::to_string(event).unwrap();
        for needle in all {
            assert!(
                !body.contains(needle),
                "{needle:?} on the stream after erasure"
            );
        }
    }

    // Replaying the stream shows the fields erased; the money adds up to the same cents.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_callmeback"))
        .args(["replay", "--source", "nats", "--format", "json", "events"])
        .args(["--user", &id])
        .env_clear()
        .envs(&env.vars)
        .output()
        .await
        .expect("replay runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    let registered = printed
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["event_type"] == "UserRegistered")
        .expect("the registration is replayed");
    assert_eq!(
        registered["payload"]["UserRegistered"]["email"],
        cmb_domain::privacy::ERASED
    );
    for needle in all {
        assert!(!printed.contains(needle), "{needle:?} replayed");
    }
    assert_eq!(reconcile(&env, "postgres").await, before);
    assert_eq!(reconcile(&env, "nats").await, before);
    app.stop().await;
    env.cleanup().await;
}

/// The events of the log, as `(aggregate_type, aggregate_id, sequence, payload)`, once the
/// stream holds as many as Postgres.
async fn stream_caught_up(env: &TestEnv, pool: &PgPool) -> Vec<String> {
    // Counted again each time: the app writes events of its own in the background (the
    // system personas' knowledge marked indexed).
    let bodies = eventually(Duration::from_secs(60), || async {
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(pool)
            .await
            .unwrap();
        let events = read_stream(env).await;
        (events.len() as i64 == stored).then(|| {
            events
                .iter()
                .map(|e| serde_json::to_string(e).unwrap())
                .collect::<Vec<_>>()
        })
    })
    .await;
    bodies.expect("the publisher republished the whole log")
}

async fn privacy_migrate_keeping_the_stream(env: &TestEnv) -> String {
    callmeback(env, &["privacy", "migrate", "--keep-stream"], &[])
        .await
        .expect("privacy migrate runs")
}

async fn privacy_migrate(env: &TestEnv) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_callmeback"))
        .args(["privacy", "migrate"])
        .env_clear()
        .envs(&env.vars)
        .output()
        .await
        .expect("privacy migrate runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_written_in_clear_are_sealed_by_the_migration_with_the_same_money() {
    let env = TestEnv::new()
        .set("SIM_TWILIO_RING_MS", "100")
        .set("SIM_TWILIO_CALL_SECONDS", "2")
        .set("SIM_TWILIO_CALLER_TURNS", "0:60000");
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, profile) = user_with_credits(&app, &api, 100).await;
    let id = profile["id"].as_str().unwrap().to_string();
    let email = profile["email"].as_str().unwrap().to_string();
    let phone = profile["phone"].as_str().unwrap().to_string();
    let persona_id = create_persona(&user, "Migrated Buddy", false).await;
    let updated = user
        .put(
            &format!("/api/personas/{persona_id}"),
            json!({ "description": PERSONA_DESCRIPTION }),
        )
        .await;
    assert_eq!(updated.status, 200, "{updated:?}");
    let call_id = request_call(&user, &persona_id, 2).await;
    let pool = app.state.pool.clone();
    assert!(
        wait_for_event(&pool, &call_id, "CallSettled").await,
        "the call was settled"
    );
    assert_eq!(count_events(&pool, &call_id, "CallSettled").await, 1);
    app.stop().await;

    // The log as a build before sealing wrote it: every personal field in clear, in Postgres
    // and (the stream rebuilt from it) on the stream.
    let b = env.backbone().await;
    let pool = b.pool.clone();
    let keys = callmeback::backbone::keys::Keyring::new(pool.clone());
    let rows: Vec<(String, String, i64, String, Value)> = sqlx::query_as(
        "SELECT aggregate_type, aggregate_id, sequence, event_type, payload FROM events",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut clear = 0;
    let mut registration = None;
    for (aggregate_type, aggregate_id, sequence, event_type, mut payload) in rows {
        if !cmb_domain::privacy::is_personal(&aggregate_type, &event_type)
            || cmb_domain::privacy::subject(&aggregate_type, &aggregate_id, &event_type, &payload)
                .is_none()
        {
            // Nobody's: a system persona's texts.
            continue;
        }
        keys.open(&aggregate_type, &aggregate_id, &event_type, &mut payload)
            .await
            .unwrap();
        // An update recorded before persona events carried their owner.
        if event_type == "PersonaUpdated" {
            payload["PersonaUpdated"]
                .as_object_mut()
                .unwrap()
                .remove("owner");
        }
        if event_type == "UserRegistered" {
            registration = Some((aggregate_id.clone(), sequence, payload.clone()));
        }
        sqlx::query(
            "UPDATE events SET payload = $4
              WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3",
        )
        .bind(&aggregate_type)
        .bind(&aggregate_id)
        .bind(sequence)
        .bind(&payload)
        .execute(&pool)
        .await
        .unwrap();
        clear += 1;
    }
    assert!(
        clear >= 4,
        "the registration, the persona's creation and update, the call request"
    );
    // A dead letter holding a copy of the registration, as an older build published it.
    let (aggregate_id, sequence, payload) = registration.expect("the registration");
    let letter = json!({
        "aggregate_type": "user", "aggregate_id": aggregate_id, "sequence": sequence,
        "event_type": "UserRegistered", "event_version": "1", "payload": payload,
    });
    sqlx::query(
        "INSERT INTO dead_letters (consumer, stream_sequence, aggregate_type, aggregate_id,
                                   sequence, event_type, deliveries, error, body)
         VALUES ('projection:test', 1, 'user', $1, $2, 'UserRegistered', 5, 'failed', $3)",
    )
    .bind(&aggregate_id)
    .bind(sequence)
    .bind(serde_json::to_vec(&letter).unwrap())
    .execute(&pool)
    .await
    .unwrap();
    b.js.delete_stream(&env.config().stream.stream)
        .await
        .unwrap();
    sqlx::query("DELETE FROM publisher_checkpoints")
        .execute(&pool)
        .await
        .unwrap();
    let app = env.spawn_app().await;
    let bodies = stream_caught_up(&env, &pool).await;
    assert!(
        bodies.iter().any(|b| b.contains(&email)),
        "in clear on the stream"
    );
    let before = reconcile(&env, "postgres").await;
    assert!(before["per_user"][&id].is_object(), "{before}");
    app.stop().await;

    // The cut-over: sealed in place, the stream rebuilt from the store by the next `serve`.
    let said = privacy_migrate(&env).await;
    assert!(said.contains(&format!("{clear} sealed")), "{said}");
    assert!(said.contains("1 copies of events sealed"), "{said}");
    for needle in [email.as_str(), phone.as_str(), PERSONA_DESCRIPTION] {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM events WHERE strpos(payload::text, $1) > 0")
                .bind(needle)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(n, 0, "{needle:?} is in an event in clear");
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM dead_letters WHERE position(convert_to($1, 'UTF8') IN body) > 0",
        )
        .bind(needle)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(n, 0, "{needle:?} is in a dead letter in clear");
    }
    // The update got its owner back from the persona's creation, so it could be sealed.
    let owner: Value = sqlx::query_scalar(
        "SELECT payload -> 'PersonaUpdated' -> 'owner' FROM events
          WHERE aggregate_id = $1 AND event_type = 'PersonaUpdated'",
    )
    .bind(&persona_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(owner, json!({ "kind": "user", "user_id": id }));
    assert_eq!(reconcile(&env, "postgres").await, before);
    let app = env.spawn_app().await;
    let bodies = stream_caught_up(&env, &pool).await;
    for needle in [email.as_str(), phone.as_str()] {
        assert!(
            !bodies.iter().any(|b| b.contains(needle)),
            "{needle:?} is on the stream in clear"
        );
    }
    assert_eq!(reconcile(&env, "nats").await, before);
    // The account works as before, its fields opened.
    let api = Api::new(app.addr);
    let login = api
        .elsewhere()
        .post(
            "/api/auth/login",
            json!({ "email": email, "password": PASSWORD }),
        )
        .await;
    assert_eq!(login.status, 200, "{login:?}");
    let again = api.with_token(login.body["token"].as_str().unwrap());
    assert_eq!(
        again.get("/api/auth/me").await.body["user"]["phone"],
        phone.as_str()
    );
    app.stop().await;
    // Nothing left in clear: a second run seals nothing and keeps the stream.
    let said = privacy_migrate(&env).await;
    assert!(said.contains("0 sealed, 0 erased"), "{said}");
    assert!(said.contains("0 copies of events sealed"), "{said}");
    assert!(!said.contains("stream was deleted"), "{said}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_call_taught_is_forgotten_with_its_transcript() {
    let env = TestEnv::new()
        .set("SIM_TWILIO_RING_MS", "100")
        .set("SIM_TWILIO_CALL_SECONDS", "6")
        .set("SIM_TWILIO_CALLER_TURNS", "1000:3000")
        .set("SIM_DEEPGRAM_SCRIPT", SAID);
    let app = env.spawn_app().await;
    let pool = app.state.pool.clone();
    let api = Api::new(app.addr);
    let (user, profile) = user_with_credits(&app, &api, 100).await;
    let id = profile["id"].as_str().unwrap().to_string();
    let persona_id = create_persona(&user, "Retention Buddy", false).await;
    app.sims
        .cerebras
        .as_ref()
        .unwrap()
        .set_extraction_reply(vec![EXTRACTED.into()]);
    request_call(&user, &persona_id, 2).await;
    let remembered = |n: i64| {
        let pool = pool.clone();
        let id = id.clone();
        async move {
            let learned: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM rm_memory_facts WHERE user_id = $1::uuid)
                      + (SELECT count(*) FROM rm_memory_open_items WHERE user_id = $1::uuid)
                      + (SELECT count(*) FROM rm_memory_summary WHERE user_id = $1::uuid)",
            )
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
            (learned == n).then_some(())
        }
    };
    let learned = eventually(Duration::from_secs(120), || remembered(3)).await;
    assert!(
        learned.is_some(),
        "a fact, an open item and a summary were learned"
    );

    // What was learned is sealed under the call's own key, not the user's.
    let learned: Value = sqlx::query_scalar(
        "SELECT payload FROM events WHERE aggregate_type = 'memory' AND event_type = 'FactsLearned'
            AND aggregate_id LIKE $1 || ':%'",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    let text = &learned["FactsLearned"]["facts"][0]["text"]["$sealed"];
    assert!(
        text.as_str().is_some_and(|t| t.starts_with("c:")),
        "{learned}"
    );
    let export = user.get("/api/user/export").await;
    assert_eq!(export.status, 200);
    assert!(
        export.body.to_string().contains(FACT),
        "the export holds what was learned"
    );

    // As a build before the calls' keys wrote it: what the call taught sealed under the
    // user's own key. `privacy migrate` moves it to the call's key.
    let (memory_id, sequence, mut older): (String, i64, Value) = sqlx::query_as(
        "SELECT aggregate_id, sequence, payload FROM events WHERE aggregate_type = 'memory'
            AND event_type = 'FactsLearned' AND aggregate_id LIKE $1 || ':%'",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    let keys = app.state.store.keys().clone();
    keys.open("memory", &memory_id, "FactsLearned", &mut older)
        .await
        .unwrap();
    let call = older["FactsLearned"]
        .as_object_mut()
        .unwrap()
        .remove("call_id")
        .unwrap();
    keys.seal("memory", &memory_id, "FactsLearned", &mut older)
        .await
        .unwrap();
    older["FactsLearned"]["call_id"] = call;
    let text = older["FactsLearned"]["facts"][0]["text"]["$sealed"].clone();
    assert!(
        text.as_str().is_some_and(|t| !t.starts_with("c:")),
        "{older}"
    );
    sqlx::query(
        "UPDATE events SET payload = $3 WHERE aggregate_type = 'memory' AND aggregate_id = $1
            AND sequence = $2",
    )
    .bind(&memory_id)
    .bind(sequence)
    .bind(&older)
    .execute(&pool)
    .await
    .unwrap();
    app.stop().await;
    let said = privacy_migrate_keeping_the_stream(&env).await;
    assert!(
        said.contains("1 moved from the user's key to their call's"),
        "{said}"
    );
    let moved: Value =
        sqlx::query_scalar("SELECT payload FROM events WHERE aggregate_id = $1 AND sequence = $2")
            .bind(&memory_id)
            .bind(sequence)
            .fetch_one(&pool)
            .await
            .unwrap();
    let text = &moved["FactsLearned"]["facts"][0]["text"]["$sealed"];
    assert!(
        text.as_str().is_some_and(|t| t.starts_with("c:")),
        "{moved}"
    );
    let app = env.spawn_app().await;
    let login = Api::new(app.addr)
        .post(
            "/api/auth/login",
            json!({ "email": profile["email"], "password": PASSWORD }),
        )
        .await;
    assert_eq!(login.status, 200, "{login:?}");
    let user = Api::new(app.addr).with_token(login.body["token"].as_str().unwrap());

    // Inside the retention nothing goes.
    let store = &app.state.store;
    let (lines, forgotten) = callmeback::serve::transcripts::apply_retention(store, 30)
        .await
        .unwrap();
    assert_eq!((lines, forgotten), (0, 0));
    // Forty days later (the call's lines and what it taught, backdated), both go.
    for sql in [
        "UPDATE call_transcripts SET at = at - interval '40 days'",
        "UPDATE rm_memory_facts SET at = at - interval '40 days'",
        "UPDATE rm_memory_open_items SET at = at - interval '40 days'",
        "UPDATE rm_memory_summary SET updated_at = updated_at - interval '40 days'",
        "UPDATE memory_keys SET created_at = created_at - interval '40 days'",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    let (lines, forgotten) = callmeback::serve::transcripts::apply_retention(store, 30)
        .await
        .unwrap();
    assert!(lines > 0, "the transcript went");
    assert_eq!(forgotten, 3, "the fact, the open item and the summary went");
    let gone = eventually(Duration::from_secs(30), || remembered(0)).await;
    assert!(
        gone.is_some(),
        "the memory read models still hold what the call taught"
    );
    let memory = user
        .get(&format!("/api/personas/{persona_id}/memory"))
        .await
        .body
        .to_string();
    for needle in [FACT, SUMMARY, OPEN_ITEM] {
        assert!(!memory.contains(needle), "{memory}");
    }
    // Nor can it be read back from the log: the call's key is gone, the user's is not.
    let keys_left: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT key FROM memory_keys WHERE user_id = $1::uuid")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(keys_left.is_none(), "the call's key is destroyed");
    let mut opened = learned.clone();
    let memory_id: String = sqlx::query_scalar(
        "SELECT aggregate_id FROM events WHERE aggregate_type = 'memory'
            AND event_type = 'FactsLearned' AND aggregate_id LIKE $1 || ':%'",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    store
        .keys()
        .open("memory", &memory_id, "FactsLearned", &mut opened)
        .await
        .unwrap();
    assert_eq!(
        opened["FactsLearned"]["facts"][0]["text"],
        cmb_domain::privacy::ERASED
    );
    let export = user.get("/api/user/export").await;
    assert_eq!(export.status, 200);
    for needle in [FACT, SUMMARY, OPEN_ITEM] {
        assert!(
            !export.body.to_string().contains(needle),
            "{needle:?} exported"
        );
    }
    assert!(
        export
            .body
            .to_string()
            .contains(profile["email"].as_str().unwrap()),
        "the user's own data still opens"
    );
    // Repeatable: nothing more to forget.
    let again = callmeback::serve::transcripts::apply_retention(store, 30)
        .await
        .unwrap();
    assert_eq!(again, (0, 0));
    app.stop().await;
    env.cleanup().await;
}

/// `callmeback <args>` on `env`'s database and stream with `extra` settings: its stdout, or
/// its stderr as the error.
async fn callmeback(
    env: &TestEnv,
    args: &[&str],
    extra: &[(&str, &str)],
) -> Result<String, String> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_callmeback"))
        .args(args)
        .env_clear()
        .envs(&env.vars)
        .envs(extra.iter().copied())
        .output()
        .await
        .expect("callmeback runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_keys_are_stored_wrapped_and_rewrap_moves_them_to_a_new_master_key() {
    use base64::Engine as _;
    use callmeback::backbone::keys::{self, Masters};
    let b64 = |byte: u8| base64::engine::general_purpose::STANDARD.encode([byte; 32]);
    let (old, new) = (b64(0x11), b64(0x22));
    let env = TestEnv::new().set("DATA_KEYS_MASTER_KEY", &old);
    let app = env.spawn_app().await;
    let pool = app.state.pool.clone();
    let api = Api::new(app.addr);
    let (_, wrapped_user) = api.register(PASSWORD).await;
    let (legacy, legacy_user) = api.register(PASSWORD).await;
    let ids: Vec<uuid::Uuid> = [&wrapped_user, &legacy_user]
        .iter()
        .map(|p| p["id"].as_str().unwrap().parse().unwrap())
        .collect();
    let under_old = Masters::from_settings(Some(&old), None).unwrap();

    // The table holds each data key wrapped by the master key, never the key itself.
    let mut clear_keys = Vec::new();
    for id in &ids {
        let (stored, clear) = keys::stored_and_clear(&pool, &under_old, *id)
            .await
            .unwrap()
            .expect("a data key");
        assert_eq!(stored.len(), keys::WRAPPED_LEN);
        assert!(!stored.windows(32).any(|w| w == clear), "the key in clear");
        clear_keys.push(clear);
    }
    // A call's memory key, under the old master too.
    let memory = cmb_domain::memory::memory_id(ids[0], "sarah_001");
    let mut summary = json!({"SummaryRewritten": {
        "call_id": uuid::Uuid::now_v7().to_string(), "summary": "Keeps bees."}});
    keys::Keyring::with_masters(
        pool.clone(),
        std::sync::Arc::new(Masters::from_settings(Some(&old), None).unwrap()),
    )
    .seal("memory", &memory, "SummaryRewritten", &mut summary)
    .await
    .unwrap();
    let memory_keys = |master: [u8; 8]| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM memory_keys WHERE master_id = $1")
                .bind(&master[..])
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(memory_keys(under_old.current.id()).await, 1);

    // One key as a build before wrapping stored it: in clear, no master.
    sqlx::query("UPDATE data_keys SET key = $2, master_id = NULL WHERE user_id = $1")
        .bind(ids[1])
        .bind(&clear_keys[1][..])
        .execute(&pool)
        .await
        .unwrap();
    let legacy_email = legacy_user["email"].as_str().unwrap().to_string();
    let me = legacy.get("/api/auth/me").await;
    assert_eq!(me.body["user"]["email"], legacy_email.as_str(), "{me:?}");
    app.stop().await;

    // Another process with another master key opens nothing.
    let user_events = |id: uuid::Uuid| {
        [
            "replay", "--source", "postgres", "--format", "json", "events", "--user",
        ]
        .into_iter()
        .map(str::to_string)
        .chain([id.to_string()])
        .collect::<Vec<_>>()
    };
    let args0 = user_events(ids[0]);
    let args0: Vec<&str> = args0.iter().map(String::as_str).collect();
    let refused = callmeback(&env, &args0, &[("DATA_KEYS_MASTER_KEY", &new)]).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("master key this instance does not have")),
        "{refused:?}"
    );

    // Rewrapped by the new master (the old one given to read them), twice: the second run
    // finds nothing to do.
    let both = [
        ("DATA_KEYS_MASTER_KEY", new.as_str()),
        ("DATA_KEYS_MASTER_KEY_OLD", old.as_str()),
    ];
    let said = callmeback(&env, &["privacy", "rewrap", "--batch", "1"], &both)
        .await
        .unwrap();
    assert!(said.contains("3 data keys rewrapped"), "{said}");
    let said = callmeback(&env, &["privacy", "rewrap"], &both)
        .await
        .unwrap();
    assert!(
        said.contains("0 data keys rewrapped by the current master key, 3 already"),
        "{said}"
    );
    let under_new = Masters::from_settings(Some(&new), None).unwrap();
    assert_eq!(
        memory_keys(under_new.current.id()).await,
        1,
        "the memory key moved"
    );
    for (id, clear) in ids.iter().zip(&clear_keys) {
        let (stored, now) = keys::stored_and_clear(&pool, &under_new, *id)
            .await
            .unwrap()
            .expect("a data key");
        assert_eq!(stored.len(), keys::WRAPPED_LEN);
        assert_eq!(&now, clear, "the same data key, wrapped anew");
        assert!(!stored.windows(32).any(|w| w == clear));
    }

    // Under the new master alone, the fields open; under the old alone, nothing does.
    let opened = callmeback(&env, &args0, &[("DATA_KEYS_MASTER_KEY", &new)])
        .await
        .unwrap();
    let wrapped_email = wrapped_user["email"].as_str().unwrap();
    assert!(opened.contains(wrapped_email), "{opened}");
    let refused = callmeback(&env, &args0, &[("DATA_KEYS_MASTER_KEY", &old)]).await;
    assert!(refused.is_err(), "{refused:?}");

    // Erasure still shreds: the key goes, the fields read erased.
    let env = env.set("DATA_KEYS_MASTER_KEY", &new);
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let login = api
        .post(
            "/api/auth/login",
            json!({ "email": legacy_email, "password": PASSWORD }),
        )
        .await;
    assert_eq!(login.status, 200, "{login:?}");
    let legacy = api.with_token(login.body["token"].as_str().unwrap());
    assert_eq!(erase(&legacy).await.status, 200);
    app.stop().await;
    let gone: Option<Vec<u8>> = sqlx::query_scalar("SELECT key FROM data_keys WHERE user_id = $1")
        .bind(ids[1])
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(gone.is_none(), "the data key is destroyed");
    let args1 = user_events(ids[1]);
    let args1: Vec<&str> = args1.iter().map(String::as_str).collect();
    let printed = callmeback(&env, &args1, &[]).await.unwrap();
    assert!(!printed.contains(&legacy_email), "{printed}");
    assert!(printed.contains(cmb_domain::privacy::ERASED), "{printed}");
    env.cleanup().await;
}
