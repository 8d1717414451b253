//! Analysts' tokens: who may call the MCP tools over HTTP (`/mcp`). They are not users' tokens
//! (a user's JWT is refused there, and an analyst token opens nothing of the API): opaque
//! strings `cmba_<43 characters>`, printed once when created; only their SHA-256 is stored
//! (`analyst_tokens`). A name has at most one token in force; revoking it refuses the token at
//! once on every instance (each request looks it up).

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

/// What every analyst token starts with, so it is recognised (and never mistaken for a JWT).
pub const PREFIX: &str = "cmba_";

#[derive(Debug, thiserror::Error)]
pub enum AnalystTokenError {
    #[error("an analyst token named {0:?} is already in force: revoke it first")]
    NameTaken(String),
    #[error("no analyst token named {0:?} is in force")]
    NotFound(String),
    #[error("a token name is 1 to 64 letters, digits, '.', '_', '-' or '@'; got {0:?}")]
    BadName(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// One analyst token as listed (never the token itself).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AnalystToken {
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
}

/// A new token for `name`: returns the token, which is stored only as its hash.
pub async fn create(pool: &PgPool, name: &str) -> Result<String, AnalystTokenError> {
    if !valid_name(name) {
        return Err(AnalystTokenError::BadName(name.into()));
    }
    let token = format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
    );
    let inserted = sqlx::query(
        "INSERT INTO analyst_tokens (name, token_sha256) VALUES ($1, $2)
         ON CONFLICT (name) WHERE revoked_at IS NULL DO NOTHING",
    )
    .bind(name)
    .bind(digest(&token))
    .execute(pool)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(AnalystTokenError::NameTaken(name.into()));
    }
    Ok(token)
}

/// Revokes the token in force for `name`.
pub async fn revoke(pool: &PgPool, name: &str) -> Result<(), AnalystTokenError> {
    let revoked = sqlx::query(
        "UPDATE analyst_tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL",
    )
    .bind(name)
    .execute(pool)
    .await?;
    if revoked.rows_affected() == 0 {
        return Err(AnalystTokenError::NotFound(name.into()));
    }
    Ok(())
}

/// Every token, in force or revoked, oldest first.
pub async fn list(pool: &PgPool) -> Result<Vec<AnalystToken>, AnalystTokenError> {
    Ok(sqlx::query_as(
        "SELECT name, created_at, revoked_at FROM analyst_tokens ORDER BY created_at, id",
    )
    .fetch_all(pool)
    .await?)
}

/// The name of the analyst whose token this is, when it is in force.
pub async fn verify(pool: &PgPool, token: &str) -> Result<Option<String>, sqlx::Error> {
    if !token.starts_with(PREFIX) {
        return Ok(None);
    }
    sqlx::query_scalar(
        "SELECT name FROM analyst_tokens WHERE token_sha256 = $1 AND revoked_at IS NULL",
    )
    .bind(digest(token))
    .fetch_optional(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain() {
        assert!(valid_name("ana@example.com"));
        assert!(valid_name("notebook-1"));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
        assert!(!valid_name(&"x".repeat(65)));
    }
}
