//! Twilio's wire conventions: form bodies, the error body, RFC 2822 dates, plausible destinations.

use super::*;

pub(super) fn rfc2822(at: DateTime<Utc>) -> String {
    at.format("%a, %d %b %Y %H:%M:%S +0000").to_string()
}

/// A refusal in Twilio's error body: `{"code","message","more_info","status"}`.
pub(super) struct Refusal {
    pub(super) status: StatusCode,
    pub(super) code: u32,
    pub(super) message: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let code = self.code;
        (
            self.status,
            Json(json!({
                "code": code,
                "message": self.message,
                "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
                "status": self.status.as_u16(),
            })),
        )
            .into_response()
    }
}

pub(super) fn refusal(status: StatusCode, code: u32, message: &str) -> Refusal {
    Refusal {
        status,
        code,
        message: message.to_string(),
    }
}

pub(super) fn twilio_error(status: StatusCode, code: u32, message: &str) -> Response {
    refusal(status, code, message).into_response()
}

/// A form-encoded body as pairs, repeated keys kept (`StatusCallbackEvent` repeats).
pub(super) fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}

pub(super) fn param<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.trim().is_empty())
}

/// E.164, or a `client:`/`sip:` address, as Twilio accepts for `To`.
pub(super) fn plausible_destination(to: &str) -> bool {
    if to.starts_with("client:") || to.starts_with("sip:") {
        return true;
    }
    to.strip_prefix('+').is_some_and(|digits| {
        (7..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
    })
}
