//! The user's data on request: `GET /api/user/export` holds a call the user made, with its
//! transcript, and the events of the account — without password hashes. (A module of the
//! `accounts` in the suite.)

use std::time::Duration;

use serde_json::{json, Value};

use super::common::{
    create_persona, eventually, request_call, transcript_lines, user_with_credits,
    wait_for_transcript, Api, TestEnv, PASSWORD,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_holds_a_made_calls_transcript_and_the_accounts_events() {
    let said = "please remember my dentist is on tuesday";
    let env = TestEnv::new()
        .set("SIM_TWILIO_RING_MS", "100")
        .set("SIM_TWILIO_CALL_SECONDS", "6")
        .set("SIM_TWILIO_CALLER_TURNS", "1000:3000")
        .set("SIM_DEEPGRAM_SCRIPT", said)
        .set("SIM_CEREBRAS_REPLY", "Okay, noted.");
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, profile) = user_with_credits(&app, &api, 100).await;
    let persona_id = create_persona(&user, "Export Buddy", false).await;
    let call_id = request_call(&user, &persona_id, 2).await;
    assert!(
        wait_for_transcript(&app.state.pool, &call_id, Some(said)).await,
        "the call's transcript was saved"
    );
    assert_eq!(
        transcript_lines(&app.state.pool, &call_id, Some(said)).await,
        1
    );
    // The call's read model has its end (so the export's call is the finished one).
    let ended = eventually(Duration::from_secs(60), || async {
        let c = user.get(&format!("/api/calls/{call_id}")).await;
        c.body["call"]["ended_at"].is_string().then_some(())
    })
    .await;
    assert!(ended.is_some(), "the call ended");

    assert_eq!(api.get("/api/user/export").await.status, 401);
    let response = user
        .request(reqwest::Method::GET, "/api/user/export")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let disposition = response.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(disposition.starts_with("attachment"), "{disposition}");
    let archive: Value = response
        .json()
        .await
        .expect("the archive is one JSON document");
    assert_eq!(archive["format"], "callmeback-export/1");
    assert_eq!(archive["profile"]["email"], profile["email"]);
    assert_eq!(archive["personas"][0]["persona"]["id"], persona_id.as_str());
    let calls = archive["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let exported = &calls[0];
    assert_eq!(exported["call"]["id"], call_id.as_str());
    let lines: Vec<&str> = exported["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert!(lines.contains(&said), "{lines:?}");
    assert!(exported["timeline"].as_array().unwrap().len() > 3);
    assert!(exported["payment"]["held_cents"].as_i64().unwrap() > 0);
    // The event log: the account's, the wallet's, the call's; no password hash.
    let events = archive["events"].as_array().unwrap();
    let has = |aggregate: &str, kind: &str| {
        events
            .iter()
            .any(|e| e["aggregate_type"] == aggregate && e["event_type"] == kind)
    };
    assert!(has("user", "UserRegistered"));
    assert!(has("wallet", "CreditsGranted"));
    assert!(has("call", "CallRequested"));
    assert!(has("persona", "PersonaCreated"));
    // Sealed in the log, the user's own fields are exported opened.
    let registered = events
        .iter()
        .find(|e| e["event_type"] == "UserRegistered")
        .unwrap();
    assert_eq!(
        registered["payload"]["UserRegistered"]["email"], profile["email"],
        "{registered}"
    );
    let text = archive.to_string();
    assert!(!text.contains("$argon2"), "a password hash was exported");
    // Another user's export holds nothing of this one.
    let (other, _) = api.register(PASSWORD).await;
    let theirs = other.get("/api/user/export").await;
    assert_eq!(theirs.status, 200);
    assert_eq!(theirs.body["calls"], json!([]));
    assert!(!theirs.body.to_string().contains(&call_id));
    // 3 an hour.
    let mut last = 0;
    for _ in 0..3 {
        last = user.get("/api/user/export").await.status;
    }
    assert_eq!(last, 429);
    app.stop().await;
    env.cleanup().await;
}
