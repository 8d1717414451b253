//! Contacts: the personas a user keeps at hand, newest first, at most 50.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use cmb_domain::contacts::{Contacts, ContactsCommand, ContactsError, RemovalReason, MAX_CONTACTS};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::personas::{accessible, PersonaView, PERSONA_COLUMNS};
use super::{settle, store_error};
use crate::serve::http::auth::AuthUser;
use crate::serve::http::error::{ApiError, ApiResult};
use crate::serve::http::extract::Json;
use crate::serve::http::ratelimit;
use crate::serve::http::AppState;

#[derive(sqlx::FromRow)]
struct ContactRow {
    added_at: DateTime<Utc>,
    #[sqlx(flatten)]
    persona: PersonaView,
}

/// The user's contacts with their personas. A persona deleted a moment ago may still have a
/// contact row until the clean-up reaches it; the join hides it meanwhile.
async fn contacts(pool: &PgPool, user: Uuid) -> Result<Vec<serde_json::Value>, sqlx::Error> {
    let rows: Vec<ContactRow> = sqlx::query_as(&format!(
        "SELECT c.added_at, {PERSONA_COLUMNS}
           FROM rm_contacts c JOIN rm_personas p ON p.id = c.persona_id
          WHERE c.user_id = $2
            AND (p.is_public OR p.created_by IN ('system', $1))
          ORDER BY c.added_at DESC, p.id"
    ))
    .bind(user.to_string())
    .bind(user)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |r| json!({ "persona_id": r.persona.id, "added_at": r.added_at, "persona": r.persona }),
        )
        .collect())
}

pub async fn list(State(state): State<AppState>, user: AuthUser) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::CONTACTS_LIST,
        &format!("user:{}", user.id),
    )
    .await?;
    let contacts = contacts(&state.pool, user.id).await?;
    Ok(axum::Json(
        json!({ "contacts": contacts, "max": MAX_CONTACTS }),
    ))
}

#[derive(Deserialize)]
pub struct AddBody {
    persona_id: String,
}

fn rejected(e: ContactsError) -> ApiError {
    match e {
        ContactsError::AlreadyAdded => ApiError::new(
            StatusCode::BAD_REQUEST,
            "already_a_contact",
            "this persona is already in your contacts",
        )
        .with_field("persona_id"),
        ContactsError::Full => ApiError::new(
            StatusCode::BAD_REQUEST,
            "contacts_full",
            format!("you can keep at most {MAX_CONTACTS} contacts; remove one first"),
        ),
        ContactsError::NotAContact => ApiError::not_found("contact"),
    }
}

pub async fn add(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<AddBody>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::CONTACTS_ADD,
        &format!("user:{}", user.id),
    )
    .await?;
    let persona_id = body.persona_id.trim().to_string();
    if persona_id.is_empty() || persona_id.len() > 100 {
        return Err(ApiError::validation(
            "persona_id",
            "persona_id: must be a persona id",
        ));
    }
    accessible(&state, &persona_id, user.id).await?;
    let command = ContactsCommand::Add {
        persona_id: persona_id.clone(),
        at: Utc::now(),
    };
    let committed = state
        .store
        .execute::<Contacts>(&user.id.to_string(), command, &user.context())
        .await
        .map_err(|e| store_error(e, rejected))?;
    settle(&state, "contacts", &committed).await;
    let contacts = contacts(&state.pool, user.id).await?;
    let contact = contacts
        .into_iter()
        .find(|c| c["persona_id"] == persona_id.as_str())
        .unwrap_or_else(|| json!({ "persona_id": persona_id }));
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "contact": contact })),
    ))
}

pub async fn remove(
    State(state): State<AppState>,
    user: AuthUser,
    Path(persona_id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::CONTACTS_REMOVE,
        &format!("user:{}", user.id),
    )
    .await?;
    let command = ContactsCommand::Remove {
        persona_id,
        reason: RemovalReason::ByUser,
    };
    let committed = state
        .store
        .execute::<Contacts>(&user.id.to_string(), command, &user.context())
        .await
        .map_err(|e| store_error(e, rejected))?;
    settle(&state, "contacts", &committed).await;
    Ok(axum::Json(
        json!({ "message": "removed from your contacts" }),
    ))
}
