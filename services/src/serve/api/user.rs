//! The user's own data: `GET /user/export`, everything we hold about them as one JSON
//! document (assembled and streamed by `serve::export`).

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::serve::export;
use crate::serve::http::auth::AuthUser;
use crate::serve::http::error::{ApiError, ApiResult};
use crate::serve::http::state::AppState;

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
