//! What a persona remembers about the signed-in user, and the user's control over it: read it,
//! forget one item, forget everything. The per-persona switch is the customisation's
//! `memory_enabled`. Memory is addressed by the signed-in user, so nobody reaches another's.

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use cmb_domain::memory::{memory_id, Memory, MemoryCommand, MemoryError};
use cmb_domain::persona::preference::{preference_id, Preference};
use serde::Serialize;
use serde_json::json;

use super::personas::accessible;
use super::{settle, store_error};
use crate::serve::http::auth::AuthUser;
use crate::serve::http::error::{ApiError, ApiResult};
use crate::serve::http::ratelimit;
use crate::serve::http::AppState;

#[derive(Serialize, sqlx::FromRow)]
struct FactView {
    id: String,
    text: String,
    kind: String,
    /// The call it was learned from.
    call_id: String,
    at: DateTime<Utc>,
}

#[derive(Serialize, sqlx::FromRow)]
struct OpenItemView {
    id: String,
    text: String,
    call_id: String,
    at: DateTime<Utc>,
}

#[derive(Serialize, sqlx::FromRow)]
struct SummaryView {
    summary: String,
    call_id: String,
    updated_at: DateTime<Utc>,
}

async fn limit(state: &AppState, user: &AuthUser) -> ApiResult<()> {
    ratelimit::check(
        &state.pool,
        ratelimit::PERSONA_CUSTOMIZE,
        &format!("user:{}", user.id),
    )
    .await?;
    Ok(())
}

pub async fn get(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    limit(&state, &user).await?;
    accessible(&state, &id, user.id).await?;
    let (pref, _) = state
        .store
        .load::<Preference>(&preference_id(user.id, &id))
        .await
        .map_err(|e| store_error(e, ApiError::internal))?;
    let summary: Option<SummaryView> = sqlx::query_as(
        "SELECT summary, call_id, updated_at FROM rm_memory_summary
          WHERE user_id = $1 AND persona_id = $2",
    )
    .bind(user.id)
    .bind(&id)
    .fetch_optional(&state.pool)
    .await?;
    let facts: Vec<FactView> = sqlx::query_as(
        "SELECT id, text, kind, call_id, at FROM rm_memory_facts
          WHERE user_id = $1 AND persona_id = $2 ORDER BY at, id",
    )
    .bind(user.id)
    .bind(&id)
    .fetch_all(&state.pool)
    .await?;
    let open_items: Vec<OpenItemView> = sqlx::query_as(
        "SELECT id, text, call_id, at FROM rm_memory_open_items
          WHERE user_id = $1 AND persona_id = $2 ORDER BY at, id",
    )
    .bind(user.id)
    .bind(&id)
    .fetch_all(&state.pool)
    .await?;
    Ok(axum::Json(json!({
        "memory": {
            "persona_id": id,
            "enabled": pref.customization.unwrap_or_default().memory_enabled,
            "summary": summary,
            "facts": facts,
            "open_items": open_items,
        }
    })))
}

/// Forgets one fact or open item (or the summary, as item `summary`).
pub async fn forget(
    State(state): State<AppState>,
    user: AuthUser,
    Path((id, item)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    limit(&state, &user).await?;
    accessible(&state, &id, user.id).await?;
    let committed = state
        .store
        .execute::<Memory>(
            &memory_id(user.id, &id),
            MemoryCommand::Forget { id: item },
            &user.context(),
        )
        .await
        .map_err(|e| {
            store_error(e, |e| match e {
                MemoryError::NoSuchItem => ApiError::not_found("memory item"),
            })
        })?;
    settle(&state, "memory", &committed).await;
    Ok(axum::Json(json!({ "message": "forgotten" })))
}

/// Forgets everything this persona remembers about the user.
pub async fn clear(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    limit(&state, &user).await?;
    accessible(&state, &id, user.id).await?;
    let committed = state
        .store
        .execute::<Memory>(
            &memory_id(user.id, &id),
            MemoryCommand::Clear,
            &user.context(),
        )
        .await
        .map_err(|e| store_error(e, |e| ApiError::internal(e.to_string())))?;
    settle(&state, "memory", &committed).await;
    Ok(axum::Json(json!({ "message": "everything forgotten" })))
}
