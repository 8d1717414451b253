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
//! The table never holds a data key in clear: each is stored wrapped (ChaCha20-Poly1305, the
//! user's id as associated data) by a master key from the environment
//! (`DATA_KEYS_MASTER_KEY`, [`Masters`]), with the master's [`MasterKey::id`] beside it. A
//! database copied without the environment opens nothing. [`rewrap`] (`callmeback privacy
//! rewrap`) moves every key to a new master; while it runs, instances given both the new
//! master and the old one (`DATA_KEYS_MASTER_KEY_OLD`) read keys under either.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use cmb_domain::{privacy, EventEnvelope};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::Value;
use sha2::{Digest, Sha256};
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
    /// A data key wrapped by a master key this process was not given.
    #[error(
        "the data key of {0} is wrapped by a master key this instance does not have \
         (DATA_KEYS_MASTER_KEY, or DATA_KEYS_MASTER_KEY_OLD while `privacy rewrap` runs)"
    )]
    UnknownMaster(Uuid),
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

/// A master key: wraps the data keys in the table.
pub struct MasterKey {
    key: LessSafeKey,
    id: [u8; 8],
}

/// The fixed text the development master key is derived from (never production's: a
/// production instance refuses to start without `DATA_KEYS_MASTER_KEY`).
const DEVELOPMENT_MASTER_SEED: &str = "callmeback development data-keys master key";

impl MasterKey {
    pub fn new(bytes: &[u8; 32]) -> Self {
        let mut h = Sha256::new();
        h.update(b"callmeback data-keys master id\0");
        h.update(bytes);
        let digest = h.finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        // 32 bytes is ChaCha20-Poly1305's key length.
        let key = UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("a 32-byte key");
        MasterKey {
            key: LessSafeKey::new(key),
            id,
        }
    }

    /// `DATA_KEYS_MASTER_KEY`'s form: base64 (standard, padded or not) of 32 bytes.
    pub fn parse(base64: &str) -> Result<Self, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(base64.trim())
            .or_else(|_| B64.decode(base64.trim()))
            .map_err(|_| "is not base64 (generate one: openssl rand -base64 32)".to_string())?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            format!(
                "is {} bytes; a master key is 32 (openssl rand -base64 32)",
                b.len()
            )
        })?;
        Ok(MasterKey::new(&bytes))
    }

    /// The development master key, derived from a fixed text in the source.
    pub fn development() -> Self {
        MasterKey::new(&Sha256::digest(DEVELOPMENT_MASTER_SEED.as_bytes()).into())
    }

    /// What identifies this master beside the keys it wrapped (a hash; not the key).
    pub fn id(&self) -> [u8; 8] {
        self.id
    }

    fn aad(user: Uuid) -> String {
        format!("data-key/{user}")
    }

    /// `data_key` wrapped for `user`: nonce ‖ ciphertext ‖ tag ([`WRAPPED_LEN`] bytes).
    fn wrap(&self, user: Uuid, data_key: &[u8; 32]) -> Result<Vec<u8>, KeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KeyError::Random)?;
        let mut data = data_key.to_vec();
        let aad = Self::aad(user);
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut data,
            )
            .map_err(|_| KeyError::Corrupt(format!("the data key of {user}")))?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&data);
        Ok(wrapped)
    }

    /// The data key `wrapped` holds for `user`.
    fn unwrap(&self, user: Uuid, wrapped: &[u8]) -> Result<[u8; 32], KeyError> {
        let corrupt = || KeyError::Corrupt(format!("the data key of {user}"));
        if wrapped.len() != WRAPPED_LEN {
            return Err(corrupt());
        }
        let mut bytes = wrapped.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(&bytes[..NONCE_LEN]).map_err(|_| corrupt())?;
        let aad = Self::aad(user);
        let clear = self
            .key
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut bytes[NONCE_LEN..])
            .map_err(|_| corrupt())?;
        clear.try_into().map_err(|_| corrupt())
    }
}

/// A wrapped data key's length: nonce, 32 bytes of key, tag.
pub const WRAPPED_LEN: usize = NONCE_LEN + 32 + 16;

/// The master keys of this process: the one that wraps (`DATA_KEYS_MASTER_KEY`) and, while
/// keys are moved to it, the one they are moved from (`DATA_KEYS_MASTER_KEY_OLD`).
pub struct Masters {
    pub current: MasterKey,
    pub old: Option<MasterKey>,
    /// Whether `current` is the development key (no `DATA_KEYS_MASTER_KEY`).
    pub development: bool,
}

impl Masters {
    /// From the configuration's values (already checked to parse by `config`).
    pub fn from_settings(current: Option<&str>, old: Option<&str>) -> Result<Self, String> {
        let parse = |name: &str, v: &str| MasterKey::parse(v).map_err(|e| format!("{name} {e}"));
        Ok(Masters {
            current: match current {
                Some(v) => parse("DATA_KEYS_MASTER_KEY", v)?,
                None => MasterKey::development(),
            },
            old: old
                .map(|v| parse("DATA_KEYS_MASTER_KEY_OLD", v))
                .transpose()?,
            development: current.is_none(),
        })
    }

    fn by_id(&self, id: &[u8]) -> Option<&MasterKey> {
        std::iter::once(&self.current)
            .chain(self.old.as_ref())
            .find(|m| m.id[..] == *id)
    }

    /// The data key stored for `user` (`master` NULL: a key from before wrapping, in clear).
    fn unwrap(
        &self,
        user: Uuid,
        stored: &[u8],
        master: Option<&[u8]>,
    ) -> Result<[u8; 32], KeyError> {
        match master {
            None => stored
                .try_into()
                .map_err(|_| KeyError::Corrupt(format!("the data key of {user}"))),
            Some(id) => self
                .by_id(id)
                .ok_or(KeyError::UnknownMaster(user))?
                .unwrap(user, stored),
        }
    }
}

fn installed() -> &'static RwLock<Option<Arc<Masters>>> {
    static MASTERS: OnceLock<RwLock<Option<Arc<Masters>>>> = OnceLock::new();
    MASTERS.get_or_init(Default::default)
}

/// Makes `masters` the process's master keys (`backbone::connect` does, from the
/// configuration, before anything reads or writes a key).
pub fn install(masters: Masters) {
    *installed().write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(masters));
}

/// The process's master keys: those installed, else the development key.
pub fn masters() -> Arc<Masters> {
    let mut slot = installed().write().unwrap_or_else(|p| p.into_inner());
    slot.get_or_insert_with(|| {
        Arc::new(Masters {
            current: MasterKey::development(),
            old: None,
            development: true,
        })
    })
    .clone()
}

fn aad(user: Uuid, aggregate_type: &str, event_type: &str, path: &str) -> String {
    format!("{user}/{aggregate_type}/{event_type}/{path}")
}

/// A `data_keys` row: the key as stored (`None` once destroyed) and the id of the master that
/// wrapped it (`None` for a key stored in clear by a build before wrapping).
type StoredKey = (Option<Vec<u8>>, Option<Vec<u8>>);

async fn stored_row(pool: &PgPool, user: Uuid) -> Result<Option<StoredKey>, sqlx::Error> {
    sqlx::query_as("SELECT key, master_id FROM data_keys WHERE user_id = $1")
        .bind(user)
        .fetch_optional(pool)
        .await
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

    /// `user`'s key as stored: `None` when there is none yet.
    async fn stored(&self, user: Uuid) -> Result<Option<DataKey>, KeyError> {
        Ok(match stored_row(&self.pool, user).await? {
            None => None,
            Some((None, _)) => Some(DataKey::Erased),
            Some((Some(stored), master)) => Some(data_key(&self.masters.unwrap(
                user,
                &stored,
                master.as_deref(),
            )?)?),
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
                let wrapped = self.masters.current.wrap(user, &bytes)?;
                sqlx::query(
                    "INSERT INTO data_keys (user_id, key, master_id) VALUES ($1, $2, $3)
                     ON CONFLICT (user_id) DO NOTHING",
                )
                .bind(user)
                .bind(&wrapped)
                .bind(&self.masters.current.id()[..])
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
             ON CONFLICT (user_id) DO UPDATE SET key = NULL, master_id = NULL, erased_at = now()",
        )
        .bind(user)
        .execute(&self.pool)
        .await?;
        remember(user, DataKey::Erased);
        Ok(())
    }
}

/// What [`rewrap`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rewrapped {
    /// Keys moved to the current master (from the old one, or from clear).
    pub rewrapped: u64,
    /// Live keys already under the current master (left as they are).
    pub already: u64,
}

/// Wraps every live data key by `masters.current`: those under the old master, and those
/// stored in clear by a build before wrapping. In batches of `batch`, each its own
/// transaction, so it can be stopped and run again (it carries on, and a second run finds
/// nothing to do); a key destroyed meanwhile stays destroyed (rows are locked while moved).
pub async fn rewrap(pool: &PgPool, masters: &Masters, batch: i64) -> Result<Rewrapped, KeyError> {
    let current = masters.current.id();
    let mut done = Rewrapped::default();
    loop {
        let mut tx = pool.begin().await?;
        let rows: Vec<(Uuid, Vec<u8>, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT user_id, key, master_id FROM data_keys
              WHERE key IS NOT NULL AND master_id IS DISTINCT FROM $1
              ORDER BY user_id LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(&current[..])
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            break;
        }
        for (user, stored, master) in rows {
            let key = masters.unwrap(user, &stored, master.as_deref())?;
            let wrapped = masters.current.wrap(user, &key)?;
            sqlx::query("UPDATE data_keys SET key = $2, master_id = $3 WHERE user_id = $1")
                .bind(user)
                .bind(&wrapped)
                .bind(&current[..])
                .execute(&mut *tx)
                .await?;
            done.rewrapped += 1;
        }
        tx.commit().await?;
    }
    let under_current = sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM data_keys WHERE key IS NOT NULL AND master_id = $1",
    )
    .bind(&current[..])
    .fetch_one(pool)
    .await?;
    done.already = (under_current as u64).saturating_sub(done.rewrapped);
    Ok(done)
}

/// `user`'s data key as the table holds it (wrapped), and in clear: for the tests that show
/// the table never holds the clear key.
pub async fn stored_and_clear(
    pool: &PgPool,
    masters: &Masters,
    user: Uuid,
) -> Result<Option<(Vec<u8>, [u8; 32])>, KeyError> {
    let Some((Some(stored), master)) = stored_row(pool, user).await? else {
        return Ok(None);
    };
    let clear = masters.unwrap(user, &stored, master.as_deref())?;
    Ok(Some((stored, clear)))
}
