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

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use cmb_domain::{privacy, EventEnvelope};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// How long another instance may still open a user's fields after the key was destroyed.
pub const LIVE_FOR: Duration = Duration::from_secs(30);

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD_NO_PAD;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("data keys: {0}")]
    Db(#[from] sqlx::Error),
    /// A sealed field that does not open under its owner's key: tampered with, or moved.
    #[error("a sealed field of {0} does not open")]
    Corrupt(String),
    #[error("the system's random source failed")]
    Random,
}

impl From<KeyError> for sqlx::Error {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Db(e) => e,
            other => sqlx::Error::Decode(Box::new(other)),
        }
    }
}

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
fn cache() -> &'static Mutex<HashMap<Uuid, Cached>> {
    static CACHE: OnceLock<Mutex<HashMap<Uuid, Cached>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Entries beyond which the cache starts over (a bound on memory, not a tuning knob).
const CACHE_MAX: usize = 100_000;

fn cached(user: Uuid) -> Option<DataKey> {
    let cache = cache().lock().unwrap_or_else(|p| p.into_inner());
    let entry = cache.get(&user)?;
    match entry.key {
        DataKey::Erased => Some(DataKey::Erased),
        DataKey::Live(_) if entry.at.elapsed() < LIVE_FOR => Some(entry.key.clone()),
        DataKey::Live(_) => None,
    }
}

fn remember(user: Uuid, key: DataKey) {
    let mut cache = cache().lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() >= CACHE_MAX {
        cache.retain(|_, c| matches!(c.key, DataKey::Erased));
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
    }
    cache.insert(
        user,
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

/// The data keys, in Postgres.
#[derive(Clone)]
pub struct Keyring {
    pool: PgPool,
}

impl Keyring {
    pub fn new(pool: PgPool) -> Self {
        Keyring { pool }
    }

    /// `user`'s key as stored: `None` when there is none yet.
    async fn stored(&self, user: Uuid) -> Result<Option<DataKey>, KeyError> {
        let row: Option<Option<Vec<u8>>> =
            sqlx::query_scalar("SELECT key FROM data_keys WHERE user_id = $1")
                .bind(user)
                .fetch_optional(&self.pool)
                .await?;
        Ok(match row {
            None => None,
            Some(None) => Some(DataKey::Erased),
            Some(Some(bytes)) => Some(data_key(&bytes)?),
        })
    }

    /// `user`'s key to read with: a user with no key row never had a sealed field, so a
    /// sealed field without one reads as erased.
    async fn for_reading(&self, user: Uuid) -> Result<DataKey, KeyError> {
        if let Some(key) = cached(user) {
            return Ok(key);
        }
        let key = self.stored(user).await?.unwrap_or(DataKey::Erased);
        if matches!(key, DataKey::Live(_)) {
            remember(user, key.clone());
        }
        Ok(key)
    }

    /// `user`'s key to write with, made on their first personal field.
    async fn for_writing(&self, user: Uuid) -> Result<DataKey, KeyError> {
        if let Some(key) = cached(user) {
            return Ok(key);
        }
        let key = match self.stored(user).await? {
            Some(key) => key,
            None => {
                let mut bytes = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut bytes)
                    .map_err(|_| KeyError::Random)?;
                sqlx::query(
                    "INSERT INTO data_keys (user_id, key) VALUES ($1, $2)
                     ON CONFLICT (user_id) DO NOTHING",
                )
                .bind(user)
                .bind(&bytes[..])
                .execute(&self.pool)
                .await?;
                // Whichever writer inserted first, everyone uses its key.
                self.stored(user)
                    .await?
                    .ok_or_else(|| KeyError::Corrupt(format!("the data key of {user}")))?
            }
        };
        remember(user, key.clone());
        Ok(key)
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
        let Some(user) = privacy::subject(aggregate_type, aggregate_id, event_type, payload) else {
            return Ok(());
        };
        let key = match self.for_writing(user).await? {
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
            *value = privacy::seal_value(B64.encode(sealed));
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
        let key = match privacy::subject(aggregate_type, aggregate_id, event_type, payload) {
            Some(user) => (user, self.for_reading(user).await?),
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
        sqlx::query(
            "INSERT INTO data_keys (user_id, key, erased_at) VALUES ($1, NULL, now())
             ON CONFLICT (user_id) DO UPDATE SET key = NULL, erased_at = now()",
        )
        .bind(user)
        .execute(&self.pool)
        .await?;
        remember(user, DataKey::Erased);
        Ok(())
    }
}
