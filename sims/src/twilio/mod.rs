//! Twilio simulator: the Calls REST resource, status callbacks, the TwiML fetch and the Media
//! Streams WebSocket, on loopback, with the same wire protocol as Twilio (its REST API and Media Streams), so
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
mod mulaw;
mod observe;
mod playback;
#[cfg(test)]
mod tests;

pub use media::{
    caller_audio, caller_frames, linear_to_mulaw, mulaw_to_linear, CallerScript, FRAME_BYTES,
};
pub use observe::{CallState, Observations, LEAD};

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

mod calls;
mod lifecycle;
mod wire;

use calls::*;
use lifecycle::*;
use wire::*;

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
    /// `SIM_TWILIO_CALLER_WAITS_TO_HEAR` (the script starts once the caller heard us),
    /// `SIM_TWILIO_CALLER_ENDPOINTING_MS` (the listener's endpointing, for the observations),
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
        let caller = CallerScript {
            waits_to_hear: flag("SIM_TWILIO_CALLER_WAITS_TO_HEAR"),
            endpointing_ms: number("SIM_TWILIO_CALLER_ENDPOINTING_MS", 0).min(60_000) as u32,
            ..caller
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
    /// Whether it has ended since.
    pub stream_closed: bool,
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
    /// `<Say>` verbs spoken after the stream ended (our apology when a session is lost).
    pub said_after_stream: u64,
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
            stream_closed: c.closed.load(Ordering::Relaxed) > 0,
            frames_sent: c.frames_sent.load(Ordering::Relaxed),
            frames_received: c.frames_received.load(Ordering::Relaxed),
            marks_received: c.marks_received.load(Ordering::Relaxed),
            marks_echoed: c.marks_echoed.load(Ordering::Relaxed),
            clears_received: c.clears_received.load(Ordering::Relaxed),
            invalid_messages: c.invalid_messages.load(Ordering::Relaxed),
            said_after_stream: c.said_after_stream.load(Ordering::Relaxed),
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
            // For a benchmark in another process (not Twilio's; loopback only).
            .route("/_sim/calls", get(observe::calls))
            .route("/_sim/observations", get(observe::observations))
            .with_state(self.clone())
    }

    /// Every call created so far, oldest first.
    pub fn calls(&self) -> Vec<SimCall> {
        self.lock().iter().map(Record::snapshot).collect()
    }

    /// What the caller side measured on each ended stream (see [`Observations`]).
    pub fn observations(&self) -> Vec<Observations> {
        self.lock()
            .iter()
            .filter(|r| r.counters.closed.load(Ordering::Relaxed) > 0)
            .filter_map(|r| r.counters.observed.lock().ok().map(|o| o.clone()))
            .collect()
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
