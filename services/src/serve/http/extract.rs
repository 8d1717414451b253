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
        // Read as a JSON value first (media type, size, syntax), then as `T`, so that a number
        // written with a zero fraction (`5.0`, an integer to JSON Schema and to JavaScript) is
        // taken for the integer it is.
        let axum::Json(mut value) = axum::Json::<serde_json::Value>::from_request(req, state)
            .await
            .map_err(json_rejection)?;
        integral_floats_as_integers(&mut value);
        let bytes = serde_json::to_vec(&value).map_err(ApiError::internal)?;
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// Rewrites every float with no fractional part (within ±2^53, where floats are exact) as an
/// integer.
fn integral_floats_as_integers(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64() {
                if f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0 {
                    *value = Value::from(f as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_as_integers),
        Value::Object(fields) => fields.values_mut().for_each(integral_floats_as_integers),
        _ => {}
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
/// and front ends send an unset filter) counts as absent, and NUL characters (which no text
/// column can hold) are left out of values.
pub struct Query<T>(pub T);

/// The request's query without empty parameters and NUL characters, as a URI to parse.
fn without_empty(uri: &axum::http::Uri) -> Option<axum::http::Uri> {
    let query = uri.query()?;
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.replace('\0', ""), v.replace('\0', "")))
        .filter(|(_, v)| !v.is_empty())
        .collect();
    let kept = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    format!("/?{kept}").parse().ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integral_floats_read_as_integers() {
        let mut v = serde_json::json!({"a": 5.0, "b": [1.5, -2.0, 1e300], "c": {"d": 0.0}, "e": 7});
        integral_floats_as_integers(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"a": 5, "b": [1.5, -2, 1e300], "c": {"d": 0}, "e": 7})
        );
        assert!(v["a"].is_i64());
    }
}
