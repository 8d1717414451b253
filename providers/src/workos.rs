//! WorkOS AuthKit (User Management): the hosted sign-in URL, the authorization-code exchange
//! (`POST /user_management/authenticate`, `grant_type=authorization_code`, with the PKCE
//! verifier) and the session logout URL. Speaks WorkOS's wire protocol directly, so the same
//! client talks to WorkOS or to `cmb_sims::workos`.
//!
//! Written on reqwest rather than the `workos` crate: we need three requests, two of which are
//! URLs we build; the crate covers many other APIs, compiles its own TLS stack (aws-lc-rs, which
//! needs a C toolchain and cmake) beside the rustls reqwest we already have, and would be a
//! second HTTP client with its own timeouts and retries.

use serde::Deserialize;

pub const DEFAULT_BASE_URL: &str = "https://api.workos.com";

#[derive(Clone)]
pub struct Workos {
    http: reqwest::Client,
    base_url: String,
    api_key: String,
    client_id: String,
}

impl std::fmt::Debug for Workos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workos")
            .field("base_url", &self.base_url)
            .field("client_id", &self.client_id)
            .field("api_key", &"<redacted>")
            .finish()
    }
}

/// Where the hosted page signs the person in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    /// AuthKit's own page: email and password, social providers, MFA as configured.
    AuthKit,
    /// A provider by WorkOS's name (`GoogleOAuth`, `MicrosoftOAuth`, …).
    Provider(String),
    /// An organisation's SSO connection.
    Organization(String),
}

/// A WorkOS user, as the code exchange returns it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct WorkosUser {
    pub id: String,
    pub email: String,
    #[serde(default)]
    pub email_verified: bool,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

/// What a code is worth.
#[derive(Debug, Clone, Deserialize)]
pub struct Authentication {
    pub user: WorkosUser,
    pub organization_id: Option<String>,
    /// `Password`, `SSO`, `GoogleOAuth`, `MagicAuth`, …
    #[serde(default)]
    pub authentication_method: Option<String>,
    /// A JWT whose `sid` claim is the WorkOS session (for the logout URL).
    pub access_token: String,
}

impl Authentication {
    /// The WorkOS session id, from the access token's `sid` claim. The token came to us over
    /// TLS straight from WorkOS in answer to our own request, so its signature is not checked:
    /// the session id only builds the logout URL, it grants nothing.
    pub fn session_id(&self) -> Option<String> {
        use base64::Engine as _;
        let payload = self.access_token.split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()?;
        let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        claims["sid"].as_str().map(str::to_string)
    }
}

/// A code exchange that did not sign anyone in.
#[derive(Debug, thiserror::Error)]
pub enum WorkosError {
    /// The code is unknown, used, expired, or not ours (`invalid_grant`), or the PKCE verifier
    /// does not match.
    #[error("the sign-in code is invalid, used or expired: {0}")]
    InvalidGrant(String),
    /// Our client id or key is refused, or another request error: a configuration problem.
    #[error("WorkOS refused the request ({status}): {detail}")]
    Refused { status: u16, detail: String },
    #[error("WorkOS could not be reached: {0}")]
    Unreachable(String),
}

#[derive(Deserialize)]
struct ErrorAnswer {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
    #[serde(default)]
    message: String,
}

impl Workos {
    pub fn new(http: reqwest::Client, base_url: &str, api_key: &str, client_id: &str) -> Workos {
        Workos {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
            client_id: client_id.to_string(),
        }
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The hosted sign-in page for `connection`, returning to `redirect_uri` with a code and
    /// `state`; `code_challenge` is the PKCE S256 challenge of the verifier we keep.
    pub fn authorization_url(
        &self,
        connection: &Connection,
        redirect_uri: &str,
        state: &str,
        code_challenge: &str,
    ) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("client_id", &self.client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("response_type", "code")
            .append_pair("state", state)
            .append_pair("code_challenge", code_challenge)
            .append_pair("code_challenge_method", "S256");
        match connection {
            Connection::AuthKit => q.append_pair("provider", "authkit"),
            Connection::Provider(p) => q.append_pair("provider", p),
            Connection::Organization(org) => q.append_pair("organization_id", org),
        };
        format!("{}/user_management/authorize?{}", self.base_url, q.finish())
    }

    /// Exchanges an authorization code (with the PKCE verifier) for the user it signed in.
    pub async fn authenticate_with_code(
        &self,
        code: &str,
        code_verifier: &str,
    ) -> Result<Authentication, WorkosError> {
        let body = serde_json::json!({
            "client_id": self.client_id,
            "client_secret": self.api_key,
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": code_verifier,
        });
        let response = self
            .http
            .post(format!("{}/user_management/authenticate", self.base_url))
            .json(&body)
            .send()
            .await
            .map_err(|e| WorkosError::Unreachable(e.to_string()))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| WorkosError::Unreachable(e.to_string()))?;
        if status.is_success() {
            return serde_json::from_str(&text).map_err(|e| WorkosError::Refused {
                status: status.as_u16(),
                detail: format!("unexpected answer: {e}"),
            });
        }
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(WorkosError::Unreachable(format!("{status}: {text}")));
        }
        let answer: Option<ErrorAnswer> = serde_json::from_str(&text).ok();
        let (code, detail) = answer
            .map(|a| {
                let detail = [a.error_description, a.message]
                    .into_iter()
                    .find(|d| !d.is_empty())
                    .unwrap_or_default();
                (a.error, detail)
            })
            .unwrap_or_default();
        if code == "invalid_grant" {
            return Err(WorkosError::InvalidGrant(detail));
        }
        Err(WorkosError::Refused {
            status: status.as_u16(),
            detail: format!("{code}: {detail}"),
        })
    }

    /// Where to send the browser to end the WorkOS session `session_id`.
    pub fn logout_url(&self, session_id: &str, return_to: Option<&str>) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("session_id", session_id);
        if let Some(to) = return_to {
            q.append_pair("return_to", to);
        }
        format!(
            "{}/user_management/sessions/logout?{}",
            self.base_url,
            q.finish()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authorization_url_carries_state_pkce_and_the_connection() {
        let w = Workos::new(
            reqwest::Client::new(),
            "https://api.workos.com/",
            "sk",
            "client_1",
        );
        let url = w.authorization_url(
            &Connection::Organization("org_1".into()),
            "https://app.test/api/auth/workos/callback",
            "st&te",
            "challenge",
        );
        assert!(url.starts_with("https://api.workos.com/user_management/authorize?client_id=client_1&redirect_uri=https%3A%2F%2Fapp.test%2Fapi%2Fauth%2Fworkos%2Fcallback&response_type=code&state=st%26te&code_challenge=challenge&code_challenge_method=S256"), "{url}");
        assert!(url.ends_with("&organization_id=org_1"));
    }

    #[test]
    fn the_session_id_is_read_from_the_access_token() {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let token = format!(
            "{}.{}.sig",
            b64.encode("{}"),
            b64.encode(r#"{"sid":"session_01X"}"#)
        );
        let auth = Authentication {
            user: WorkosUser {
                id: "user_1".into(),
                email: "a@b.test".into(),
                email_verified: true,
                first_name: None,
                last_name: None,
            },
            organization_id: None,
            authentication_method: None,
            access_token: token,
        };
        assert_eq!(auth.session_id().as_deref(), Some("session_01X"));
    }
}
