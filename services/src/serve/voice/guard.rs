//! What ends a session from outside its loop: the paid duration's end, Twilio's hang-up
//! callback (recorded on any instance: read from the event log), and a socket that has been
//! silent too long (Twilio streams a frame every 20 ms, silence included, so a quiet socket is
//! a dead or hostile one). A small task of its own, so the voice loop pays one relaxed atomic
//! add per frame for it and nothing else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

/// No frame at all for this long ends the session.
pub const SOCKET_SILENCE: Duration = Duration::from_secs(10);
/// How often the guard looks (silence and the paid duration are checked to within this).
const TICK: Duration = Duration::from_secs(1);
/// How often it asks the event log whether the call has ended.
const CALL_END_POLL: Duration = Duration::from_secs(2);

pub(super) struct Guard {
    /// Frames the session has received; the session adds one per frame.
    pub(super) frames: Arc<AtomicU64>,
    /// Why the session must end, once it must.
    pub(super) end: oneshot::Receiver<&'static str>,
    task: JoinHandle<()>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Guard {
    /// Watches the session of `call_id`, which may last `cap` (the paid duration).
    pub(super) fn spawn(pool: PgPool, call_id: Uuid, cap: Duration) -> Guard {
        let frames = Arc::new(AtomicU64::new(0));
        let (tx, end) = oneshot::channel();
        let seen = frames.clone();
        let task = tokio::spawn(async move {
            let _ = tx.send(watch(pool, call_id, cap, seen).await);
        });
        Guard { frames, end, task }
    }
}

async fn watch(pool: PgPool, call_id: Uuid, cap: Duration, frames: Arc<AtomicU64>) -> &'static str {
    let started = Instant::now();
    let deadline = started + cap;
    let (mut count, mut changed) = (0, started);
    let mut next_poll = started + CALL_END_POLL;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return "paid duration reached";
        }
        let n = frames.load(Ordering::Relaxed);
        if n != count {
            (count, changed) = (n, now);
        } else if now.duration_since(changed) >= SOCKET_SILENCE {
            return "socket silent";
        }
        if now >= next_poll {
            next_poll = now + CALL_END_POLL;
            match call_ended(&pool, call_id).await {
                Ok(true) => return "call ended",
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(call = %call_id, error = %e, "checking the call's end failed")
                }
            }
        }
        tokio::time::sleep_until((now + TICK).min(deadline)).await;
    }
}

/// Whether the call has ended in the event log (Twilio's hang-up callback, on any instance).
async fn call_ended(pool: &PgPool, call_id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events
                         WHERE aggregate_type = 'call' AND aggregate_id = $1
                           AND event_type = 'CallEnded')",
    )
    .bind(call_id.to_string())
    .fetch_one(pool)
    .await
}
