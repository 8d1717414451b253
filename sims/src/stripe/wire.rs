//! Stripe's wire conventions: form parameters with bracket notation, the error body, responses.

use super::*;

/// A Stripe error answer.
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) kind: &'static str,
    pub(super) code: Option<&'static str>,
    pub(super) decline_code: Option<&'static str>,
    pub(super) message: String,
    pub(super) param: Option<&'static str>,
    /// Boxed to keep `Result<_, ApiError>` small.
    pub(super) payment_intent: Option<Box<Value>>,
}

impl ApiError {
    pub(super) fn invalid(
        code: Option<&'static str>,
        param: Option<&'static str>,
        message: String,
    ) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code,
            decline_code: None,
            message,
            param,
            payment_intent: None,
        }
    }

    pub(super) fn missing(param: &'static str, what: &str, id: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            ..ApiError::invalid(
                Some("resource_missing"),
                Some(param),
                format!("No such {what}: '{id}'"),
            )
        }
    }

    pub(super) fn body(&self) -> Value {
        let mut error = json!({
            "type": self.kind,
            "message": self.message,
            "doc_url": self.code.map(|c| format!("https://stripe.com/docs/error-codes/{}", c.replace('_', "-"))),
        });
        for (k, v) in [
            ("code", self.code),
            ("decline_code", self.decline_code),
            ("param", self.param),
        ] {
            if let Some(v) = v {
                error[k] = json!(v);
            }
        }
        if let Some(pi) = &self.payment_intent {
            error["payment_intent"] = (**pi).clone();
        }
        json!({ "error": error })
    }
}

pub(super) type Params = Vec<(String, String)>;
pub(super) type Outcome = Result<Value, ApiError>;

pub(super) fn param<'a>(p: &'a Params, key: &str) -> Option<&'a str> {
    p.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

pub(super) fn flag(p: &Params, key: &str) -> Result<bool, ApiError> {
    match param(p, key) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(bad_param(key, other)),
    }
}

pub(super) fn cents(p: &Params, key: &'static str) -> Result<Option<i64>, ApiError> {
    match param(p, key) {
        None => Ok(None),
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| *n > 0)
            .map(Some)
            .ok_or_else(|| {
                ApiError::invalid(
                    Some("parameter_invalid_integer"),
                    Some(key),
                    format!("Invalid positive integer: {v}"),
                )
            }),
    }
}

pub(super) fn bad_param(key: &str, value: &str) -> ApiError {
    ApiError::invalid(
        Some("parameter_invalid_empty"),
        None,
        format!("Invalid value for {key}: {value}"),
    )
}

/// `metadata[k]=v` pairs.
pub(super) fn metadata(p: &Params) -> BTreeMap<String, String> {
    p.iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("metadata[")
                .and_then(|k| k.strip_suffix(']'))
                .map(|k| (k.to_string(), v.clone()))
        })
        .collect()
}

pub(super) fn random_id(prefix: &str) -> String {
    let tail: String = rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("{prefix}_{tail}")
}

pub(super) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A poisoned lock only means a panic elsewhere; the data is still consistent enough for a
/// simulator.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) type ReadOp = fn(&mut Ledger, &Params) -> Outcome;
pub(super) type Events = Vec<(&'static str, Value)>;
pub(super) type WriteOp = Box<dyn FnOnce(&mut Ledger, &Params, &mut Events) -> Outcome + Send>;

pub(super) fn respond(status: StatusCode, body: Value, headers: &[(&str, &str)]) -> Response {
    let mut response = (status, Json(body)).into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&random_id("req")) {
        h.insert("request-id", v);
    }
    h.insert("stripe-version", HeaderValue::from_static(api_version()));
    for (k, v) in headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.insert(name, value);
        }
    }
    response
}
