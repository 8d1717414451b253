//! What ends a session from outside its loop: the paid duration's end, Twilio's hang-up
//! callback (recorded on any instance: read from the event log, for all the instance's
//! sessions in one query, [`CallEnds`]), and a socket that has been
//! silent too long (Twilio streams a frame every 20 ms, silence included, so a quiet socket is
//! a dead or hostile one). A small task of its own, so the voice loop pays one relaxed atomic
//! add per frame for it and nothing else.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cmb_domain::CallId;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

/// No frame at all for this long ends the session.
pub const SOCKET_SILENCE: Duration = Duration::from_secs(10);
/// How often the guard looks (silence and the paid duration are checked to within this).
const TICK: Duration = Duration::from_secs(1);
/// How often the event log is asked which live calls have ended.
const CALL_END_POLL: Duration = Duration::from_secs(2);

pub(super) struct Guard {
    /// Frames the session has received; the session adds one per frame.
    pub(super) frames: Arc<AtomicU64>,
    /// Why the session must end, once it must.
    pub(super) end: oneshot::Receiver<&'static str>,
    task: JoinHandle<()>,
    ends: Arc<CallEnds>,
    call_id: Uuid,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.task.abort();
        self.ends.unwatch(self.call_id);
    }
}

impl Guard {
    /// Watches the session of `call_id`, which may last `cap` (the paid duration).
    pub(super) fn spawn(
        ends: &Arc<CallEnds>,
        pool: &PgPool,
        call_id: CallId,
        cap: Duration,
    ) -> Guard {
        let call_id = call_id.uuid();
        ends.watch(pool, call_id);
        let frames = Arc::new(AtomicU64::new(0));
        let (tx, end) = oneshot::channel();
        let seen = frames.clone();
        let watched = ends.clone();
        let task = tokio::spawn(async move {
            let _ = tx.send(watch(watched, call_id, cap, seen).await);
        });
        Guard {
            frames,
            end,
            task,
            ends: ends.clone(),
            call_id,
        }
    }
}

async fn watch(
    ends: Arc<CallEnds>,
    call_id: Uuid,
    cap: Duration,
    frames: Arc<AtomicU64>,
) -> &'static str {
    let started = Instant::now();
    let deadline = started + cap;
    let (mut count, mut changed) = (0, started);
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
        if ends.ended(call_id) {
            return "call ended";
        }
        tokio::time::sleep_until((now + TICK).min(deadline)).await;
    }
}

/// Which live sessions' calls have ended in the event log (Twilio's hang-up callback, recorded
/// on any instance): one query for all of an instance's sessions every [`CALL_END_POLL`],
/// rather than one per session (at 500 calls, 250 queries a second).
#[derive(Default)]
pub struct CallEnds {
    state: Mutex<Ends>,
}

#[derive(Default)]
struct Ends {
    /// Calls with a live session here (and how many: a call has one, but a stale session may
    /// overlap its successor for a moment).
    live: HashMap<Uuid, usize>,
    ended: HashSet<Uuid>,
    polling: bool,
}

impl CallEnds {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ends> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn watch(self: &Arc<Self>, pool: &PgPool, call_id: Uuid) {
        let mut state = self.lock();
        *state.live.entry(call_id).or_default() += 1;
        if !state.polling {
            state.polling = true;
            tokio::spawn(poll(self.clone(), pool.clone()));
        }
    }

    fn unwatch(&self, call_id: Uuid) {
        let mut state = self.lock();
        if let Some(n) = state.live.get_mut(&call_id) {
            *n -= 1;
            if *n == 0 {
                state.live.remove(&call_id);
                state.ended.remove(&call_id);
            }
        }
    }

    fn ended(&self, call_id: Uuid) -> bool {
        self.lock().ended.contains(&call_id)
    }
}

/// Asks the event log which of the live calls have ended, every [`CALL_END_POLL`] while any
/// is live.
async fn poll(ends: Arc<CallEnds>, pool: PgPool) {
    loop {
        tokio::time::sleep(CALL_END_POLL).await;
        let ids: Vec<String> = {
            let mut state = ends.lock();
            if state.live.is_empty() {
                state.polling = false;
                return;
            }
            state
                .live
                .keys()
                .filter(|id| !state.ended.contains(id))
                .map(Uuid::to_string)
                .collect()
        };
        if ids.is_empty() {
            continue;
        }
        let found = sqlx::query_scalar::<_, String>(
            "SELECT DISTINCT aggregate_id FROM events
              WHERE aggregate_type = 'call' AND aggregate_id = ANY($1) AND event_type = 'CallEnded'",
        )
        .bind(&ids)
        .fetch_all(&pool)
        .await;
        match found {
            Ok(found) => {
                let mut state = ends.lock();
                for id in found.iter().filter_map(|f| Uuid::parse_str(f).ok()) {
                    if state.live.contains_key(&id) {
                        state.ended.insert(id);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "checking which calls ended failed"),
        }
    }
}
