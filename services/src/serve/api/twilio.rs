//! Twilio's webhooks: status callbacks and the answer URL. Both are signed by Twilio
//! (`X-Twilio-Signature` over the full URL we gave it and the POST parameters); anything
//! unsigned or forged is refused with 403 and records nothing.

use axum::extract::{OriginalUri, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use cmb_domain::call::{Call, CallCommand, Status};
use cmb_domain::persona::Persona;
use cmb_domain::{Actor, CommandContext};
use serde::Deserialize;
use uuid::Uuid;

use crate::serve::http::error::{ApiError, ApiResult, ErrorBody};
use crate::serve::http::extract::{request_id, Form, Query};
use crate::serve::http::state::AppState;
use cmb_providers::twilio::verify_signature;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CallRef {
    /// Our call id, in the URL we gave Twilio.
    call_id: Option<String>,
}

/// Checks the signature over `PUBLIC_BASE_URL` + the path and query Twilio called.
fn verify(
    state: &AppState,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
    params: &[(String, String)],
) -> ApiResult<()> {
    let base = state.config.public_base_url.as_str();
    verify_over(state, headers, uri, params, &[base])
}

/// `PUBLIC_BASE_URL` as the WebSocket URL Twilio is given for the stream (`wss://`).
fn ws_base(state: &AppState) -> String {
    state
        .config
        .public_base_url
        .replacen("https://", "wss://", 1)
        .replacen("http://", "ws://", 1)
}

/// Checks the signature over any of `bases` + the path and query Twilio called.
fn verify_over(
    state: &AppState,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
    params: &[(String, String)],
    bases: &[&str],
) -> ApiResult<()> {
    let signature = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let token = state.config.twilio.auth_token.expose();
    let url = format!("{}{path}", bases[0]);
    let signed = !signature.is_empty()
        && bases
            .iter()
            .any(|base| verify_signature(token, &format!("{base}{path}"), params, signature));
    if !signed {
        metrics::counter!("cmb_webhooks_refused_total", "source" => "twilio").increment(1);
        tracing::warn!(%url, "Twilio webhook with a missing or wrong signature refused");
        return Err(ApiError::forbidden("invalid Twilio signature"));
    }
    Ok(())
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The call a webhook is about: our id from the URL, or the CallSid.
async fn call_id(
    state: &AppState,
    query: &CallRef,
    params: &[(String, String)],
) -> ApiResult<String> {
    if let Some(id) = query
        .call_id
        .as_deref()
        .and_then(|id| Uuid::parse_str(id).ok())
    {
        return Ok(id.to_string());
    }
    let sid = param(params, "CallSid").unwrap_or("");
    crate::usecases::calls::sids::call_of(&state.pool, sid)
        .await?
        .map(|id| id.to_string())
        .ok_or_else(|| ApiError::not_found("call"))
}

/// Twilio's status callbacks (`initiated`, `ringing`, `in-progress`, `completed`, …), signed
/// with `X-Twilio-Signature`. Called by Twilio only.
#[utoipa::path(post, path = "/twilio/callback", tag = "webhooks", params(CallRef,
        ("X-Twilio-Signature" = String, Header, description = "Base64 HMAC-SHA1, with the auth token, of the full URL followed by the sorted POST parameters (name then value)")),
    request_body(content = Object, content_type = "application/x-www-form-urlencoded",
        description = "Twilio's parameters: `CallSid`, `CallStatus`, `SequenceNumber`, `CallDuration`, `Timestamp`, …"),
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, description = "A parameter is missing or unknown", body = ErrorBody),
        (status = 403, description = "The signature is missing or wrong; nothing is recorded", body = ErrorBody),
        (status = 404, description = "No such call", body = ErrorBody),
        (status = 415, description = "The body is not a form (`application/x-www-form-urlencoded`)", body = ErrorBody),
    ))]
pub async fn status_callback(
    State(state): State<AppState>,
    OriginalUri(uri): OriginalUri,
    Query(query): Query<CallRef>,
    headers: HeaderMap,
    Form(params): Form<Vec<(String, String)>>,
) -> ApiResult<Response> {
    verify(&state, &headers, &uri, &params)?;
    let id = call_id(&state, &query, &params).await?;
    let sid = param(&params, "CallSid")
        .ok_or_else(|| ApiError::validation("CallSid", "CallSid: missing"))?
        .to_string();
    let raw_status = param(&params, "CallStatus").unwrap_or("");
    let status = Status::from_twilio(raw_status).ok_or_else(|| {
        ApiError::validation("CallStatus", format!("CallStatus: unknown {raw_status:?}"))
    })?;
    let sequence = param(&params, "SequenceNumber").and_then(|s| s.parse().ok());
    let duration_secs = param(&params, "CallDuration").and_then(|s| s.parse().ok());
    let at = param(&params, "Timestamp")
        .and_then(|t| DateTime::parse_from_rfc2822(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| state.clock.now());
    let ctx = CommandContext::for_request(request_id(&headers), Actor::Webhook("twilio".into()));
    let command = CallCommand::RecordStatus {
        call_sid: sid,
        status,
        sequence,
        duration_secs,
        at,
    };
    state.store.execute::<Call>(&id, command, &ctx).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// The answer URL: what Twilio does when the callee picks up (TwiML that connects the media
/// stream). Signed like the callbacks. Called by Twilio only.
#[utoipa::path(post, path = "/twilio/answer", tag = "webhooks", params(CallRef,
        ("X-Twilio-Signature" = String, Header, description = "As for the status callback")),
    request_body(content = Object, content_type = "application/x-www-form-urlencoded", description = "Twilio's parameters"),
    responses(
        (status = 200, description = "TwiML: `<Connect><Stream url=\"wss://…/api/twilio/stream\">` with the call's parameters, then `<Say>` an apology and `<Hangup/>` for a stream lost while the call is up", content_type = "text/xml", body = String),
        (status = 400, description = "A parameter is invalid", body = ErrorBody),
        (status = 403, description = "The signature is missing or wrong", body = ErrorBody),
        (status = 404, description = "No such call", body = ErrorBody),
        (status = 415, description = "The body is not a form (`application/x-www-form-urlencoded`)", body = ErrorBody),
    ))]
pub async fn answer(
    State(state): State<AppState>,
    OriginalUri(uri): OriginalUri,
    Query(query): Query<CallRef>,
    headers: HeaderMap,
    Form(params): Form<Vec<(String, String)>>,
) -> ApiResult<Response> {
    verify(&state, &headers, &uri, &params)?;
    let id = call_id(&state, &query, &params).await?;
    let sid = param(&params, "CallSid")
        .filter(|sid| crate::serve::voice::plausible_call_sid(sid))
        .ok_or_else(|| ApiError::validation("CallSid", "CallSid: missing or malformed"))?
        .to_string();
    // Twilio asks for the answer when the callee picks up: that is the call answered, whether
    // or not its `in-progress` callback has arrived yet.
    if param(&params, "CallStatus").and_then(Status::from_twilio) == Some(Status::InProgress) {
        let ctx =
            CommandContext::for_request(request_id(&headers), Actor::Webhook("twilio".into()));
        let command = CallCommand::RecordStatus {
            call_sid: sid.clone(),
            status: Status::InProgress,
            sequence: None,
            duration_secs: None,
            at: state.clock.now(),
        };
        if let Err(e) = state.store.execute::<Call>(&id, command, &ctx).await {
            tracing::warn!(call = %id, error = %e, "answer for a call that does not take it");
        }
    }
    let (call, _) = state.store.load::<Call>(&id).await?;
    if !call.exists() {
        return Err(ApiError::not_found("call"));
    }
    if call.status != Some(Status::InProgress) || call.call_sid.as_deref() != Some(sid.as_str()) {
        // Over, never answered, or another call's CallSid: no stream, Twilio hangs up.
        tracing::warn!(call = %id, status = ?call.status, "answer for a call that cannot stream; hanging up");
        let twiml = r#"<?xml version="1.0" encoding="UTF-8"?><Response><Hangup/></Response>"#;
        return Ok(([(axum::http::header::CONTENT_TYPE, "text/xml")], twiml).into_response());
    }
    let persona = match &call.persona_id {
        Some(p) => {
            let (persona, _) = state.store.load::<Persona>(p).await?;
            persona
                .created
                .then_some((persona.greeting, persona.voice_id))
        }
        None => None,
    };
    // Warm the greeting while Twilio opens the stream (usually cached already).
    if let Some((greeting, voice_id)) = persona {
        let prices = call
            .prices
            .unwrap_or(cmb_domain::pricing::PriceTable::LAUNCH);
        tokio::spawn(
            state
                .voice
                .clone()
                .warm_greeting(id.clone(), prices, voice_id, greeting),
        );
    }
    let call_id = id
        .parse::<cmb_domain::CallId>()
        .map_err(|_| ApiError::not_found("call"))?;
    let expires_at = state.clock.now() + crate::serve::voice::TOKEN_LIFETIME;
    let token = state.voice.stream_tokens.mint(call_id, &sid, expires_at);
    let twiml = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="{}/api/twilio/stream"><Parameter name="call_id" value="{}"/><Parameter name="token" value="{}"/></Stream></Connect><Say>{}</Say><Hangup/></Response>"#,
        xml_escape(&ws_base(&state)),
        xml_escape(&id),
        xml_escape(&token),
        LOST_LINE_APOLOGY
    );
    Ok(([(axum::http::header::CONTENT_TYPE, "text/xml")], twiml).into_response())
}

/// What Twilio says when the media stream ends while the call is still up — the instance
/// holding the voice session died or lost the socket: Twilio goes on to the verb after
/// `<Connect>`. A session that ends normally hangs the call up through the REST API first, so
/// the caller never hears this then.
pub const LOST_LINE_APOLOGY: &str =
    "Sorry, we lost the line on our side. Please call again from the app.";

/// The Media Streams WebSocket: Twilio connects here when the call is answered (`GET` with
/// `Upgrade: websocket`), signed like every Twilio webhook: `X-Twilio-Signature` over the
/// stream URL of the TwiML (`wss://…/api/twilio/stream`; the `https://` form is accepted too),
/// checked before the upgrade. Twilio sends JSON text frames `connected`, `start` (with the
/// `call_id` and `token` custom parameters), `media` (base64 μ-law 8 kHz audio, 20 ms frames),
/// `mark`, `dtmf` and `stop`; we send `media`, `mark` and `clear` (barge-in) back. A stream
/// whose token is missing, forged, expired, used or for another call, whose call is not
/// answered or already has a session, or that says no `start` within 5 s, is closed (1008);
/// so is one that sends a frame over 64 KiB or nothing for 10 s.
#[utoipa::path(get, path = "/twilio/stream", tag = "webhooks",
    params(("Upgrade" = String, Header, description = "`websocket`"),
        ("X-Twilio-Signature" = String, Header, description = "Base64 HMAC-SHA1, with the auth token, of the stream URL (`wss://…/api/twilio/stream`)")),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket upgrade request"),
        (status = 403, description = "The signature is missing or wrong; no upgrade", body = ErrorBody),
        (status = 426, description = "Upgrade required: the request is not a WebSocket handshake"),
    ))]
pub async fn stream(
    State(state): State<AppState>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    ws: Result<
        axum::extract::ws::WebSocketUpgrade,
        axum::extract::ws::rejection::WebSocketUpgradeRejection,
    >,
) -> Response {
    let ws_base = ws_base(&state);
    let bases = [ws_base.as_str(), state.config.public_base_url.as_str()];
    if let Err(e) = verify_over(&state, &headers, &uri, &[], &bases) {
        return e.into_response();
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let voice = state.voice.clone();
    // Small buffers (tungstenite's 128 KiB read buffer is zero-filled before every read) and
    // bounded messages: Twilio's largest is a `start` with our few parameters; anything over
    // 64 KiB closes the socket.
    let ws = ws
        .read_buffer_size(cmb_providers::WS_BUFFER)
        .write_buffer_size(cmb_providers::WS_BUFFER)
        .max_message_size(64 * 1024)
        .max_frame_size(64 * 1024);
    ws.on_upgrade(move |socket| async move {
        match crate::serve::voice::run(voice, socket).await {
            Ok(()) => metrics::counter!("cmb_voice_sessions_total", "outcome" => "ok").increment(1),
            Err(crate::serve::voice::SessionError::Refused(why)) => {
                metrics::counter!("cmb_voice_sessions_total", "outcome" => "refused").increment(1);
                tracing::warn!(reason = %why, "media stream refused");
            }
            Err(e) => {
                metrics::counter!("cmb_voice_sessions_total", "outcome" => "failed").increment(1);
                tracing::error!(error = %e, "voice session failed");
            }
        }
    })
}
