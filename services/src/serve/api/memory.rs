//! What a persona remembers about the signed-in user, and the user's control over it: read it,
//! forget one item, forget everything. The per-persona switch is the customisation's
//! `memory_enabled`. Memory is addressed by the signed-in user, so nobody reaches another's.

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use cmb_domain::persona::preference::{preference_id, Preference};
use cmb_domain::PersonaId;
use cmb_projections::memory::{FactView, OpenItemView, SummaryView};
use serde::Serialize;
use utoipa::ToSchema;

use crate::serve::http::answer::Done;
use crate::serve::http::auth::AuthUser;
use crate::serve::http::error::{ApiResult, ErrorBody};
use crate::serve::http::state::AppState;
use crate::usecases::{memory, personas};

#[derive(Serialize, ToSchema)]
pub struct Memory {
    #[schema(value_type = String)]
    persona_id: PersonaId,
    /// Whether the persona remembers your calls (the customisation's `memory_enabled`).
    enabled: bool,
    summary: Option<SummaryView>,
    /// What it learned, each with the call it came from.
    facts: Vec<FactView>,
    /// Things to follow up on.
    open_items: Vec<OpenItemView>,
}

#[derive(Serialize, ToSchema)]
pub struct MemoryAnswer {
    memory: Memory,
}

/// What this persona remembers about you: summary, facts (with their source call and date),
/// open items.
#[utoipa::path(get, path = "/personas/{id}/memory", operation_id = "get_memory", tag = "personas", security(("bearer" = [])),
    params(("id" = String, Path, description = "The persona's id")),
    responses(
        (status = 200, description = "What it remembers", body = MemoryAnswer),
        (status = 404, description = "No persona you can see has this id", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<PersonaId>,
) -> ApiResult<impl IntoResponse> {
    personas::accessible(&state.store, &id, user.id).await?;
    let (pref, _) = state
        .store
        .load::<Preference>(&preference_id(user.id.uuid(), id.as_str()))
        .await?;
    let m = cmb_projections::memory::view(&state.pool, user.id, &id).await?;
    Ok(axum::Json(MemoryAnswer {
        memory: Memory {
            persona_id: id,
            enabled: pref.customization.unwrap_or_default().memory_enabled,
            summary: m.summary,
            facts: m.facts,
            open_items: m.open_items,
        },
    }))
}

/// Forget one fact or open item (or the summary, as item `summary`).
#[utoipa::path(delete, path = "/personas/{id}/memory/{item_id}", tag = "personas", security(("bearer" = [])),
    params(("id" = String, Path, description = "The persona's id"),
           ("item_id" = String, Path, description = "A fact's or open item's id, or `summary`")),
    responses(
        (status = 200, description = "Forgotten", body = Done),
        (status = 404, description = "No such persona or item", body = ErrorBody),
    ))]
pub async fn forget(
    State(state): State<AppState>,
    user: AuthUser,
    Path((id, item)): Path<(PersonaId, String)>,
) -> ApiResult<impl IntoResponse> {
    let committed = memory::forget(&state.store, user.id, &id, item, &user.context()).await?;
    state.read_your_writes("memory", &committed).await;
    Ok(axum::Json(Done::new("forgotten")))
}

/// Forget everything this persona remembers about you.
#[utoipa::path(delete, path = "/personas/{id}/memory", tag = "personas", security(("bearer" = [])),
    params(("id" = String, Path, description = "The persona's id")),
    responses(
        (status = 200, description = "Everything forgotten", body = Done),
        (status = 404, description = "No persona you can see has this id", body = ErrorBody),
    ))]
pub async fn clear(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<PersonaId>,
) -> ApiResult<impl IntoResponse> {
    let committed = memory::clear(&state.store, user.id, &id, &user.context()).await?;
    state.read_your_writes("memory", &committed).await;
    Ok(axum::Json(Done::new("everything forgotten")))
}
