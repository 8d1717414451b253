//! The OpenAPI 3.1 document of every endpoint (`/api/openapi.json`) and an interactive page
//! (`/docs`) that reads it and sends requests, with no assets from elsewhere.

use axum::response::{Html, IntoResponse};
use serde_json::{json, Value};

struct Op {
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    auth: Auth,
    body: Option<Value>,
    params: &'static [(&'static str, &'static str, &'static str)],
    ok: u16,
    errors: &'static [u16],
    limit: &'static str,
}

#[derive(PartialEq)]
enum Auth {
    None,
    Optional,
    Required,
}

fn schema(props: &[(&str, Value)], required: &[&str]) -> Value {
    let properties: serde_json::Map<String, Value> = props
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    json!({ "type": "object", "properties": properties, "required": required })
}

fn s(description: &str) -> Value {
    json!({ "type": "string", "description": description })
}

fn operations() -> Vec<Op> {
    let persona_fields = || {
        vec![
            ("name", s("3–50 characters, unique among your personas")),
            ("description", s("10–500 characters")),
            ("voice", s("an ElevenLabs voice id (alias: voice_id)")),
            ("system_prompt", s("20–2000 characters")),
            (
                "greeting",
                s("1–300 characters; what the persona says first"),
            ),
            ("is_public", json!({ "type": "boolean" })),
            (
                "tags",
                json!({ "type": "array", "items": { "type": "string" }, "maxItems": 10 }),
            ),
            (
                "turn_taking",
                schema(
                    &[
                        ("endpointing_ms", json!({ "type": "integer" })),
                        ("silence_reminder_ms", json!({ "type": "integer" })),
                        ("silence_hangup_ms", json!({ "type": "integer" })),
                    ],
                    &["endpointing_ms", "silence_reminder_ms", "silence_hangup_ms"],
                ),
            ),
        ]
    };
    vec![
        Op {
            method: "post",
            path: "/api/auth/register",
            summary: "Create an account; answers the user and a token",
            auth: Auth::None,
            body: Some(schema(
                &[
                    ("name", s("1–100 characters")),
                    ("email", s("an email address; stored lower-case")),
                    (
                        "password",
                        s("8–128 characters with upper, lower, digit and symbol; any Unicode"),
                    ),
                    ("phone", s("E.164, e.g. +14155550123")),
                ],
                &["name", "email", "password", "phone"],
            )),
            params: &[],
            ok: 201,
            errors: &[400, 409, 413, 415, 429],
            limit: "3/hour per IP",
        },
        Op {
            method: "post",
            path: "/api/auth/login",
            summary: "Sign in; 10 failures in a row lock the account for 30 minutes",
            auth: Auth::None,
            body: Some(schema(
                &[("email", s("")), ("password", s(""))],
                &["email", "password"],
            )),
            params: &[],
            ok: 200,
            errors: &[400, 401, 429],
            limit: "5/min per IP",
        },
        Op {
            method: "post",
            path: "/api/auth/logout",
            summary: "Revoke the token used",
            auth: Auth::Required,
            body: None,
            params: &[],
            ok: 200,
            errors: &[401, 429],
            limit: "10/min per user",
        },
        Op {
            method: "get",
            path: "/api/auth/me",
            summary: "The signed-in user",
            auth: Auth::Required,
            body: None,
            params: &[],
            ok: 200,
            errors: &[401, 429],
            limit: "30/min per user",
        },
        Op {
            method: "put",
            path: "/api/user/profile",
            summary: "Change name, email or phone",
            auth: Auth::Required,
            body: Some(schema(
                &[("name", s("")), ("email", s("")), ("phone", s("E.164"))],
                &[],
            )),
            params: &[],
            ok: 200,
            errors: &[400, 401, 409, 429],
            limit: "10/min per user",
        },
        Op {
            method: "get",
            path: "/api/personas",
            summary: "Public personas and your own, paginated",
            auth: Auth::Optional,
            body: None,
            params: &[
                ("page", "integer", "1 or more (default 1)"),
                ("limit", "integer", "1–100 (default 20)"),
                (
                    "search",
                    "string",
                    "at least 2 characters; name and description",
                ),
                ("tags", "string", "comma-separated; any of them"),
                ("is_public", "boolean", ""),
                ("created_by", "string", "system, me, or a user id"),
                ("sort", "string", "popular (default), newest, oldest, name"),
            ],
            ok: 200,
            errors: &[400, 401, 429],
            limit: "60/min anonymous, 120/min signed in",
        },
        Op {
            method: "post",
            path: "/api/personas",
            summary: "Create a persona (10 per free account)",
            auth: Auth::Required,
            body: Some(schema(
                &persona_fields(),
                &["name", "description", "voice", "system_prompt"],
            )),
            params: &[],
            ok: 201,
            errors: &[400, 401, 409, 429, 503],
            limit: "20/hour per user",
        },
        Op {
            method: "get",
            path: "/api/personas/{id}",
            summary: "One persona you can see",
            auth: Auth::Optional,
            body: None,
            params: &[],
            ok: 200,
            errors: &[404, 429],
            limit: "as the list",
        },
        Op {
            method: "put",
            path: "/api/personas/{id}",
            summary: "Change your persona (all fields optional); system personas are read-only",
            auth: Auth::Required,
            body: Some(schema(&persona_fields(), &[])),
            params: &[],
            ok: 200,
            errors: &[400, 401, 403, 404, 409, 429],
            limit: "30/hour per user",
        },
        Op {
            method: "delete",
            path: "/api/personas/{id}",
            summary: "Delete your persona; it leaves every contact list",
            auth: Auth::Required,
            body: None,
            params: &[],
            ok: 200,
            errors: &[401, 403, 404, 429],
            limit: "20/hour per user",
        },
        Op {
            method: "get",
            path: "/api/personas/{id}/customization",
            summary: "Your customisation of a persona you can see",
            auth: Auth::Required,
            body: None,
            params: &[],
            ok: 200,
            errors: &[401, 404, 429],
            limit: "30/min per user",
        },
        Op {
            method: "put",
            path: "/api/personas/{id}/customization",
            summary: "Set your custom prompt, voice, favourite mark and memory switch",
            auth: Auth::Required,
            body: Some(schema(
                &[
                    ("custom_prompt", s("up to 1000 characters; empty clears")),
                    ("voice_override", s("ElevenLabs voice id; empty clears")),
                    ("favorite", json!({ "type": "boolean" })),
                    ("memory_enabled", json!({ "type": "boolean" })),
                ],
                &[],
            )),
            params: &[],
            ok: 200,
            errors: &[400, 401, 404, 429],
            limit: "30/min per user",
        },
        Op {
            method: "get",
            path: "/api/personas/{id}/memory",
            summary: "What this persona remembers about you: summary, facts (with their source call and date), open items",
            auth: Auth::Required,
            body: None,
            params: &[],
            ok: 200,
            errors: &[401, 404, 429],
            limit: "30/min per user",
        },
        Op {
            method: "delete",
            path: "/api/personas/{id}/memory",
            summary: "Forget everything this persona remembers about you",
            auth: Auth::Required,
            body: None,
            params: &[],
            ok: 200,
            errors: &[401, 404, 429],
            limit: "30/min per user",
        },
        Op {
            method: "delete",
            path: "/api/personas/{id}/memory/{item_id}",
            summary: "Forget one fact or open item (or the summary, as item `summary`)",
            auth: Auth::Required,
            body: None,
            params: &[],
            ok: 200,
            errors: &[401, 404, 429],
            limit: "30/min per user",
        },
        Op {
            method: "post",
            path: "/api/personas/{id}/knowledge",
            summary: "Add a document your persona draws on in calls (JSON, or multipart with `file`: text, Markdown, HTML, PDF; 5 MiB, 20 per persona)",
            auth: Auth::Required,
            body: Some(schema(
                &[
                    ("title", s("up to 120 characters; default: the file name or first words")),
                    ("format", s("text, markdown (default), html or pdf")),
                    ("content", s("the text")),
                    ("content_base64", s("the file's bytes, base64")),
                ],
                &[],
            )),
            params: &[],
            ok: 202,
            errors: &[400, 401, 403, 404, 409, 413, 415, 429],
            limit: "30/hour per user",
        },
        Op {
            method: "get",
            path: "/api/personas/{id}/knowledge",
            summary: "A persona's documents: yours with their indexing status, a public or system persona's titles",
            auth: Auth::Required,
            body: None,
            params: &[],
            ok: 200,
            errors: &[401, 404, 429],
            limit: "120/min per user",
        },
        Op {
            method: "delete",
            path: "/api/personas/{id}/knowledge/{doc}",
            summary: "Remove a document from your persona; the next call no longer has it",
            auth: Auth::Required,
            body: None,
            params: &[],
            ok: 200,
            errors: &[401, 403, 404, 429],
            limit: "30/hour per user",
        },
        Op {
            method: "get",
            path: "/api/contacts",
            summary: "Your contacts, newest first, with their personas",
            auth: Auth::Required,
            body: None,
            params: &[],
            ok: 200,
            errors: &[401, 429],
            limit: "60/min per user",
        },
        Op {
            method: "post",
            path: "/api/contacts",
            summary: "Add a persona you can see (at most 50)",
            auth: Auth::Required,
            body: Some(schema(&[("persona_id", s(""))], &["persona_id"])),
            params: &[],
            ok: 201,
            errors: &[400, 401, 404, 429],
            limit: "30/min per user",
        },
        Op {
            method: "delete",
            path: "/api/contacts/{persona_id}",
            summary: "Remove a contact",
            auth: Auth::Required,
            body: None,
            params: &[],
            ok: 200,
            errors: &[401, 404, 429],
            limit: "30/min per user",
        },
        Op {
            method: "get",
            path: "/healthz",
            summary: "Liveness",
            auth: Auth::None,
            body: None,
            params: &[],
            ok: 200,
            errors: &[],
            limit: "none",
        },
        Op {
            method: "get",
            path: "/readyz",
            summary: "Readiness: Postgres, NATS, publisher and projection lag",
            auth: Auth::None,
            body: None,
            params: &[],
            ok: 200,
            errors: &[503],
            limit: "none",
        },
        Op {
            method: "get",
            path: "/metrics",
            summary: "Prometheus metrics",
            auth: Auth::None,
            body: None,
            params: &[],
            ok: 200,
            errors: &[],
            limit: "none",
        },
    ]
}

pub fn spec() -> Value {
    let mut paths = serde_json::Map::new();
    for op in operations() {
        let mut parameters: Vec<Value> = op
            .params
            .iter()
            .map(|(name, ty, description)| {
                json!({ "name": name, "in": "query", "description": description, "schema": { "type": ty } })
            })
            .collect();
        for segment in op.path.split('/') {
            if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                parameters.push(json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }));
            }
        }
        let mut responses = serde_json::Map::new();
        responses.insert(op.ok.to_string(), json!({ "description": "success" }));
        for code in op.errors {
            responses.insert(
                code.to_string(),
                json!({ "$ref": "#/components/responses/Error" }),
            );
        }
        let mut operation = json!({
            "summary": op.summary,
            "description": format!("Rate limit: {}.", op.limit),
            "parameters": parameters,
            "responses": responses,
        });
        match op.auth {
            Auth::Required => operation["security"] = json!([{ "bearer": [] }]),
            Auth::Optional => operation["security"] = json!([{}, { "bearer": [] }]),
            Auth::None => {}
        }
        if let Some(body) = op.body {
            operation["requestBody"] =
                json!({ "required": true, "content": { "application/json": { "schema": body } } });
        }
        paths
            .entry(op.path.to_string())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("a path item")
            .insert(op.method.to_string(), operation);
    }
    json!({
        "openapi": "3.1.0",
        "info": { "title": "Call Me Back API", "version": env!("CARGO_PKG_VERSION"),
                  "description": "AI personas that call you back. Errors are {\"error\": {\"code\", \"message\", \"field\"?}}." },
        "paths": paths,
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT" } },
            "responses": { "Error": { "description": "an error", "content": { "application/json": { "schema": {
                "type": "object", "properties": { "error": { "type": "object", "properties": {
                    "code": { "type": "string" }, "message": { "type": "string" }, "field": { "type": "string" } },
                    "required": ["code", "message"] } } } } } } }
        }
    })
}

pub async fn document() -> impl IntoResponse {
    axum::Json(spec())
}

pub async fn docs_page() -> impl IntoResponse {
    Html(include_str!("docs.html"))
}
