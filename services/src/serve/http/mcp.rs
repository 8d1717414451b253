//! `/mcp`: the analysts' MCP tools (`ops::mcp`) as streamable HTTP, behind an analyst token
//! (`usecases::analysts`). A user's token is refused (403), a missing, unknown or revoked
//! token too (401): the tools read every user's calls and money.
//!
//! Stateless: each POST carries a JSON-RPC request and gets its answer as JSON (no session to
//! keep, so any instance behind a balancer answers). The tools read the event store through a
//! small read-only pool of their own, so an analyst's question neither takes the API's
//! connections nor can write.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use rmcp::transport::streamable_http_server::{
    session::local::LocalSessionManager, StreamableHttpServerConfig, StreamableHttpService,
};

use crate::ops::mcp::log::{read_only_pool, Log, Source};
use crate::ops::mcp::AnalystTools;
use crate::serve::http::auth;
use crate::serve::http::error::ApiError;
use crate::serve::http::state::AppState;

/// Connections the MCP tools may hold at once on an instance.
const POOL: u32 = 2;

/// The largest request: a JSON-RPC message, a provider's bill inside (`compare_bill`).
pub const BODY_LIMIT: usize = 8 * 1024 * 1024;

/// The `/mcp` route with its token check.
pub fn routes(state: &AppState) -> Router<AppState> {
    let log = Log {
        pool: read_only_pool(&state.pool, POOL),
        js: state.js.clone(),
        stream: state.config.stream.clone(),
        nats_url: state.config.nats_url.clone(),
        source: Source::Postgres,
    };
    let tools = AnalystTools::new(log);
    let mut config = StreamableHttpServerConfig::default();
    config.legacy_session_mode = false;
    config.json_response = true;
    config.sse_keep_alive = None;
    config.allowed_hosts = allowed_hosts(&state.config);
    let service: StreamableHttpService<AnalystTools, LocalSessionManager> =
        StreamableHttpService::new(move || Ok(tools.clone()), Default::default(), config);
    Router::new()
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_analyst,
        ))
}

/// The hosts clients may name (`Host`), against DNS rebinding: loopback, where we listen, and
/// the public address (a balancer in front).
fn allowed_hosts(config: &crate::config::Config) -> Vec<String> {
    let mut hosts = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "[::1]".to_string(),
        config.http_addr.to_string(),
    ];
    if let Ok(url) = reqwest::Url::parse(&config.public_base_url) {
        if let Some(host) = url.host_str() {
            hosts.push(host.to_string());
            if let Some(port) = url.port() {
                hosts.push(format!("{host}:{port}"));
            }
        }
    }
    hosts
}

async fn require_analyst(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(token) = auth::bearer_token(req.headers()) else {
        return challenge(ApiError::unauthorized(
            "send Authorization: Bearer <analyst token> (`callmeback analyst-token create NAME`)",
        ));
    };
    match crate::usecases::analysts::verify(&state.pool, token).await {
        Ok(Some(analyst)) => {
            tracing::info!(%analyst, "MCP request");
            // Read whole here (the SDK would buffer it too), within the limit.
            let (parts, body) = req.into_parts();
            match axum::body::to_bytes(body, BODY_LIMIT).await {
                Ok(bytes) => {
                    as_json(next.run(Request::from_parts(parts, bytes.into())).await).await
                }
                Err(_) => ApiError::new(
                    axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("an MCP request is at most {} MiB", BODY_LIMIT >> 20),
                )
                .into_response(),
            }
        }
        Ok(None) if auth::decode_token(state.config.jwt_secret.expose(), token).is_some() => {
            ApiError::forbidden(
                "a user's token cannot call the MCP tools: use an analyst token \
                 (`callmeback analyst-token create NAME`)",
            )
            .into_response()
        }
        Ok(None) => challenge(ApiError::unauthorized(
            "the analyst token is unknown or revoked",
        )),
        Err(e) => {
            tracing::warn!(error = %e, "checking an analyst token");
            ApiError::unavailable("the token could not be checked; try again").into_response()
        }
    }
}

/// The SDK answers a request it cannot take (a GET, a body that is not JSON-RPC) in plain
/// text: said again as our JSON error, with its status.
async fn as_json(response: Response) -> Response {
    use axum::http::StatusCode;
    let status = response.status();
    let json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json") || t.starts_with("text/event-stream"));
    if !status.is_client_error() || json {
        return response;
    }
    let text = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let code = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::NOT_ACCEPTABLE => "not_acceptable",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::NOT_FOUND => "not_found",
        _ => "bad_request",
    };
    let message = match (status, text.is_empty()) {
        (StatusCode::METHOD_NOT_ALLOWED, _) => {
            "POST a JSON-RPC message (streamable HTTP, stateless: no GET stream, no session to DELETE)".to_string()
        }
        (_, true) => status.canonical_reason().unwrap_or("refused").to_string(),
        (_, false) => text,
    };
    ApiError::new(status, code, message).into_response()
}

fn challenge(error: ApiError) -> Response {
    let mut response = error.into_response();
    response.headers_mut().insert(
        axum::http::header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer realm=\"callmeback-mcp\""),
    );
    response
}
