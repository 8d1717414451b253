//! Personas: list and search, create, edit, delete; and each user's customisation of any
//! persona they can see (the rules are in `usecases::personas`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use cmb_domain::persona::preference::Customization;
use cmb_domain::persona::{parse_tags, parse_voice_id, PersonaDraft, PersonaPatch, TurnTaking};
use cmb_domain::values::{parse_name, parse_text, Invalid};
use cmb_projections::personas::{CreatedBy, ListFilter, PersonaView, Sort};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::serve::http::auth::{AuthUser, ClientIp, MaybeUser};
use crate::serve::http::error::{ApiError, ApiResult};
use crate::serve::http::extract::{Json, Query};
use crate::serve::http::ratelimit;
use crate::serve::http::state::AppState;
use crate::usecases::personas::{self, CustomizationChange};

// ---- list ---------------------------------------------------------------------------------

#[derive(Deserialize)]
pub struct ListParams {
    page: Option<i64>,
    limit: Option<i64>,
    search: Option<String>,
    tags: Option<String>,
    is_public: Option<bool>,
    created_by: Option<String>,
    sort: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    MaybeUser(user): MaybeUser,
    ClientIp(ip): ClientIp,
    Query(params): Query<ListParams>,
) -> ApiResult<impl IntoResponse> {
    let limit = if user.is_some() {
        ratelimit::PERSONAS_LIST
    } else {
        ratelimit::PERSONAS_LIST_ANON
    };
    ratelimit::check(&state.pool, limit, &ratelimit::subject(user.as_ref(), ip)).await?;
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
        Some(other) => match Uuid::parse_str(other) {
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
    Ok(axum::Json(json!({
        "personas": personas,
        "pagination": {
            "page": page,
            "limit": per_page,
            "total": total,
            "total_pages": (total + per_page - 1) / per_page,
        }
    })))
}

pub async fn get_one(
    State(state): State<AppState>,
    MaybeUser(user): MaybeUser,
    ClientIp(ip): ClientIp,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let limit = if user.is_some() {
        ratelimit::PERSONAS_LIST
    } else {
        ratelimit::PERSONAS_LIST_ANON
    };
    ratelimit::check(&state.pool, limit, &ratelimit::subject(user.as_ref(), ip)).await?;
    let persona = cmb_projections::personas::view(&state.pool, &id, user.map(|u| u.id))
        .await?
        .ok_or_else(|| ApiError::not_found("persona"))?;
    Ok(axum::Json(json!({ "persona": persona })))
}

// ---- create, update, delete -----------------------------------------------------------------

#[derive(Deserialize)]
pub struct CreateBody {
    name: String,
    description: String,
    #[serde(alias = "voice_id")]
    voice: String,
    system_prompt: String,
    greeting: Option<String>,
    #[serde(default)]
    is_public: bool,
    #[serde(default)]
    tags: Vec<String>,
    turn_taking: Option<TurnTaking>,
}

pub async fn create(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<CreateBody>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::PERSONA_CREATE,
        &format!("user:{}", user.id),
    )
    .await?;
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
        axum::Json(json!({ "persona": persona })),
    ))
}

#[derive(Deserialize)]
pub struct UpdateBody {
    name: Option<String>,
    description: Option<String>,
    #[serde(alias = "voice_id")]
    voice: Option<String>,
    system_prompt: Option<String>,
    greeting: Option<String>,
    is_public: Option<bool>,
    tags: Option<Vec<String>>,
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

pub async fn update(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
    Json(body): Json<UpdateBody>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::PERSONA_UPDATE,
        &format!("user:{}", user.id),
    )
    .await?;
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
    Ok(axum::Json(json!({ "persona": persona })))
}

pub async fn remove(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::PERSONA_DELETE,
        &format!("user:{}", user.id),
    )
    .await?;
    let committed = personas::remove(&state.store, user.id, &id, &user.context()).await?;
    state.read_your_writes("personas", &committed).await;
    Ok(axum::Json(json!({
        "message": "persona deleted; it is being removed from every contact list"
    })))
}

// ---- customisation ---------------------------------------------------------------------------

pub async fn get_customization(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::PERSONA_CUSTOMIZE,
        &format!("user:{}", user.id),
    )
    .await?;
    personas::accessible(&state.store, &id, user.id).await?;
    let c = cmb_projections::accounts::customization(&state.pool, user.id, &id).await?;
    Ok(axum::Json(json!({ "customization": c })))
}

/// Fields left out keep their value; an empty `custom_prompt` or `voice_override` clears it.
#[derive(Deserialize)]
pub struct CustomizeBody {
    custom_prompt: Option<String>,
    voice_override: Option<String>,
    favorite: Option<bool>,
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

pub async fn customize(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
    Json(body): Json<CustomizeBody>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::PERSONA_CUSTOMIZE,
        &format!("user:{}", user.id),
    )
    .await?;
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
    Ok(axum::Json(json!({ "customization": c })))
}
