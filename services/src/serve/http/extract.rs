//! Extractors whose rejections are our JSON errors, naming the field when serde can.

use axum::extract::rejection::{FormRejection, JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON body, or a 4xx that says what is wrong with it.
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with Content-Type: application/json",
        ),
        JsonRejection::JsonSyntaxError(e) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {}", inner(&e.body_text())),
        ),
        JsonRejection::JsonDataError(e) => {
            let text = e.body_text();
            let field = field_of(&text);
            let mut err = ApiError::new(
                StatusCode::BAD_REQUEST,
                "validation_failed",
                inner(&text).to_string(),
            );
            err.field = field;
            err
        }
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the body is larger than 1 MiB",
            )
        }
        other => ApiError::new(other.status(), "bad_request", other.body_text()),
    }
}

/// serde_path_to_error's message starts with the path: `name: invalid type ...`.
fn field_of(text: &str) -> Option<String> {
    let detail = inner(text);
    if let Some(rest) = detail.strip_prefix("missing field `") {
        return rest.split('`').next().map(str::to_string);
    }
    let (path, _) = detail.split_once(": ")?;
    (!path.contains(' ') && path != ".").then(|| path.to_string())
}

fn inner(text: &str) -> &str {
    text.split_once(": ").map(|(_, rest)| rest).unwrap_or(text)
}

/// A form body (`application/x-www-form-urlencoded`, as Twilio posts), or our JSON 4xx.
pub struct Form<T>(pub T);

impl<S, T> FromRequest<S> for Form<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Form::<T>::from_request(req, state).await {
            Ok(axum::Form(v)) => Ok(Form(v)),
            Err(FormRejection::InvalidFormContentType(_)) => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as a form with Content-Type: application/x-www-form-urlencoded",
            )),
            Err(other) => Err(ApiError::new(
                if other.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    StatusCode::PAYLOAD_TOO_LARGE
                } else {
                    StatusCode::BAD_REQUEST
                },
                "invalid_form",
                inner(&other.body_text()).to_string(),
            )),
        }
    }
}

/// Query parameters, or a 400 naming the bad one. A parameter given empty (`status=`, as forms
/// and front ends send an unset filter) counts as absent.
pub struct Query<T>(pub T);

/// The request's query with empty parameters left out, as a URI to parse.
fn without_empty(uri: &axum::http::Uri) -> Option<axum::http::Uri> {
    let query = uri.query()?;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| matches!(pair.split_once('='), Some((_, v)) if !v.is_empty()))
        .collect();
    format!("/?{}", kept.join("&")).parse().ok()
}

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let parsed = match without_empty(&parts.uri) {
            Some(uri) => axum::extract::Query::<T>::try_from_uri(&uri),
            None => axum::extract::Query::<T>::from_request_parts(parts, state).await,
        };
        match parsed {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                let text = e.body_text();
                let mut err = ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    inner(&text).to_string(),
                );
                err.field = field_of(&text);
                Err(err)
            }
            Err(other) => Err(ApiError::new(
                other.status(),
                "invalid_query",
                other.body_text(),
            )),
        }
    }
}

/// The request id the middleware gave this request.
pub fn request_id(headers: &axum::http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}
