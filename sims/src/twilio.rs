//! Twilio simulator: the Calls REST resource, status callbacks, the TwiML fetch and the Media
//! Streams WebSocket, on loopback, with the same wire protocol as Twilio (PROTOCOLS.md §1), so
//! the real client in `providers::twilio` and our webhooks cannot tell the difference.
//!
//! A created call lives in a spawned task: initiated → ringing → (after `ring`) answered or
//! busy / no-answer / failed. An answered call fetches its `Url`, opens the TwiML's `<Stream>`
//! if any and plays a scripted caller into it, and completes when `call_length` or `TimeLimit`
//! elapses, when our API hangs it up, or when our server closes a `<Connect><Stream>`.
//!
//! Simplifications, on purpose: callbacks and the TwiML fetch are always POSTs (our client asks
//! for POST), the ring phase lasts `ring` whatever `Timeout` says, and TwiML verbs other than
//! `<Stream>` are not played (the callee simply stays on the line for `call_length`).

mod media;
#[cfg(test)]
mod tests;

pub use media::{caller_audio, linear_to_mulaw, mulaw_to_linear, CallerScript, FRAME_BYTES};

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Faults;
use cmb_providers::twilio::signature;
use media::{StreamContext, StreamCounters, StreamEnd};

/// Used when neither `SIM_TWILIO_ACCOUNT_SID` nor `TWILIO_ACCOUNT_SID` is set.
pub const DEFAULT_ACCOUNT_SID: &str = "AC00000000000000000000000000000000";
/// Used when neither `SIM_TWILIO_AUTH_TOKEN` nor `TWILIO_AUTH_TOKEN` is set.
pub const DEFAULT_AUTH_TOKEN: &str = "simulated-twilio-auth-token";
const API_VERSION: &str = "2010-04-01";
/// Twilio's default `TimeLimit`: four hours.
const DEFAULT_TIME_LIMIT_SECS: u32 = 14_400;

/// How the simulated callee answers, unless the number says otherwise (see [`Outcome::for_call`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Answer,
    Busy,
    NoAnswer,
    Failed,
}

impl Outcome {
    /// `answer`, `busy`, `no-answer` or `failed`.
    pub fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "answer" | "answered" | "in-progress" => Some(Outcome::Answer),
            "busy" => Some(Outcome::Busy),
            "no-answer" | "no_answer" | "noanswer" => Some(Outcome::NoAnswer),
            "failed" | "fail" => Some(Outcome::Failed),
            _ => None,
        }
    }

    /// Magic destinations, so one simulator serves tests of every outcome: a `To` ending in
    /// 0001 is busy, 0002 does not answer, 0003 fails; any other number gets `self`.
    pub fn for_call(self, to: &str) -> Self {
        if to.ends_with("0001") {
            Outcome::Busy
        } else if to.ends_with("0002") {
            Outcome::NoAnswer
        } else if to.ends_with("0003") {
            Outcome::Failed
        } else {
            self
        }
    }

    /// The final `CallStatus` of an unanswered call.
    fn unanswered_status(self) -> Option<&'static str> {
        match self {
            Outcome::Answer => None,
            Outcome::Busy => Some("busy"),
            Outcome::NoAnswer => Some("no-answer"),
            Outcome::Failed => Some("failed"),
        }
    }
}

/// The simulator's configuration, from `SIM_TWILIO_*` variables.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The account the REST API accepts (Basic auth and path).
    pub account_sid: String,
    /// Checks Basic auth and signs every callback and TwiML fetch.
    pub auth_token: String,
    /// How long the phone rings before it is answered (or not).
    pub ring: Duration,
    /// How long an answered call lasts unless it is hung up or hits its `TimeLimit`.
    pub call_length: Duration,
    pub outcome: Outcome,
    /// Every status callback is posted twice, as Twilio's retries can.
    pub duplicate_callbacks: bool,
    /// The ringing callback is posted after the next one, as separate HTTP requests can arrive.
    pub reorder_callbacks: bool,
    /// Latency and injected 503s on call creation.
    pub faults: Faults,
    /// What the callee says into the media stream.
    pub caller: CallerScript,
    /// Places a created call but holds the answer this long: Twilio acted, and the client
    /// learns it late or never (it times out, or dies meanwhile — the crash a test stages).
    pub hold_create_response: Option<Duration>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings::from_lookup(&|_| None)
    }
}

impl Settings {
    /// `SIM_TWILIO_ACCOUNT_SID`/`SIM_TWILIO_AUTH_TOKEN` (else `TWILIO_ACCOUNT_SID`/
    /// `TWILIO_AUTH_TOKEN`, so the app's client and the simulator agree), `SIM_TWILIO_RING_MS`
    /// (1000), `SIM_TWILIO_CALL_SECONDS` (30), `SIM_TWILIO_OUTCOME` (answer),
    /// `SIM_TWILIO_DUPLICATE_CALLBACKS`, `SIM_TWILIO_REORDER_CALLBACKS`,
    /// `SIM_TWILIO_LATENCY_MS`, `SIM_TWILIO_FAIL_EVERY`, `SIM_TWILIO_CALLER_TURNS`,
    /// `SIM_TWILIO_HOLD_CREATE_RESPONSE_MS`.
    /// A malformed value falls back to the default with a warning.
    pub fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Self {
        let text = |names: &[&str], default: &str| {
            names
                .iter()
                .find_map(|n| get(n).filter(|v| !v.trim().is_empty()))
                .unwrap_or_else(|| default.to_string())
        };
        let number = |name: &str, default: u64| match get(name) {
            None => default,
            Some(v) => v.trim().parse().unwrap_or_else(|_| {
                tracing::warn!(variable = name, value = %v, "not a number; using the default");
                default
            }),
        };
        let flag = |name: &str| {
            get(name).is_some_and(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
        };
        let outcome = match get("SIM_TWILIO_OUTCOME") {
            None => Outcome::Answer,
            Some(v) => Outcome::parse(&v).unwrap_or_else(|| {
                tracing::warn!(value = %v, "SIM_TWILIO_OUTCOME is not answer|busy|no-answer|failed; answering");
                Outcome::Answer
            }),
        };
        let caller = match get("SIM_TWILIO_CALLER_TURNS") {
            None => CallerScript::default(),
            Some(v) => CallerScript::parse_turns(&v).unwrap_or_else(|| {
                tracing::warn!(value = %v, "SIM_TWILIO_CALLER_TURNS is not like 1500:1500,1200:2000; using the default");
                CallerScript::default()
            }),
        };
        Settings {
            account_sid: text(
                &["SIM_TWILIO_ACCOUNT_SID", "TWILIO_ACCOUNT_SID"],
                DEFAULT_ACCOUNT_SID,
            ),
            auth_token: text(
                &["SIM_TWILIO_AUTH_TOKEN", "TWILIO_AUTH_TOKEN"],
                DEFAULT_AUTH_TOKEN,
            ),
            ring: Duration::from_millis(number("SIM_TWILIO_RING_MS", 1000)),
            call_length: Duration::from_secs(number("SIM_TWILIO_CALL_SECONDS", 30)),
            outcome,
            duplicate_callbacks: flag("SIM_TWILIO_DUPLICATE_CALLBACKS"),
            reorder_callbacks: flag("SIM_TWILIO_REORDER_CALLBACKS"),
            faults: Faults::from_lookup(get, "TWILIO"),
            caller,
            hold_create_response: get("SIM_TWILIO_HOLD_CREATE_RESPONSE_MS")
                .map(|_| Duration::from_millis(number("SIM_TWILIO_HOLD_CREATE_RESPONSE_MS", 0))),
        }
    }
}

/// A call as the simulator saw it, for tests to count and inspect.
#[derive(Debug, Clone)]
pub struct SimCall {
    pub sid: String,
    pub to: String,
    pub from: String,
    /// The TwiML URL (empty when the call was created with inline `Twiml`).
    pub url: String,
    pub status_callback: Option<String>,
    /// Seconds.
    pub time_limit: u32,
    /// Twilio's status: queued, ringing, in-progress, then completed, busy, no-answer, failed
    /// or canceled.
    pub status: String,
    pub date_created: DateTime<Utc>,
    pub answered_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    /// Whole seconds from answer to end, once ended (0 when never answered).
    pub duration_secs: Option<u64>,
    /// Status callback POSTs made (duplicates included).
    pub callbacks_sent: u64,
    /// Whether a media stream WebSocket was opened.
    pub stream_opened: bool,
    /// Caller-audio `media` frames sent to our server.
    pub frames_sent: u64,
    /// `media` frames our server sent back.
    pub frames_received: u64,
    pub marks_received: u64,
    /// Marks echoed back once "played" (or cleared).
    pub marks_echoed: u64,
    pub clears_received: u64,
    /// Messages Twilio would reject with error 31951.
    pub invalid_messages: u64,
}

/// One call's record: what the REST API shows plus what drives its task.
struct Record {
    call: SimCall,
    /// `StatusCallbackEvent` values asked for (initiated, ringing, answered, completed).
    events: Vec<String>,
    /// Inline TwiML, used instead of fetching `Url`.
    twiml: Option<String>,
    /// Cancelled when our API hangs the call up.
    hang_up: CancellationToken,
    counters: Arc<StreamCounters>,
}

impl Record {
    fn snapshot(&self) -> SimCall {
        let c = &self.counters;
        SimCall {
            stream_opened: c.opened.load(Ordering::Relaxed) > 0,
            frames_sent: c.frames_sent.load(Ordering::Relaxed),
            frames_received: c.frames_received.load(Ordering::Relaxed),
            marks_received: c.marks_received.load(Ordering::Relaxed),
            marks_echoed: c.marks_echoed.load(Ordering::Relaxed),
            clears_received: c.clears_received.load(Ordering::Relaxed),
            invalid_messages: c.invalid_messages.load(Ordering::Relaxed),
            ..self.call.clone()
        }
    }
}

struct Inner {
    settings: Settings,
    http: reqwest::Client,
    calls: Mutex<Vec<Record>>,
}

/// The simulator. Clones share the same calls.
#[derive(Clone)]
pub struct TwilioSim {
    inner: Arc<Inner>,
}

fn is_terminal(status: &str) -> bool {
    matches!(
        status,
        "completed" | "busy" | "no-answer" | "failed" | "canceled"
    )
}

impl TwilioSim {
    pub fn new(settings: Settings) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(15))
            .user_agent("TwilioProxy/1.1")
            .build()
            .unwrap_or_default();
        TwilioSim {
            inner: Arc::new(Inner {
                settings,
                http,
                calls: Mutex::new(Vec::new()),
            }),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/2010-04-01/Accounts/{account}/Calls.json",
                post(create_call).get(list_calls),
            )
            .route(
                "/2010-04-01/Accounts/{account}/Calls/{call}",
                get(fetch_call).post(update_call),
            )
            .with_state(self.clone())
    }

    /// Every call created so far, oldest first.
    pub fn calls(&self) -> Vec<SimCall> {
        self.lock().iter().map(Record::snapshot).collect()
    }

    /// The call, if the simulator created it.
    pub fn call(&self, sid: &str) -> Option<SimCall> {
        self.lock()
            .iter()
            .find(|r| r.call.sid == sid)
            .map(Record::snapshot)
    }

    /// The lock is never held across an await; a panic while holding it (none is expected)
    /// must not take the whole simulator down, hence no poisoning.
    fn lock(&self) -> MutexGuard<'_, Vec<Record>> {
        self.inner
            .calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn update<T>(&self, sid: &str, change: impl FnOnce(&mut Record) -> T) -> Option<T> {
        self.lock()
            .iter_mut()
            .find(|r| r.call.sid == sid)
            .map(change)
    }

    fn set_status(&self, sid: &str, status: &str) {
        self.update(sid, |r| {
            if !is_terminal(&r.call.status) {
                r.call.status = status.to_string();
                if status == "in-progress" {
                    r.call.answered_at = Some(Utc::now());
                }
            }
        });
    }

    /// Ends the call with `status` unless it has already ended; returns the call as it ended.
    /// Both the hang-up handler and the call's task call this, so it must be idempotent.
    fn finish(&self, sid: &str, status: &str) -> Option<SimCall> {
        self.update(sid, |r| {
            if !is_terminal(&r.call.status) {
                let now = Utc::now();
                r.call.status = status.to_string();
                r.call.ended_at = Some(now);
                r.call.duration_secs = Some(
                    r.call
                        .answered_at
                        .map_or(0, |a| (now - a).num_seconds().max(0) as u64),
                );
                r.hang_up.cancel();
            }
            r.snapshot()
        })
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(encoded) = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
        else {
            return false;
        };
        let Some(decoded) = BASE64
            .decode(encoded.trim())
            .ok()
            .and_then(|d| String::from_utf8(d).ok())
        else {
            return false;
        };
        let settings = &self.inner.settings;
        decoded.split_once(':') == Some((&settings.account_sid, &settings.auth_token))
    }

    /// Basic auth and the account in the path, as Twilio checks them.
    fn check_account(&self, account: &str, headers: &HeaderMap) -> Result<(), Refusal> {
        if !self.authorized(headers) {
            return Err(refusal(StatusCode::UNAUTHORIZED, 20003, "Authenticate"));
        }
        if account != self.inner.settings.account_sid {
            return Err(refusal(
                StatusCode::NOT_FOUND,
                20404,
                "The requested resource was not found",
            ));
        }
        Ok(())
    }

    fn resource(&self, call: &SimCall) -> Value {
        let account = &self.inner.settings.account_sid;
        let uri = format!("/{API_VERSION}/Accounts/{account}/Calls/{}", call.sid);
        let sub = |name: &str| format!("{}/{name}.json", uri);
        json!({
            "sid": call.sid,
            "account_sid": account,
            "parent_call_sid": null,
            "date_created": rfc2822(call.date_created),
            "date_updated": rfc2822(call.ended_at.or(call.answered_at).unwrap_or(call.date_created)),
            "start_time": call.answered_at.map(rfc2822),
            "end_time": call.ended_at.map(rfc2822),
            "to": call.to,
            "to_formatted": call.to,
            "from": call.from,
            "from_formatted": call.from,
            "phone_number_sid": null,
            "status": call.status,
            "duration": call.duration_secs.map(|d| d.to_string()),
            "price": null,
            "price_unit": "USD",
            "direction": "outbound-api",
            "answered_by": null,
            "annotation": null,
            "forwarded_from": null,
            "group_sid": null,
            "caller_name": null,
            "trunk_sid": null,
            "api_version": API_VERSION,
            "queue_time": "0",
            "uri": format!("{uri}.json"),
            "subresource_uris": {
                "notifications": sub("Notifications"),
                "recordings": sub("Recordings"),
                "events": sub("Events"),
                "streams": sub("Streams"),
                "payments": sub("Payments"),
                "siprec": sub("Siprec"),
                "user_defined_messages": sub("UserDefinedMessages"),
                "user_defined_message_subscriptions": sub("UserDefinedMessageSubscriptions"),
            },
        })
    }
}

fn rfc2822(at: DateTime<Utc>) -> String {
    at.format("%a, %d %b %Y %H:%M:%S +0000").to_string()
}

/// A refusal in Twilio's error body: `{"code","message","more_info","status"}`.
struct Refusal {
    status: StatusCode,
    code: u32,
    message: String,
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

fn refusal(status: StatusCode, code: u32, message: &str) -> Refusal {
    Refusal {
        status,
        code,
        message: message.to_string(),
    }
}

fn twilio_error(status: StatusCode, code: u32, message: &str) -> Response {
    refusal(status, code, message).into_response()
}

/// A form-encoded body as pairs, repeated keys kept (`StatusCallbackEvent` repeats).
fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}

fn param<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.trim().is_empty())
}

/// E.164, or a `client:`/`sip:` address, as Twilio accepts for `To`.
fn plausible_destination(to: &str) -> bool {
    if to.starts_with("client:") || to.starts_with("sip:") {
        return true;
    }
    to.strip_prefix('+').is_some_and(|digits| {
        (7..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
    })
}

async fn create_call(
    State(sim): State<TwilioSim>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if sim.inner.settings.faults.apply().await {
        return twilio_error(
            StatusCode::SERVICE_UNAVAILABLE,
            20503,
            "Service unavailable (injected failure)",
        );
    }
    if let Err(refused) = sim.check_account(&account, &headers) {
        return refused.into_response();
    }
    let form = parse_form(&body);
    let Some(to) = param(&form, "To") else {
        return twilio_error(
            StatusCode::BAD_REQUEST,
            21201,
            "No 'To' number is specified",
        );
    };
    if !plausible_destination(to) {
        return twilio_error(
            StatusCode::BAD_REQUEST,
            21211,
            &format!("Invalid 'To' Phone Number: {to}"),
        );
    }
    let Some(from) = param(&form, "From") else {
        return twilio_error(
            StatusCode::BAD_REQUEST,
            21603,
            "A 'From' phone number is required.",
        );
    };
    let url = param(&form, "Url");
    let twiml = param(&form, "Twiml");
    if url.is_none() && twiml.is_none() {
        return twilio_error(StatusCode::BAD_REQUEST, 21205, "Url parameter is required.");
    }
    let time_limit = match param(&form, "TimeLimit").map(|v| v.trim().parse::<u32>()) {
        None => DEFAULT_TIME_LIMIT_SECS,
        Some(Ok(secs)) if secs > 0 => secs,
        Some(_) => {
            return twilio_error(
                StatusCode::BAD_REQUEST,
                20001,
                "TimeLimit must be a positive number of seconds",
            )
        }
    };
    let events: Vec<String> = form
        .iter()
        .filter(|(k, _)| k == "StatusCallbackEvent")
        .flat_map(|(_, v)| v.split([' ', ',']))
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty())
        .collect();
    if let Some(bad) = events.iter().find(|e| {
        !matches!(
            e.as_str(),
            "initiated" | "ringing" | "answered" | "completed"
        )
    }) {
        return twilio_error(
            StatusCode::BAD_REQUEST,
            21626,
            &format!("Invalid StatusCallbackEvent: {bad}"),
        );
    }
    let call = SimCall {
        sid: format!("CA{:032x}", rand::random::<u128>()),
        to: to.to_string(),
        from: from.to_string(),
        url: url.unwrap_or_default().to_string(),
        status_callback: param(&form, "StatusCallback").map(str::to_string),
        time_limit,
        status: "queued".into(),
        date_created: Utc::now(),
        answered_at: None,
        ended_at: None,
        duration_secs: None,
        callbacks_sent: 0,
        stream_opened: false,
        frames_sent: 0,
        frames_received: 0,
        marks_received: 0,
        marks_echoed: 0,
        clears_received: 0,
        invalid_messages: 0,
    };
    let body = sim.resource(&call);
    let sid = call.sid.clone();
    sim.lock().push(Record {
        call,
        events,
        twiml: twiml.map(str::to_string),
        hang_up: CancellationToken::new(),
        counters: Arc::default(),
    });
    tracing::info!(call_sid = %sid, "simulated call queued");
    tokio::spawn(run_call(sim.clone(), sid));
    if let Some(hold) = sim.inner.settings.hold_create_response {
        tokio::time::sleep(hold).await;
    }
    (StatusCode::CREATED, Json(body)).into_response()
}

/// `{sid}.json` → `sid`; anything else is not a call.
fn call_sid(segment: &str) -> Option<&str> {
    segment.strip_suffix(".json").filter(|s| !s.is_empty())
}

async fn fetch_call(
    State(sim): State<TwilioSim>,
    Path((account, call)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = sim.check_account(&account, &headers) {
        return refused.into_response();
    }
    match call_sid(&call).and_then(|sid| sim.call(sid)) {
        Some(call) => Json(sim.resource(&call)).into_response(),
        None => not_found(),
    }
}

fn not_found() -> Response {
    twilio_error(
        StatusCode::NOT_FOUND,
        20404,
        "The requested resource was not found",
    )
}

/// `Status=completed` hangs up in any state (an unanswered call ends `canceled`);
/// `Status=canceled` only ends a call that has not been answered. An ended call is left as
/// it is. Redirects (`Url`, `Twiml`) are not simulated.
async fn update_call(
    State(sim): State<TwilioSim>,
    Path((account, call)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(refused) = sim.check_account(&account, &headers) {
        return refused.into_response();
    }
    let Some(sid) = call_sid(&call) else {
        return not_found();
    };
    let Some(current) = sim.call(sid) else {
        return not_found();
    };
    let form = parse_form(&body);
    let answered = current.status == "in-progress";
    match param(&form, "Status") {
        Some("completed") => {
            sim.finish(sid, if answered { "completed" } else { "canceled" });
        }
        Some("canceled") if !answered => {
            sim.finish(sid, "canceled");
        }
        Some("canceled") => {}
        Some(other) => {
            return twilio_error(
                StatusCode::BAD_REQUEST,
                20001,
                &format!("Invalid Status: {other}"),
            )
        }
        None => tracing::debug!(call_sid = %sid, "call update without Status ignored"),
    }
    match sim.call(sid) {
        Some(call) => Json(sim.resource(&call)).into_response(),
        None => not_found(),
    }
}

/// Filters `To`, `From`, `Status`, and `StartTime` with `>=`, `<=` or exact day (on the day the
/// call was created); newest first, one page.
async fn list_calls(
    State(sim): State<TwilioSim>,
    Path(account): Path<String>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    if let Err(refused) = sim.check_account(&account, &headers) {
        return refused.into_response();
    }
    let query = query.map(|Query(q)| q).unwrap_or_default();
    let day = |name: &str| -> Result<Option<chrono::NaiveDate>, Refusal> {
        match param(&query, name) {
            None => Ok(None),
            Some(v) => chrono::NaiveDate::parse_from_str(v.trim(), "%Y-%m-%d")
                .map(Some)
                .map_err(|_| {
                    refusal(
                        StatusCode::BAD_REQUEST,
                        20001,
                        &format!("{name} must be YYYY-MM-DD"),
                    )
                }),
        }
    };
    let (after, before, on) = match (day("StartTime>="), day("StartTime<="), day("StartTime")) {
        (Ok(a), Ok(b), Ok(o)) => (a, b, o),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return e.into_response(),
    };
    let to = param(&query, "To");
    let from = param(&query, "From");
    let status = param(&query, "Status");
    let page_size = param(&query, "PageSize")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(50)
        .clamp(1, 1000);
    let mut calls: Vec<SimCall> = sim
        .calls()
        .into_iter()
        .filter(|c| to.is_none_or(|t| c.to == t))
        .filter(|c| from.is_none_or(|f| c.from == f))
        .filter(|c| status.is_none_or(|s| c.status == s))
        .filter(|c| after.is_none_or(|d| c.date_created.date_naive() >= d))
        .filter(|c| before.is_none_or(|d| c.date_created.date_naive() <= d))
        .filter(|c| on.is_none_or(|d| c.date_created.date_naive() == d))
        .collect();
    calls.reverse();
    calls.truncate(page_size);
    let uri = format!("/{API_VERSION}/Accounts/{account}/Calls.json");
    let resources: Vec<Value> = calls.iter().map(|c| sim.resource(c)).collect();
    Json(json!({
        "calls": resources,
        "page": 0,
        "page_size": page_size,
        "start": 0,
        "end": resources.len().saturating_sub(1),
        "first_page_uri": format!("{uri}?PageSize={page_size}&Page=0"),
        "next_page_uri": null,
        "previous_page_uri": null,
        "uri": uri,
    }))
    .into_response()
}

/// A status callback to post: its `CallStatus` and any extra fields.
struct Callback {
    params: Vec<(String, String)>,
}

/// Numbers and queues the status callbacks of one call, holding `ringing` back one step when
/// asked to reorder. A separate task posts them, so a slow webhook does not slow the call.
struct Callbacks {
    tx: Option<mpsc::Sender<Callback>>,
    events: Vec<String>,
    base: Vec<(String, String)>,
    sequence: u64,
    reorder: bool,
    held: Option<Callback>,
}

impl Callbacks {
    /// Sends the callback for `event` (initiated, ringing, answered, completed) if the call
    /// asked for it; Twilio sends only `completed` when no event was asked for.
    async fn emit(&mut self, event: &str, status: &str, extra: Vec<(String, String)>) {
        let wanted = if self.events.is_empty() {
            event == "completed"
        } else {
            self.events.iter().any(|e| e == event)
        };
        if !wanted || self.tx.is_none() {
            return;
        }
        let mut params = self.base.clone();
        params.extend(
            [
                ("CallStatus", status.to_string()),
                ("SequenceNumber", self.sequence.to_string()),
                ("Timestamp", rfc2822(Utc::now())),
                ("CallbackSource", "call-progress-events".to_string()),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        params.extend(extra);
        self.sequence += 1;
        let callback = Callback { params };
        if self.reorder && event == "ringing" {
            self.held = Some(callback);
            return;
        }
        self.send(callback).await;
        if let Some(held) = self.held.take() {
            self.send(held).await;
        }
    }

    async fn send(&mut self, callback: Callback) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(callback).await;
        }
    }

    async fn flush(&mut self) {
        if let Some(held) = self.held.take() {
            self.send(held).await;
        }
        self.tx = None;
    }
}

/// Posts the callbacks of one call in order, signed over the exact `StatusCallback` URL.
async fn post_callbacks(
    sim: TwilioSim,
    sid: String,
    url: String,
    mut rx: mpsc::Receiver<Callback>,
) {
    let times = if sim.inner.settings.duplicate_callbacks {
        2
    } else {
        1
    };
    while let Some(callback) = rx.recv().await {
        for _ in 0..times {
            let signed = signature(&sim.inner.settings.auth_token, &url, &callback.params);
            let posted = sim
                .inner
                .http
                .post(&url)
                .header("X-Twilio-Signature", signed)
                .form(&callback.params)
                .send()
                .await;
            sim.update(&sid, |r| r.call.callbacks_sent += 1);
            match posted {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => {
                    tracing::warn!(call_sid = %sid, status = r.status().as_u16(), "status callback refused")
                }
                Err(e) => tracing::warn!(call_sid = %sid, error = %e, "status callback failed"),
            }
        }
    }
}

/// One call, from queued to its end. See the module docs for the phases.
async fn run_call(sim: TwilioSim, sid: String) {
    let Some((call, events, twiml, hang_up, counters)) = sim.update(&sid, |r| {
        (
            r.call.clone(),
            r.events.clone(),
            r.twiml.clone(),
            r.hang_up.clone(),
            r.counters.clone(),
        )
    }) else {
        return;
    };
    let settings = &sim.inner.settings;
    let base: Vec<(String, String)> = [
        ("CallSid", call.sid.as_str()),
        ("AccountSid", settings.account_sid.as_str()),
        ("From", call.from.as_str()),
        ("To", call.to.as_str()),
        ("Direction", "outbound-api"),
        ("ApiVersion", API_VERSION),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let (tx, rx) = mpsc::channel(16);
    let poster = call
        .status_callback
        .clone()
        .map(|url| tokio::spawn(post_callbacks(sim.clone(), sid.clone(), url, rx)));
    let mut callbacks = Callbacks {
        tx: poster.is_some().then_some(tx),
        events,
        base: base.clone(),
        sequence: 0,
        reorder: settings.reorder_callbacks,
        held: None,
    };

    callbacks.emit("initiated", "initiated", Vec::new()).await;
    sim.set_status(&sid, "ringing");
    callbacks.emit("ringing", "ringing", Vec::new()).await;
    let rang = tokio::select! {
        _ = hang_up.cancelled() => false,
        _ = tokio::time::sleep(settings.ring) => true,
    };
    let outcome = settings.outcome.for_call(&call.to);
    if !rang {
        // Hung up (canceled) while ringing; `finish` already set the status.
    } else if let Some(status) = outcome.unanswered_status() {
        sim.finish(&sid, status);
    } else {
        sim.set_status(&sid, "in-progress");
        callbacks.emit("answered", "in-progress", Vec::new()).await;
        let limit = settings
            .call_length
            .min(Duration::from_secs(u64::from(call.time_limit)));
        let deadline = tokio::time::Instant::now() + limit;
        let ended_by_stream =
            converse(&sim, &call, &base, twiml, &hang_up, deadline, counters).await;
        if ended_by_stream {
            tracing::debug!(call_sid = %sid, "call ended by our server");
        }
        sim.finish(&sid, "completed");
    }

    let Some(ended) = sim.call(&sid) else {
        return;
    };
    let mut extra = Vec::new();
    if ended.status == "completed" {
        let seconds = ended.duration_secs.unwrap_or(0);
        extra.push(("CallDuration".to_string(), seconds.to_string()));
        // Billed minutes, rounded up; an answered call bills at least one.
        extra.push((
            "Duration".to_string(),
            seconds.div_ceil(60).max(1).to_string(),
        ));
    }
    callbacks.emit("completed", &ended.status, extra).await;
    callbacks.flush().await;
    if let Some(poster) = poster {
        let _ = poster.await;
    }
    tracing::info!(call_sid = %sid, status = %ended.status, duration = ended.duration_secs.unwrap_or(0), "simulated call ended");
}

/// The answered part of a call: fetch the TwiML, run its stream, wait for the end. Returns
/// whether our side ended it (a bidirectional stream closed, or the TwiML could not be had —
/// Twilio then says "an application error has occurred" and hangs up).
async fn converse(
    sim: &TwilioSim,
    call: &SimCall,
    base: &[(String, String)],
    twiml: Option<String>,
    hang_up: &CancellationToken,
    deadline: tokio::time::Instant,
    counters: Arc<StreamCounters>,
) -> bool {
    let settings = &sim.inner.settings;
    let twiml = match twiml {
        Some(inline) => inline,
        None => match fetch_twiml(sim, call, base).await {
            Some(t) => t,
            None => return true,
        },
    };
    if hang_up.is_cancelled() {
        // Hung up while we were fetching the TwiML: nothing left to run.
        return false;
    }
    let stream = media::parse_stream(&twiml);
    let Some(stream) = stream else {
        tokio::select! {
            _ = hang_up.cancelled() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
        return false;
    };
    let bidirectional = stream.bidirectional;
    let stop = CancellationToken::new();
    let context = StreamContext {
        account_sid: settings.account_sid.clone(),
        call_sid: call.sid.clone(),
        auth_token: settings.auth_token.clone(),
        script: settings.caller.clone(),
        counters,
    };
    let mut session = tokio::spawn(media::run_stream(context, stream, stop.clone()));
    let mut session_done = false;
    let ended_by_us = loop {
        tokio::select! {
            _ = hang_up.cancelled() => break false,
            _ = tokio::time::sleep_until(deadline) => break false,
            end = &mut session, if !session_done => {
                session_done = true;
                // With <Connect>, Twilio hangs up once our server closes the socket (there is
                // no next verb in our TwiML); with <Start>, the call carries on.
                if bidirectional && matches!(end, Ok(StreamEnd::Closed) | Err(_)) {
                    break true;
                }
            }
        }
    };
    stop.cancel();
    if !session_done {
        let _ = tokio::time::timeout(Duration::from_secs(5), session).await;
    }
    ended_by_us
}

/// POSTs the answered call's parameters to its `Url`, signed, and returns the TwiML.
async fn fetch_twiml(sim: &TwilioSim, call: &SimCall, base: &[(String, String)]) -> Option<String> {
    let mut params = base.to_vec();
    params.push(("CallStatus".into(), "in-progress".into()));
    let signed = signature(&sim.inner.settings.auth_token, &call.url, &params);
    let answer = sim
        .inner
        .http
        .post(&call.url)
        .header("X-Twilio-Signature", signed)
        .form(&params)
        .send()
        .await;
    match answer {
        Ok(r) if r.status().is_success() => match r.text().await {
            Ok(body) => Some(body),
            Err(e) => {
                tracing::warn!(call_sid = %call.sid, error = %e, "TwiML unreadable; hanging up (Twilio error 11200)");
                None
            }
        },
        Ok(r) => {
            tracing::warn!(call_sid = %call.sid, status = r.status().as_u16(), "TwiML fetch refused; hanging up (Twilio error 11200)");
            None
        }
        Err(e) => {
            tracing::warn!(call_sid = %call.sid, error = %e, "TwiML fetch failed; hanging up (Twilio error 11200)");
            None
        }
    }
}
