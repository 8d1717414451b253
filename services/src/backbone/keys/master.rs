//! The master keys that wrap the data keys (`DATA_KEYS_MASTER_KEY`, README "Privacy"), and
//! [`rewrap`], which moves every data key to the current master.

use std::sync::{Arc, OnceLock, RwLock};

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

/// How sealed values and master keys are written (base64 without padding).
pub(super) const B64: base64::engine::GeneralPurpose =
    base64::engine::general_purpose::STANDARD_NO_PAD;

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

/// Which data key: a user's own, or the one of what personas learned on one of their calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId {
    pub user: Uuid,
    pub call: Option<Uuid>,
}

impl KeyId {
    pub fn user(user: Uuid) -> Self {
        KeyId { user, call: None }
    }

    /// The associated data of this key wrapped by a master key.
    pub(super) fn wrap_aad(&self) -> String {
        match self.call {
            None => format!("data-key/{}", self.user),
            Some(call) => format!("data-key/{}/call/{call}", self.user),
        }
    }
}

/// A key's row: the key as stored (`None` once destroyed) and the id of the master that
/// wrapped it (`None` for a user's key stored in clear by a build before wrapping).
pub(super) type StoredKey = (Option<Vec<u8>>, Option<Vec<u8>>);

pub(super) async fn stored_row(pool: &PgPool, id: KeyId) -> Result<Option<StoredKey>, sqlx::Error> {
    match id.call {
        None => {
            sqlx::query_as("SELECT key, master_id FROM data_keys WHERE user_id = $1")
                .bind(id.user)
                .fetch_optional(pool)
                .await
        }
        Some(call) => {
            sqlx::query_as(
                "SELECT key, master_id FROM memory_keys WHERE user_id = $1 AND call_id = $2",
            )
            .bind(id.user)
            .bind(call)
            .fetch_optional(pool)
            .await
        }
    }
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

    /// `data_key` wrapped as key `id`: nonce ‖ ciphertext ‖ tag ([`WRAPPED_LEN`] bytes).
    pub(super) fn wrap(&self, id: KeyId, data_key: &[u8; 32]) -> Result<Vec<u8>, KeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KeyError::Random)?;
        let mut data = data_key.to_vec();
        let aad = id.wrap_aad();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut data,
            )
            .map_err(|_| KeyError::Corrupt(format!("the data key of {}", id.user)))?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&data);
        Ok(wrapped)
    }

    /// The data key `wrapped` holds as key `id`.
    fn unwrap(&self, id: KeyId, wrapped: &[u8]) -> Result<[u8; 32], KeyError> {
        let corrupt = || KeyError::Corrupt(format!("the data key of {}", id.user));
        if wrapped.len() != WRAPPED_LEN {
            return Err(corrupt());
        }
        let mut bytes = wrapped.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(&bytes[..NONCE_LEN]).map_err(|_| corrupt())?;
        let aad = id.wrap_aad();
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

    /// The data key stored as key `id` (`master` NULL: a key from before wrapping, in clear).
    pub(super) fn unwrap(
        &self,
        id: KeyId,
        stored: &[u8],
        master: Option<&[u8]>,
    ) -> Result<[u8; 32], KeyError> {
        match master {
            None => stored
                .try_into()
                .map_err(|_| KeyError::Corrupt(format!("the data key of {}", id.user))),
            Some(master) => self
                .by_id(master)
                .ok_or(KeyError::UnknownMaster(id.user))?
                .unwrap(id, stored),
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

/// What [`rewrap`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rewrapped {
    /// Keys moved to the current master (from the old one, or from clear).
    pub rewrapped: u64,
    /// Live keys already under the current master (left as they are).
    pub already: u64,
}

/// A key to move: user, call (none for a user's key), key as stored, its master.
type KeyRow = (Uuid, Option<Uuid>, Vec<u8>, Option<Vec<u8>>);

/// Wraps every live key (`data_keys`, then `memory_keys`) by `masters.current`: those under
/// the old master, and those stored in clear by a build before wrapping. In batches of
/// `batch`, each its own transaction, so it can be stopped and run again (it carries on, and a
/// second run finds nothing to do); a key destroyed meanwhile stays destroyed (rows are locked
/// while moved).
pub async fn rewrap(pool: &PgPool, masters: &Masters, batch: i64) -> Result<Rewrapped, KeyError> {
    let current = masters.current.id();
    let mut done = Rewrapped::default();
    // A user's key has no call.
    for (table, call_column) in [("data_keys", "NULL::uuid"), ("memory_keys", "call_id")] {
        loop {
            let mut tx = pool.begin().await?;
            let rows: Vec<KeyRow> = sqlx::query_as(&format!(
                "SELECT user_id, {call_column}, key, master_id FROM {table}
                      WHERE key IS NOT NULL AND master_id IS DISTINCT FROM $1
                      ORDER BY 1, 2 LIMIT $2 FOR UPDATE SKIP LOCKED"
            ))
            .bind(&current[..])
            .bind(batch)
            .fetch_all(&mut *tx)
            .await?;
            if rows.is_empty() {
                break;
            }
            for (user, call, stored, master) in rows {
                let id = KeyId { user, call };
                let key = masters.unwrap(id, &stored, master.as_deref())?;
                let wrapped = masters.current.wrap(id, &key)?;
                sqlx::query(&format!(
                    "UPDATE {table} SET key = $2, master_id = $3
                      WHERE user_id = $1 AND {call_column} IS NOT DISTINCT FROM $4"
                ))
                .bind(user)
                .bind(&wrapped)
                .bind(&current[..])
                .bind(call)
                .execute(&mut *tx)
                .await?;
                done.rewrapped += 1;
            }
            tx.commit().await?;
        }
    }
    let under_current = sqlx::query_scalar::<_, i64>(
        "SELECT (SELECT count(*) FROM data_keys WHERE key IS NOT NULL AND master_id = $1)
              + (SELECT count(*) FROM memory_keys WHERE key IS NOT NULL AND master_id = $1)",
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
    let id = KeyId::user(user);
    let Some((Some(stored), master)) = stored_row(pool, id).await? else {
        return Ok(None);
    };
    let clear = masters.unwrap(id, &stored, master.as_deref())?;
    Ok(Some((stored, clear)))
}
