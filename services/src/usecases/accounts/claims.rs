//! Identity claims (`identity_claims`, beside the event log): an email, phone number or WorkOS
//! user belongs to one account, claimed in the same transaction for both before the account records it, so
//! two registrations racing for one email cannot both win, on any number of instances.

use cmb_domain::values::{Email, PhoneNumber};
use cmb_domain::UserId;
use sqlx::PgPool;
use uuid::Uuid;

/// What is already someone else's.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("an account with this email already exists")]
    EmailTaken,
    #[error("an account with this phone number already exists")]
    PhoneTaken,
    #[error("this WorkOS user already signs in to another account")]
    WorkosTaken,
    #[error("identity claims: {0}")]
    Db(#[from] sqlx::Error),
}

/// Claims `value` of `kind` ('email' or 'phone') for `user`. False if someone else has it.
async fn claim(
    tx: &mut sqlx::PgConnection,
    kind: &str,
    value: &str,
    user: UserId,
) -> Result<bool, sqlx::Error> {
    let holder: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO identity_claims (kind, value, user_id) VALUES ($1, $2, $3)
         ON CONFLICT (kind, value) DO UPDATE SET kind = EXCLUDED.kind
         RETURNING user_id",
    )
    .bind(kind)
    .bind(value)
    .bind(user.uuid())
    .fetch_optional(&mut *tx)
    .await?;
    Ok(holder == Some(user.uuid()))
}

/// Gives up `user`'s claim on `value` of `kind` (logged, not returned, on failure: a claim
/// left behind only keeps that value taken).
pub async fn release(pool: &PgPool, kind: &str, value: &str, user: UserId) {
    let released =
        sqlx::query("DELETE FROM identity_claims WHERE kind = $1 AND value = $2 AND user_id = $3")
            .bind(kind)
            .bind(value)
            .bind(user.uuid())
            .execute(pool)
            .await;
    if let Err(e) = released {
        tracing::error!(kind, error = %e, "could not release an identity claim");
    }
}

/// Claims an email and/or phone atomically: both or neither.
pub async fn claim_identity(
    pool: &PgPool,
    user: UserId,
    email: Option<&Email>,
    phone: Option<&PhoneNumber>,
) -> Result<(), ClaimError> {
    let mut tx = pool.begin().await?;
    if let Some(email) = email {
        if !claim(&mut tx, "email", email.as_str(), user).await? {
            return Err(ClaimError::EmailTaken);
        }
    }
    if let Some(phone) = phone {
        if !claim(&mut tx, "phone", phone.as_str(), user).await? {
            return Err(ClaimError::PhoneTaken);
        }
    }
    tx.commit().await?;
    Ok(())
}

/// The user holding `email`, from the claims (consistent, unlike a read model).
pub async fn user_by_email(pool: &PgPool, email: &Email) -> Result<Option<UserId>, sqlx::Error> {
    let user: Option<Uuid> = sqlx::query_scalar(
        "SELECT user_id FROM identity_claims WHERE kind = 'email' AND value = $1",
    )
    .bind(email.as_str())
    .fetch_optional(pool)
    .await?;
    Ok(user.map(UserId::from))
}

/// Claims WorkOS user `workos_user_id` (and `email`, for a new account) for `user`: both or
/// neither.
pub async fn claim_workos(
    pool: &PgPool,
    user: UserId,
    workos_user_id: &str,
    email: Option<&Email>,
) -> Result<(), ClaimError> {
    let mut tx = pool.begin().await?;
    if !claim(&mut tx, "workos", workos_user_id, user).await? {
        return Err(ClaimError::WorkosTaken);
    }
    if let Some(email) = email {
        if !claim(&mut tx, "email", email.as_str(), user).await? {
            return Err(ClaimError::EmailTaken);
        }
    }
    tx.commit().await?;
    Ok(())
}

/// The account WorkOS user `workos_user_id` signs in to.
pub async fn user_by_workos(
    pool: &PgPool,
    workos_user_id: &str,
) -> Result<Option<UserId>, sqlx::Error> {
    let user: Option<Uuid> = sqlx::query_scalar(
        "SELECT user_id FROM identity_claims WHERE kind = 'workos' AND value = $1",
    )
    .bind(workos_user_id)
    .fetch_optional(pool)
    .await?;
    Ok(user.map(UserId::from))
}
