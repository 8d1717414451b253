//! What a persona remembers about the signed-in user, and the user's control over it: read it,
//! forget one item, forget everything. The per-persona switch is the customisation's
//! `memory_enabled`. Memory is addressed by the signed-in user, so nobody reaches another's.

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use cmb_domain::persona::preference::{preference_id, Preference};
use serde_json::json;

use crate::serve::http::auth::AuthUser;
use crate::serve::http::error::ApiResult;
use crate::serve::http::ratelimit;
use crate::serve::http::state::AppState;
use crate::usecases::{memory, personas};

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
    personas::accessible(&state.store, &id, user.id).await?;
    let (pref, _) = state
        .store
        .load::<Preference>(&preference_id(user.id, &id))
        .await?;
    let m = cmb_projections::memory::view(&state.pool, user.id, &id).await?;
    Ok(axum::Json(json!({
        "memory": {
            "persona_id": id,
            "enabled": pref.customization.unwrap_or_default().memory_enabled,
            "summary": m.summary,
            "facts": m.facts,
            "open_items": m.open_items,
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
    let committed = memory::forget(&state.store, user.id, &id, item, &user.context()).await?;
    state.read_your_writes("memory", &committed).await;
    Ok(axum::Json(json!({ "message": "forgotten" })))
}

/// Forgets everything this persona remembers about the user.
pub async fn clear(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    limit(&state, &user).await?;
    let committed = memory::clear(&state.store, user.id, &id, &user.context()).await?;
    state.read_your_writes("memory", &committed).await;
    Ok(axum::Json(json!({ "message": "everything forgotten" })))
}
