//! Memory across calls, end to end through the simulators: a call teaches the persona facts
//! and an open item (the LLM simulator answers the extraction as scripted, malformed once);
//! the next call's prompt carries them and its greeting follows up; forgetting and the switch
//! show in the next call; nobody else sees any of it; the read model rebuilds the same.

use crate::common;

use std::time::Duration;

use callmeback::app::Running;
use common::{eventually, grant, request_call, wait_for_event, Api, TestEnv, PASSWORD};
use serde_json::{json, Value};

async fn persona(user: &Api) -> String {
    let reply = user
        .post(
            "/api/personas",
            json!({
                "name": "Memory Buddy",
                "description": "A persona for memory tests.",
                "voice": "21m00Tcm4TlvDq8ikWAM",
                "system_prompt": "You are a test buddy. Answer in one short sentence.",
                "greeting": "Hi there.",
                "is_public": true,
                "turn_taking": { "endpointing_ms": 300, "silence_reminder_ms": 20000, "silence_hangup_ms": 40000 },
            }),
        )
        .await;
    assert_eq!(reply.status, 201, "{reply:?}");
    reply.body["persona"]["id"].as_str().unwrap().to_string()
}

/// Calls; waits until the session is recorded and the memory worker has dealt with the call
/// (a `CallDigested` event, or none when memory is off: then a moment for it to have looked).
async fn call(app: &Running, user: &Api, persona_id: &str, digested: bool) -> (String, Value) {
    let id = request_call(user, persona_id, 2).await;
    let pool = &app.state.pool;
    assert!(
        wait_for_event(pool, &id, "VoiceSessionEnded").await,
        "the voice session of {id} never ended"
    );
    if digested {
        let done = eventually(Duration::from_secs(30), || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM events WHERE aggregate_type = 'memory'
                   AND event_type = 'CallDigested' AND payload->'CallDigested'->>'call_id' = $1",
            )
            .bind(&id)
            .fetch_one(pool)
            .await
            .unwrap();
            (n == 1).then_some(())
        })
        .await;
        assert!(done.is_some(), "call {id} was never digested");
        // And the memory read model has caught up with the memory aggregate.
        let caught_up = eventually(Duration::from_secs(20), || async {
            let behind: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM events e WHERE e.aggregate_type = 'memory'
                   AND e.sequence > COALESCE((SELECT o.sequence FROM projection_offsets o
                     WHERE o.projection = 'memory' AND o.aggregate_type = 'memory'
                       AND o.aggregate_id = e.aggregate_id), 0))",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            (!behind).then_some(())
        })
        .await;
        assert!(caught_up.is_some(), "the memory read model lags");
    } else {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let call = user.get(&format!("/api/calls/{id}")).await;
    (id, call.body)
}

/// The first voice (not extraction) LLM request sent since `from`, all its messages joined.
fn voice_prompt(app: &Running, from: usize) -> String {
    let log = app.sims.cerebras.as_ref().unwrap().requests_log();
    log[from..]
        .iter()
        .find(|m| !cmb_sims::llm::is_extraction(m))
        .map(|m| {
            m.iter()
                .map(|(r, c)| format!("[{r}] {c}"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .expect("a voice request")
}

fn extractions(app: &Running, from: usize) -> Vec<Vec<(String, String)>> {
    app.sims.cerebras.as_ref().unwrap().requests_log()[from..]
        .iter()
        .filter(|m| cmb_sims::llm::is_extraction(m))
        .cloned()
        .collect()
}

fn log_len(app: &Running) -> usize {
    app.sims.cerebras.as_ref().unwrap().requests_log().len()
}

fn greeting(call: &Value) -> String {
    call["transcript"][0]["text"].as_str().unwrap().to_string()
}

const EXTRACTED: &str = r#"{"facts":[{"text":"Is training for a 10k race in May","kind":"goal"},{"text":"Has a sister called Anna","kind":"person"}],"summary":"A runner who talks about training and family.","open_items":[{"text":"the job interview on Friday"}],"closed_items":[]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persona_remembers_what_it_learned_and_the_user_controls_it() {
    let env = TestEnv::new()
        .set("SIM_TWILIO_RING_MS", "100")
        // The caller lets the greeting finish (a follow-up greeting lasts about 5 s) before
        // speaking: a first "turn" of no speech lengthens the silence after picking up.
        .set("SIM_TWILIO_CALL_SECONDS", "13")
        .set("SIM_TWILIO_CALLER_TURNS", "0:5500,1000:2500,1000:2500")
        .set(
            "SIM_DEEPGRAM_SCRIPT",
            "I am training for a 10k race in May|my sister Anna says hi and I have a job interview on Friday",
        )
        .set("SIM_CEREBRAS_REPLY", "Okay, noted.")
        // Synthesis fast enough for the follow-up greeting's 1.5 s bound.
        .set("SIM_ELEVENLABS_TTS_SPEED", "20");
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 300).await;
    let persona_id = persona(&user).await;
    let llm = app.sims.cerebras.as_ref().unwrap();

    // First call: nothing remembered yet; the extraction answers malformed JSON, then JSON.
    llm.set_extraction_reply(vec![
        "Sure! Here is what I learned: {".into(),
        EXTRACTED.into(),
    ]);
    let (first, call1) = call(&app, &user, &persona_id, true).await;
    assert_eq!(greeting(&call1), "Hi there.");
    assert!(!voice_prompt(&app, 0).contains("remember"));
    let asked = extractions(&app, 0);
    assert_eq!(
        asked.len(),
        2,
        "asked again once after the malformed answer"
    );
    assert!(asked[0][1].1.contains("10k race in May") && asked[0][1].1.contains("job interview"));

    let memory = user
        .get(&format!("/api/personas/{persona_id}/memory"))
        .await;
    assert_eq!(memory.status, 200, "{memory:?}");
    let m = &memory.body["memory"];
    let facts: Vec<&str> = m["facts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        facts,
        [
            "Is training for a 10k race in May",
            "Has a sister called Anna"
        ]
    );
    for f in m["facts"].as_array().unwrap() {
        assert_eq!(f["call_id"], first.as_str());
        assert!(f["at"].is_string());
    }
    assert_eq!(m["open_items"][0]["text"], "the job interview on Friday");
    assert_eq!(
        m["summary"]["summary"],
        "A runner who talks about training and family."
    );
    assert_eq!(m["enabled"], true);
    // Embeddings are kept with each fact.
    let dims: Vec<i32> = sqlx::query_scalar("SELECT cardinality(embedding) FROM rm_memory_facts")
        .fetch_all(&app.state.pool)
        .await
        .unwrap();
    assert_eq!(dims, [256, 256]);

    // Memory work is billed on the call: both extraction attempts and the embeddings.
    let costs: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT service, operation, quantity FROM rm_call_costs
          WHERE call_id = $1::uuid AND operation LIKE 'memory-%' ORDER BY operation",
    )
    .bind(&first)
    .fetch_all(&app.state.pool)
    .await
    .unwrap();
    // Both kinds: the extraction's cost lines come first (one per attempt), the embeddings'
    // after them.
    let eventually_costs = eventually(Duration::from_secs(60), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT operation) FROM rm_call_costs WHERE call_id = $1::uuid AND operation LIKE 'memory-%'",
        )
        .bind(&first)
        .fetch_one(&app.state.pool)
        .await
        .unwrap();
        (n >= 2).then_some(())
    })
    .await;
    assert!(eventually_costs.is_some(), "{costs:?}");
    let costs: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT service, operation, sum(quantity)::bigint FROM rm_call_costs
          WHERE call_id = $1::uuid AND operation LIKE 'memory-%' GROUP BY 1, 2 ORDER BY 2",
    )
    .bind(&first)
    .fetch_all(&app.state.pool)
    .await
    .unwrap();
    assert_eq!(costs.len(), 2, "{costs:?}");
    assert_eq!(costs[0].0, "openai");
    assert_eq!(costs[0].1, "memory-embedding-tokens");
    // The simulator also embedded the knowledge passages (billed apart, to their owners).
    assert_eq!(
        costs[0].2,
        app.sims.openai.as_ref().unwrap().embedding_tokens_total() as i64
            - common::knowledge_embedding_tokens(&app).await
    );
    assert_eq!(costs[1].0, "cerebras");
    assert_eq!(costs[1].1, "memory-extraction-tokens");
    assert!(costs[1].2 > 0);

    // Second call: the prompt carries the facts and the open item; the greeting follows up.
    let from = log_len(&app);
    let (_, call2) = call(&app, &user, &persona_id, true).await;
    let prompt = voice_prompt(&app, from);
    assert!(
        prompt.contains("Is training for a 10k race in May"),
        "{prompt}"
    );
    assert!(prompt.contains("Has a sister called Anna"), "{prompt}");
    assert!(prompt.contains("the job interview on Friday"), "{prompt}");
    assert!(
        prompt.contains("A runner who talks about training"),
        "{prompt}"
    );
    assert_eq!(
        greeting(&call2),
        "Hi there. Last time you mentioned the job interview on Friday. How did it go?"
    );
    // The extraction was shown what is remembered, with the open item's id to close it.
    let open_id = m["open_items"][0]["id"].as_str().unwrap();
    assert!(extractions(&app, from)[0][1].1.contains(open_id));

    // Forget a fact: gone from the read model and from the next call's prompt.
    let anna = m["facts"][1]["id"].as_str().unwrap().to_string();
    let forgot = user
        .delete(&format!("/api/personas/{persona_id}/memory/{anna}"))
        .await;
    assert_eq!(forgot.status, 200, "{forgot:?}");
    let again = user
        .delete(&format!("/api/personas/{persona_id}/memory/{anna}"))
        .await;
    assert_eq!(again.status, 404);
    let memory = user
        .get(&format!("/api/personas/{persona_id}/memory"))
        .await;
    assert_eq!(memory.body["memory"]["facts"].as_array().unwrap().len(), 1);
    let tombstone: Value =
        sqlx::query_scalar("SELECT payload FROM events WHERE event_type = 'MemoryItemForgotten'")
            .fetch_one(&app.state.pool)
            .await
            .unwrap();
    assert_eq!(tombstone, json!({ "MemoryItemForgotten": { "id": anna } }));
    let from = log_len(&app);
    call(&app, &user, &persona_id, true).await;
    let prompt = voice_prompt(&app, from);
    assert!(!prompt.contains("sister called Anna"), "{prompt}");
    assert!(
        prompt.contains("Is training for a 10k race in May"),
        "{prompt}"
    );

    // Nobody else sees it: another user (200, empty, on a public persona; 404 on the item),
    // another persona of the same user, a persona that does not exist.
    let (other, _) = api.register(PASSWORD).await;
    let theirs = other
        .get(&format!("/api/personas/{persona_id}/memory"))
        .await;
    assert_eq!(theirs.status, 200, "{theirs:?}");
    assert_eq!(theirs.body["memory"]["facts"], json!([]));
    assert_eq!(theirs.body["memory"]["summary"], Value::Null);
    assert_eq!(theirs.body["memory"]["open_items"], json!([]));
    let fact = m["facts"][0]["id"].as_str().unwrap();
    let steal = other
        .delete(&format!("/api/personas/{persona_id}/memory/{fact}"))
        .await;
    assert_eq!(steal.status, 404);
    let brad = user.get("/api/personas/brad_001/memory").await;
    assert_eq!(brad.status, 200, "{brad:?}");
    assert_eq!(brad.body["memory"]["facts"], json!([]));
    let nope = user.get("/api/personas/no-such-persona/memory").await;
    assert_eq!(nope.status, 404);

    // The read model rebuilt from the events is the live one.
    let live = cmb_projections::memory::dump(&app.state.pool)
        .await
        .unwrap();
    assert_eq!(live.len(), 3, "{live:?}");
    let config = env.config();
    let projection = cmb_projections::memory::MemoryProjection;
    cmb_projections::reset(&app.state.pool, &projection)
        .await
        .unwrap();
    callmeback::backbone::projector::rebuild(
        &app.state.pool,
        &app.state.js,
        &config.stream,
        &projection,
        false,
    )
    .await
    .unwrap();
    assert_eq!(
        cmb_projections::memory::dump(&app.state.pool)
            .await
            .unwrap(),
        live
    );

    // Memory off: the next call's prompt and greeting carry nothing, and nothing is learned.
    let off = user
        .put(
            &format!("/api/personas/{persona_id}/customization"),
            json!({ "memory_enabled": false }),
        )
        .await;
    assert_eq!(off.status, 200, "{off:?}");
    let from = log_len(&app);
    let (_, call4) = call(&app, &user, &persona_id, false).await;
    let prompt = voice_prompt(&app, from);
    assert!(!prompt.contains("Is training for a 10k"), "{prompt}");
    assert!(!prompt.contains("the job interview on Friday"), "{prompt}");
    assert_eq!(greeting(&call4), "Hi there.");
    assert!(extractions(&app, from).is_empty());

    // Forget everything.
    let cleared = user
        .delete(&format!("/api/personas/{persona_id}/memory"))
        .await;
    assert_eq!(cleared.status, 200, "{cleared:?}");
    let memory = user
        .get(&format!("/api/personas/{persona_id}/memory"))
        .await;
    assert_eq!(memory.body["memory"]["facts"], json!([]));
    assert_eq!(memory.body["memory"]["open_items"], json!([]));
    assert_eq!(memory.body["memory"]["summary"], Value::Null);

    app.stop().await;
    env.cleanup().await;
}
