//! Contacts: the personas a user keeps at hand, newest first, at most 50.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::Utc;
use cmb_domain::contacts::MAX_CONTACTS;
use cmb_domain::PersonaId;
use cmb_projections::accounts::ContactView;
use cmb_projections::personas::PersonaView;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::serve::http::answer::Done;
use crate::serve::http::auth::AuthUser;
use crate::serve::http::error::{ApiError, ApiResult, ErrorBody};
use crate::serve::http::extract::Json;
use crate::serve::http::state::AppState;
use crate::usecases::contacts;

/// A persona you keep at hand.
#[derive(Serialize, ToSchema)]
pub struct Contact {
    #[schema(value_type = String)]
    persona_id: PersonaId,
    added_at: chrono::DateTime<Utc>,
    persona: PersonaView,
}

#[derive(Serialize, ToSchema)]
pub struct ContactList {
    contacts: Vec<Contact>,
    /// How many contacts you may keep.
    max: usize,
}

#[derive(Serialize, ToSchema)]
pub struct ContactAnswer {
    contact: Contact,
}

fn contact_json(c: ContactView) -> Contact {
    Contact {
        persona_id: c.persona.id.clone(),
        added_at: c.added_at,
        persona: c.persona,
    }
}

/// Your contacts, newest first, with their personas.
#[utoipa::path(get, path = "/contacts", operation_id = "list_contacts", tag = "contacts", security(("bearer" = [])),
    responses((status = 200, description = "Your contacts", body = ContactList)))]
pub async fn list(State(state): State<AppState>, user: AuthUser) -> ApiResult<impl IntoResponse> {
    let contacts: Vec<_> = cmb_projections::accounts::contacts(&state.pool, user.id)
        .await?
        .into_iter()
        .map(contact_json)
        .collect();
    Ok(axum::Json(ContactList {
        contacts,
        max: MAX_CONTACTS,
    }))
}

#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"persona_id": "brad_001"}))]
pub struct AddBody {
    /// A persona you can see.
    #[schema(min_length = 1, max_length = 100, example = "brad")]
    persona_id: String,
}

/// Add a persona you can see (at most 50 contacts).
#[utoipa::path(post, path = "/contacts", operation_id = "add_contact", tag = "contacts", security(("bearer" = [])), request_body = AddBody,
    responses(
        (status = 201, description = "Added", body = ContactAnswer),
        (status = 404, description = "No persona you can see has this id", body = ErrorBody),
    ))]
pub async fn add(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<AddBody>,
) -> ApiResult<impl IntoResponse> {
    let persona_id = PersonaId::new(body.persona_id.trim());
    if persona_id.as_str().is_empty() || persona_id.as_str().len() > 100 {
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
        .ok_or_else(|| {
            ApiError::unavailable("the contact is being added; look again in a moment")
        })?;
    Ok((StatusCode::CREATED, axum::Json(ContactAnswer { contact })))
}

/// Remove a contact.
#[utoipa::path(delete, path = "/contacts/{persona_id}", operation_id = "remove_contact", tag = "contacts", security(("bearer" = [])),
    params(("persona_id" = String, Path, description = "The contact's persona id")),
    responses(
        (status = 200, description = "Removed", body = Done),
        (status = 404, description = "Not one of your contacts", body = ErrorBody),
    ))]
pub async fn remove(
    State(state): State<AppState>,
    user: AuthUser,
    Path(persona_id): Path<PersonaId>,
) -> ApiResult<impl IntoResponse> {
    let committed = contacts::remove(&state.store, user.id, persona_id, &user.context()).await?;
    state.read_your_writes("contacts", &committed).await;
    Ok(axum::Json(Done::new("removed from your contacts")))
}
