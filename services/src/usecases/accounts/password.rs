//! Password hashing: argon2id, off the async threads (it takes tens of milliseconds on
//! purpose).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

fn hasher() -> Argon2<'static> {
    // argon2id, 19 MiB, 2 passes, 1 lane: OWASP's recommended minimum.
    Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(19 * 1024, 2, 1, None).expect("valid argon2 parameters"),
    )
}

/// Hashing failed (it does not, short of a broken runtime).
#[derive(Debug, thiserror::Error)]
#[error("hashing a password: {0}")]
pub struct HashError(String);

pub async fn hash(password: String) -> Result<String, HashError> {
    tokio::task::spawn_blocking(move || {
        let salt: [u8; 16] = rand::random();
        let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
        hasher()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| HashError(e.to_string()))?
    .map_err(HashError)
}

/// Checks a password against a stored hash in constant time. An unknown account is checked
/// against a dummy hash, so a miss costs the same as a wrong password.
pub async fn verify(password: String, hash: Option<String>) -> bool {
    tokio::task::spawn_blocking(move || {
        let stored = hash.as_deref().unwrap_or(dummy_hash());
        let Ok(parsed) = PasswordHash::new(stored) else {
            return false;
        };
        let ok = hasher()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        ok && hash.is_some()
    })
    .await
    .unwrap_or(false)
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
        assert!(verify(r#"Aa1!"\{}$ü"#.into(), Some(hashed.clone())).await);
        assert!(!verify(r#"Aa1!"\{}$u"#.into(), Some(hashed)).await);
        assert!(!verify("not anyone's password".into(), None).await);
    }
}
