//! What the API asks of the users, wallets and contacts read models.

use chrono::{DateTime, Utc};
use cmb_domain::{PersonaId, UserId};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// The user as the front end shows it.
#[derive(Debug, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct UserView {
    #[sqlx(try_from = "Uuid")]
    #[schema(value_type = Uuid)]
    pub id: UserId,
    pub name: String,
    pub email: String,
    /// None for an account made by a WorkOS sign-in until the user adds one.
    pub phone: Option<String>,
    /// Verified by WorkOS (a WorkOS sign-in with a verified email); we send no verification
    /// email of our own.
    pub email_verified: bool,
    /// There is no phone verification flow.
    pub phone_verified: bool,
    /// How the user can sign in: `password`, `workos`, or both.
    #[schema(example = json!(["password"]))]
    pub sign_in_methods: Vec<String>,
    pub credits: i64,
    pub last_sign_in: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub async fn user_view(pool: &PgPool, id: UserId) -> Result<Option<UserView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT u.id, u.name, u.email, u.phone, u.email_verified, false AS phone_verified,
                array_remove(ARRAY[CASE WHEN u.has_password THEN 'password' END,
                                   CASE WHEN u.workos_user_id IS NOT NULL THEN 'workos' END],
                             NULL) AS sign_in_methods,
                COALESCE(w.balance, 0) AS credits, u.last_sign_in, u.created_at, u.updated_at
           FROM rm_users u LEFT JOIN rm_wallets w ON w.user_id = u.id
          WHERE u.id = $1",
    )
    .bind(id.uuid())
    .fetch_optional(pool)
    .await
}

/// A contact: a persona the user keeps at hand.
#[derive(Debug, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct ContactView {
    pub added_at: DateTime<Utc>,
    #[sqlx(flatten)]
    pub persona: crate::personas::PersonaView,
}

/// The user's contacts with their personas, newest first. A persona deleted a moment ago may
/// still have a contact row until the clean-up reaches it; the join hides it meanwhile.
pub async fn contacts(pool: &PgPool, user: UserId) -> Result<Vec<ContactView>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT c.added_at, {}
           FROM rm_contacts c JOIN rm_personas p ON p.id = c.persona_id
          WHERE c.user_id = $2
            AND (p.is_public OR p.created_by IN ('system', $1))
          ORDER BY c.added_at DESC, p.id",
        crate::personas::PERSONA_COLUMNS
    ))
    .bind(user.to_string())
    .bind(user.uuid())
    .fetch_all(pool)
    .await
}

/// A user's customisation of a persona, as the front end shows it.
#[derive(Debug, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct CustomizationView {
    #[sqlx(try_from = "String")]
    #[schema(value_type = String)]
    pub persona_id: PersonaId,
    pub custom_prompt: Option<String>,
    pub voice_override: Option<String>,
    pub favorite: bool,
    pub memory_enabled: bool,
    pub updated_at: Option<DateTime<Utc>>,
}

/// `user`'s customisation of persona `persona_id` (the defaults when there is none).
pub async fn customization(
    pool: &PgPool,
    user: UserId,
    persona_id: &PersonaId,
) -> Result<CustomizationView, sqlx::Error> {
    let row: Option<CustomizationView> = sqlx::query_as(
        "SELECT persona_id, custom_prompt, voice_override, favorite, memory_enabled, updated_at
           FROM rm_persona_preferences WHERE user_id = $1 AND persona_id = $2",
    )
    .bind(user.uuid())
    .bind(persona_id.as_str())
    .fetch_optional(pool)
    .await?;
    let none = cmb_domain::persona::preference::Customization::default();
    Ok(row.unwrap_or(CustomizationView {
        persona_id: persona_id.clone(),
        custom_prompt: none.custom_prompt,
        voice_override: none.voice_override,
        favorite: none.favorite,
        memory_enabled: none.memory_enabled,
        updated_at: None,
    }))
}
