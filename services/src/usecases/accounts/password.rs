//! Password hashing: argon2id (19 MiB, 2 passes: it takes tens of milliseconds and 19 MiB on
//! purpose), on a bounded pool of its own threads, so a burst of sign-ins queues instead of
//! taking a gigabyte: at most `PASSWORD_HASH_CONCURRENCY` hashes at once (default two per
//! core; each holds its 19 MiB while it runs, and the pool's threads keep their memory for the
//! next one instead of spreading it over hundreds of blocking threads), at most
//! `PASSWORD_HASH_QUEUE` waiting; beyond that [`Busy`] (503 with `Retry-After`). A hash whose
//! request has gone (its deadline passed, the client left) is skipped, not computed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use tokio::sync::oneshot;

fn hasher() -> Argon2<'static> {
    // argon2id, 19 MiB, 2 passes, 1 lane: OWASP's recommended minimum.
    Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(19 * 1024, 2, 1, None).expect("valid argon2 parameters"),
    )
}

/// Hashing refused (the pool is full) or failed (it does not, short of a broken runtime).
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error(transparent)]
    Busy(#[from] Busy),
    #[error("hashing a password: {0}")]
    Failed(String),
}

/// Every hasher is busy and the queue is full: try again in a moment.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("too many sign-ins at once; try again in {retry_after_secs} s")]
pub struct Busy {
    pub retry_after_secs: u64,
}

type Job = Box<dyn FnOnce() + Send>;

/// The hashing threads and their queue.
struct Pool {
    jobs: mpsc::SyncSender<Job>,
    /// Jobs queued or running.
    in_flight: Arc<AtomicUsize>,
    capacity: usize,
    threads: usize,
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// Sets the pool's size (`PASSWORD_HASH_CONCURRENCY` threads, `PASSWORD_HASH_QUEUE` waiting).
/// The first call wins (the app calls it at start); without one, two threads per core and 64
/// waiting.
pub fn configure(threads: usize, queue: usize) {
    let _ = POOL.get_or_init(|| Pool::start(threads, queue));
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Pool::start(2 * cores, 64)
    })
}

impl Pool {
    fn start(threads: usize, queue: usize) -> Pool {
        let threads = threads.max(1);
        // The channel holds what waits; the threads hold what runs.
        let (jobs, rx) = mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("password-hash-{n}"))
                .spawn(move || loop {
                    // The lock is held only to take a job; a poisoned lock (a job panicked
                    // while taking) still hands out the receiver.
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start a password hashing thread");
            }
        }
        Pool {
            jobs,
            in_flight: Arc::new(AtomicUsize::new(0)),
            capacity: threads + queue,
            threads,
        }
    }

    /// Runs `work` on the pool, or refuses at once when the queue is full.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<Option<T>, Busy> {
        let waiting = self.in_flight.fetch_add(1, Ordering::SeqCst);
        let in_flight = self.in_flight.clone();
        if waiting >= self.capacity {
            in_flight.fetch_sub(1, Ordering::SeqCst);
            metrics::counter!("cmb_password_hash_refused_total").increment(1);
            // About how long the queue ahead takes to drain (a hash is ~50 ms a thread).
            let retry_after_secs = (waiting / self.threads / 20).clamp(1, 30) as u64;
            return Err(Busy { retry_after_secs });
        }
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            // Nobody waits for it any more (the request's deadline passed): skip the work.
            if !tx.is_closed() {
                let _ = tx.send(work());
            }
            in_flight.fetch_sub(1, Ordering::SeqCst);
        });
        if self.jobs.try_send(job).is_err() {
            // Full (or the threads are gone): the job was dropped unrun.
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(Busy {
                retry_after_secs: 1,
            });
        }
        Ok(rx.await.ok())
    }
}

pub async fn hash(password: String) -> Result<String, HashError> {
    let hashed = pool()
        .run(move || {
            let salt: [u8; 16] = rand::random();
            let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
            hasher()
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| e.to_string())
        })
        .await?;
    hashed
        .ok_or_else(|| HashError::Failed("the hashing thread stopped".into()))?
        .map_err(HashError::Failed)
}

/// Checks a password against a stored hash in constant time. An unknown account is checked
/// against a dummy hash, so a miss costs the same as a wrong password.
pub async fn verify(password: String, hash: Option<String>) -> Result<bool, Busy> {
    let matched = pool()
        .run(move || {
            let stored = hash.as_deref().unwrap_or(dummy_hash());
            let Ok(parsed) = PasswordHash::new(stored) else {
                return false;
            };
            let ok = hasher()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok();
            ok && hash.is_some()
        })
        .await?;
    Ok(matched.unwrap_or(false))
}

fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        let salt = SaltString::encode_b64(&[7u8; 16]).expect("salt");
        hasher()
            .hash_password(b"not anyone's password", &salt)
            .expect("dummy hash")
            .to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passwords_round_trip_and_unknown_accounts_never_match() {
        let hashed = hash(r#"Aa1!"\{}$ü"#.into()).await.unwrap();
        assert!(hashed.starts_with("$argon2id$"));
        assert!(verify(r#"Aa1!"\{}$ü"#.into(), Some(hashed.clone()))
            .await
            .unwrap());
        assert!(!verify(r#"Aa1!"\{}$u"#.into(), Some(hashed)).await.unwrap());
        assert!(!verify("not anyone's password".into(), None).await.unwrap());
    }
}
