//! The WorkOS API side: the code exchange, users, the organisation, session logout.

#![allow(clippy::wildcard_imports)]

use super::*;

#[derive(Debug, Deserialize)]
pub(super) struct AuthenticateBody {
    client_id: Option<String>,
    client_secret: Option<String>,
    grant_type: Option<String>,
    code: Option<String>,
    code_verifier: Option<String>,
}

fn unsigned_jwt(claims: &Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{}",
        b64.encode(br#"{"alg":"RS256","typ":"JWT","kid":"sso_oidc_key_pair_sim"}"#),
        b64.encode(claims.to_string()),
        b64.encode(b"simulator-signature")
    )
}

/// `POST /user_management/authenticate` with `grant_type=authorization_code`.
pub(super) async fn authenticate(
    State(sim): State<WorkosSim>,
    Json(body): Json<AuthenticateBody>,
) -> Response {
    if sim.settings.faults.apply().await {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "simulated outage",
        );
    }
    if body.client_id.as_deref() != Some(sim.settings.client_id.as_str())
        || body.client_secret.as_deref() != Some(sim.settings.api_key.as_str())
    {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Invalid client ID or secret.",
        );
    }
    if body.grant_type.as_deref() != Some("authorization_code") {
        return error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "Only authorization_code is simulated.",
        );
    }
    let code = body.code.unwrap_or_default();
    let invalid = || {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            &format!("The code '{code}' has expired or is invalid."),
        )
    };
    let mut dir = sim.dir();
    let Some(grant) = dir.codes.get_mut(&code) else {
        return invalid();
    };
    if grant.used
        || grant.issued.elapsed() > sim.settings.code_ttl
        || grant.client_id != sim.settings.client_id
    {
        return invalid();
    }
    if let Some(challenge) = &grant.challenge {
        let verifier = body.code_verifier.unwrap_or_default();
        let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(Sha256::digest(verifier.as_bytes()));
        if computed != *challenge {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "The code_verifier does not match the code_challenge.",
            );
        }
    }
    grant.used = true;
    let (user_id, organization_id, method) = (
        grant.user_id.clone(),
        grant.organization_id.clone(),
        grant.method,
    );
    let Some(user) = dir.users.get(&user_id).cloned() else {
        return invalid();
    };
    let session_id = random_id("session");
    dir.sessions.insert(session_id.clone(), user.id.clone());
    let now = chrono::Utc::now().timestamp();
    let access_token = unsigned_jwt(&json!({
        "iss": "https://api.workos.com",
        "sub": user.id,
        "sid": session_id,
        "org_id": organization_id,
        "iat": now,
        "exp": now + 300,
    }));
    let mut answer = json!({
        "user": user.json(),
        "access_token": access_token,
        "refresh_token": random_id("refresh"),
        "authentication_method": method,
    });
    if let Some(org) = organization_id {
        answer["organization_id"] = json!(org);
    }
    Json(answer).into_response()
}

#[derive(Debug, Deserialize)]
pub(super) struct CreateUserBody {
    email: String,
    password: Option<String>,
    first_name: Option<String>,
    last_name: Option<String>,
    #[serde(default)]
    email_verified: bool,
}

pub(super) async fn create_user_api(
    State(sim): State<WorkosSim>,
    headers: HeaderMap,
    Json(body): Json<CreateUserBody>,
) -> Response {
    if !sim.authorized(&headers) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "Invalid API key.");
    }
    if sim.user_by_email(&body.email).is_some() {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "user_exists",
            "A user with this email already exists.",
        );
    }
    let mut user = sim.create_user(&body.email, body.email_verified, body.password.as_deref());
    user.first_name = body.first_name;
    user.last_name = body.last_name;
    sim.dir().users.insert(user.id.clone(), user.clone());
    (StatusCode::CREATED, Json(user.json())).into_response()
}

pub(super) async fn get_user(
    State(sim): State<WorkosSim>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !sim.authorized(&headers) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "Invalid API key.");
    }
    match sim.dir().users.get(&id) {
        Some(u) => Json(u.json()).into_response(),
        None => error(StatusCode::NOT_FOUND, "entity_not_found", "User not found."),
    }
}

pub(super) async fn get_organization(
    State(sim): State<WorkosSim>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !sim.authorized(&headers) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "Invalid API key.");
    }
    if id != SSO_ORGANIZATION_ID {
        return error(
            StatusCode::NOT_FOUND,
            "entity_not_found",
            "Organization not found.",
        );
    }
    Json(json!({
        "object": "organization",
        "id": SSO_ORGANIZATION_ID,
        "name": "Acme Corp",
        "domains": [{ "object": "organization_domain", "domain": SSO_DOMAIN, "state": "verified" }],
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
pub(super) struct LogoutQuery {
    session_id: String,
    return_to: Option<String>,
}

pub(super) async fn logout(State(sim): State<WorkosSim>, Query(q): Query<LogoutQuery>) -> Response {
    let mut dir = sim.dir();
    if dir.sessions.remove(&q.session_id).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            "entity_not_found",
            "Session not found.",
        );
    }
    dir.ended_sessions.push(q.session_id);
    match q.return_to {
        Some(to) => Redirect::to(&to).into_response(),
        None => (StatusCode::OK, Html("<p>Signed out.</p>")).into_response(),
    }
}
