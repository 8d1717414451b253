//! Password hashing: argon2id (19 MiB, 2 passes: it takes tens of milliseconds and 19 MiB on
//! purpose), on a bounded pool of its own threads, so a burst of sign-ins queues instead of
//! taking a gigabyte: at most `PASSWORD_HASH_CONCURRENCY` hashes at once (default two per
//! core; each holds its 19 MiB while it runs, and the pool's threads keep their memory for the
//! next one instead of spreading it over hundreds of blocking threads), at most
//! `PASSWORD_HASH_QUEUE` waiting; beyond that [`Busy`] (503 with `Retry-After`). A hash whose
//! request has gone (its deadline passed, the client left) is skipped, not computed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use std::cell::RefCell;

use argon2::password_hash::{Output, ParamsString, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
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
/// The first call wins (the app calls it at start); without one, two threads per core and 256
/// waiting.
pub fn configure(threads: usize, queue: usize) {
    let _ = POOL.get_or_init(|| Pool::start(threads, queue));
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Pool::start(2 * cores, 256)
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

thread_local! {
    /// The argon2 memory of this thread, allocated once and used for every hash it computes:
    /// 19 MiB allocated and freed per hash left each hashing thread holding ~100 MiB of heap
    /// (measured with deploy/bench/logins.py).
    static BLOCKS: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// `argon`'s hash of `password` with `salt` (raw bytes) into `out`, in this thread's memory.
fn hash_into(
    argon: &Argon2<'_>,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), argon2::Error> {
    BLOCKS.with(|blocks| {
        let mut blocks = blocks.borrow_mut();
        let needed = argon.params().block_count();
        if blocks.len() < needed {
            blocks.resize(needed, Block::default());
        }
        argon.hash_password_into_with_memory(password, salt, out, &mut blocks[..needed])
    })
}

/// A new PHC string (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`) for `password`.
fn hash_new(password: &[u8]) -> Result<String, String> {
    let e = |e: argon2::password_hash::Error| e.to_string();
    let salt: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt).map_err(e)?;
    let argon = hasher();
    let params = argon.params().clone();
    let mut salt_buf = [0u8; 64];
    let salt_bytes = salt.as_salt().decode_b64(&mut salt_buf).map_err(e)?;
    let len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
    let output = Output::init_with(len, |out| {
        hash_into(&argon, password, salt_bytes, out).map_err(Into::into)
    })
    .map_err(e)?;
    let hash = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(e)?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(hash.to_string())
}

/// Whether `password` is the one `stored` (a PHC string) was made from, with the parameters
/// written in it; the comparison takes the same time wherever they differ.
fn matches(password: &[u8], stored: &str) -> bool {
    let check = || -> Result<bool, argon2::password_hash::Error> {
        let parsed = PasswordHash::new(stored)?;
        let algorithm = Algorithm::try_from(parsed.algorithm)?;
        let version = parsed
            .version
            .map(Version::try_from)
            .transpose()?
            .unwrap_or_default();
        let params = Params::try_from(&parsed)?;
        let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
            return Ok(false);
        };
        let mut salt_buf = [0u8; 64];
        let salt = salt.decode_b64(&mut salt_buf)?;
        let argon = Argon2::new(algorithm, version, params);
        let computed = Output::init_with(expected.len(), |out| {
            hash_into(&argon, password, salt, out).map_err(Into::into)
        })?;
        // `Output`'s equality is constant-time.
        Ok(computed == expected)
    };
    check().unwrap_or(false)
}

pub async fn hash(password: String) -> Result<String, HashError> {
    let hashed = pool().run(move || hash_new(password.as_bytes())).await?;
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
            matches(password.as_bytes(), stored) && hash.is_some()
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

    #[test]
    fn hashes_are_argon2s_own_phc_strings() {
        // A hash made by the argon2 crate itself verifies here, and ours verify there.
        let salt = SaltString::encode_b64(&[9u8; 16]).unwrap();
        let theirs = hasher()
            .hash_password(b"Correct-horse-1", &salt)
            .unwrap()
            .to_string();
        assert!(matches(b"Correct-horse-1", &theirs));
        assert!(!matches(b"Correct-horse-2", &theirs));
        let ours = hash_new(b"Correct-horse-1").unwrap();
        assert!(
            ours.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{ours}"
        );
        use argon2::password_hash::PasswordVerifier;
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(hasher()
            .verify_password(b"Correct-horse-1", &parsed)
            .is_ok());
        assert!(!matches(b"x", "not a hash"));
    }

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
