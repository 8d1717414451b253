//! Tokens (HS256 JWTs with a token id) and the extractors that turn a request's
//! `Authorization` header into a user (passwords: `usecases::accounts::password`).
//!
//! Revocation: logout writes the token id to `revoked_tokens` before answering (so every
//! instance refuses it at once, and after a restart) and records `TokenRevoked` on the user,
//! from which the users projection can rebuild the table. Signing out everywhere (and a
//! password change or reset) moves the user to a new session epoch: tokens carry the epoch
//! they were issued in, and older ones are refused (`usecases::accounts::sessions`).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chrono::{DateTime, Duration, TimeZone, Utc};
use cmb_domain::UserId;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::serve::http::error::ApiError;
use crate::serve::http::state::AppState;

/// How long a token is valid.
pub const TOKEN_DAYS: i64 = 30;

/// The only algorithm tokens are signed with, and so the only one accepted.
const ALGORITHM: Algorithm = Algorithm::HS256;

/// What a token says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: UserId,
    pub iat: i64,
    pub exp: i64,
    /// The token id, the handle for revocation.
    pub jti: String,
    /// The user's session epoch when the token was issued (tokens issued before epochs
    /// existed read as 0).
    #[serde(default)]
    pub epoch: u32,
    /// The WorkOS session a WorkOS sign-in opened (sign-out answers its logout URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wos_sid: Option<String>,
}

impl Claims {
    pub fn expires_at(&self) -> DateTime<Utc> {
        Utc.timestamp_opt(self.exp, 0)
            .single()
            .unwrap_or_else(Utc::now)
    }
}

/// A token for `user_id` in session epoch `epoch` (`usecases::accounts::sessions::epoch`).
pub fn issue_token(
    secret: &str,
    user_id: UserId,
    epoch: u32,
) -> Result<(String, Claims), ApiError> {
    issue_token_for_session(secret, user_id, epoch, None)
}

/// A token as [`issue_token`] makes, remembering the WorkOS session `wos_sid` it came from.
pub fn issue_token_for_session(
    secret: &str,
    user_id: UserId,
    epoch: u32,
    wos_sid: Option<String>,
) -> Result<(String, Claims), ApiError> {
    let now = Utc::now();
    let claims = Claims {
        sub: user_id,
        iat: now.timestamp(),
        exp: (now + Duration::days(TOKEN_DAYS)).timestamp(),
        jti: Uuid::new_v4().simple().to_string(),
        epoch,
        wos_sid,
    };
    let token = jsonwebtoken::encode(
        &Header::new(ALGORITHM),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(ApiError::internal)?;
    Ok((token, claims))
}

/// Checks signature, algorithm and expiry (no leeway). Revocation is checked by the caller.
pub fn decode_token(secret: &str, token: &str) -> Option<Claims> {
    let mut validation = Validation::new(ALGORITHM);
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp", "sub", "iat"]);
    jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .ok()
    .map(|data| data.claims)
}

/// A signed-in user: the token was valid, unexpired and not revoked.
#[derive(Debug, Clone)]
pub struct AuthUser {
    pub id: UserId,
    pub claims: Claims,
    pub request_id: String,
}

impl AuthUser {
    /// For a sensitive change (email, phone, a card, buying credits): a sign-in younger than
    /// `reauth::FRESH_MINUTES`, or `password` (the account's, sent with the request). Else
    /// `403 reauthentication_required`; a wrong password is `403 wrong_password`.
    pub async fn reauthenticate(
        &self,
        state: &AppState,
        password: Option<&str>,
    ) -> Result<(), ApiError> {
        use crate::usecases::accounts::{reauth, Error};
        let required = || {
            ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "reauthentication_required",
                format!(
                    "this change needs a sign-in from the last {} minutes: sign in again, or send your password as `password`",
                    reauth::FRESH_MINUTES
                ),
            )
            .with_field("password")
        };
        match password.filter(|p| !p.is_empty()) {
            Some(given) => {
                match reauth::confirm_password(&state.store, self.id, given.to_string()).await {
                    Ok(()) => Ok(()),
                    Err(Error::WrongPassword) => Err(ApiError::new(
                        axum::http::StatusCode::FORBIDDEN,
                        "wrong_password",
                        "the password is wrong",
                    )
                    .with_field("password")),
                    Err(Error::NoPassword) => Err(required()),
                    Err(other) => Err(other.into()),
                }
            }
            None if reauth::fresh(self.claims.iat, Utc::now()) => Ok(()),
            None => Err(required()),
        }
    }

    pub fn actor(&self) -> cmb_domain::Actor {
        cmb_domain::Actor::User(self.id)
    }
    pub fn context(&self) -> cmb_domain::CommandContext {
        cmb_domain::CommandContext::for_request(self.request_id.clone(), self.actor())
    }
}

fn bearer(parts: &Parts) -> Option<&str> {
    bearer_token(&parts.headers)
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

async fn authenticate(parts: &Parts, state: &AppState) -> Result<Option<AuthUser>, ApiError> {
    let Some(token) = bearer(parts) else {
        return Ok(None);
    };
    let unauthorized = || ApiError::unauthorized("the token is invalid, expired or revoked");
    let claims = decode_token(state.config.jwt_secret.expose(), token).ok_or_else(unauthorized)?;
    if crate::usecases::accounts::revoked(&state.pool, &claims.jti, claims.sub, claims.epoch)
        .await?
    {
        return Err(unauthorized());
    }
    Ok(Some(AuthUser {
        id: claims.sub,
        claims,
        request_id: crate::serve::http::extract::request_id(&parts.headers),
    }))
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authenticate(parts, state).await?.ok_or_else(|| {
            ApiError::unauthorized("sign in first: send Authorization: Bearer <token>")
        })
    }
}

/// A user if the request carries a token; anonymous otherwise. A bad token is still a 401:
/// a client that sends one expects to be signed in.
#[derive(Debug, Clone)]
pub struct MaybeUser(pub Option<AuthUser>);

impl FromRequestParts<AppState> for MaybeUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authenticate(parts, state).await.map(MaybeUser)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_algorithm_and_secret_are_accepted() {
        let (token, claims) = issue_token("s3cret", UserId::generate(), 0).unwrap();
        assert_eq!(decode_token("s3cret", &token).unwrap().jti, claims.jti);
        assert!(decode_token("other", &token).is_none());
        // The same claims signed with HS512 are refused although the secret is right.
        let other_alg = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert!(decode_token("s3cret", &other_alg).is_none());
        // An unsigned token ("alg": "none") is refused.
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(serde_json::to_vec(&claims).unwrap())
        );
        assert!(decode_token("s3cret", &none).is_none());
    }

    #[test]
    fn expired_tokens_are_refused() {
        let claims = Claims {
            sub: UserId::generate(),
            iat: Utc::now().timestamp() - 100,
            exp: Utc::now().timestamp() - 1,
            jti: "x".into(),
            epoch: 0,
            wos_sid: None,
        };
        let token = jsonwebtoken::encode(
            &Header::new(ALGORITHM),
            &claims,
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        assert!(decode_token("k", &token).is_none());
    }
}
