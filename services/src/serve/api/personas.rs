//! Personas: list and search, create, edit, delete; and each user's customisation of any
//! persona they can see (the rules are in `usecases::personas`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use cmb_domain::persona::preference::Customization;
use cmb_domain::persona::{parse_tags, parse_voice_id, PersonaDraft, PersonaPatch, TurnTaking};
use cmb_domain::values::{parse_name, parse_text, Invalid};
use cmb_domain::PersonaId;
use cmb_projections::accounts::CustomizationView;
use cmb_projections::personas::PersonaView;
use cmb_projections::personas::{CreatedBy, ListFilter, Sort};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::serve::http::answer::{Done, Pagination};
use crate::serve::http::auth::{AuthUser, MaybeUser};
use crate::serve::http::error::{ApiError, ApiResult, ErrorBody};
use crate::serve::http::extract::{Json, Query};
use crate::serve::http::state::AppState;
use crate::usecases::personas::{self, CustomizationChange};

// ---- list ---------------------------------------------------------------------------------

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// 1 or more (default 1).
    #[param(minimum = 1)]
    page: Option<i64>,
    /// Personas per page, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
    /// In the name and description; at least 2 characters.
    #[param(min_length = 2)]
    search: Option<String>,
    /// Comma-separated; personas with any of them.
    tags: Option<String>,
    is_public: Option<bool>,
    /// `system`, `me` (signed in) or a user id.
    created_by: Option<String>,
    /// `popular` (default), `newest`, `oldest` or `name`.
    #[param(pattern = "^(popular|newest|oldest|name)$")]
    sort: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct PersonaList {
    personas: Vec<PersonaView>,
    pagination: Pagination,
}

#[derive(Serialize, ToSchema)]
pub struct PersonaAnswer {
    persona: PersonaView,
}

/// Public personas, the system's and your own, a page at a time.
#[utoipa::path(get, path = "/personas", operation_id = "list_personas", tag = "personas", params(ListParams),
    security((), ("bearer" = [])),
    responses((status = 200, description = "A page of personas", body = PersonaList)))]
pub async fn list(
    State(state): State<AppState>,
    MaybeUser(user): MaybeUser,
    Query(params): Query<ListParams>,
) -> ApiResult<impl IntoResponse> {
    let page = params.page.unwrap_or(1);
    if page < 1 {
        return Err(ApiError::validation("page", "page: must be 1 or more"));
    }
    let per_page = params.limit.unwrap_or(20);
    if !(1..=100).contains(&per_page) {
        return Err(ApiError::validation("limit", "limit: must be 1 to 100"));
    }
    let sort = match params.sort.as_deref().unwrap_or("popular") {
        "popular" => Sort::Popular,
        "newest" => Sort::Newest,
        "oldest" => Sort::Oldest,
        "name" => Sort::Name,
        _ => {
            return Err(ApiError::validation(
                "sort",
                "sort: one of popular, newest, oldest, name",
            ))
        }
    };
    let search = params.search.as_deref().map(str::trim);
    if search.is_some_and(|s| s.chars().count() < 2) {
        return Err(ApiError::validation(
            "search",
            "search: at least 2 characters",
        ));
    }
    let tags = params
        .tags
        .as_deref()
        .map(|tags| {
            tags.split(',')
                .map(|t| t.trim().to_lowercase())
                .filter(|t| !t.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let created_by = match params.created_by.as_deref() {
        None => None,
        Some("system") => Some(CreatedBy::System),
        Some("me") if user.is_some() => user.as_ref().map(|u| CreatedBy::User(u.id)),
        Some(other) => match other.parse() {
            Ok(id) => Some(CreatedBy::User(id)),
            Err(_) => {
                return Err(ApiError::validation(
                    "created_by",
                    "created_by: must be system, me (signed in) or a user id",
                ))
            }
        },
    };
    let filter = ListFilter {
        viewer: user.as_ref().map(|u| u.id),
        search: search.map(str::to_string),
        tags,
        is_public: params.is_public,
        created_by,
        sort,
        page,
        per_page,
    };
    let (personas, total) = cmb_projections::personas::list(&state.pool, &filter).await?;
    Ok(axum::Json(PersonaList {
        personas,
        pagination: Pagination::new(page, per_page, total),
    }))
}

/// One persona you can see.
#[utoipa::path(get, path = "/personas/{id}", operation_id = "get_persona", tag = "personas",
    params(("id" = String, Path, description = "The persona's id")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The persona", body = PersonaAnswer),
        (status = 404, description = "No persona you can see has this id", body = ErrorBody),
    ))]
pub async fn get_one(
    State(state): State<AppState>,
    MaybeUser(user): MaybeUser,
    Path(id): Path<PersonaId>,
) -> ApiResult<impl IntoResponse> {
    let persona = cmb_projections::personas::view(&state.pool, &id, user.map(|u| u.id))
        .await?
        .ok_or_else(|| ApiError::not_found("persona"))?;
    Ok(axum::Json(PersonaAnswer { persona }))
}

// ---- create, update, delete -----------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"name": "Coach Kim", "description": "A calm running coach who keeps you honest", "voice": "21m00Tcm4TlvDq8ikWAM", "system_prompt": "You are Kim, a calm and encouraging running coach.", "tags": ["fitness"]}))]
pub struct CreateBody {
    /// 3 to 50 characters, unique among your personas.
    #[schema(min_length = 3, max_length = 50)]
    name: String,
    #[schema(min_length = 10, max_length = 500)]
    description: String,
    /// An ElevenLabs voice id (also accepted as `voice_id`).
    #[serde(alias = "voice_id")]
    #[schema(pattern = r"^[A-Za-z0-9]{1,50}$")]
    voice: String,
    #[schema(min_length = 20, max_length = 2000)]
    system_prompt: String,
    /// What the persona says first.
    #[schema(min_length = 1, max_length = 300)]
    greeting: Option<String>,
    #[serde(default)]
    is_public: bool,
    /// At most 10 tags.
    #[serde(default)]
    #[schema(max_items = 10)]
    tags: Vec<String>,
    #[schema(value_type = Option<TurnTakingSchema>)]
    turn_taking: Option<TurnTaking>,
}

/// How the persona takes turns on a call, in milliseconds.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct TurnTakingSchema {
    /// Silence that ends the caller's turn.
    #[schema(minimum = 100, maximum = 3000)]
    endpointing_ms: u32,
    /// Silence after which the persona checks in.
    #[schema(minimum = 3000, maximum = 120000)]
    silence_reminder_ms: u32,
    /// Silence after which the persona hangs up: more than `silence_reminder_ms` (a 400
    /// otherwise).
    #[schema(minimum = 3001, maximum = 300000)]
    silence_hangup_ms: u32,
}

/// Create a persona (10 per free account).
#[utoipa::path(post, path = "/personas", tag = "personas", security(("bearer" = [])), request_body = CreateBody,
    responses(
        (status = 201, description = "The new persona", body = PersonaAnswer),
        (status = 409, description = "You already have a persona of this name", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<CreateBody>,
) -> ApiResult<impl IntoResponse> {
    let draft = PersonaDraft::parse(
        &body.name,
        &body.description,
        &body.voice,
        &body.system_prompt,
        body.greeting.as_deref(),
        body.is_public,
        &body.tags,
        body.turn_taking.unwrap_or_default(),
    )?;
    let at = state.clock.now();
    let (id, committed) = personas::create(
        &state.store,
        &state.elevenlabs,
        user.id,
        draft.clone(),
        &user.context(),
    )
    .await?;
    // The command committed: answer with what it recorded if the read model is not there yet.
    let caught_up = state.read_your_writes("personas", &committed).await;
    let found = match caught_up {
        true => cmb_projections::personas::view(&state.pool, &id, Some(user.id)).await,
        false => Ok(None),
    };
    let persona = match found {
        Ok(Some(view)) => view,
        found => {
            if let Err(e) = found {
                tracing::warn!(persona = %id, error = %e, "reading the persona back");
            }
            metrics::counter!("cmb_answered_before_read_model_total", "resource" => "persona")
                .increment(1);
            PersonaView::created(&id, user.id, &draft, at)
        }
    };
    let location = format!("/api/personas/{id}");
    Ok((
        StatusCode::CREATED,
        [(axum::http::header::LOCATION, location)],
        axum::Json(PersonaAnswer { persona }),
    ))
}

/// Fields left out keep their value.
#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"description": "A calm coach who listens first.", "tags": ["calm", "coach"]}))]
pub struct UpdateBody {
    /// 3 to 50 characters, unique among your personas.
    #[schema(min_length = 3, max_length = 50)]
    name: Option<String>,
    #[schema(min_length = 10, max_length = 500)]
    description: Option<String>,
    /// An ElevenLabs voice id (also accepted as `voice_id`).
    #[serde(alias = "voice_id")]
    #[schema(pattern = r"^[A-Za-z0-9]{1,50}$")]
    voice: Option<String>,
    #[schema(min_length = 20, max_length = 2000)]
    system_prompt: Option<String>,
    /// What the persona says first.
    #[schema(min_length = 1, max_length = 300)]
    greeting: Option<String>,
    is_public: Option<bool>,
    #[schema(max_items = 10)]
    tags: Option<Vec<String>>,
    #[schema(value_type = Option<TurnTakingSchema>)]
    turn_taking: Option<TurnTaking>,
}

impl UpdateBody {
    fn parse(self) -> Result<PersonaPatch, Invalid> {
        Ok(PersonaPatch {
            name: self
                .name
                .as_deref()
                .map(|v| parse_name("name", v, 3, 50))
                .transpose()?,
            description: self
                .description
                .as_deref()
                .map(|v| parse_text("description", v, 10, 500))
                .transpose()?,
            voice_id: self.voice.as_deref().map(parse_voice_id).transpose()?,
            system_prompt: self
                .system_prompt
                .as_deref()
                .map(|v| parse_text("system_prompt", v, 20, 2000))
                .transpose()?,
            greeting: self
                .greeting
                .as_deref()
                .map(|v| parse_text("greeting", v, 1, 300))
                .transpose()?,
            is_public: self.is_public,
            tags: self.tags.as_deref().map(parse_tags).transpose()?,
            turn_taking: self.turn_taking.map(TurnTaking::validate).transpose()?,
        })
    }
}

/// Change your persona; system personas are read-only.
#[utoipa::path(put, path = "/personas/{id}", tag = "personas", security(("bearer" = [])),
    params(("id" = String, Path, description = "The persona's id")), request_body = UpdateBody,
    responses(
        (status = 200, description = "The changed persona", body = PersonaAnswer),
        (status = 403, description = "A system persona, or another user's public persona", body = ErrorBody),
        (status = 404, description = "No persona you can see has this id", body = ErrorBody),
        (status = 409, description = "You already have a persona of this name", body = ErrorBody),
    ))]
pub async fn update(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<PersonaId>,
    Json(body): Json<UpdateBody>,
) -> ApiResult<impl IntoResponse> {
    let committed = personas::update(
        &state.store,
        &state.elevenlabs,
        user.id,
        &id,
        || body.parse(),
        &user.context(),
    )
    .await?;
    state.read_your_writes("personas", &committed).await;
    let persona = cmb_projections::personas::view(&state.pool, &id, Some(user.id))
        .await?
        .ok_or_else(|| ApiError::not_found("persona"))?;
    Ok(axum::Json(PersonaAnswer { persona }))
}

/// Delete your persona; it leaves every contact list.
#[utoipa::path(delete, path = "/personas/{id}", operation_id = "delete_persona", tag = "personas", security(("bearer" = [])),
    params(("id" = String, Path, description = "The persona's id")),
    responses(
        (status = 200, description = "Deleted", body = Done),
        (status = 403, description = "A system persona, or another user's public persona", body = ErrorBody),
        (status = 404, description = "No persona you can see has this id", body = ErrorBody),
        (status = 409, description = "A scheduled call is waiting for this persona", body = ErrorBody),
    ))]
pub async fn remove(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<PersonaId>,
) -> ApiResult<impl IntoResponse> {
    let committed = personas::remove(&state.store, user.id, &id, &user.context()).await?;
    state.read_your_writes("personas", &committed).await;
    Ok(axum::Json(Done::new(
        "persona deleted; it is being removed from every contact list",
    )))
}

// ---- customisation ---------------------------------------------------------------------------

#[derive(Serialize, ToSchema)]
pub struct CustomizationAnswer {
    customization: CustomizationView,
}

/// Your customisation of a persona you can see (the defaults when you have none).
#[utoipa::path(get, path = "/personas/{id}/customization", tag = "personas", security(("bearer" = [])),
    params(("id" = String, Path, description = "The persona's id")),
    responses(
        (status = 200, description = "Your customisation", body = CustomizationAnswer),
        (status = 404, description = "No persona you can see has this id", body = ErrorBody),
    ))]
pub async fn get_customization(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<PersonaId>,
) -> ApiResult<impl IntoResponse> {
    personas::accessible(&state.store, &id, user.id).await?;
    let c = cmb_projections::accounts::customization(&state.pool, user.id, &id).await?;
    Ok(axum::Json(CustomizationAnswer { customization: c }))
}

/// Fields left out keep their value; an empty `custom_prompt` or `voice_override` clears it.
#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"custom_prompt": "Call me Ada and keep it short.", "favorite": true}))]
pub struct CustomizeBody {
    /// Added to the persona's prompt for your calls; up to 1000 characters.
    #[schema(max_length = 1000)]
    custom_prompt: Option<String>,
    /// An ElevenLabs voice id for your calls (letters and digits); empty clears it.
    #[schema(pattern = r"^[A-Za-z0-9]{0,50}$")]
    voice_override: Option<String>,
    favorite: Option<bool>,
    /// Whether the persona remembers your calls.
    memory_enabled: Option<bool>,
}

impl CustomizeBody {
    fn parse(self) -> Result<CustomizationChange, Invalid> {
        Ok(CustomizationChange {
            custom_prompt: self
                .custom_prompt
                .as_deref()
                .map(Customization::parse_prompt)
                .transpose()?,
            voice_override: self
                .voice_override
                .as_deref()
                .map(|voice| {
                    if voice.trim().is_empty() {
                        Ok(None)
                    } else {
                        parse_voice_id(voice)
                            .map(Some)
                            .map_err(|e| Invalid::new("voice_override", e.message))
                    }
                })
                .transpose()?,
            favorite: self.favorite,
            memory_enabled: self.memory_enabled,
        })
    }
}

/// Set your custom prompt, voice, favourite mark and memory switch.
#[utoipa::path(put, path = "/personas/{id}/customization", tag = "personas", security(("bearer" = [])),
    params(("id" = String, Path, description = "The persona's id")), request_body = CustomizeBody,
    responses(
        (status = 200, description = "Your customisation", body = CustomizationAnswer),
        (status = 404, description = "No persona you can see has this id", body = ErrorBody),
    ))]
pub async fn customize(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<PersonaId>,
    Json(body): Json<CustomizeBody>,
) -> ApiResult<impl IntoResponse> {
    let committed = personas::customize(
        &state.store,
        &state.elevenlabs,
        user.id,
        &id,
        || body.parse(),
        &user.context(),
    )
    .await?;
    state
        .read_your_writes("persona_preferences", &committed)
        .await;
    let c = cmb_projections::accounts::customization(&state.pool, user.id, &id).await?;
    Ok(axum::Json(CustomizationAnswer { customization: c }))
}
