//! Stream tokens: what the answer TwiML gives Twilio to name the call on the media stream, and
//! why a stream may be refused. Pure: no I/O (the one use of a token is recorded by
//! `admission`).

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use cmb_domain::CallId;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

/// How long a stream token is good for after the answer TwiML is served (Twilio opens the
/// stream at once; the margin is for a slow network).
pub const TOKEN_LIFETIME: chrono::Duration = chrono::Duration::minutes(2);
/// The `<Parameter>` names: the token, and our call id beside it.
pub const TOKEN_PARAMETER: &str = "token";
pub const CALL_PARAMETER: &str = "call_id";

/// Why a stream was refused (logged and counted by reason; the socket is closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no `start` within the time allowed")]
    NoStart,
    #[error("no stream token")]
    NoToken,
    #[error("the stream token is malformed or its signature is wrong")]
    Forged,
    #[error("the stream token has expired")]
    Expired,
    #[error("the stream token is for another call")]
    OtherCall,
    #[error("the stream token was used already")]
    Replayed,
    #[error("the call is not answered (it is {0})")]
    NotAnswered(String),
    #[error("the call already has a live voice session")]
    SessionLive,
    #[error("the call's voice session is over")]
    SessionOver,
}

impl Refusal {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::NoStart => "no_start",
            Refusal::NoToken => "no_token",
            Refusal::Forged => "forged",
            Refusal::Expired => "expired",
            Refusal::OtherCall => "other_call",
            Refusal::Replayed => "replayed",
            Refusal::NotAnswered(_) => "not_answered",
            Refusal::SessionLive => "session_live",
            Refusal::SessionOver => "session_over",
        }
    }
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    pub call_id: CallId,
    pub call_sid: String,
    pub expires_at: DateTime<Utc>,
    pub nonce: Uuid,
}

/// Mints and checks stream tokens: `v1.<call id>.<CallSid>.<expiry, unix s>.<nonce>.<MAC>`,
/// the MAC an HMAC-SHA256 of everything before it under a key derived from the server secret
/// (`JWT_SECRET`) for this one use, so a token of one kind is never valid as another.
#[derive(Clone)]
pub struct StreamTokens {
    key: [u8; 32],
}

impl std::fmt::Debug for StreamTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamTokens(***)")
    }
}

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts any key length")
}

/// A CallSid as Twilio writes them (`CA` and hex): nothing that could split a token.
pub fn plausible_call_sid(sid: &str) -> bool {
    (2..=64).contains(&sid.len()) && sid.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl StreamTokens {
    pub fn new(server_secret: &str) -> Self {
        let mut m = mac(server_secret.as_bytes());
        m.update(b"callmeback media stream token v1");
        StreamTokens {
            key: m.finalize().into_bytes().into(),
        }
    }

    fn signature(&self, body: &str) -> HmacSha256 {
        let mut m = mac(&self.key);
        m.update(body.as_bytes());
        m
    }

    /// A fresh token for `call_id` as Twilio knows it (`call_sid`), good until `expires_at`.
    pub fn mint(&self, call_id: CallId, call_sid: &str, expires_at: DateTime<Utc>) -> String {
        let body = format!(
            "v1.{}.{call_sid}.{}.{}",
            call_id.uuid().simple(),
            expires_at.timestamp(),
            Uuid::new_v4().simple()
        );
        let tag = B64.encode(self.signature(&body).finalize().into_bytes());
        format!("{body}.{tag}")
    }

    /// The claims of a token this server signed that has not expired at `now`.
    pub fn check(&self, token: &str, now: DateTime<Utc>) -> Result<TokenClaims, Refusal> {
        if token.len() > 512 {
            return Err(Refusal::Forged);
        }
        let (body, tag) = token.rsplit_once('.').ok_or(Refusal::Forged)?;
        let tag = B64.decode(tag).map_err(|_| Refusal::Forged)?;
        self.signature(body)
            .verify_slice(&tag)
            .map_err(|_| Refusal::Forged)?;
        let parts: Vec<&str> = body.split('.').collect();
        let [version, call_id, call_sid, expiry, nonce] = parts[..] else {
            return Err(Refusal::Forged);
        };
        if version != "v1" {
            return Err(Refusal::Forged);
        }
        let call_id = call_id.parse::<CallId>().map_err(|_| Refusal::Forged)?;
        let nonce = Uuid::parse_str(nonce).map_err(|_| Refusal::Forged)?;
        let expires_at = expiry
            .parse::<i64>()
            .ok()
            .and_then(|s| DateTime::from_timestamp(s, 0))
            .ok_or(Refusal::Forged)?;
        if now >= expires_at {
            return Err(Refusal::Expired);
        }
        Ok(TokenClaims {
            call_id,
            call_sid: call_sid.to_string(),
            expires_at,
            nonce,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(s, 0).unwrap()
    }

    #[test]
    fn a_token_names_its_call_and_expires() {
        let tokens = StreamTokens::new("a server secret");
        let id = CallId::generate();
        let token = tokens.mint(id, "CA0123", at(1_000));
        let claims = tokens.check(&token, at(999)).expect("valid");
        assert_eq!((claims.call_id, claims.call_sid.as_str()), (id, "CA0123"));
        assert_eq!(tokens.check(&token, at(1_000)), Err(Refusal::Expired));
        // Two tokens for one call differ (each has its own nonce).
        assert_ne!(token, tokens.mint(id, "CA0123", at(1_000)));
    }

    #[test]
    fn a_token_cannot_be_forged_or_altered() {
        let tokens = StreamTokens::new("a server secret");
        let id = CallId::generate();
        let token = tokens.mint(id, "CA0123", at(1_000));
        let other = StreamTokens::new("another secret").mint(id, "CA0123", at(1_000));
        assert_eq!(tokens.check(&other, at(0)), Err(Refusal::Forged));
        let altered = token.replacen("CA0123", "CA0124", 1);
        assert_eq!(tokens.check(&altered, at(0)), Err(Refusal::Forged));
        let later = token.replacen(".1000.", ".9999.", 1);
        assert_eq!(tokens.check(&later, at(0)), Err(Refusal::Forged));
        for junk in ["", ".", "v1", "v1.a.b.c.d.e", &"x".repeat(600)] {
            assert_eq!(tokens.check(junk, at(0)), Err(Refusal::Forged), "{junk}");
        }
    }

    #[test]
    fn call_sids_that_could_split_a_token_are_not_plausible() {
        assert!(plausible_call_sid("CA0123456789abcdef0123456789abcdef"));
        for bad in ["", "C", "CA.1", "CA 1", "CA/1"] {
            assert!(!plausible_call_sid(bad), "{bad}");
        }
    }
}
