//! Per-user data keys and the sealing of personal fields in event payloads (crypto-shredding;
//! README "Privacy"). Which fields are personal, and whose, is the domain's
//! ([`cmb_domain::privacy`]); this module holds the keys (`data_keys`, one row per user) and
//! the cipher, at the event store's boundary:
//!
//! - [`Keyring::seal`] — on the way in (`store::EventStore::execute`): each personal field is
//!   replaced by `{"$sealed": …}`, ChaCha20-Poly1305 under its owner's key, the owner, event
//!   type and field path as associated data (a sealed value moved elsewhere does not open).
//!   The outbox publishes the stored payload, so JetStream carries the same sealed fields.
//! - [`Keyring::open`] — on the way out, where clear values are needed: loading an aggregate,
//!   applying an event to a read model. A field whose key was destroyed reads as
//!   [`cmb_domain::privacy::ERASED`]; readers that do not open (the reconcile, analysts'
//!   tools) see the same through `EventEnvelope::decode`.
//! - [`Keyring::destroy`] — erasure: the key row keeps the user's id with no key, so what is
//!   written for them afterwards is written already erased.
//!
//! Keys are cached in the process (live ones for [`LIVE_FOR`], destroyed ones for good);
//! destroying a key forgets it here at once, and every other instance within [`LIVE_FOR`].
//!
//! What personas learned on a call (memory events, `privacy::call_scope`) is sealed under a
//! key of its own per user and call (`memory_keys`), destroyed when the call's transcript's
//! retention ends ([`Keyring::destroy_calls`]): memory derived from a transcript becomes
//! unreadable with it, in the log and on the stream, while the rest of the user's data stays.
//!
//! The table never holds a data key in clear: each is stored wrapped (ChaCha20-Poly1305, the
//! user's id as associated data) by a master key from the environment
//! (`DATA_KEYS_MASTER_KEY`, [`Masters`]), with the master's [`MasterKey::id`] beside it. A
//! database copied without the environment opens nothing. [`rewrap`] (`callmeback privacy
//! rewrap`) moves every key to a new master; while it runs, instances given both the new
//! master and the old one (`DATA_KEYS_MASTER_KEY_OLD`) read keys under either.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use cmb_domain::{privacy, EventEnvelope};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

mod master;
pub use master::{
    install, masters, rewrap, stored_and_clear, KeyError, KeyId, MasterKey, Masters, Rewrapped,
    WRAPPED_LEN,
};
use master::{stored_row, B64};

/// How long another instance may still open a user's fields after the key was destroyed.
pub const LIVE_FOR: Duration = Duration::from_secs(30);

/// Data keys destroyed by this process so far: what was opened before one was may no longer
/// be kept in clear (the event store's kept aggregates, `store::Kept`, check it).
static ERASURES: AtomicU64 = AtomicU64::new(0);

/// How many times this process destroyed data keys ([`ERASURES`]).
pub fn erasures() -> u64 {
    ERASURES.load(Ordering::SeqCst)
}

/// Before the ciphertext of a field sealed under a call's key (base64 has no `:`); a field
/// without it was sealed under its user's key.
const CALL_KEYED: &str = "c:";

/// A user's data key, or the fact that it was destroyed.
#[derive(Clone)]
enum DataKey {
    Live(Arc<LessSafeKey>),
    Erased,
}

struct Cached {
    key: DataKey,
    at: Instant,
}

/// One cache for the process: user ids are unique across databases, and a destroyed key
/// never comes back.
fn cache() -> &'static Mutex<HashMap<KeyId, Cached>> {
    static CACHE: OnceLock<Mutex<HashMap<KeyId, Cached>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Entries beyond which the cache starts over (a bound on memory, not a tuning knob).
const CACHE_MAX: usize = 100_000;

fn cached(id: KeyId) -> Option<DataKey> {
    let cache = cache().lock().unwrap_or_else(|p| p.into_inner());
    let entry = cache.get(&id)?;
    match entry.key {
        DataKey::Erased => Some(DataKey::Erased),
        DataKey::Live(_) if entry.at.elapsed() < LIVE_FOR => Some(entry.key.clone()),
        DataKey::Live(_) => None,
    }
}

fn remember(id: KeyId, key: DataKey) {
    let mut cache = cache().lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() >= CACHE_MAX {
        cache.retain(|_, c| matches!(c.key, DataKey::Erased));
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
    }
    cache.insert(
        id,
        Cached {
            key,
            at: Instant::now(),
        },
    );
}

fn data_key(bytes: &[u8]) -> Result<DataKey, KeyError> {
    let key = UnboundKey::new(&CHACHA20_POLY1305, bytes)
        .map_err(|_| KeyError::Corrupt("a data key".into()))?;
    Ok(DataKey::Live(Arc::new(LessSafeKey::new(key))))
}

fn aad(user: Uuid, aggregate_type: &str, event_type: &str, path: &str) -> String {
    format!("{user}/{aggregate_type}/{event_type}/{path}")
}

/// The data keys, in Postgres, wrapped by the process's master keys.
#[derive(Clone)]
pub struct Keyring {
    pool: PgPool,
    masters: Arc<Masters>,
}

impl Keyring {
    /// The keys in `pool`, under the process's master keys ([`masters`]).
    pub fn new(pool: PgPool) -> Self {
        Keyring::with_masters(pool, masters())
    }

    pub fn with_masters(pool: PgPool, masters: Arc<Masters>) -> Self {
        Keyring { pool, masters }
    }

    /// The key as stored: `None` when there is none yet.
    async fn stored(&self, id: KeyId) -> Result<Option<DataKey>, KeyError> {
        Ok(match stored_row(&self.pool, id).await? {
            None => None,
            Some((None, _)) => Some(DataKey::Erased),
            Some((Some(stored), master)) => Some(data_key(&self.masters.unwrap(
                id,
                &stored,
                master.as_deref(),
            )?)?),
        })
    }

    /// The key to read with: no key row means no sealed field was ever written under it, so
    /// a sealed field without one reads as erased.
    async fn for_reading(&self, id: KeyId) -> Result<DataKey, KeyError> {
        if let Some(key) = cached(id) {
            return Ok(key);
        }
        let key = self.stored(id).await?.unwrap_or(DataKey::Erased);
        if matches!(key, DataKey::Live(_)) {
            remember(id, key.clone());
        }
        Ok(key)
    }

    /// The key to write with, made on its first personal field; erased (for good) when the
    /// user is.
    async fn for_writing(&self, id: KeyId) -> Result<DataKey, KeyError> {
        if let Some(key) = cached(id) {
            return Ok(key);
        }
        if id.call.is_some() {
            // A call's key is never made for a user already erased.
            if let DataKey::Erased = Box::pin(self.for_writing(KeyId::user(id.user))).await? {
                return Ok(DataKey::Erased);
            }
        }
        let key = match self.stored(id).await? {
            Some(key) => key,
            None => {
                let mut bytes = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut bytes)
                    .map_err(|_| KeyError::Random)?;
                let wrapped = self.masters.current.wrap(id, &bytes)?;
                let insert = match id.call {
                    None => {
                        "INSERT INTO data_keys (user_id, key, master_id) VALUES ($1, $2, $3)
                         ON CONFLICT (user_id) DO NOTHING"
                    }
                    Some(_) => {
                        "INSERT INTO memory_keys (user_id, call_id, key, master_id)
                         VALUES ($1, $4, $2, $3) ON CONFLICT (user_id, call_id) DO NOTHING"
                    }
                };
                let mut q = sqlx::query(insert)
                    .bind(id.user)
                    .bind(&wrapped)
                    .bind(self.masters.current.id().to_vec());
                if let Some(call) = id.call {
                    q = q.bind(call);
                }
                q.execute(&self.pool).await?;
                // Whichever writer inserted first, everyone uses its key.
                self.stored(id)
                    .await?
                    .ok_or_else(|| KeyError::Corrupt(format!("the data key of {}", id.user)))?
            }
        };
        remember(id, key.clone());
        Ok(key)
    }

    /// Whether `payload` holds what a call taught sealed under its user's key (by a build
    /// before the calls' keys): `privacy migrate` moves it to the call's key, so that it goes
    /// with the transcript's retention.
    pub fn needs_call_key(aggregate_type: &str, event_type: &str, payload: &mut Value) -> bool {
        if privacy::call_scope(aggregate_type, event_type, payload).is_none() {
            return false;
        }
        let mut under_user = false;
        privacy::each_field(aggregate_type, event_type, payload, |_, v| {
            under_user |= privacy::sealed(v).is_some_and(|t| !t.starts_with(CALL_KEYED));
        });
        under_user
    }

    /// Which key seals an event's personal fields: `None` when they are nobody's.
    fn key_of(
        aggregate_type: &str,
        aggregate_id: &str,
        event_type: &str,
        payload: &Value,
    ) -> Option<KeyId> {
        let user = privacy::subject(aggregate_type, aggregate_id, event_type, payload)?;
        Some(KeyId {
            user,
            call: privacy::call_scope(aggregate_type, event_type, payload),
        })
    }

    /// Seals the personal fields of a payload about to be stored (`{"Type": {…}}`). A payload
    /// of a user already erased is stored with those fields erased.
    pub async fn seal(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        event_type: &str,
        payload: &mut Value,
    ) -> Result<(), KeyError> {
        if !privacy::is_personal(aggregate_type, event_type) {
            return Ok(());
        }
        let Some(id) = Self::key_of(aggregate_type, aggregate_id, event_type, payload) else {
            return Ok(());
        };
        let user = id.user;
        let key = match self.for_writing(id).await? {
            DataKey::Live(key) => key,
            DataKey::Erased => {
                privacy::erase(aggregate_type, event_type, payload);
                return Ok(());
            }
        };
        let random = SystemRandom::new();
        let mut failed = None;
        privacy::each_field(aggregate_type, event_type, payload, |field, value| {
            if failed.is_some() || privacy::sealed(value).is_some() {
                return;
            }
            let mut nonce = [0u8; NONCE_LEN];
            if random.fill(&mut nonce).is_err() {
                failed = Some(KeyError::Random);
                return;
            }
            // A serde_json::Value always serialises.
            let mut data = serde_json::to_vec(value).unwrap_or_default();
            let aad = aad(user, aggregate_type, event_type, field.path);
            if key
                .seal_in_place_append_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad.as_bytes()),
                    &mut data,
                )
                .is_err()
            {
                failed = Some(KeyError::Corrupt(event_type.into()));
                return;
            }
            let mut sealed = nonce.to_vec();
            sealed.extend_from_slice(&data);
            let text = B64.encode(sealed);
            *value = privacy::seal_value(match id.call {
                Some(_) => format!("{CALL_KEYED}{text}"),
                None => text,
            });
        });
        failed.map_or(Ok(()), Err)
    }

    /// Opens the sealed fields of a stored payload in place: their clear values, or
    /// [`privacy::ERASED`] where the key was destroyed.
    pub async fn open(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        event_type: &str,
        payload: &mut Value,
    ) -> Result<(), KeyError> {
        if !privacy::is_personal(aggregate_type, event_type)
            || !privacy::has_sealed(aggregate_type, event_type, payload)
        {
            return Ok(());
        }
        // Sealed under a call's key (since there are such keys) or the user's (before).
        let mut call_keyed = false;
        privacy::each_field(aggregate_type, event_type, payload, |_, v| {
            call_keyed |= privacy::sealed(v).is_some_and(|t| t.starts_with(CALL_KEYED));
        });
        let id = Self::key_of(aggregate_type, aggregate_id, event_type, payload).map(|id| KeyId {
            call: id.call.filter(|_| call_keyed),
            ..id
        });
        let key = match id {
            Some(id) => (id.user, self.for_reading(id).await?),
            None => {
                privacy::blank(aggregate_type, event_type, payload);
                return Ok(());
            }
        };
        let (user, key) = match key {
            (user, DataKey::Live(key)) => (user, key),
            (_, DataKey::Erased) => {
                privacy::blank(aggregate_type, event_type, payload);
                return Ok(());
            }
        };
        let mut ok = true;
        privacy::each_field(aggregate_type, event_type, payload, |field, value| {
            let Some(text) = privacy::sealed(value) else {
                return;
            };
            let text = text.strip_prefix(CALL_KEYED).unwrap_or(text);
            let opened = B64.decode(text).ok().and_then(|mut bytes| {
                if bytes.len() < NONCE_LEN {
                    return None;
                }
                let nonce = Nonce::try_assume_unique_for_key(&bytes[..NONCE_LEN]).ok()?;
                let aad = aad(user, aggregate_type, event_type, field.path);
                let clear = key
                    .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut bytes[NONCE_LEN..])
                    .ok()?;
                serde_json::from_slice::<Value>(clear).ok()
            });
            match opened {
                Some(clear) => *value = clear,
                None => ok = false,
            }
        });
        if ok {
            Ok(())
        } else {
            Err(KeyError::Corrupt(format!(
                "{aggregate_type}:{aggregate_id} {event_type}"
            )))
        }
    }

    /// `event` with its personal fields opened (borrowed as is when it has none sealed).
    pub async fn opened<'e>(
        &self,
        event: &'e EventEnvelope,
    ) -> Result<Cow<'e, EventEnvelope>, KeyError> {
        if !privacy::is_personal(&event.aggregate_type, &event.event_type) {
            return Ok(Cow::Borrowed(event));
        }
        let mut event = event.clone();
        self.open(
            &event.aggregate_type,
            &event.aggregate_id,
            &event.event_type,
            &mut event.payload,
        )
        .await?;
        Ok(Cow::Owned(event))
    }

    /// Destroys `user`'s key: every field sealed under it reads as erased from now on, here at
    /// once and on other instances within [`LIVE_FOR`]; what is written for them afterwards is
    /// written erased.
    pub async fn destroy(&self, user: Uuid) -> Result<(), KeyError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO data_keys (user_id, key, erased_at) VALUES ($1, NULL, now())
             ON CONFLICT (user_id) DO UPDATE SET key = NULL, master_id = NULL, erased_at = now()",
        )
        .bind(user)
        .execute(&mut *tx)
        .await?;
        let calls: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE memory_keys SET key = NULL, master_id = NULL, erased_at = now()
              WHERE user_id = $1 AND key IS NOT NULL RETURNING call_id",
        )
        .bind(user)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        ERASURES.fetch_add(1, Ordering::SeqCst);
        remember(KeyId::user(user), DataKey::Erased);
        for call in calls {
            let id = KeyId {
                user,
                call: Some(call),
            };
            remember(id, DataKey::Erased);
        }
        Ok(())
    }

    /// Destroys the keys of what personas learned on calls before `before` (their
    /// transcripts' retention is over): those facts, summaries and open items read as erased
    /// from now on, in the log and on the stream (here at once, elsewhere within
    /// [`LIVE_FOR`]), and any still written for those calls are written erased. A key is as
    /// old as the first thing learned on its call (written after the call's transcript).
    /// Returns the keys destroyed.
    pub async fn expire_calls(
        &self,
        before: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, KeyError> {
        let gone: Vec<(Uuid, Uuid)> = sqlx::query_as(
            "UPDATE memory_keys SET key = NULL, master_id = NULL, erased_at = now()
              WHERE created_at < $1 AND key IS NOT NULL RETURNING user_id, call_id",
        )
        .bind(before)
        .fetch_all(&self.pool)
        .await?;
        if !gone.is_empty() {
            ERASURES.fetch_add(1, Ordering::SeqCst);
        }
        for (user, call) in &gone {
            let id = KeyId {
                user: *user,
                call: Some(*call),
            };
            remember(id, DataKey::Erased);
        }
        Ok(gone.len() as u64)
    }
}
