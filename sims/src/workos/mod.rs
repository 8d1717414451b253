//! WorkOS simulator: AuthKit's hosted sign-in page, the authorization-code exchange, users, one
//! organisation with an SSO connection, and session logout — on WorkOS's paths and shapes
//! (`/user_management/authorize`, `/user_management/authenticate`, `/user_management/users`,
//! `/user_management/sessions/logout`). What it knows of a request it reads from the request.
//!
//! The hosted page is an HTML form; a test (or a person in development) posts it back as a
//! browser would (`POST /user_management/authorize`), and is redirected to the app's
//! `redirect_uri` with `code` and `state`. Codes are single-use, expire after ten minutes and
//! are bound to the client, the redirect URI and the PKCE challenge, as WorkOS's are.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::Faults;

mod api;
use api::*;

/// The API key the simulator accepts when `WORKOS_API_KEY` is not set.
pub const DEV_API_KEY: &str = "sk_test_callmeback_workos_simulator";
/// The client id the simulator accepts when `WORKOS_CLIENT_ID` is not set.
pub const DEV_CLIENT_ID: &str = "client_callmeback_simulator";
/// The organisation with an SSO connection every simulator starts with.
pub const SSO_ORGANIZATION_ID: &str = "org_01SIMACMECORP";
pub const SSO_CONNECTION_ID: &str = "conn_01SIMACMEOKTA";
/// Its email domain: only its members sign in through its connection.
pub const SSO_DOMAIN: &str = "acme.test";

/// How long a code may wait for its exchange, as at WorkOS.
const CODE_TTL: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct Settings {
    pub api_key: String,
    pub client_id: String,
    pub faults: Faults,
    /// How long a code stays exchangeable (`SIM_WORKOS_CODE_TTL_MS`, for tests of an expired
    /// code; ten minutes otherwise, as WorkOS's).
    pub code_ttl: Duration,
}

impl Settings {
    /// `WORKOS_API_KEY`, `WORKOS_CLIENT_ID` (else the development values),
    /// `SIM_WORKOS_LATENCY_MS`, `SIM_WORKOS_FAIL_EVERY`, `SIM_WORKOS_CODE_TTL_MS`.
    pub fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Self {
        Settings {
            api_key: get("WORKOS_API_KEY").unwrap_or_else(|| DEV_API_KEY.into()),
            client_id: get("WORKOS_CLIENT_ID").unwrap_or_else(|| DEV_CLIENT_ID.into()),
            faults: Faults::from_lookup(get, "WORKOS"),
            code_ttl: get("SIM_WORKOS_CODE_TTL_MS")
                .and_then(|ms| ms.parse().ok())
                .map_or(CODE_TTL, Duration::from_millis),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SimUser {
    pub id: String,
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub email_verified: bool,
    /// AuthKit's own password for this user, if they signed up with one.
    password: Option<String>,
    created_at: String,
}

impl SimUser {
    fn json(&self) -> Value {
        json!({
            "object": "user",
            "id": self.id,
            "email": self.email,
            "first_name": self.first_name,
            "last_name": self.last_name,
            "email_verified": self.email_verified,
            "profile_picture_url": null,
            "created_at": self.created_at,
            "updated_at": self.created_at,
        })
    }
}

struct Grant {
    user_id: String,
    client_id: String,
    challenge: Option<String>,
    organization_id: Option<String>,
    method: &'static str,
    issued: Instant,
    used: bool,
}

#[derive(Default)]
struct Directory {
    users: HashMap<String, SimUser>,
    codes: HashMap<String, Grant>,
    /// session id → user id, for logout.
    sessions: HashMap<String, String>,
    ended_sessions: Vec<String>,
}

/// The simulator; clones share state.
#[derive(Clone)]
pub struct WorkosSim {
    settings: Arc<Settings>,
    directory: Arc<Mutex<Directory>>,
}

fn random_id(prefix: &str) -> String {
    let bytes: [u8; 13] = rand::random();
    let text: String = bytes
        .iter()
        .map(|b| char::from(b"0123456789ABCDEFGHJKMNPQRSTVWXYZ"[(*b % 32) as usize]))
        .collect();
    format!("{prefix}_01{text}")
}

fn now_iso() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn error(status: StatusCode, code: &str, description: &str) -> Response {
    (
        status,
        Json(json!({ "error": code, "error_description": description })),
    )
        .into_response()
}

impl WorkosSim {
    pub fn new(settings: Settings) -> WorkosSim {
        WorkosSim {
            settings: Arc::new(settings),
            directory: Arc::default(),
        }
    }

    fn dir(&self) -> MutexGuard<'_, Directory> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.directory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a user as the WorkOS dashboard or API would; returns it.
    pub fn create_user(
        &self,
        email: &str,
        email_verified: bool,
        password: Option<&str>,
    ) -> SimUser {
        let user = SimUser {
            id: random_id("user"),
            email: email.trim().to_lowercase(),
            first_name: None,
            last_name: None,
            email_verified,
            password: password.map(str::to_string),
            created_at: now_iso(),
        };
        self.dir().users.insert(user.id.clone(), user.clone());
        user
    }

    pub fn user_by_email(&self, email: &str) -> Option<SimUser> {
        let email = email.trim().to_lowercase();
        self.dir()
            .users
            .values()
            .find(|u| u.email == email)
            .cloned()
    }

    /// Sessions ended through the logout URL.
    pub fn ended_sessions(&self) -> Vec<String> {
        self.dir().ended_sessions.clone()
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/user_management/authorize", get(hosted_page).post(submit))
            .route("/user_management/authenticate", post(authenticate))
            .route("/user_management/users", post(create_user_api))
            .route("/user_management/users/{id}", get(get_user))
            .route("/user_management/sessions/logout", get(logout))
            .route("/organizations/{id}", get(get_organization))
            .with_state(self.clone())
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|k| k == self.settings.api_key)
    }
}

#[derive(Debug, Deserialize, Default)]
struct AuthorizeParams {
    client_id: Option<String>,
    redirect_uri: Option<String>,
    response_type: Option<String>,
    state: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
    provider: Option<String>,
    organization_id: Option<String>,
    connection_id: Option<String>,
    login_hint: Option<String>,
}

/// What the authorize request asks for, checked: (client, redirect, organisation if SSO).
fn check_authorize(
    sim: &WorkosSim,
    p: &AuthorizeParams,
) -> Result<(String, String, Option<String>), String> {
    let client_id = p.client_id.clone().ok_or("client_id is required")?;
    if client_id != sim.settings.client_id {
        return Err(format!("unknown client_id {client_id:?}"));
    }
    let redirect_uri = p.redirect_uri.clone().ok_or("redirect_uri is required")?;
    if !(redirect_uri.starts_with("http://") || redirect_uri.starts_with("https://")) {
        return Err("redirect_uri must be an http(s) URL".into());
    }
    if p.response_type.as_deref() != Some("code") {
        return Err("response_type must be code".into());
    }
    if let Some(method) = &p.code_challenge_method {
        if method != "S256" {
            return Err("code_challenge_method must be S256".into());
        }
    }
    let organization = match (&p.organization_id, &p.connection_id, &p.provider) {
        (Some(org), _, _) if org == SSO_ORGANIZATION_ID => Some(org.clone()),
        (Some(org), _, _) => return Err(format!("organization {org:?} not found")),
        (None, Some(conn), _) if conn == SSO_CONNECTION_ID => Some(SSO_ORGANIZATION_ID.into()),
        (None, Some(conn), _) => return Err(format!("connection {conn:?} not found")),
        (None, None, Some(p)) if p == "authkit" => None,
        (None, None, Some(p)) => return Err(format!("provider {p:?} is not enabled")),
        (None, None, None) => {
            return Err("one of provider, organization_id or connection_id is required".into())
        }
    };
    Ok((client_id, redirect_uri, organization))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// AuthKit's hosted page: a form that posts back here.
async fn hosted_page(State(sim): State<WorkosSim>, Query(p): Query<AuthorizeParams>) -> Response {
    sim.settings.faults.apply().await;
    let (client_id, redirect_uri, organization) = match check_authorize(&sim, &p) {
        Ok(ok) => ok,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Html(format!("<p>{}</p>", escape(&e))),
            )
                .into_response()
        }
    };
    let hidden = |name: &str, value: &Option<String>| {
        value
            .as_ref()
            .map(|v| {
                format!(
                    r#"<input type="hidden" name="{name}" value="{}">"#,
                    escape(v)
                )
            })
            .unwrap_or_default()
    };
    let title = match &organization {
        Some(_) => format!("Sign in with your Acme Corp account (SSO, @{SSO_DOMAIN})"),
        None => "Sign in or sign up".to_string(),
    };
    let page = format!(
        r#"<!doctype html><title>{title}</title><h1>{title}</h1>
<form method="post" action="/user_management/authorize">
{}{}{}{}{}{}{}{}
<label>Email <input name="email" type="email" value="{}"></label>
<label>Password <input name="password" type="password"></label>
<label>First name <input name="first_name"></label>
<label>Last name <input name="last_name"></label>
<button>Continue</button>
</form>"#,
        hidden("client_id", &Some(client_id)),
        hidden("redirect_uri", &Some(redirect_uri)),
        hidden("response_type", &p.response_type),
        hidden("state", &p.state),
        hidden("code_challenge", &p.code_challenge),
        hidden("code_challenge_method", &p.code_challenge_method),
        hidden("provider", &p.provider),
        hidden("organization_id", &organization),
        escape(p.login_hint.as_deref().unwrap_or("")),
    );
    Html(page).into_response()
}

#[derive(Debug, Deserialize)]
struct SubmitForm {
    #[serde(flatten)]
    authorize: AuthorizeParamsForm,
    email: String,
    #[serde(default)]
    password: String,
    first_name: Option<String>,
    last_name: Option<String>,
    /// A test's way to sign up a user whose email AuthKit has not verified.
    email_verified: Option<String>,
}

/// The same fields as [`AuthorizeParams`], from a form (serde's flatten needs its own type
/// for `Option<String>` fields coming from `application/x-www-form-urlencoded`).
#[derive(Debug, Deserialize)]
struct AuthorizeParamsForm {
    client_id: Option<String>,
    redirect_uri: Option<String>,
    response_type: Option<String>,
    state: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
    provider: Option<String>,
    organization_id: Option<String>,
}

/// The page's form, posted: signs the person in (or up), then redirects with a code.
async fn submit(State(sim): State<WorkosSim>, Form(form): Form<SubmitForm>) -> Response {
    sim.settings.faults.apply().await;
    let a = form.authorize;
    let params = AuthorizeParams {
        client_id: a.client_id,
        redirect_uri: a.redirect_uri,
        response_type: a.response_type,
        state: a.state,
        code_challenge: a.code_challenge,
        code_challenge_method: a.code_challenge_method,
        provider: a.provider,
        organization_id: a.organization_id,
        connection_id: None,
        login_hint: None,
    };
    let bad = |m: &str| {
        (
            StatusCode::BAD_REQUEST,
            Html(format!("<p>{}</p>", escape(m))),
        )
            .into_response()
    };
    let (client_id, redirect_uri, organization) = match check_authorize(&sim, &params) {
        Ok(ok) => ok,
        Err(e) => return bad(&e),
    };
    let email = form.email.trim().to_lowercase();
    if !email.contains('@') {
        return bad("enter your email address");
    }
    let sso = organization.is_some();
    if sso && !email.ends_with(&format!("@{SSO_DOMAIN}")) {
        return bad("this email is not part of the organization's SSO connection");
    }
    let user = match sim.user_by_email(&email) {
        Some(user) if sso => user,
        Some(user) => match &user.password {
            Some(p) if *p == form.password => user,
            Some(_) => return bad("wrong email or password"),
            None => return bad("this account signs in another way"),
        },
        None => {
            if !sso && form.password.chars().count() < 8 {
                return bad("choose a password of at least 8 characters");
            }
            // Identity providers vouch for their users' addresses; AuthKit sign-ups are
            // verified unless the form says otherwise (a test's unverified account).
            let verified = sso || form.email_verified.as_deref() != Some("false");
            let mut user =
                sim.create_user(&email, verified, (!sso).then_some(form.password.as_str()));
            user.first_name = form.first_name.filter(|s| !s.is_empty());
            user.last_name = form.last_name.filter(|s| !s.is_empty());
            sim.dir().users.insert(user.id.clone(), user.clone());
            user
        }
    };
    let code = random_id("code");
    sim.dir().codes.insert(
        code.clone(),
        Grant {
            user_id: user.id,
            client_id,
            challenge: params.code_challenge,
            organization_id: organization,
            method: if sso { "SSO" } else { "Password" },
            issued: Instant::now(),
            used: false,
        },
    );
    let mut target = match url::Url::parse(&redirect_uri) {
        Ok(u) => u,
        Err(_) => return bad("redirect_uri is not a URL"),
    };
    {
        let mut q = target.query_pairs_mut();
        q.append_pair("code", &code);
        if let Some(state) = &params.state {
            q.append_pair("state", state);
        }
    }
    Redirect::to(target.as_str()).into_response()
}
