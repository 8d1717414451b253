//! Personas: list and search, create, edit, delete; and each user's customisation of any
//! persona they can see.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use cmb_domain::persona::preference::{preference_id, Customization, Customize, Preference};
use cmb_domain::persona::{
    parse_tags, parse_voice_id, Owner, Persona, PersonaCommand, PersonaDraft, PersonaError,
    PersonaPatch, TurnTaking, PERSONA_LIMITS,
};
use cmb_domain::values::{parse_name, parse_text};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

use super::{settle, store_error};
use crate::serve::http::auth::{AuthUser, ClientIp, MaybeUser};
use crate::serve::http::error::{ApiError, ApiResult};
use crate::serve::http::extract::{Json, Query};
use crate::serve::http::ratelimit;
use crate::serve::http::AppState;

/// A persona as the front end shows it. Another user's prompt is theirs: it is left out.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct PersonaView {
    pub id: String,
    pub name: String,
    pub description: String,
    pub voice_id: String,
    pub system_prompt: Option<String>,
    pub greeting: String,
    pub is_public: bool,
    pub is_system: bool,
    pub created_by: String,
    pub tags: Vec<String>,
    pub use_count: i64,
    pub turn_taking: sqlx::types::Json<TurnTaking>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Columns of `PersonaView` from `rm_personas p`, for a viewer bound as `$1` (text, may be '').
pub const PERSONA_COLUMNS: &str = "p.id, p.name, p.description, p.voice_id,
    CASE WHEN p.created_by IN ('system', $1) THEN p.system_prompt END AS system_prompt,
    p.greeting, p.is_public, p.created_by = 'system' AS is_system, p.created_by, p.tags,
    p.use_count, p.turn_taking, p.created_at, p.updated_at";

async fn view(
    pool: &PgPool,
    id: &str,
    viewer: Option<Uuid>,
) -> Result<Option<PersonaView>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {PERSONA_COLUMNS} FROM rm_personas p
          WHERE p.id = $2 AND (p.is_public OR p.created_by IN ('system', $1))"
    ))
    .bind(viewer.map(|v| v.to_string()).unwrap_or_default())
    .bind(id)
    .fetch_optional(pool)
    .await
}

fn rejected(e: PersonaError) -> ApiError {
    match e {
        PersonaError::NotFound => ApiError::not_found("persona"),
        PersonaError::SystemPersona => ApiError::forbidden("system personas are read-only"),
        PersonaError::NotOwner { visible: true } => {
            ApiError::forbidden("this persona belongs to someone else")
        }
        PersonaError::NotOwner { visible: false } => ApiError::not_found("persona"),
        PersonaError::AlreadyExists => ApiError::conflict("persona_exists", e.to_string()),
    }
}

/// Whether the persona exists and `user` may see it: public, system, or theirs. From the
/// event store, so a persona deleted a moment ago is already gone.
pub async fn accessible(state: &AppState, id: &str, user: Uuid) -> ApiResult<Persona> {
    let (persona, _) = state
        .store
        .load::<Persona>(id)
        .await
        .map_err(|e| store_error(e, rejected))?;
    let visible = persona.exists()
        && (persona.is_public
            || matches!(persona.owner, Some(Owner::System))
            || persona.owner == Some(Owner::User(user)));
    if visible {
        Ok(persona)
    } else {
        Err(ApiError::not_found("persona"))
    }
}

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

/// `SELECT <persona columns> FROM rm_personas p WHERE <visible to viewer and filters>`, or
/// the count of the same rows. Built afresh for each query (a builder's binds are consumed).
fn filtered<'a>(
    count: bool,
    viewer: &'a str,
    signed_in: bool,
    params: &'a ListParams,
) -> ApiResult<QueryBuilder<'a, Postgres>> {
    let mut q = QueryBuilder::new("SELECT ");
    if count {
        q.push("count(*)");
    } else {
        q.push("p.id, p.name, p.description, p.voice_id, CASE WHEN p.created_by IN ('system', ")
            .push_bind(viewer)
            .push(
                ") THEN p.system_prompt END AS system_prompt, p.greeting, p.is_public,
                 p.created_by = 'system' AS is_system, p.created_by, p.tags, p.use_count,
                 p.turn_taking, p.created_at, p.updated_at",
            );
    }
    q.push(" FROM rm_personas p WHERE (p.is_public OR p.created_by IN ('system', ")
        .push_bind(viewer)
        .push("))");
    if let Some(search) = params.search.as_deref().map(str::trim) {
        if search.chars().count() < 2 {
            return Err(ApiError::validation(
                "search",
                "search: at least 2 characters",
            ));
        }
        let escaped = search
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        let pattern = format!("%{escaped}%");
        q.push(" AND (p.name ILIKE ")
            .push_bind(pattern.clone())
            .push(" OR p.description ILIKE ")
            .push_bind(pattern)
            .push(")");
    }
    if let Some(tags) = params.tags.as_deref() {
        let tags: Vec<String> = tags
            .split(',')
            .map(|t| t.trim().to_lowercase())
            .filter(|t| !t.is_empty())
            .collect();
        if !tags.is_empty() {
            q.push(" AND p.tags && ").push_bind(tags);
        }
    }
    if let Some(is_public) = params.is_public {
        q.push(" AND p.is_public = ").push_bind(is_public);
    }
    match params.created_by.as_deref() {
        None => {}
        Some("system") => {
            q.push(" AND p.created_by = 'system'");
        }
        Some("me") if signed_in => {
            q.push(" AND p.created_by = ").push_bind(viewer);
        }
        Some(other) => match Uuid::parse_str(other) {
            Ok(id) => {
                q.push(" AND p.created_by = ").push_bind(id.to_string());
            }
            Err(_) => {
                return Err(ApiError::validation(
                    "created_by",
                    "created_by: must be system, me (signed in) or a user id",
                ))
            }
        },
    }
    Ok(q)
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
    let order = match params.sort.as_deref().unwrap_or("popular") {
        "popular" => "p.use_count DESC, (p.created_by = 'system') DESC, lower(p.name), p.id",
        "newest" => "p.created_at DESC, p.id",
        "oldest" => "p.created_at ASC, p.id",
        "name" => "lower(p.name) ASC, p.id",
        _ => {
            return Err(ApiError::validation(
                "sort",
                "sort: one of popular, newest, oldest, name",
            ))
        }
    };
    let viewer = user.as_ref().map(|u| u.id.to_string()).unwrap_or_default();
    let total: i64 = filtered(true, &viewer, user.is_some(), &params)?
        .build_query_scalar()
        .fetch_one(&state.pool)
        .await?;
    let mut rows = filtered(false, &viewer, user.is_some(), &params)?;
    rows.push(format!(
        " ORDER BY {order} LIMIT {per_page} OFFSET {}",
        (page - 1) * per_page
    ));
    let personas: Vec<PersonaView> = rows.build_query_as().fetch_all(&state.pool).await?;
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
    let persona = view(&state.pool, &id, user.map(|u| u.id))
        .await?
        .ok_or_else(|| ApiError::not_found("persona"))?;
    Ok(axum::Json(json!({ "persona": persona })))
}

// ---- names: unique per owner, and the per-user limit ----------------------------------------

/// Reserves `name` for `owner`'s new persona `persona_id`, under a lock on the owner so the
/// limit and uniqueness hold with any number of instances.
async fn claim_name(pool: &PgPool, owner: Uuid, persona_id: &str, name: &str) -> ApiResult<()> {
    let owner = owner.to_string();
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('persona_names:' || $1, 0))")
        .bind(&owner)
        .execute(&mut *tx)
        .await?;
    {
        let owned: i64 =
            sqlx::query_scalar("SELECT count(*) FROM persona_name_claims WHERE owner = $1")
                .bind(&owner)
                .fetch_one(&mut *tx)
                .await?;
        if owned >= PERSONA_LIMITS.free as i64 {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "persona_limit_reached",
                format!(
                    "you have {} personas, the most a free account may have; delete one first",
                    PERSONA_LIMITS.free
                ),
            ));
        }
    }
    let inserted = sqlx::query(
        "INSERT INTO persona_name_claims (owner, name_key, persona_id) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(&owner)
    .bind(name.to_lowercase())
    .bind(persona_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Err(
            ApiError::conflict("name_taken", "you already have a persona with this name")
                .with_field("name"),
        );
    }
    tx.commit().await?;
    Ok(())
}

/// Moves persona `persona_id`'s name claim to `to`; 409 if the owner has another persona by it.
async fn rename_claim(pool: &PgPool, owner: Uuid, persona_id: &str, to: &str) -> ApiResult<()> {
    let moved = sqlx::query(
        "UPDATE persona_name_claims SET name_key = $3 WHERE owner = $1 AND persona_id = $2",
    )
    .bind(owner.to_string())
    .bind(persona_id)
    .bind(to.to_lowercase())
    .execute(pool)
    .await;
    match moved {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(ApiError::conflict(
            "name_taken",
            "you already have a persona with this name",
        )
        .with_field("name")),
        Err(e) => Err(e.into()),
    }
}

async fn release_name(pool: &PgPool, owner: Uuid, name: &str, persona_id: &str) {
    let released = sqlx::query(
        "DELETE FROM persona_name_claims WHERE owner = $1 AND name_key = $2 AND persona_id = $3",
    )
    .bind(owner.to_string())
    .bind(name.to_lowercase())
    .bind(persona_id)
    .execute(pool)
    .await;
    if let Err(e) = released {
        tracing::error!(persona = persona_id, error = %e, "could not release a persona name");
    }
}

/// Asks ElevenLabs whether the voice exists: 400 naming `field` if not, 503 if it cannot tell.
async fn check_voice(state: &AppState, field: &'static str, voice_id: &str) -> ApiResult<()> {
    match state.elevenlabs.voice(voice_id).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(ApiError::validation(
            field,
            format!("{field}: ElevenLabs has no voice {voice_id}"),
        )),
        Err(e) => {
            tracing::warn!(error = %e, "voice check failed");
            Err(ApiError {
                retry_after: Some(5),
                ..ApiError::unavailable("the voice could not be checked with ElevenLabs; try again")
            })
        }
    }
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
    check_voice(&state, "voice", &draft.voice_id).await?;
    let id = Uuid::now_v7().to_string();
    claim_name(&state.pool, user.id, &id, &draft.name).await?;
    let name = draft.name.clone();
    let command = PersonaCommand::Create {
        owner: Owner::User(user.id),
        draft,
    };
    let committed = match state
        .store
        .execute::<Persona>(&id, command, &user.context())
        .await
    {
        Ok(c) => c,
        Err(e) => {
            release_name(&state.pool, user.id, &name, &id).await;
            return Err(store_error(e, rejected));
        }
    };
    settle(&state, "personas", &committed).await;
    let persona = view(&state.pool, &id, Some(user.id))
        .await?
        .ok_or_else(|| {
            ApiError::unavailable("the persona is being saved; try again in a moment")
        })?;
    Ok((
        StatusCode::CREATED,
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
    fn parse(self) -> ApiResult<PersonaPatch> {
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

/// The persona, if `user` may change it (owner, not system); the right 403/404 otherwise.
async fn owned(state: &AppState, id: &str, user: Uuid) -> ApiResult<Persona> {
    let (persona, _) = state
        .store
        .load::<Persona>(id)
        .await
        .map_err(|e| store_error(e, rejected))?;
    match persona.owner {
        _ if !persona.exists() => Err(rejected(PersonaError::NotFound)),
        Some(Owner::System) => Err(rejected(PersonaError::SystemPersona)),
        Some(Owner::User(owner)) if owner == user => Ok(persona),
        _ => Err(rejected(PersonaError::NotOwner {
            visible: persona.is_public,
        })),
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
    let current = owned(&state, &id, user.id).await?;
    let patch = body.parse()?;
    if let Some(voice) = patch.voice_id.as_deref().filter(|v| *v != current.voice_id) {
        check_voice(&state, "voice", voice).await?;
    }
    let renamed = patch
        .name
        .clone()
        .filter(|n| n.to_lowercase() != current.name.to_lowercase());
    if let Some(name) = &renamed {
        rename_claim(&state.pool, user.id, &id, name).await?;
    }
    let command = PersonaCommand::Update { by: user.id, patch };
    let result = state
        .store
        .execute::<Persona>(&id, command, &user.context())
        .await;
    if renamed.is_some() && result.is_err() {
        // Put the claim back under the name the persona still has.
        if let Err(e) = rename_claim(&state.pool, user.id, &id, &current.name).await {
            tracing::error!(persona = %id, error = %e.message, "could not restore a persona name claim");
        }
    }
    let committed = result.map_err(|e| store_error(e, rejected))?;
    settle(&state, "personas", &committed).await;
    let persona = view(&state.pool, &id, Some(user.id))
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
    let current = owned(&state, &id, user.id).await?;
    // Anyone's scheduled call with this persona still to come keeps it.
    let scheduled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM rm_calls WHERE persona_id = $1 AND status = 'scheduled'",
    )
    .bind(&id)
    .fetch_one(&state.pool)
    .await?;
    if scheduled > 0 {
        return Err(ApiError::conflict(
            "persona_scheduled",
            format!("this persona has {scheduled} scheduled call(s) to come; cancel them first"),
        ));
    }
    let command = PersonaCommand::Delete { by: user.id };
    let committed = state
        .store
        .execute::<Persona>(&id, command, &user.context())
        .await
        .map_err(|e| store_error(e, rejected))?;
    release_name(&state.pool, user.id, &current.name, &id).await;
    settle(&state, "personas", &committed).await;
    Ok(axum::Json(json!({
        "message": "persona deleted; it is being removed from every contact list"
    })))
}

// ---- customisation ---------------------------------------------------------------------------

#[derive(Debug, Serialize, sqlx::FromRow)]
struct CustomizationView {
    persona_id: String,
    custom_prompt: Option<String>,
    voice_override: Option<String>,
    favorite: bool,
    memory_enabled: bool,
    updated_at: Option<DateTime<Utc>>,
}

async fn customization(
    pool: &PgPool,
    user: Uuid,
    persona_id: &str,
) -> Result<CustomizationView, sqlx::Error> {
    let row: Option<CustomizationView> = sqlx::query_as(
        "SELECT persona_id, custom_prompt, voice_override, favorite, memory_enabled, updated_at
           FROM rm_persona_preferences WHERE user_id = $1 AND persona_id = $2",
    )
    .bind(user)
    .bind(persona_id)
    .fetch_optional(pool)
    .await?;
    let none = Customization::default();
    Ok(row.unwrap_or(CustomizationView {
        persona_id: persona_id.to_string(),
        custom_prompt: none.custom_prompt,
        voice_override: none.voice_override,
        favorite: none.favorite,
        memory_enabled: none.memory_enabled,
        updated_at: None,
    }))
}

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
    accessible(&state, &id, user.id).await?;
    let c = customization(&state.pool, user.id, &id).await?;
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
    accessible(&state, &id, user.id).await?;
    let aggregate_id = preference_id(user.id, &id);
    let (current, _) = state
        .store
        .load::<Preference>(&aggregate_id)
        .await
        .map_err(|e| store_error(e, ApiError::internal))?;
    let mut next = current.customization.unwrap_or_default();
    if let Some(prompt) = body.custom_prompt.as_deref() {
        next.custom_prompt = Customization::parse_prompt(prompt)?;
    }
    if let Some(voice) = body.voice_override.as_deref() {
        next.voice_override = if voice.trim().is_empty() {
            None
        } else {
            let voice = parse_voice_id(voice)
                .map_err(|e| ApiError::validation("voice_override", e.message))?;
            check_voice(&state, "voice_override", &voice).await?;
            Some(voice)
        };
    }
    if let Some(favorite) = body.favorite {
        next.favorite = favorite;
    }
    if let Some(memory) = body.memory_enabled {
        next.memory_enabled = memory;
    }
    let command = Customize {
        user_id: user.id,
        persona_id: id.clone(),
        customization: next,
    };
    let committed = state
        .store
        .execute::<Preference>(&aggregate_id, command, &user.context())
        .await
        .map_err(|e| store_error(e, ApiError::internal))?;
    settle(&state, "persona_preferences", &committed).await;
    let c = customization(&state.pool, user.id, &id).await?;
    Ok(axum::Json(json!({ "customization": c })))
}
