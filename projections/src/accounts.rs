//! Users (with revoked tokens), contacts, persona customisations and credit wallets.

use async_trait::async_trait;
use cmb_domain::contacts::ContactsEvent;
use cmb_domain::persona::preference::PreferenceEvent;
use cmb_domain::user::UserEvent;
use cmb_domain::wallet::WalletEvent;
use cmb_domain::EventEnvelope;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Projection;

mod queries;
pub use queries::*;

fn decode<E: serde::de::DeserializeOwned>(e: &EventEnvelope) -> Result<E, sqlx::Error> {
    e.decode().map_err(|err| sqlx::Error::Decode(Box::new(err)))
}

fn user_id(e: &EventEnvelope) -> Result<Uuid, sqlx::Error> {
    Uuid::parse_str(&e.aggregate_id).map_err(|err| sqlx::Error::Decode(Box::new(err)))
}

pub struct Users;

#[async_trait]
impl Projection for Users {
    fn name(&self) -> &'static str {
        "users"
    }
    fn tables(&self) -> &'static [&'static str] {
        &["rm_users"]
    }
    fn aggregate_types(&self) -> &'static [&'static str] {
        &["user"]
    }
    async fn apply(&self, db: &mut PgConnection, e: &EventEnvelope) -> Result<(), sqlx::Error> {
        let id = user_id(e)?;
        match decode::<UserEvent>(e)? {
            UserEvent::UserRegistered {
                name, email, phone, ..
            } => {
                sqlx::query(
                    "INSERT INTO rm_users (id, name, email, phone, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $5)",
                )
                .bind(id)
                .bind(name)
                .bind(email.as_str())
                .bind(phone.as_str())
                .bind(e.occurred_at)
                .execute(db)
                .await?;
            }
            UserEvent::ProfileUpdated { name, email, phone } => {
                sqlx::query(
                    "UPDATE rm_users SET name = COALESCE($2, name), email = COALESCE($3, email),
                            phone = COALESCE($4, phone), updated_at = $5 WHERE id = $1",
                )
                .bind(id)
                .bind(name)
                .bind(email.map(|e| e.as_str().to_string()))
                .bind(phone.map(|p| p.as_str().to_string()))
                .bind(e.occurred_at)
                .execute(db)
                .await?;
            }
            // A lock for one client is not the account's state; an account-wide one (written
            // before locks were per client) is.
            UserEvent::AccountLocked {
                until,
                client: None,
            } => {
                sqlx::query("UPDATE rm_users SET locked_until = $2 WHERE id = $1")
                    .bind(id)
                    .bind(until)
                    .execute(db)
                    .await?;
            }
            UserEvent::SignedIn { at, .. } => {
                sqlx::query("UPDATE rm_users SET last_sign_in = $2 WHERE id = $1")
                    .bind(id)
                    .bind(at)
                    .execute(db)
                    .await?;
            }
            UserEvent::TokenRevoked {
                token_id,
                expires_at,
            } => {
                // Not in `tables()`: a rebuild must never un-revoke a token.
                sqlx::query(
                    "INSERT INTO revoked_tokens (token_id, user_id, expires_at) VALUES ($1, $2, $3)
                     ON CONFLICT DO NOTHING",
                )
                .bind(token_id)
                .bind(id)
                .bind(expires_at)
                .execute(db)
                .await?;
            }
            UserEvent::SessionsRevoked { epoch, .. } => {
                // Like revoked_tokens: beside the read model, only ever raised.
                sqlx::query(
                    "INSERT INTO session_epochs (user_id, epoch) VALUES ($1, $2)
                     ON CONFLICT (user_id) DO UPDATE
                        SET epoch = GREATEST(session_epochs.epoch, EXCLUDED.epoch)",
                )
                .bind(id)
                .bind(epoch as i32)
                .execute(db)
                .await?;
            }
            UserEvent::UserRegisteredWithWorkos {
                name,
                email,
                workos_user_id,
                email_verified,
            } => {
                sqlx::query(
                    "INSERT INTO rm_users (id, name, email, phone, has_password, workos_user_id,
                                           email_verified, created_at, updated_at)
                     VALUES ($1, $2, $3, NULL, false, $4, $5, $6, $6)",
                )
                .bind(id)
                .bind(name)
                .bind(email.as_str())
                .bind(workos_user_id)
                .bind(email_verified)
                .bind(e.occurred_at)
                .execute(db)
                .await?;
            }
            UserEvent::WorkosLinked {
                workos_user_id,
                email_verified,
            } => {
                sqlx::query(
                    "UPDATE rm_users SET workos_user_id = $2,
                            email_verified = email_verified OR $3, updated_at = $4 WHERE id = $1",
                )
                .bind(id)
                .bind(workos_user_id)
                .bind(email_verified)
                .bind(e.occurred_at)
                .execute(db)
                .await?;
            }
            UserEvent::SignedInWithWorkos { at, .. } => {
                sqlx::query("UPDATE rm_users SET last_sign_in = $2 WHERE id = $1")
                    .bind(id)
                    .bind(at)
                    .execute(db)
                    .await?;
            }
            UserEvent::PasswordChanged { .. } => {
                sqlx::query("UPDATE rm_users SET has_password = true WHERE id = $1")
                    .bind(id)
                    .execute(db)
                    .await?;
            }
            UserEvent::UserErased { .. } => {
                sqlx::query("DELETE FROM rm_users WHERE id = $1")
                    .bind(id)
                    .execute(db)
                    .await?;
            }
            UserEvent::SignInFailed { .. } | UserEvent::AccountLocked { .. } => {}
        }
        Ok(())
    }
}

pub struct Contacts;

#[async_trait]
impl Projection for Contacts {
    fn name(&self) -> &'static str {
        "contacts"
    }
    fn tables(&self) -> &'static [&'static str] {
        &["rm_contacts"]
    }
    fn aggregate_types(&self) -> &'static [&'static str] {
        &["contacts"]
    }
    async fn apply(&self, db: &mut PgConnection, e: &EventEnvelope) -> Result<(), sqlx::Error> {
        let id = user_id(e)?;
        match decode::<ContactsEvent>(e)? {
            ContactsEvent::ContactAdded { persona_id, at } => {
                sqlx::query(
                    "INSERT INTO rm_contacts (user_id, persona_id, added_at) VALUES ($1, $2, $3)",
                )
                .bind(id)
                .bind(persona_id)
                .bind(at)
                .execute(db)
                .await?;
            }
            ContactsEvent::ContactRemoved { persona_id, .. } => {
                sqlx::query("DELETE FROM rm_contacts WHERE user_id = $1 AND persona_id = $2")
                    .bind(id)
                    .bind(persona_id)
                    .execute(db)
                    .await?;
            }
        }
        Ok(())
    }
}

pub struct Preferences;

#[async_trait]
impl Projection for Preferences {
    fn name(&self) -> &'static str {
        "persona_preferences"
    }
    fn tables(&self) -> &'static [&'static str] {
        &["rm_persona_preferences"]
    }
    fn aggregate_types(&self) -> &'static [&'static str] {
        &["persona_preference"]
    }
    async fn apply(&self, db: &mut PgConnection, e: &EventEnvelope) -> Result<(), sqlx::Error> {
        let PreferenceEvent::PersonaCustomized {
            user_id,
            persona_id,
            customization: c,
        } = decode(e)?;
        sqlx::query(
            "INSERT INTO rm_persona_preferences
                (user_id, persona_id, custom_prompt, voice_override, favorite, memory_enabled, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (user_id, persona_id) DO UPDATE SET
                custom_prompt = EXCLUDED.custom_prompt, voice_override = EXCLUDED.voice_override,
                favorite = EXCLUDED.favorite, memory_enabled = EXCLUDED.memory_enabled,
                updated_at = EXCLUDED.updated_at",
        )
        .bind(user_id)
        .bind(persona_id)
        .bind(c.custom_prompt)
        .bind(c.voice_override)
        .bind(c.favorite)
        .bind(c.memory_enabled)
        .bind(e.occurred_at)
        .execute(db)
        .await?;
        Ok(())
    }
}

pub struct Wallets;

#[async_trait]
impl Projection for Wallets {
    fn name(&self) -> &'static str {
        "wallets"
    }
    fn tables(&self) -> &'static [&'static str] {
        &["rm_wallets", "rm_credit_ledger"]
    }
    fn aggregate_types(&self) -> &'static [&'static str] {
        &["wallet"]
    }
    async fn apply(&self, db: &mut PgConnection, e: &EventEnvelope) -> Result<(), sqlx::Error> {
        self.apply_all(db, &[e]).await
    }

    /// Set-based: every wallet the batch moves updated by one upsert (its events' changes
    /// summed), and every event's ledger line by one insert, its balance after the event being
    /// the wallet's new balance less what the wallet's later events in the batch moved.
    async fn apply_all(
        &self,
        db: &mut PgConnection,
        events: &[&EventEnvelope],
    ) -> Result<(), sqlx::Error> {
        let mut m = Movements::default();
        for e in events {
            m.push(e)?;
        }
        sqlx::query(
            "WITH d AS (
                  SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::bigint[],
                                       $5::text[], $6::text[], $7::bigint[], $8::bigint[],
                                       $9::bigint[], $10::timestamptz[])
                         WITH ORDINALITY
                         AS d(user_id, sequence, kind, credits, reason, reference,
                              balance, reserved, debt, at, n)),
              totals AS (
                  SELECT DISTINCT ON (user_id) user_id,
                         sum(balance) OVER w AS balance, sum(reserved) OVER w AS reserved,
                         sum(debt) OVER w AS debt, at
                    FROM d WINDOW w AS (PARTITION BY user_id)
                   ORDER BY user_id, n DESC),
              wallets AS (
                  INSERT INTO rm_wallets (user_id, balance, reserved, debt, updated_at)
                  SELECT user_id, balance, reserved, debt, at FROM totals
                  ON CONFLICT (user_id) DO UPDATE
                     SET balance = rm_wallets.balance + EXCLUDED.balance,
                         reserved = rm_wallets.reserved + EXCLUDED.reserved,
                         debt = rm_wallets.debt + EXCLUDED.debt,
                         updated_at = EXCLUDED.updated_at
                  RETURNING user_id, balance)
             INSERT INTO rm_credit_ledger
                    (user_id, sequence, kind, credits, reason, reference, balance_after, at)
             SELECT d.user_id, d.sequence, d.kind, d.credits, d.reason, d.reference,
                    w.balance - COALESCE(sum(d.balance) OVER (
                        PARTITION BY d.user_id ORDER BY d.n DESC
                        ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0),
                    d.at
               FROM d JOIN wallets w USING (user_id)",
        )
        .bind(&m.user_id)
        .bind(&m.sequence)
        .bind(&m.kind)
        .bind(&m.credits)
        .bind(&m.reason)
        .bind(&m.reference)
        .bind(&m.balance)
        .bind(&m.reserved)
        .bind(&m.debt)
        .bind(&m.at)
        .execute(db)
        .await?;
        Ok(())
    }
}

/// Wallet events as columns: what each moved, and its ledger line.
#[derive(Default)]
struct Movements {
    user_id: Vec<Uuid>,
    sequence: Vec<i64>,
    kind: Vec<&'static str>,
    credits: Vec<i64>,
    reason: Vec<String>,
    reference: Vec<String>,
    balance: Vec<i64>,
    reserved: Vec<i64>,
    debt: Vec<i64>,
    at: Vec<chrono::DateTime<chrono::Utc>>,
}

impl Movements {
    fn push(&mut self, e: &EventEnvelope) -> Result<(), sqlx::Error> {
        let id = user_id(e)?;
        // (kind, credits moved, reason, reference, balance change, reserved change); debt change
        let mut debt_delta = 0;
        let (kind, credits, reason, reference, balance_delta, reserved_delta) =
            match decode::<WalletEvent>(e)? {
                WalletEvent::CreditsGranted {
                    credits,
                    reason,
                    reference,
                    ..
                } => ("grant", credits, reason, reference, credits, 0),
                WalletEvent::CreditsReserved {
                    hold_id, credits, ..
                } => ("reserve", credits, "call hold".into(), hold_id, 0, credits),
                WalletEvent::CreditsSettled {
                    hold_id,
                    used,
                    released,
                    ..
                } => (
                    "settle",
                    used,
                    "call".into(),
                    hold_id,
                    -used,
                    -(used + released),
                ),
                WalletEvent::CreditsReleased { hold_id, credits } => (
                    "release",
                    credits,
                    "call hold released".into(),
                    hold_id,
                    0,
                    -credits,
                ),
                WalletEvent::CreditsRevoked {
                    grant,
                    cause,
                    credits,
                    from_balance,
                    to_debt,
                    ..
                } => {
                    debt_delta = to_debt;
                    (
                        "revoke",
                        credits,
                        format!("purchase {cause}: taken back"),
                        grant,
                        -from_balance,
                        0,
                    )
                }
                WalletEvent::DebtPaid { credits, .. } => {
                    debt_delta = -credits;
                    (
                        "debt_paid",
                        credits,
                        "debt paid".into(),
                        String::new(),
                        -credits,
                        0,
                    )
                }
            };
        self.user_id.push(id);
        self.sequence.push(e.sequence as i64);
        self.kind.push(kind);
        self.credits.push(credits);
        self.reason.push(reason);
        self.reference.push(reference);
        self.balance.push(balance_delta);
        self.reserved.push(reserved_delta);
        self.debt.push(debt_delta);
        self.at.push(e.occurred_at);
        Ok(())
    }
}
