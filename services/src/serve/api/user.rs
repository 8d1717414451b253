//! The user's own data: `GET /user/export`, everything we hold about them as one JSON
//! document (assembled and streamed by `serve::export`); `DELETE /user`, the account erased
//! (`usecases::accounts::erasure`).

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::serve::export;
use crate::serve::http::auth::AuthUser;
use crate::serve::http::error::{ApiError, ApiResult, ErrorBody};
use crate::serve::http::extract::Json;
use crate::serve::http::state::AppState;
use crate::usecases::accounts::erasure;

/// Download everything we hold about you: profile, contacts, the personas you made, every call
/// (payment, provider usage, timeline, transcript), what personas remember, and the events of
/// your account, wallet, payments and calls. One JSON document (`format`
/// `callmeback-export/1`), streamed as it is assembled. 3 an hour.
#[utoipa::path(get, path = "/user/export", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 200, description = "The archive: `{format, exported_at, user_id, profile, contacts, personas, calls, memory, events}`",
            content_type = "application/json",
            headers(("content-disposition" = String, description = "attachment; filename=callmeback-export-<user>.json"))),
    ))]
pub async fn export(State(state): State<AppState>, user: AuthUser) -> ApiResult<Response> {
    tracing::info!(user = %user.id, "data export");
    let body = Body::from_stream(export::archive(state.pool.clone(), user.id));
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let disposition = format!(
        "attachment; filename=\"callmeback-export-{}.json\"",
        user.id
    );
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&disposition).map_err(ApiError::internal)?,
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"password": "Correct-horse-1"}))]
pub struct EraseBody {
    /// The account's password; not needed within 15 minutes of a sign-in.
    password: Option<String>,
}

/// What an erasure did.
#[derive(Serialize, ToSchema)]
pub struct EraseAnswer {
    message: String,
    /// Transcript lines deleted.
    transcript_lines: u64,
    /// Personas' memories of you cleared.
    memories_cleared: usize,
    /// The personas you made, deleted with their knowledge documents.
    personas_deleted: usize,
    /// Scheduled calls cancelled: yours, and anyone's with your personas.
    calls_cancelled: usize,
    /// Your customer at Stripe (and with it your saved cards) was deleted, or there was none.
    stripe_customer_deleted: bool,
    /// Every clean-up step is done. If not (Stripe unreachable, say), the account is erased
    /// all the same and the rest is retried in the background until it is.
    finished: bool,
}

/// Erase your account: every session ends, sign-in stops working, your email, phone and
/// WorkOS link are released, your transcripts, what personas remember of you, and the personas
/// you made (with their knowledge) are deleted, your scheduled calls cancelled. Your data key is
/// destroyed, so what the event log holds of you reads as `[erased]`. Needs a sign-in from the
/// last 15 minutes or the password. Money records stay (see README "Privacy"). 3 an hour.
#[utoipa::path(delete, path = "/user", tag = "auth", security(("bearer" = [])),
    request_body = EraseBody,
    responses(
        (status = 200, description = "Erased; this token no longer works", body = EraseAnswer),
        (status = 403, description = "A fresh sign-in or the password is needed, or the password is wrong", body = ErrorBody),
    ))]
pub async fn erase(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<EraseBody>,
) -> ApiResult<impl IntoResponse> {
    user.reauthenticate(&state, body.password.as_deref())
        .await?;
    let erased = erasure::erase(
        &state.store,
        &state.stripe,
        user.id,
        Utc::now(),
        state.config.erasure_retry,
        &user.context(),
    )
    .await?;
    tracing::info!(user = %user.id, transcript_lines = erased.transcript_lines,
        personas = erased.personas, finished = erased.finished, "account erased");
    Ok(axum::Json(EraseAnswer {
        message: "your account is erased: sign-in no longer works and this token is refused".into(),
        transcript_lines: erased.transcript_lines,
        memories_cleared: erased.memories,
        personas_deleted: erased.personas,
        calls_cancelled: erased.calls_cancelled,
        stripe_customer_deleted: erased.stripe_customer_deleted,
        finished: erased.finished,
    }))
}
