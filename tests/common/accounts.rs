//! Steps of an account for the privacy tests (given / when / then): a user with credits, a
//! persona of theirs, a document it knows, a call whose transcript was saved; the erasure.

use std::time::Duration;

use callmeback::app::Running;
use serde_json::{json, Value};
use sqlx::PgPool;

use super::{eventually, grant, persona_body, Api, Reply, PASSWORD};

/// Given a freshly registered user granted `credits`: a client signed in as them, and their
/// profile (`id`, `email`, `phone`, …).
pub async fn user_with_credits(app: &Running, api: &Api, credits: i64) -> (Api, Value) {
    let (user, profile) = api.register(PASSWORD).await;
    grant(app, &profile, credits).await;
    (user, profile)
}

/// Given `user`'s new persona `name` (public or not): its id. Must be accepted.
pub async fn create_persona(user: &Api, name: &str, public: bool) -> String {
    let persona = user.post("/api/personas", persona_body(name, public)).await;
    assert_eq!(persona.status, 201, "{persona:?}");
    persona.body["persona"]["id"]
        .as_str()
        .expect("a persona id")
        .to_string()
}

/// Given a Markdown document `content` added to `user`'s persona `persona_id`: its id. Must be
/// accepted.
pub async fn add_document(user: &Api, persona_id: &str, title: &str, content: &str) -> String {
    let added = user
        .post(
            &format!("/api/personas/{persona_id}/knowledge"),
            json!({ "title": title, "content": content }),
        )
        .await;
    assert_eq!(added.status, 202, "{added:?}");
    added.body["document"]["id"]
        .as_str()
        .expect("a document id")
        .to_string()
}

/// How many transcript lines call `call_id` has (saying `said`, if given).
pub async fn transcript_lines(pool: &PgPool, call_id: &str, said: Option<&str>) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM call_transcripts
          WHERE call_id = $1::uuid AND ($2::text IS NULL OR text = $2)",
    )
    .bind(call_id)
    .bind(said)
    .fetch_one(pool)
    .await
    .expect("transcripts counted")
}

/// Then call `call_id`'s transcript is saved (with a line saying `said`, if given), within
/// 90 s: whether it was.
pub async fn wait_for_transcript(pool: &PgPool, call_id: &str, said: Option<&str>) -> bool {
    eventually(Duration::from_secs(90), || async {
        (transcript_lines(pool, call_id, said).await > 0).then_some(())
    })
    .await
    .is_some()
}

/// When `user` erases their account with their password: the answer.
pub async fn erase(user: &Api) -> Reply {
    user.delete_json("/api/user", json!({ "password": PASSWORD }))
        .await
}
