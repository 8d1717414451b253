//! Liveness, readiness and metrics.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;

use super::state::AppState;

/// Readiness fails when a projection is this many messages behind.
const MAX_READY_LAG: u64 = 10_000;

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = Object, example = json!({"status": "ok"}))))]
pub async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

/// Postgres and NATS answer, and the read models are not far behind.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready: Postgres and NATS answer, read models within 10 000 events", body = Object),
        (status = 503, description = "Not ready; `checks` says what is down", body = Object),
    ))]
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let postgres = sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(&state.pool)
        .await
        .is_ok();
    let nats = state.nats.connection_state() == async_nats::connection::State::Connected
        && state
            .js
            .get_stream(&state.config.stream.stream)
            .await
            .is_ok();
    let lag = state.projection_lag.read().expect("lag board").clone();
    // Not a readiness condition (publication does not wait for it), but an operator's clue.
    let oldest_transaction = crate::backbone::outbox::oldest_transaction(&state.pool)
        .await
        .ok()
        .flatten();
    // Events set aside per consumer: not a readiness condition, but someone must look.
    let dead_letters = crate::backbone::deadletter::open_counts(&state.pool)
        .await
        .unwrap_or_default();
    let cluster = cluster(&state).await;
    let lag_ok = lag.values().all(|&l| l <= MAX_READY_LAG);
    let ready = postgres && nats && lag_ok;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(json!({
            "status": if ready { "ready" } else { "not_ready" },
            "checks": {
                "postgres": if postgres { "ok" } else { "down" },
                "nats": if nats { "ok" } else { "down" },
                "cluster": cluster,
                "projection_lag": lag,
                "oldest_transaction": oldest_transaction,
                "dead_letters": dead_letters,
            }
        })),
    )
}

/// What this instance sees of NATS: the server it is connected to and the others the cluster
/// advertises, the stream's leader and replicas (how many are current), and each of our
/// durable consumers' pending messages (the workers' as well as the projections').
async fn cluster(state: &AppState) -> serde_json::Value {
    let server = state.nats.server_info();
    let mut view = json!({
        "instance": state.config.instance_id,
        "connected_server": {
            "name": server.server_name,
            "url": format!("nats://{}:{}", server.host, server.port),
            "version": server.version,
        },
        "servers_seen": server.connect_urls,
    });
    let Ok(mut stream) = state.js.get_stream(&state.config.stream.stream).await else {
        return view;
    };
    if let Ok(info) = stream.info().await {
        let replicas = info.config.num_replicas.max(1);
        let (leader, peers) = match &info.cluster {
            Some(c) => (c.leader.clone(), c.replicas.clone()),
            None => (None, Vec::new()),
        };
        // The leader is current by definition; the other peers say whether they are.
        let current = usize::from(leader.is_some())
            + peers.iter().filter(|p| p.current && !p.offline).count();
        view["stream"] = json!({
            "name": info.config.name,
            "messages": info.state.messages,
            "last_sequence": info.state.last_sequence,
            "leader": leader,
            "replicas": replicas,
            "replicas_current": current,
            "peers": peers.iter().map(|p| json!({
                "name": p.name,
                "current": p.current,
                "offline": p.offline,
                "lag": p.lag,
                "seen_ms_ago": p.active.as_millis() as u64,
            })).collect::<Vec<_>>(),
        });
        metrics::gauge!("cmb_stream_replicas_current").set(current as f64);
    }
    let prefix = format!("{}-", state.config.consumer_prefix);
    let mut consumers = serde_json::Map::new();
    let mut list = stream.consumers();
    while let Some(Ok(info)) = futures::StreamExt::next(&mut list).await {
        if info.name.starts_with(&prefix) {
            consumers.insert(
                info.name.clone(),
                json!({
                    "pending": info.num_pending,
                    "ack_pending": info.num_ack_pending,
                    "redelivered": info.num_redelivered,
                    "leader": info.cluster.as_ref().and_then(|c| c.leader.clone()),
                }),
            );
        }
    }
    view["consumers"] = consumers.into();
    view
}

/// Prometheus text format, every sample labelled with this instance's `instance_id` (so the
/// instances behind one load balancer can be told apart even when scraped through it).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    // Sets `cmb_oldest_transaction_age_seconds`.
    let _ = crate::backbone::outbox::oldest_transaction(&state.pool).await;
    let _ = crate::backbone::deadletter::open_counts(&state.pool).await;
    (
        [("content-type", "text/plain; version=0.0.4")],
        label_instance(&state.metrics.render(), &state.config.instance_id),
    )
}

/// Adds `instance="<id>"` to every sample of a Prometheus text exposition.
fn label_instance(text: &str, instance: &str) -> String {
    let escaped = instance
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    let label = format!("instance=\"{escaped}\"");
    let mut out = String::with_capacity(text.len() + text.len() / 4);
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            out.push_str(line);
        } else if let Some(brace) = line.find('{') {
            let (name, rest) = line.split_at(brace);
            let sep = if rest.starts_with("{}") { "" } else { "," };
            out.push_str(&format!("{name}{{{label}{sep}{}", &rest[1..]));
        } else if let Some(space) = line.find(' ') {
            let (name, rest) = line.split_at(space);
            out.push_str(&format!("{name}{{{label}}}{rest}"));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::label_instance;

    #[test]
    fn every_sample_names_its_instance() {
        let text = "# TYPE a counter\na 1\nb{kind=\"x\"} 2\nc{} 3\n";
        assert_eq!(
            label_instance(text, "i-\"1"),
            "# TYPE a counter\na{instance=\"i-\\\"1\"} 1\nb{instance=\"i-\\\"1\",kind=\"x\"} 2\nc{instance=\"i-\\\"1\"} 3\n"
        );
    }
}
