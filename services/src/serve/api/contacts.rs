//! Contacts: the personas a user keeps at hand, newest first, at most 50.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::Utc;
use cmb_domain::contacts::MAX_CONTACTS;
use cmb_projections::accounts::ContactView;
use serde::Deserialize;
use serde_json::json;

use crate::serve::http::auth::AuthUser;
use crate::serve::http::error::{ApiError, ApiResult};
use crate::serve::http::extract::Json;
use crate::serve::http::ratelimit;
use crate::serve::http::state::AppState;
use crate::usecases::contacts;

fn contact_json(c: ContactView) -> serde_json::Value {
    json!({ "persona_id": c.persona.id, "added_at": c.added_at, "persona": c.persona })
}

pub async fn list(State(state): State<AppState>, user: AuthUser) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::CONTACTS_LIST,
        &format!("user:{}", user.id),
    )
    .await?;
    let contacts: Vec<_> = cmb_projections::accounts::contacts(&state.pool, user.id)
        .await?
        .into_iter()
        .map(contact_json)
        .collect();
    Ok(axum::Json(
        json!({ "contacts": contacts, "max": MAX_CONTACTS }),
    ))
}

#[derive(Deserialize)]
pub struct AddBody {
    persona_id: String,
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
    let committed = contacts::add(
        &state.store,
        user.id,
        &persona_id,
        Utc::now(),
        &user.context(),
    )
    .await?;
    state.read_your_writes("contacts", &committed).await;
    let contact = cmb_projections::accounts::contacts(&state.pool, user.id)
        .await?
        .into_iter()
        .find(|c| c.persona.id == persona_id)
        .map(contact_json)
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
    let committed = contacts::remove(&state.store, user.id, persona_id, &user.context()).await?;
    state.read_your_writes("contacts", &committed).await;
    Ok(axum::Json(
        json!({ "message": "removed from your contacts" }),
    ))
}
