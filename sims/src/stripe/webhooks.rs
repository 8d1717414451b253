//! Signed webhook delivery, one event after another, retried a few times.

use super::*;

/// Delivers events one after another, a little after they happened, retrying a few times.
pub(super) async fn deliver(
    mut rx: mpsc::Receiver<Value>,
    url: Arc<Mutex<Option<String>>>,
    secret: String,
    delivered: Arc<std::sync::atomic::AtomicU64>,
) {
    let http = cmb_providers::http_client();
    while let Some(event) = rx.recv().await {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let Some(target) = lock(&url).clone() else {
            continue;
        };
        let payload = event.to_string();
        for attempt in 1..=3u64 {
            let signature = sign_webhook(&secret, payload.as_bytes(), now());
            let sent = http
                .post(&target)
                .header("content-type", "application/json")
                .header("Stripe-Signature", signature)
                .body(payload.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    delivered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    break;
                }
                Ok(r) => tracing::debug!(status = %r.status(), attempt, "webhook refused"),
                Err(e) => tracing::debug!(error = %e, attempt, "webhook not delivered"),
            }
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
        }
    }
}
