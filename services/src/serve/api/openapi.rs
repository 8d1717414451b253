//! The OpenAPI 3.1 document (`/api/openapi.json`) and an interactive page (`/docs`) that reads
//! it and sends requests, with no assets from elsewhere.
//!
//! The document is generated: every route is registered with `utoipa_axum::routes!` from a
//! handler's `#[utoipa::path]` (method, path, parameters, body and answers from its Rust types),
//! so a route and its description are one entry; rate limits are written in by the layer that
//! enforces them (`http::ratelimit::limited`). `finish` adds what follows from the operation's
//! shape, the same for all: a JSON body can be refused with 400/413/415, query parameters with
//! 400 (and may be sent empty, meaning left out), a bearer token with 401, and any operation with 503 (the server's concurrency cap
//! and every request's deadline, `http::guard`). The test in `serve::http::tests` compares the router with the
//! document.

use std::sync::Arc;

use axum::response::{Html, IntoResponse};
use axum::Extension;
use serde_json::{json, Value};
use utoipa::OpenApi;

use crate::serve::http::error::{ErrorBody, ErrorDetail};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Call Me Back API",
        description = "AI personas that call you back, now or when you choose.\n\n\
            Sign in with `POST /api/auth/login` (or register) and send the token as \
            `Authorization: Bearer <token>`. Every error is `{\"error\": {\"code\", \"message\", \"field\"?}}` \
            with the 4xx that fits; a 429 carries `Retry-After` (seconds). Money is in integer cents (USD).",
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    tags(
        (name = "auth", description = "Accounts and tokens"),
        (name = "personas", description = "Personas, your customisation of them, and what they remember"),
        (name = "contacts", description = "The personas you keep at hand"),
        (name = "calls", description = "Calls now or later, their history and usage"),
        (name = "billing", description = "Cards, payment intents (holds), credits and budgets"),
        (name = "webhooks", description = "Called by Twilio and Stripe, signed by them; not for the front end"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
    )
)]
struct Base;

/// The finished document, shared with the handler that serves it.
#[derive(Clone)]
pub struct Document(pub Arc<Value>);

/// Error answers every operation of a given shape can give, by status.
const SHARED: &[(&str, &str, &str)] = &[
    (
        "400",
        "BadRequest",
        "The body, a query parameter or a path segment is invalid; `field` names it",
    ),
    (
        "401",
        "Unauthorized",
        "No token, or a token that is invalid, expired or revoked",
    ),
    ("413", "PayloadTooLarge", "The body is larger than 1 MiB"),
    (
        "415",
        "UnsupportedMediaType",
        "The body is not sent in the operation's media type (`application/json`; a form for Twilio's webhooks)",
    ),
    (
        "429",
        "TooManyRequests",
        "Over the rate limit; `Retry-After` says when to try again",
    ),
    (
        "503",
        "Unavailable",
        "Busy for a moment: over the server's concurrency cap (`overloaded`), past the request's \
         15 s deadline (`timeout`), every password hasher busy (`busy`), a concurrent change, a \
         provider, a read model catching up; try again (after `Retry-After` when it is sent)",
    ),
];

/// The generated paths with the shared parts: info, components, the bearer scheme, and the
/// answers that follow from each operation's shape.
pub fn finish(paths: utoipa::openapi::OpenApi) -> Value {
    let mut doc = serde_json::to_value(Base::openapi()).expect("the base document");
    let generated = serde_json::to_value(paths).expect("the generated document");
    doc["paths"] = generated["paths"].clone();
    let schemas = doc["components"]["schemas"]
        .as_object_mut()
        .expect("schemas");
    if let Some(more) = generated["components"]["schemas"].as_object() {
        for (name, schema) in more {
            schemas.insert(name.clone(), schema.clone());
        }
    }
    doc["components"]["securitySchemes"] = json!({
        "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                    "description": "The token from register or login; valid 30 days unless you sign out" }
    });
    let mut responses = serde_json::Map::new();
    for (_, name, description) in SHARED {
        let mut response = json!({ "description": description,
            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ErrorBody" } } } });
        if *name == "TooManyRequests" {
            response["headers"] = json!({ "Retry-After": { "description": "seconds until the window ends",
                "required": true, "schema": { "type": "integer", "minimum": 1 } } });
        }
        responses.insert(name.to_string(), response);
    }
    doc["components"]["responses"] = Value::Object(responses);
    if let Some(paths) = doc["paths"].as_object_mut() {
        for item in paths.values_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for op in item.values_mut() {
                if let Some(op) = op.as_object_mut() {
                    shared_answers(op);
                }
            }
        }
    }
    doc
}

fn shared_answers(op: &mut serde_json::Map<String, Value>) {
    // `http::extract::Query` takes a parameter sent empty (`status=`, as forms and front ends
    // send an unset filter) for one left out: the document says so.
    if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
        for p in params
            .iter_mut()
            .filter(|p| p["in"] == "query" && p["required"] != true)
        {
            p["allowEmptyValue"] = Value::Bool(true);
        }
    }
    let webhook = op
        .get("tags")
        .and_then(Value::as_array)
        .is_some_and(|t| t.iter().any(|t| t == "webhooks"));
    if webhook {
        // Called by their providers: the answers they can get are the ones they declare.
        return;
    }
    let content = op.get("requestBody").map(|b| &b["content"]);
    let body = content.is_some_and(|c| {
        c.get("application/json").is_some() || c.get("application/x-www-form-urlencoded").is_some()
    });
    let query = op
        .get("parameters")
        .and_then(Value::as_array)
        .is_some_and(|ps| ps.iter().any(|p| p["in"] == "query"));
    let signed_in = op
        .get("security")
        .and_then(Value::as_array)
        .is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
    let responses = op
        .entry("responses")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("responses");
    for (status, name, _) in SHARED {
        let applies = match *status {
            "400" => body || query,
            "401" => signed_in,
            "413" | "415" => body,
            // Any request may meet the concurrency cap or its deadline.
            "503" => true,
            _ => false,
        };
        if applies && !responses.contains_key(*status) {
            responses.insert(
                status.to_string(),
                json!({ "$ref": format!("#/components/responses/{name}") }),
            );
        }
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of every endpoint", body = Object)))]
pub async fn document(Extension(doc): Extension<Document>) -> impl IntoResponse {
    axum::Json(doc.0.as_ref().clone())
}

/// An interactive page that reads the document and sends requests.
#[utoipa::path(get, path = "/docs", tag = "operations",
    responses((status = 200, description = "An HTML page", content_type = "text/html", body = String)))]
pub async fn docs_page() -> impl IntoResponse {
    Html(include_str!("docs.html"))
}
