//! The API answers what its document says: the main flows of the front end, each real answer
//! checked against the generated `/api/openapi.json` (its status documented for the operation,
//! its body valid against the operation's JSON schema). And the PRD's own call flow: a hold
//! for 1 minute, a call with no duration, completed, 65 ¢ captured, a timeline that says what
//! happened.

use crate::common;

use std::time::Duration;

use common::{persona_body, Api, Reply, TestEnv, PASSWORD};
use serde_json::{json, Value};

fn env() -> TestEnv {
    TestEnv::new()
        .set("SIM_TWILIO_RING_MS", "200")
        .set("SIM_TWILIO_CALL_SECONDS", "2")
        .set("SCHEDULER_TICK_MS", "100")
        .set("READ_YOUR_WRITES_MS", "5000")
}

/// The document, and a tally of what was checked.
struct Contract {
    doc: Value,
    checked: Vec<String>,
}

impl Contract {
    async fn of(api: &Api) -> Contract {
        let doc = api.get("/api/openapi.json").await;
        assert_eq!(doc.status, 200);
        Contract {
            doc: doc.body,
            checked: Vec::new(),
        }
    }

    /// Follows `{"$ref": "#/a/b"}` within the document.
    fn resolve<'a>(&'a self, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => r
                .trim_start_matches("#/")
                .split('/')
                .fold(&self.doc, |v, k| &v[k]),
            None => v,
        }
    }

    /// The JSON Schema keywords the generated document uses: `$ref`, `type` (one or several),
    /// `properties`, `required`, `items`, `allOf`, `oneOf`, `anyOf`, `enum`, `minimum`,
    /// `maximum`, `minLength`, `maxLength`, `maxItems`. An unknown keyword fails the test, so
    /// nothing goes unchecked silently.
    fn validate(&self, schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
        let schema = self.resolve(schema);
        let Some(keywords) = schema.as_object() else {
            return;
        };
        for (k, rule) in keywords {
            match k.as_str() {
                "type" => {
                    let types: Vec<&str> = match rule {
                        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                        t => vec![t.as_str().unwrap_or("")],
                    };
                    let fits = |t: &str| match t {
                        "null" => v.is_null(),
                        "boolean" => v.is_boolean(),
                        "object" => v.is_object(),
                        "array" => v.is_array(),
                        "string" => v.is_string(),
                        "number" => v.is_number(),
                        "integer" => v.is_i64() || v.is_u64(),
                        _ => false,
                    };
                    if !types.iter().any(|t| fits(t)) {
                        errors.push(format!("{at}: {v} is not {types:?}"));
                    }
                }
                "properties" => {
                    for (name, sub) in rule.as_object().into_iter().flatten() {
                        if let Some(value) = v.get(name) {
                            self.validate(sub, value, &format!("{at}/{name}"), errors);
                        }
                    }
                }
                "required" => {
                    for name in rule.as_array().into_iter().flatten() {
                        let name = name.as_str().unwrap_or("");
                        if v.is_object() && v.get(name).is_none() {
                            errors.push(format!("{at}: {name} is required"));
                        }
                    }
                }
                "items" => {
                    for (i, item) in v.as_array().into_iter().flatten().enumerate() {
                        self.validate(rule, item, &format!("{at}/{i}"), errors);
                    }
                }
                "allOf" => {
                    for sub in rule.as_array().into_iter().flatten() {
                        self.validate(sub, v, at, errors);
                    }
                }
                "oneOf" | "anyOf" => {
                    let fitting = rule
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|sub| {
                            let mut e = Vec::new();
                            self.validate(sub, v, at, &mut e);
                            e.is_empty()
                        })
                        .count();
                    let ok = if k == "oneOf" {
                        fitting == 1
                    } else {
                        fitting >= 1
                    };
                    if !ok {
                        errors.push(format!("{at}: {v} fits {fitting} of the {k} schemas"));
                    }
                }
                "enum" => {
                    if !rule.as_array().is_some_and(|e| e.contains(v)) {
                        errors.push(format!("{at}: {v} is not one of {rule}"));
                    }
                }
                "minimum" | "maximum" => {
                    if let (Some(n), Some(bound)) = (v.as_f64(), rule.as_f64()) {
                        if (k == "minimum" && n < bound) || (k == "maximum" && n > bound) {
                            errors.push(format!("{at}: {n} is past its {k} {bound}"));
                        }
                    }
                }
                "minLength" | "maxLength" => {
                    if let (Some(s), Some(bound)) = (v.as_str(), rule.as_u64()) {
                        let n = s.chars().count() as u64;
                        if (k == "minLength" && n < bound) || (k == "maxLength" && n > bound) {
                            errors.push(format!("{at}: {s:?} is past its {k} {bound}"));
                        }
                    }
                }
                "maxItems" => {
                    if v.as_array()
                        .is_some_and(|a| a.len() as u64 > rule.as_u64().unwrap_or(0))
                    {
                        errors.push(format!("{at}: more than {rule} items"));
                    }
                }
                // Annotations, and what responses never carry.
                "description"
                | "format"
                | "example"
                | "examples"
                | "title"
                | "default"
                | "additionalProperties"
                | "pattern"
                | "propertyNames"
                | "deprecated"
                | "contentMediaType"
                | "minItems" => {}
                other => errors.push(format!("{at}: the test does not know keyword {other}")),
            }
        }
    }

    /// Asserts that `reply` is an answer `method path` documents, with a valid body.
    fn check(&mut self, method: &str, path: &str, reply: &Reply) {
        let op = &self.doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} is not documented");
        let status = reply.status.to_string();
        let response = op["responses"].get(&status).unwrap_or_else(|| {
            panic!("{method} {path} answered {reply:?}, an undocumented status")
        });
        let response = self.resolve(response);
        if reply.status == 429 {
            let documented = response["headers"]["Retry-After"].is_object();
            assert!(documented, "{method} {path}: 429 documents Retry-After");
            assert!(
                reply.headers.get("retry-after").is_some(),
                "{method} {path}: Retry-After sent"
            );
        }
        let Some(schema) = response["content"]["application/json"].get("schema") else {
            return;
        };
        let mut errors = Vec::new();
        self.validate(schema, &reply.body, "", &mut errors);
        assert!(
            errors.is_empty(),
            "{method} {path} answered {status} with a body its schema refuses: {errors:#?}\n{}",
            reply.body
        );
        self.checked.push(format!("{method} {path} {status}"));
    }
}

#[tokio::test]
async fn the_main_flows_answer_what_the_document_says() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let mut c = Contract::of(&api).await;

    // Anonymous.
    c.check("get", "/healthz", &api.get("/healthz").await);
    let personas = api.get("/api/personas?limit=2&sort=name").await;
    c.check("get", "/api/personas", &personas);
    assert!(
        personas.body["personas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["created_by"] == "system" || p.get("created_by").is_none()),
        "no other user's id: {personas:?}"
    );
    c.check(
        "get",
        "/api/personas",
        &api.get("/api/personas?limit=500").await,
    );
    c.check(
        "get",
        "/api/personas",
        &api.get("/api/personas?search=a").await,
    );
    c.check(
        "get",
        "/api/personas/{id}",
        &api.get("/api/personas/brad_001").await,
    );
    c.check(
        "get",
        "/api/personas/{id}",
        &api.get("/api/personas/nobody").await,
    );
    c.check("get", "/api/calls", &api.get("/api/calls").await);
    c.check(
        "post",
        "/api/auth/register",
        &api.post("/api/auth/register", json!({ "name": "" })).await,
    );
    let not_json = api.send(
        api.request(reqwest::Method::POST, "/api/auth/login")
            .body("email=a"),
    );
    c.check("post", "/api/auth/login", &not_json.await);

    // Signed in.
    let (user, _profile) = api.register(PASSWORD).await;
    c.check("get", "/api/auth/me", &user.get("/api/auth/me").await);
    c.check(
        "put",
        "/api/user/profile",
        &user
            .put("/api/user/profile", json!({ "name": "Ada" }))
            .await,
    );
    let created = user
        .post("/api/personas", persona_body("Contract Coach", true))
        .await;
    c.check("post", "/api/personas", &created);
    let mine = created.body["persona"]["id"].as_str().unwrap().to_string();
    c.check(
        "put",
        "/api/personas/{id}",
        &user
            .put(
                &format!("/api/personas/{mine}"),
                json!({ "tags": ["calm"] }),
            )
            .await,
    );
    c.check(
        "put",
        "/api/personas/{id}",
        &user
            .put("/api/personas/brad_001", json!({ "name": "Bradley" }))
            .await,
    );
    // Another user sees the public persona without its maker's id.
    let (other, _) = api.register(PASSWORD).await;
    let seen = other.get(&format!("/api/personas/{mine}")).await;
    c.check("get", "/api/personas/{id}", &seen);
    assert!(seen.body["persona"].get("created_by").is_none(), "{seen:?}");
    c.check(
        "put",
        "/api/personas/{id}/customization",
        &user
            .put(
                "/api/personas/brad_001/customization",
                json!({ "favorite": true }),
            )
            .await,
    );
    c.check(
        "get",
        "/api/personas/{id}/customization",
        &user.get("/api/personas/brad_001/customization").await,
    );
    c.check(
        "get",
        "/api/personas/{id}/memory",
        &user.get("/api/personas/brad_001/memory").await,
    );
    c.check(
        "post",
        "/api/contacts",
        &user
            .post("/api/contacts", json!({ "persona_id": "sarah_001" }))
            .await,
    );
    c.check("get", "/api/contacts", &user.get("/api/contacts").await);
    c.check(
        "delete",
        "/api/contacts/{persona_id}",
        &user.delete("/api/contacts/sarah_001").await,
    );
    c.check(
        "get",
        "/api/user/budget",
        &user.get("/api/user/budget").await,
    );
    c.check(
        "put",
        "/api/user/budget",
        &user
            .put("/api/user/budget", json!({ "warn_at_percent": 101 }))
            .await,
    );
    c.check(
        "put",
        "/api/user/budget",
        &user
            .put(
                "/api/user/budget",
                json!({ "max_cost_per_call_cents": 5000 }),
            )
            .await,
    );
    // A token issued 16 minutes ago must confirm with the password (documented 403s).
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
    let refused = stale
        .post(
            "/api/user/payment-method",
            json!({ "payment_method_id": "pm_card_visa" }),
        )
        .await;
    assert_eq!(refused.code(), "reauthentication_required", "{refused:?}");
    c.check("post", "/api/user/payment-method", &refused);
    let attached = stale
        .post(
            "/api/user/payment-method",
            json!({ "payment_method_id": "pm_card_visa", "password": PASSWORD }),
        )
        .await;
    c.check("post", "/api/user/payment-method", &attached);
    c.check(
        "get",
        "/api/user/billing",
        &user.get("/api/user/billing").await,
    );
    c.check(
        "post",
        "/api/user/credits",
        &user
            .post("/api/user/credits", json!({ "credits": 100 }))
            .await,
    );

    // The PRD's flow: a hold for 1 minute, then a call with the PRD's inputs and no duration.
    let intent = user
        .post(
            "/api/user/create-payment-intent",
            json!({ "estimated_duration": 1 }),
        )
        .await;
    c.check("post", "/api/user/create-payment-intent", &intent);
    assert_eq!(intent.body["amount"], 65, "{intent:?}");
    let pi = intent.body["payment_intent_id"]
        .as_str()
        .unwrap()
        .to_string();
    let call = user
        .post(
            "/api/call",
            json!({ "phone_number": "+14155550123", "persona_id": "brad_001", "payment_intent_id": pi }),
        )
        .await;
    c.check("post", "/api/call", &call);
    assert_eq!(call.status, 201, "{call:?}");
    assert_eq!(call.body["call"]["duration_minutes"], 1, "{call:?}");
    assert_eq!(call.body["hold"]["amount_cents"], 65);
    let id = call.body["call"]["id"].as_str().unwrap().to_string();
    // Polled every 2 s: the call detail is limited to 60 reads a minute per user.
    let mut done = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut last = Value::Null;
    while std::time::Instant::now() < deadline {
        let r = user.get(&format!("/api/calls/{id}")).await;
        let settled = r.body["payment"]["state"] == "captured"
            && r.body["timeline"]
                .as_array()
                .is_some_and(|t| t.iter().any(|e| e["event_type"] == "CallSettled"));
        if settled {
            done = Some(r);
            break;
        }
        last = r.body;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let Some(done) = done else {
        panic!("the call completed and was settled: {last}");
    };
    c.check("get", "/api/calls/{id}", &done);
    assert_eq!(done.body["call"]["status"], "completed");
    assert_eq!(done.body["payment"]["captured_cents"], 65, "{done:?}");
    assert_eq!(done.body["payment"]["released_cents"], 0);
    let summaries: Vec<&str> = done.body["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["summary"].as_str())
        .collect();
    assert!(
        summaries.iter().any(|s| s.ends_with("→ completed")),
        "a status change says what it changed to: {summaries:#?}"
    );
    assert!(
        summaries
            .iter()
            .any(|s| s.starts_with("settled: 65 ¢ captured")),
        "{summaries:#?}"
    );
    // The story a user reads: the hold and its amount, each provider's usage; every entry
    // names its event and actor; usage lines give quantity and unit, never what it cost us.
    assert!(
        summaries
            .iter()
            .any(|s| s.contains("65 ¢ held on card (pi_")),
        "{summaries:#?}"
    );
    assert!(
        summaries
            .iter()
            .any(|s| s.starts_with("twilio outbound-voice-minutes: 1 minute")),
        "a provider's usage: {summaries:#?}"
    );
    for entry in done.body["timeline"].as_array().unwrap() {
        assert!(entry["event_type"].is_string(), "{entry}");
        assert!(entry["actor"].is_string(), "{entry}");
    }
    let usage = done.body["usage"].as_array().unwrap();
    assert!(!usage.is_empty(), "{done:?}");
    for line in usage {
        assert!(
            line["service"].is_string() && line["unit"].is_string(),
            "{line}"
        );
        assert!(line["quantity"].as_i64().is_some_and(|q| q > 0), "{line}");
    }
    let told = done.body.to_string();
    for internal in ["margin", "micros", "unit_cost", "per_units"] {
        assert!(
            !told.contains(internal),
            "{internal} stays internal: {told}"
        );
    }
    // A duration the hold does not cover: 402 saying how much is missing.
    let small = user
        .post(
            "/api/user/create-payment-intent",
            json!({ "estimated_duration": 1 }),
        )
        .await;
    let pi = small.body["payment_intent_id"]
        .as_str()
        .unwrap()
        .to_string();
    let short = user
        .post(
            "/api/call",
            json!({ "persona_id": "brad_001", "payment_intent_id": pi, "duration_minutes": 3 }),
        )
        .await;
    c.check("post", "/api/call", &short);
    assert_eq!(short.status, 402);
    assert!(
        short.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("80 cents missing"),
        "{short:?}"
    );
    // The same intent, no duration, scheduled: a 1-minute call; then cancelled.
    let at = (chrono::Utc::now() + chrono::Duration::hours(2)).to_rfc3339();
    let scheduled = user
        .post(
            "/api/calls/schedule",
            json!({ "persona_id": "sarah_001", "payment_intent_id": pi, "scheduled_time": at }),
        )
        .await;
    c.check("post", "/api/calls/schedule", &scheduled);
    assert_eq!(
        scheduled.body["call"]["duration_minutes"], 1,
        "{scheduled:?}"
    );
    let sid = scheduled.body["call"]["id"].as_str().unwrap().to_string();
    c.check(
        "get",
        "/api/calls/scheduled",
        &user.get("/api/calls/scheduled").await,
    );
    c.check(
        "get",
        "/api/calls/scheduled",
        &user.get("/api/calls/scheduled?sort=sideways").await,
    );
    c.check(
        "delete",
        "/api/calls/schedule/{id}",
        &user.delete(&format!("/api/calls/schedule/{sid}")).await,
    );
    c.check(
        "get",
        "/api/calls",
        &user
            .get("/api/calls?limit=5&sort=newest&from_date=2026-01-01")
            .await,
    );
    c.check("get", "/api/calls", &user.get("/api/calls?limit=101").await);
    c.check(
        "get",
        "/api/calls/{id}",
        &user.get("/api/calls/not-a-call").await,
    );
    c.check(
        "get",
        "/api/user/usage",
        &user.get("/api/user/usage?months=2").await,
    );
    c.check(
        "delete",
        "/api/personas/{id}",
        &user.delete(&format!("/api/personas/{mine}")).await,
    );
    c.check(
        "post",
        "/api/auth/logout",
        &user.post("/api/auth/logout", json!({})).await,
    );
    c.check("get", "/api/auth/me", &user.get("/api/auth/me").await);

    // Over a limit: 429 with Retry-After (login: 5 a minute per address).
    let stranger = api.elsewhere();
    let mut last = None;
    for _ in 0..6 {
        last = Some(
            stranger
                .post(
                    "/api/auth/login",
                    json!({ "email": "nobody@example.com", "password": "x" }),
                )
                .await,
        );
    }
    let last = last.unwrap();
    assert_eq!(last.status, 429, "{last:?}");
    c.check("post", "/api/auth/login", &last);

    assert!(c.checked.len() >= 40, "{:#?}", c.checked);
    app.stop().await;
    env.cleanup().await;
}

/// Front ends send an unset filter as an empty parameter (`status=`): it counts as absent. And
/// Twilio's form webhooks refuse another media type with our JSON error, as the JSON routes do.
#[tokio::test]
async fn empty_filters_count_as_absent_and_form_webhooks_answer_json_errors() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, _) = api.register(PASSWORD).await;
    for path in [
        "/api/calls?page=&limit=&status=&sort=&from_date=&to_date=",
        "/api/calls/scheduled?status=&sort=",
        "/api/personas?search=&tags=&created_by=&sort=",
    ] {
        let reply = user.get(path).await;
        assert_eq!(reply.status, 200, "{path}: {reply:?}");
    }
    // A value that is there is still checked: a bad one is a 400 naming its parameter.
    for (path, field) in [
        ("/api/calls?status=nope", "status"),
        ("/api/calls?page=0", "page"),
        ("/api/calls?limit=101", "limit"),
        ("/api/calls?sort=sideways", "sort"),
        ("/api/calls?from_date=yesterday", "from_date"),
        ("/api/calls?to_date=2026-13-45", "to_date"),
        ("/api/calls/scheduled?status=nope", "status"),
        ("/api/calls/scheduled?sort=sideways", "sort"),
        ("/api/personas?page=0", "page"),
        ("/api/personas?limit=101", "limit"),
        ("/api/personas?search=a", "search"),
        ("/api/personas?sort=sideways", "sort"),
        ("/api/personas?created_by=nobody", "created_by"),
        ("/api/personas?is_public=perhaps", "is_public"),
    ] {
        let bad = user.get(path).await;
        assert_eq!(bad.status, 400, "{path}: {bad:?}");
        assert_eq!(bad.body["error"]["field"], field, "{path}: {bad:?}");
    }
    // Totals for paging.
    let page = user.get("/api/personas?limit=1").await;
    assert!(
        page.body["pagination"]["total"].as_i64().unwrap() >= 1,
        "{page:?}"
    );
    let calls = user.get("/api/calls?limit=1").await;
    assert!(calls.body["pagination"]["total"].is_i64(), "{calls:?}");
    let scheduled = user.get("/api/calls/scheduled").await;
    assert!(scheduled.body["total"].is_u64(), "{scheduled:?}");

    let http = reqwest::Client::new();
    for hook in ["answer", "callback"] {
        let reply = http
            .post(format!(
                "http://{}/api/twilio/{hook}?call_id={}",
                app.addr,
                uuid::Uuid::now_v7()
            ))
            .json(&json!({ "CallSid": "CA1" }))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 415, "{hook}");
        let body: Value = reply.json().await.expect("a JSON error");
        assert_eq!(body["error"]["code"], "unsupported_media_type", "{hook}");
    }
    env.cleanup().await;
}
