//! Persona name claims (`persona_name_claims`, beside the event log): a name is unique per
//! owner, and an owner has at most `PERSONA_LIMITS.free` personas — both held under a lock on
//! the owner, so they hold with any number of instances.

use cmb_domain::persona::PERSONA_LIMITS;
use cmb_domain::{PersonaId, UserId};
use sqlx::PgPool;

#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error(
        "you have {} personas, the most a free account may have; delete one first",
        PERSONA_LIMITS.free
    )]
    LimitReached,
    #[error("you already have a persona with this name")]
    Taken,
    #[error("persona names: {0}")]
    Db(#[from] sqlx::Error),
}

/// Reserves `name` for `owner`'s new persona `persona_id`.
pub async fn claim(
    pool: &PgPool,
    owner: UserId,
    persona_id: &PersonaId,
    name: &str,
) -> Result<(), NameError> {
    let owner = owner.to_string();
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('persona_names:' || $1, 0))")
        .bind(&owner)
        .execute(&mut *tx)
        .await?;
    let owned: i64 =
        sqlx::query_scalar("SELECT count(*) FROM persona_name_claims WHERE owner = $1")
            .bind(&owner)
            .fetch_one(&mut *tx)
            .await?;
    if owned >= PERSONA_LIMITS.free as i64 {
        return Err(NameError::LimitReached);
    }
    let inserted = sqlx::query(
        "INSERT INTO persona_name_claims (owner, name_key, persona_id) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(&owner)
    .bind(name.to_lowercase())
    .bind(persona_id.as_str())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Err(NameError::Taken);
    }
    tx.commit().await?;
    Ok(())
}

/// Moves persona `persona_id`'s name claim to `to`.
pub async fn rename(
    pool: &PgPool,
    owner: UserId,
    persona_id: &PersonaId,
    to: &str,
) -> Result<(), NameError> {
    let moved = sqlx::query(
        "UPDATE persona_name_claims SET name_key = $3 WHERE owner = $1 AND persona_id = $2",
    )
    .bind(owner.to_string())
    .bind(persona_id.as_str())
    .bind(to.to_lowercase())
    .execute(pool)
    .await;
    match moved {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(NameError::Taken),
        Err(e) => Err(e.into()),
    }
}

/// Gives a name back (logged, not returned, on failure).
pub async fn release(pool: &PgPool, owner: UserId, name: &str, persona_id: &PersonaId) {
    let released = sqlx::query(
        "DELETE FROM persona_name_claims WHERE owner = $1 AND name_key = $2 AND persona_id = $3",
    )
    .bind(owner.to_string())
    .bind(name.to_lowercase())
    .bind(persona_id.as_str())
    .execute(pool)
    .await;
    if let Err(e) = released {
        tracing::error!(persona = %persona_id, error = %e, "could not release a persona name");
    }
}

/// Gives back every name of `owner` (an erased account's; again: nothing changes).
pub async fn release_all(pool: &PgPool, owner: UserId) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("DELETE FROM persona_name_claims WHERE owner = $1")
        .bind(owner.to_string())
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}
