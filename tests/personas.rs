//! Personas, customisation and contacts over HTTP against real Postgres and NATS.

use crate::common;

use std::time::Duration;

use common::{persona_body, Api, TestEnv, PASSWORD};
use serde_json::json;

fn ids(reply: &common::Reply) -> Vec<String> {
    reply.body["personas"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn system_personas_exist_and_are_read_only() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let list = api.get("/api/personas?created_by=system&sort=name").await;
    assert_eq!(list.status, 200, "{list:?}");
    assert_eq!(ids(&list), ["alex_001", "brad_001", "sarah_001"]);
    let brad = api.get("/api/personas/brad_001").await;
    assert_eq!(brad.body["persona"]["voice_id"], "pNInz6obpgDQGcFmaJgB");
    assert_eq!(brad.body["persona"]["is_system"], true);
    let sarah = api.get("/api/personas/sarah_001").await;
    assert_eq!(sarah.body["persona"]["voice_id"], "EXAVITQu4vr4xnSDxMaL");

    let (user, _) = api.register(PASSWORD).await;
    let edit = user
        .put("/api/personas/brad_001", json!({ "name": "Bradley" }))
        .await;
    assert_eq!(edit.status, 403, "{edit:?}");
    let delete = user.delete("/api/personas/brad_001").await;
    assert_eq!(delete.status, 403, "{delete:?}");
    app.stop().await;

    // A restart defines them again without changing anything.
    let app = env.spawn_app().await;
    let again = Api::new(app.addr)
        .get("/api/personas?created_by=system")
        .await;
    assert_eq!(again.body["pagination"]["total"], 3);
    // Their built-in libraries' documents are indexed by a worker, at its own pace: counted
    // apart.
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'persona'
           AND event_type NOT IN ('KnowledgeDocumentIndexed', 'KnowledgeDocumentIndexingFailed')",
    )
    .fetch_one(&app.state.pool)
    .await
    .unwrap();
    let documents: usize = cmb_domain::persona::system::system_personas()
        .iter()
        .map(|p| cmb_domain::knowledge::library::library(p.id).len())
        .sum();
    assert_eq!(
        events,
        3 + documents as i64,
        "one creation and one library each, nothing more"
    );
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn users_see_and_change_only_what_is_theirs() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (ann, _) = api.register(PASSWORD).await;
    let (bob, _) = api.register(PASSWORD).await;

    let private = ann
        .post("/api/personas", persona_body("Ann Private", false))
        .await;
    assert_eq!(private.status, 201, "{private:?}");
    let private_id = private.body["persona"]["id"].as_str().unwrap().to_string();
    let public = ann
        .post("/api/personas", persona_body("Ann Public", true))
        .await;
    let public_id = public.body["persona"]["id"].as_str().unwrap().to_string();

    // Listing: Ann sees both; Bob and anonymous see the public one, without its prompt.
    let mine = ann.get("/api/personas?created_by=me").await;
    assert_eq!(mine.body["pagination"]["total"], 2, "{mine:?}");
    for viewer in [&bob, &api] {
        let seen = ids(&viewer.get("/api/personas?limit=100").await);
        assert!(
            seen.contains(&public_id) && !seen.contains(&private_id),
            "{seen:?}"
        );
        let one = viewer.get(&format!("/api/personas/{public_id}")).await;
        assert_eq!(one.status, 200);
        assert!(
            one.body["persona"]["system_prompt"].is_null(),
            "someone else's prompt is theirs"
        );
        assert_eq!(
            viewer
                .get(&format!("/api/personas/{private_id}"))
                .await
                .status,
            404
        );
    }

    // Changing: Bob gets 403 on the public one, 404 on the private one.
    let body = json!({ "description": "Bob was here, changing things." });
    assert_eq!(
        bob.put(&format!("/api/personas/{public_id}"), body.clone())
            .await
            .status,
        403
    );
    assert_eq!(
        bob.put(&format!("/api/personas/{private_id}"), body.clone())
            .await
            .status,
        404
    );
    assert_eq!(
        bob.delete(&format!("/api/personas/{public_id}"))
            .await
            .status,
        403
    );
    assert_eq!(
        bob.delete(&format!("/api/personas/{private_id}"))
            .await
            .status,
        404
    );
    assert_eq!(
        bob.get(&format!("/api/personas/{private_id}/customization"))
            .await
            .status,
        404
    );
    assert_eq!(
        bob.post("/api/contacts", json!({ "persona_id": private_id }))
            .await
            .status,
        404
    );
    let edited = ann.put(&format!("/api/personas/{private_id}"), body).await;
    assert_eq!(edited.status, 200, "{edited:?}");
    assert_eq!(
        edited.body["persona"]["description"],
        "Bob was here, changing things."
    );

    // Contacts are per user.
    assert_eq!(
        ann.post("/api/contacts", json!({ "persona_id": "brad_001" }))
            .await
            .status,
        201
    );
    let bobs = bob.get("/api/contacts").await;
    assert_eq!(bobs.body["contacts"].as_array().unwrap().len(), 0);
    assert_eq!(bob.delete("/api/contacts/brad_001").await.status, 404);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn persona_rules_names_limit_voices_and_search() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (ann, _) = api.register(PASSWORD).await;

    for (field, value) in [
        ("name", json!("ab")),
        ("description", json!("short")),
        ("system_prompt", json!("too short")),
        ("voice", json!("no such voice!")),
        (
            "tags",
            json!((0..11).map(|i| format!("t{i}")).collect::<Vec<_>>()),
        ),
    ] {
        let mut body = persona_body("Valid Name", true);
        body[field] = value;
        let reply = ann.post("/api/personas", body).await;
        assert_eq!(reply.status, 400, "{field}: {reply:?}");
        assert_eq!(reply.field(), field, "{reply:?}");
    }
    // A well-formed id that ElevenLabs does not know.
    let mut body = persona_body("Valid Name", true);
    body["voice"] = json!("UnknownVoice000000000");
    let reply = ann.post("/api/personas", body).await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(reply.field(), "voice");

    let first = ann
        .post("/api/personas", persona_body("Night Owl", true))
        .await;
    assert_eq!(first.status, 201, "{first:?}");
    let dup = ann
        .post("/api/personas", persona_body("night owl", true))
        .await;
    assert_eq!(dup.status, 409, "{dup:?}");
    assert_eq!(dup.field(), "name");
    // Another user may use the name.
    let (bob, _) = api.register(PASSWORD).await;
    assert_eq!(
        bob.post("/api/personas", persona_body("Night Owl", true))
            .await
            .status,
        201
    );

    for i in 2..=10 {
        let reply = ann
            .post(
                "/api/personas",
                persona_body(&format!("Persona {i}"), i % 2 == 0),
            )
            .await;
        assert_eq!(reply.status, 201, "{i}: {reply:?}");
    }
    let eleventh = ann
        .post("/api/personas", persona_body("One Too Many", true))
        .await;
    assert_eq!(eleventh.status, 429, "{eleventh:?}");
    assert_eq!(eleventh.code(), "persona_limit_reached");
    // Deleting one frees a place and the name.
    let id = first.body["persona"]["id"].as_str().unwrap();
    assert_eq!(ann.delete(&format!("/api/personas/{id}")).await.status, 200);
    assert_eq!(ann.get(&format!("/api/personas/{id}")).await.status, 404);
    assert_eq!(
        ann.post("/api/personas", persona_body("Night Owl", true))
            .await
            .status,
        201
    );

    // Renaming to a taken name is refused; renaming frees the old one.
    let p2 = ids(&ann
        .get("/api/personas?created_by=me&search=Persona%202")
        .await);
    assert_eq!(p2.len(), 1);
    let clash = ann
        .put(
            &format!("/api/personas/{}", p2[0]),
            json!({ "name": "NIGHT OWL" }),
        )
        .await;
    assert_eq!(clash.status, 409, "{clash:?}");
    let renamed = ann
        .put(
            &format!("/api/personas/{}", p2[0]),
            json!({ "name": "Early Bird" }),
        )
        .await;
    assert_eq!(renamed.status, 200, "{renamed:?}");

    // Listing rules.
    assert_eq!(api.get("/api/personas?search=a").await.status, 400);
    assert_eq!(api.get("/api/personas?limit=101").await.status, 400);
    assert_eq!(api.get("/api/personas?sort=sideways").await.field(), "sort");
    let owls = api.get("/api/personas?search=OWL").await;
    assert_eq!(owls.body["pagination"]["total"], 2, "{owls:?}");
    let percent = api.get("/api/personas?search=%25%25").await;
    assert_eq!(
        percent.body["pagination"]["total"], 0,
        "a % is a character, not a wildcard"
    );
    let tagged = api.get("/api/personas?tags=coach,nothing").await;
    assert!(ids(&tagged).contains(&"brad_001".to_string()), "{tagged:?}");
    let page = api.get("/api/personas?limit=2&page=2&sort=name").await;
    assert_eq!(page.body["personas"].as_array().unwrap().len(), 2);
    assert_eq!(page.body["pagination"]["page"], 2);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn contacts_add_list_remove_and_leave_with_a_deleted_persona() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (ann, _) = api.register(PASSWORD).await;
    let (bob, _) = api.register(PASSWORD).await;

    let created = ann
        .post("/api/personas", persona_body("Shared Friend", true))
        .await;
    let shared = created.body["persona"]["id"].as_str().unwrap().to_string();

    for id in ["brad_001", "sarah_001", shared.as_str()] {
        let reply = bob.post("/api/contacts", json!({ "persona_id": id })).await;
        assert_eq!(reply.status, 201, "{reply:?}");
        assert_eq!(reply.body["contact"]["persona"]["id"], id);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let dup = bob
        .post("/api/contacts", json!({ "persona_id": "brad_001" }))
        .await;
    assert_eq!(dup.status, 400, "{dup:?}");
    let missing = bob
        .post("/api/contacts", json!({ "persona_id": "nobody_001" }))
        .await;
    assert_eq!(missing.status, 404, "{missing:?}");

    let list = bob.get("/api/contacts").await;
    let order: Vec<&str> = list.body["contacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["persona"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        order,
        [shared.as_str(), "sarah_001", "brad_001"],
        "newest first"
    );
    assert_eq!(list.body["contacts"][1]["persona"]["name"], "Sarah");

    assert_eq!(bob.delete("/api/contacts/sarah_001").await.status, 200);
    assert_eq!(bob.delete("/api/contacts/sarah_001").await.status, 404);

    // Ann deletes her persona: it leaves Bob's contacts, by the worker, through the stream.
    assert_eq!(
        ann.delete(&format!("/api/personas/{shared}")).await.status,
        200
    );
    let gone = common::eventually(Duration::from_secs(10), || async {
        let removed: Option<String> = sqlx::query_scalar(
            "SELECT payload -> 'ContactRemoved' ->> 'reason' FROM events
              WHERE aggregate_type = 'contacts' AND payload -> 'ContactRemoved' ->> 'persona_id' = $1",
        )
        .bind(&shared)
        .fetch_optional(&app.state.pool)
        .await
        .unwrap();
        removed
    })
    .await;
    assert_eq!(gone.as_deref(), Some("persona_deleted"));
    let list = bob.get("/api/contacts").await;
    assert_eq!(
        list.body["contacts"].as_array().unwrap().len(),
        1,
        "{list:?}"
    );
    // And Bob can add Sarah again (the removal was real).
    assert_eq!(
        bob.post("/api/contacts", json!({ "persona_id": "sarah_001" }))
            .await
            .status,
        201
    );
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn customisation_of_any_visible_persona() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (ann, _) = api.register(PASSWORD).await;
    let default = ann.get("/api/personas/brad_001/customization").await;
    assert_eq!(default.status, 200, "{default:?}");
    assert_eq!(default.body["customization"]["favorite"], false);
    assert_eq!(default.body["customization"]["memory_enabled"], true);

    let set = ann
        .put(
            "/api/personas/brad_001/customization",
            json!({ "custom_prompt": "Call me Captain. ✨", "voice_override": "21m00Tcm4TlvDq8ikWAM", "favorite": true }),
        )
        .await;
    assert_eq!(set.status, 200, "{set:?}");
    assert_eq!(
        set.body["customization"]["custom_prompt"],
        "Call me Captain. ✨"
    );
    assert_eq!(set.body["customization"]["favorite"], true);
    let partial = ann
        .put(
            "/api/personas/brad_001/customization",
            json!({ "custom_prompt": "" }),
        )
        .await;
    assert!(partial.body["customization"]["custom_prompt"].is_null());
    assert_eq!(
        partial.body["customization"]["voice_override"],
        "21m00Tcm4TlvDq8ikWAM"
    );
    let bad_voice = ann
        .put(
            "/api/personas/brad_001/customization",
            json!({ "voice_override": "UnknownVoice000000000" }),
        )
        .await;
    assert_eq!(bad_voice.status, 400);
    assert_eq!(bad_voice.field(), "voice_override");
    // Another user's view is their own.
    let (bob, _) = api.register(PASSWORD).await;
    let bobs = bob.get("/api/personas/brad_001/customization").await;
    assert_eq!(bobs.body["customization"]["favorite"], false);
    app.stop().await;
    env.cleanup().await;
}
