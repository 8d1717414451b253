//! The router and the OpenAPI document describe the same routes: every path and method the
//! router answers is documented, and every documented operation is routed.

use std::collections::BTreeSet;

use super::{document, routes};

const METHODS: [&str; 9] = [
    "get", "head", "delete", "options", "patch", "post", "put", "trace", "connect",
];

/// `(path, method)` of every route the router holds, read from its `Debug` form (axum keeps
/// its routes private; the form lists each route's path and method router).
fn routed() -> BTreeSet<(String, String)> {
    let (router, _) = routes().split_for_parts();
    let text = format!("{router:?}");
    let text = text
        .split("fallback_router")
        .next()
        .expect("the path router comes first");
    let (routes_part, node_part) = text
        .split_once("node: Node")
        .expect("axum's PathRouter debug form has `routes` then `node`");
    let mut paths = std::collections::HashMap::new();
    for entry in node_part.split("RouteId(").skip(1) {
        let (id, rest) = entry.split_once(')').expect("RouteId(n)");
        let path = rest
            .split('"')
            .nth(1)
            .expect("a quoted path after the route id");
        paths.insert(id.to_string(), path.to_string());
    }
    let mut found = BTreeSet::new();
    for entry in routes_part.split("RouteId(").skip(1) {
        let (id, rest) = entry.split_once(')').expect("RouteId(n)");
        let path = paths.get(id).expect("every route id has a path").clone();
        for method in METHODS {
            let field = format!(" {method}: ");
            if let Some(at) = rest.find(&field) {
                if !rest[at + field.len()..].starts_with("None") {
                    found.insert((path.clone(), method.to_string()));
                }
            }
        }
    }
    found
}

fn documented() -> BTreeSet<(String, String)> {
    let doc = document();
    let mut found = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(method).is_some() {
                found.insert((path.clone(), method.to_string()));
            }
        }
    }
    found
}

#[test]
fn every_route_is_documented_and_every_documented_operation_is_routed() {
    let routed = routed();
    let documented = documented();
    assert!(
        routed.len() > 30 && routed.contains(&("/api/calls/{id}".into(), "get".into())),
        "the router's routes were read: {routed:?}"
    );
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "the router and /api/openapi.json differ.\n\
         Routed but not documented: {undocumented:?}\n\
         Documented but not routed: {unrouted:?}\n\
         To add an endpoint: annotate its handler with #[utoipa::path(<method>, path = \"<path \
         under /api>\", tag = …, security((\"bearer\" = [])), request_body = <Body: ToSchema>, \
         responses(…))] and register it in services/src/serve/api/mod.rs with \
         .merge(at(routes!(module::handler), limit::<LIMIT>)) (or .routes(routes!(…)) when it has \
         no rate limit), never with axum's .route(); see ARCHITECTURE.md, \"A new endpoint\"."
    );
}

#[test]
fn every_operation_states_its_answers_and_its_limit() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            let responses = op["responses"].as_object().expect("responses");
            assert!(
                // 101: a WebSocket upgrade; 302: a redirect to a provider (WorkOS sign-in).
                responses
                    .keys()
                    .any(|s| s.starts_with('2') || s == "101" || s == "302"),
                "{method} {path} documents its success"
            );
            let signed_in = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
            if signed_in {
                assert!(responses.contains_key("401"), "{method} {path}: 401");
                assert!(
                    op["x-rate-limit"].is_object() && responses.contains_key("429"),
                    "{method} {path}: a signed-in route has a rate limit, stated with its 429"
                );
            }
            if op["requestBody"]["content"]["application/json"].is_object()
                && op["tags"][0] != "webhooks"
            {
                for status in ["400", "413", "415"] {
                    assert!(responses.contains_key(status), "{method} {path}: {status}");
                }
            }
        }
    }
    let limit = &doc["paths"]["/api/auth/login"]["post"]["x-rate-limit"]["anonymous"];
    assert_eq!(limit["max"], super::ratelimit::LOGIN.max);
    assert_eq!(
        doc["components"]["responses"]["TooManyRequests"]["headers"]["Retry-After"]["required"],
        true
    );
}

#[test]
fn operation_ids_are_unique_and_empty_query_values_are_stated() {
    // Clients generated from the document name their functions after `operationId`, and
    // schemathesis follows links by it: two operations with one id are one too many.
    let doc = document();
    let mut seen = std::collections::BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            let id = op["operationId"].as_str().unwrap_or_default().to_string();
            assert!(!id.is_empty(), "{method} {path} has an operationId");
            if let Some(other) = seen.insert(id.clone(), format!("{method} {path}")) {
                panic!("operationId {id:?} names both {other} and {method} {path}");
            }
            for p in op["parameters"].as_array().into_iter().flatten() {
                if p["in"] == "query" && p["required"] != true {
                    assert_eq!(p["allowEmptyValue"], true, "{method} {path}: {}", p["name"]);
                }
            }
        }
    }
}

#[test]
fn every_json_request_body_has_an_example() {
    // A front-end developer reads the example first (and /docs shows it as the request to
    // try): every JSON body an operation takes comes with one.
    let doc = document();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            let content = &op["requestBody"]["content"]["application/json"];
            let Some(schema) = content.get("schema") else {
                continue;
            };
            let schema = match schema["$ref"].as_str() {
                Some(r) => &doc["components"]["schemas"][r.rsplit('/').next().unwrap_or("")],
                None => schema,
            };
            // The Stripe webhook's body is Stripe's Event, described in words.
            if op["tags"][0] == "webhooks" {
                continue;
            }
            assert!(
                schema.get("example").is_some() || content.get("example").is_some(),
                "{method} {path}: its JSON body has no example"
            );
        }
    }
}

#[test]
fn webhooks_state_their_signature_and_signed_in_routes_the_bearer_scheme() {
    // Stripe and Twilio call us: their operations are tagged as webhooks and name the header
    // that carries the signature we check (the media stream's upgrade included).
    let doc = document();
    for (path, method, header) in [
        ("/api/stripe/webhook", "post", "Stripe-Signature"),
        ("/api/twilio/answer", "post", "X-Twilio-Signature"),
        ("/api/twilio/callback", "post", "X-Twilio-Signature"),
        ("/api/twilio/stream", "get", "X-Twilio-Signature"),
    ] {
        let op = &doc["paths"][path][method];
        assert_eq!(op["tags"][0], "webhooks", "{method} {path}");
        let named = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["in"] == "header" && p["name"] == header && p["required"] == true);
        assert!(named, "{method} {path} states its {header} header");
    }
    assert!(doc["paths"]["/api/twilio/stream"]["get"]["responses"]["101"].is_object());
    let bearer = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(bearer["type"], "http");
    assert_eq!(bearer["scheme"], "bearer");
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/docs",
        "/api/openapi.json",
    ] {
        assert!(
            doc["paths"][path]["get"].is_object(),
            "{path} is documented"
        );
    }
}
