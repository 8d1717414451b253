//! Steps of a call for the tests to read as given / when / then: ask for a call now or
//! schedule one (when), then wait for what the product records of it (then). Every wait is
//! generous (the machine is loaded) and watches the database, never the rate-limited API.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;

use super::{eventually, Api, Reply};

/// The body of `POST /api/call`: `minutes` of `persona_id`, paid with credits, to the account's
/// own number.
pub fn call_body(persona_id: &str, minutes: u32) -> Value {
    json!({ "persona_id": persona_id, "use_credits": true, "duration": minutes })
}

/// When `user` asks for a call now ([`call_body`]): its id. The request must be accepted.
pub async fn request_call(user: &Api, persona_id: &str, minutes: u32) -> String {
    let reply = user.post("/api/call", call_body(persona_id, minutes)).await;
    assert_eq!(reply.status, 201, "{reply:?}");
    reply.body["call"]["id"]
        .as_str()
        .expect("a call id")
        .to_string()
}

/// When `user` schedules the call `body` (as `POST /api/call` takes it, a `timezone` beside it
/// if any) for `time`: the answer, accepted or not. (The future borrows only `user`, so a test
/// can wrap it in a closure.)
pub fn schedule_call<'a>(
    user: &'a Api,
    mut body: Value,
    time: &str,
) -> impl std::future::Future<Output = Reply> + 'a {
    body["scheduled_time"] = json!(time);
    user.post("/api/calls/schedule", body)
}

/// How many `event_type` events the aggregate `id` has recorded.
pub async fn count_events(pool: &PgPool, id: &str, event_type: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = $2")
        .bind(id)
        .bind(event_type)
        .fetch_one(pool)
        .await
        .expect("events counted")
}

/// Then call `id` records `event_type` (within a minute): whether it did.
pub async fn wait_for_event(pool: &PgPool, id: &str, event_type: &str) -> bool {
    eventually(Duration::from_secs(60), || async {
        (count_events(pool, id, event_type).await >= 1).then_some(())
    })
    .await
    .is_some()
}

/// Then call `id` ends as `status` and is settled (what it cost taken, the rest released), as
/// the calls read model shows it (within a minute): whether it did.
pub async fn wait_for_settlement(pool: &PgPool, id: &str, status: &str) -> bool {
    wait_for_status(pool, id, status, true).await
}

/// Then the calls read model shows call `id` as `status` (and settled, if `settled`), within a
/// minute: whether it did.
pub async fn wait_for_status(pool: &PgPool, id: &str, status: &str, settled: bool) -> bool {
    eventually(Duration::from_secs(60), || async {
        let row: Option<(String, Option<i64>)> =
            sqlx::query_as("SELECT status, charged_cents FROM rm_calls WHERE id = $1::uuid")
                .bind(id)
                .fetch_optional(pool)
                .await
                .expect("the calls read model");
        row.filter(|(s, charged)| s == status && (!settled || charged.is_some()))
    })
    .await
    .is_some()
}
