//! The real client against the simulator on loopback, with a small stand-in for our server
//! that records status callbacks, serves TwiML and answers the media stream.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;

use super::*;
use cmb_providers::twilio::{verify_signature, CreateCall, Twilio};
use cmb_providers::ProviderError;

const TOKEN: &str = "test-auth-token";
const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";

fn settings() -> Settings {
    Settings {
        account_sid: ACCOUNT.into(),
        auth_token: TOKEN.into(),
        ring: Duration::from_millis(50),
        call_length: Duration::from_millis(400),
        outcome: Outcome::Answer,
        duplicate_callbacks: false,
        reorder_callbacks: false,
        faults: Faults::default(),
        caller: CallerScript::default(),
        hold_create_response: None,
    }
}

/// A request the simulator made to our stand-in server.
#[derive(Debug, Clone)]
struct Received {
    signature: String,
    params: Vec<(String, String)>,
}

impl Received {
    fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Log {
    callbacks: Mutex<Vec<Received>>,
    twiml_fetches: Mutex<Vec<Received>>,
    /// Every JSON message the media stream received, in order.
    ws_messages: Mutex<Vec<Value>>,
    /// When the mark echo came back, measured from when our mark was sent.
    mark_delay: Mutex<Option<Duration>>,
    ws_signature: Mutex<Option<String>>,
}

#[derive(Clone)]
struct App {
    log: Arc<Log>,
    twiml: Arc<String>,
}

async fn status(
    State(app): State<App>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> impl IntoResponse {
    app.log.callbacks.lock().unwrap().push(Received {
        signature: header(&headers),
        params: parse_form(&body),
    });
    StatusCode::NO_CONTENT
}

async fn twiml(
    State(app): State<App>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> impl IntoResponse {
    app.log.twiml_fetches.lock().unwrap().push(Received {
        signature: header(&headers),
        params: parse_form(&body),
    });
    (
        [("content-type", "text/xml")],
        app.twiml.as_str().to_string(),
    )
}

fn header(headers: &HeaderMap) -> String {
    headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

async fn media(
    State(app): State<App>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> impl IntoResponse {
    *app.log.ws_signature.lock().unwrap() = Some(header(&headers));
    ws.on_upgrade(move |socket| answer_stream(app, socket))
}

/// Plays like our server: after five caller frames, sends 200 ms of audio and a mark, and
/// times the mark's echo.
async fn answer_stream(app: App, mut socket: WebSocket) {
    let mut media_seen = 0;
    let mut mark_sent_at = None;
    while let Some(Ok(message)) = socket.recv().await {
        let WsMessage::Text(text) = message else {
            continue;
        };
        let Ok(value) = serde_json::from_str::<Value>(text.as_str()) else {
            continue;
        };
        app.log.ws_messages.lock().unwrap().push(value.clone());
        match value["event"].as_str() {
            Some("media") => {
                media_seen += 1;
                if media_seen == 5 {
                    let sid = value["streamSid"].as_str().unwrap_or_default().to_string();
                    for _ in 0..10 {
                        let frame = json!({"event": "media", "streamSid": sid,
                            "media": {"payload": BASE64.encode([0xFFu8; 160])}});
                        let _ = socket.send(WsMessage::Text(frame.to_string().into())).await;
                    }
                    let mark = json!({"event": "mark", "streamSid": sid, "mark": {"name": "m1"}});
                    let _ = socket.send(WsMessage::Text(mark.to_string().into())).await;
                    mark_sent_at = Some(Instant::now());
                }
            }
            Some("mark") => {
                if let Some(sent) = mark_sent_at {
                    *app.log.mark_delay.lock().unwrap() = Some(sent.elapsed());
                }
            }
            Some("stop") => break,
            _ => {}
        }
    }
}

struct Env {
    sim: TwilioSim,
    client: Twilio,
    sim_url: String,
    app_url: String,
    log: Arc<Log>,
}

async fn spawn(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

/// Starts the simulator and our stand-in server; `twiml` gets the stand-in's base URL.
async fn start(settings: Settings, twiml: impl FnOnce(&str) -> String) -> Env {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_url = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Log::default());
    let app = App {
        log: log.clone(),
        twiml: Arc::new(twiml(&app_url)),
    };
    let router = Router::new()
        .route("/status", post(status))
        .route("/twiml", post(twiml_handler))
        .route("/media", get(media))
        .with_state(app);
    tokio::spawn(async move { axum::serve(listener, router).await });
    let sim = TwilioSim::new(settings);
    let sim_url = spawn(sim.router()).await;
    let client = Twilio::new(cmb_providers::http_client(), &sim_url, ACCOUNT, TOKEN);
    Env {
        sim,
        client,
        sim_url,
        app_url,
        log,
    }
}

async fn twiml_handler(
    state: State<App>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> impl IntoResponse {
    twiml(state, headers, body).await
}

const PLAIN_TWIML: &str =
    r#"<?xml version="1.0" encoding="UTF-8"?><Response><Pause length="60"/></Response>"#;

impl Env {
    fn call(&self, to: &str) -> CreateCall {
        CreateCall {
            to: to.into(),
            from: "+15005550006".into(),
            url: format!("{}/twiml", self.app_url),
            status_callback: format!("{}/status?call=42", self.app_url),
            time_limit_secs: 600,
        }
    }

    fn callbacks(&self) -> Vec<Received> {
        self.log.callbacks.lock().unwrap().clone()
    }

    fn statuses(&self) -> Vec<String> {
        self.callbacks()
            .iter()
            .map(|c| c.get("CallStatus").unwrap_or_default().to_string())
            .collect()
    }

    async fn wait_for_callbacks(&self, count: usize) {
        let started = Instant::now();
        while self.callbacks().len() < count {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "only {:?} arrived",
                self.statuses()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test]
async fn answered_call_sends_signed_ordered_callbacks() {
    let env = start(settings(), |_| PLAIN_TWIML.to_string()).await;
    let created = env
        .client
        .create_call(&env.call("+15551234567"))
        .await
        .unwrap();
    assert!(created.sid.starts_with("CA") && created.sid.len() == 34);
    assert_eq!(created.status, "queued");
    assert_eq!(created.to, "+15551234567");
    assert!(created.date_created.is_some());

    env.wait_for_callbacks(4).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let callbacks = env.callbacks();
    assert_eq!(
        env.statuses(),
        ["initiated", "ringing", "in-progress", "completed"]
    );
    let status_url = format!("{}/status?call=42", env.app_url);
    for (i, callback) in callbacks.iter().enumerate() {
        assert!(verify_signature(
            TOKEN,
            &status_url,
            &callback.params,
            &callback.signature
        ));
        assert!(!verify_signature(
            "other",
            &status_url,
            &callback.params,
            &callback.signature
        ));
        assert_eq!(callback.get("SequenceNumber"), Some(i.to_string().as_str()));
        assert_eq!(callback.get("CallSid"), Some(created.sid.as_str()));
        assert_eq!(callback.get("AccountSid"), Some(ACCOUNT));
        assert_eq!(callback.get("Direction"), Some("outbound-api"));
        assert_eq!(callback.get("ApiVersion"), Some("2010-04-01"));
        assert_eq!(callback.get("CallbackSource"), Some("call-progress-events"));
        assert_eq!(callback.get("To"), Some("+15551234567"));
        assert_eq!(callback.get("From"), Some("+15005550006"));
        let timestamp = callback.get("Timestamp").unwrap_or_default();
        assert!(
            DateTime::parse_from_rfc2822(timestamp).is_ok(),
            "{timestamp}"
        );
    }
    assert!(callbacks[..3]
        .iter()
        .all(|c| c.get("CallDuration").is_none()));
    assert_eq!(callbacks[3].get("CallDuration"), Some("0"));
    assert_eq!(callbacks[3].get("Duration"), Some("1"));

    let fetches = env.log.twiml_fetches.lock().unwrap().clone();
    assert_eq!(fetches.len(), 1);
    let twiml_url = format!("{}/twiml", env.app_url);
    assert!(verify_signature(
        TOKEN,
        &twiml_url,
        &fetches[0].params,
        &fetches[0].signature
    ));
    assert_eq!(fetches[0].get("CallStatus"), Some("in-progress"));

    let fetched = env.client.fetch_call(&created.sid).await.unwrap().unwrap();
    assert_eq!(fetched.status, "completed");
    assert_eq!(fetched.duration.as_deref(), Some("0"));
    assert!(env
        .client
        .fetch_call("CA00000000000000000000000000000000")
        .await
        .unwrap()
        .is_none());

    let today = Utc::now().date_naive();
    let listed = env
        .client
        .list_calls_to("+15551234567", today)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].sid, created.sid);
    assert!(env
        .client
        .list_calls_to("+15559999999", today)
        .await
        .unwrap()
        .is_empty());
    let tomorrow = today.succ_opt().unwrap();
    assert!(env
        .client
        .list_calls_to("+15551234567", tomorrow)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(env.sim.calls().len(), 1);
    assert_eq!(env.sim.calls()[0].time_limit, 600);
}

#[tokio::test]
async fn magic_numbers_are_busy_unanswered_or_failed() {
    let env = start(settings(), |_| PLAIN_TWIML.to_string()).await;
    let created = env
        .client
        .create_call(&env.call("+15550100001"))
        .await
        .unwrap();
    env.wait_for_callbacks(3).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(env.statuses(), ["initiated", "ringing", "busy"]);
    assert!(env.callbacks()[2].get("CallDuration").is_none());
    assert!(env.log.twiml_fetches.lock().unwrap().is_empty());
    let fetched = env.client.fetch_call(&created.sid).await.unwrap().unwrap();
    assert_eq!(fetched.status, "busy");

    env.client
        .create_call(&env.call("+15550100002"))
        .await
        .unwrap();
    env.client
        .create_call(&env.call("+15550100003"))
        .await
        .unwrap();
    env.wait_for_callbacks(9).await;
    let finals: Vec<String> = env.sim.calls().iter().map(|c| c.status.clone()).collect();
    assert_eq!(finals, ["busy", "no-answer", "failed"]);
}

#[tokio::test]
async fn wrong_credentials_are_a_401_that_is_not_retried() {
    let env = start(settings(), |_| PLAIN_TWIML.to_string()).await;
    let impostor = Twilio::new(cmb_providers::http_client(), &env.sim_url, ACCOUNT, "wrong");
    let refused = impostor
        .create_call(&env.call("+15551234567"))
        .await
        .unwrap_err();
    match &refused {
        ProviderError::Status { status, detail, .. } => {
            assert_eq!(*status, 401);
            assert!(
                detail.contains("Authenticate") && detail.contains("20003"),
                "{detail}"
            );
        }
        other => panic!("expected a status error, got {other:?}"),
    }
    assert!(!refused.retryable());
    assert!(env.sim.calls().is_empty());
}

#[tokio::test]
async fn injected_failures_are_503s_that_are_retried() {
    let mut settings = settings();
    settings.faults = Faults::new(Duration::ZERO, 2);
    let env = start(settings, |_| PLAIN_TWIML.to_string()).await;
    env.client
        .create_call(&env.call("+15551234567"))
        .await
        .unwrap();
    let refused = env
        .client
        .create_call(&env.call("+15551234567"))
        .await
        .unwrap_err();
    assert!(matches!(refused, ProviderError::Status { status: 503, .. }));
    assert!(refused.retryable());
    assert_eq!(env.sim.calls().len(), 1);
}

#[tokio::test]
async fn missing_fields_are_twilio_400s() {
    let env = start(settings(), |_| PLAIN_TWIML.to_string()).await;
    let url = format!("{}/2010-04-01/Accounts/{ACCOUNT}/Calls.json", env.sim_url);
    let http = reqwest::Client::new();
    for (form, code) in [
        (vec![("From", "+15005550006"), ("Url", "http://x/")], 21201),
        (vec![("To", "+15551234567"), ("Url", "http://x/")], 21603),
        (
            vec![("To", "+15551234567"), ("From", "+15005550006")],
            21205,
        ),
        (
            vec![("To", "not a number"), ("From", "+1"), ("Url", "http://x/")],
            21211,
        ),
    ] {
        let answer = http
            .post(&url)
            .basic_auth(ACCOUNT, Some(TOKEN))
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 400);
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["code"], code);
        assert_eq!(body["status"], 400);
        assert!(body["message"].is_string() && body["more_info"].is_string());
    }
    assert!(env.sim.calls().is_empty());
}

#[tokio::test]
async fn hang_up_ends_an_answered_call_early() {
    let mut settings = settings();
    settings.call_length = Duration::from_secs(30);
    let env = start(settings, |_| PLAIN_TWIML.to_string()).await;
    let created = env
        .client
        .create_call(&env.call("+15551234567"))
        .await
        .unwrap();
    env.wait_for_callbacks(3).await;
    assert_eq!(env.statuses()[2], "in-progress");
    let hung_up_at = Instant::now();
    env.client.hang_up(&created.sid).await.unwrap();
    env.wait_for_callbacks(4).await;
    assert!(hung_up_at.elapsed() < Duration::from_secs(2));
    let completed = &env.callbacks()[3];
    assert_eq!(completed.get("CallStatus"), Some("completed"));
    assert_eq!(completed.get("CallDuration"), Some("0"));
    let fetched = env.client.fetch_call(&created.sid).await.unwrap().unwrap();
    assert_eq!(fetched.status, "completed");
    // Hanging up again is harmless.
    env.client.hang_up(&created.sid).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(env.callbacks().len(), 4);
}

#[tokio::test]
async fn hang_up_while_ringing_cancels() {
    let mut settings = settings();
    settings.ring = Duration::from_secs(30);
    let env = start(settings, |_| PLAIN_TWIML.to_string()).await;
    let created = env
        .client
        .create_call(&env.call("+15551234567"))
        .await
        .unwrap();
    env.wait_for_callbacks(2).await;
    env.client.hang_up(&created.sid).await.unwrap();
    env.wait_for_callbacks(3).await;
    assert_eq!(env.statuses(), ["initiated", "ringing", "canceled"]);
}

#[tokio::test]
async fn reordered_and_duplicated_callbacks() {
    let mut settings = settings();
    settings.reorder_callbacks = true;
    settings.duplicate_callbacks = true;
    let env = start(settings, |_| PLAIN_TWIML.to_string()).await;
    env.client
        .create_call(&env.call("+15551234567"))
        .await
        .unwrap();
    env.wait_for_callbacks(8).await;
    assert_eq!(
        env.statuses(),
        [
            "initiated",
            "initiated",
            "in-progress",
            "in-progress",
            "ringing",
            "ringing",
            "completed",
            "completed"
        ]
    );
    let sequence: Vec<String> = env
        .callbacks()
        .iter()
        .map(|c| c.get("SequenceNumber").unwrap_or_default().to_string())
        .collect();
    assert_eq!(sequence, ["0", "0", "2", "2", "1", "1", "3", "3"]);
    assert_eq!(env.sim.calls()[0].callbacks_sent, 8);
}

#[tokio::test]
async fn connect_stream_plays_the_caller_and_echoes_marks() {
    let mut settings = settings();
    settings.call_length = Duration::from_millis(1500);
    let env = start(settings, |base| {
        let ws = base.replacen("http://", "ws://", 1);
        format!(
            r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="{ws}/media"><Parameter name="callId" value="abc"/></Stream></Connect></Response>"#
        )
    })
    .await;
    let created = env
        .client
        .create_call(&env.call("+15551234567"))
        .await
        .unwrap();
    env.wait_for_callbacks(4).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let messages = env.log.ws_messages.lock().unwrap().clone();
    let events: Vec<&str> = messages
        .iter()
        .map(|m| m["event"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(events[0], "connected");
    assert_eq!(messages[0]["protocol"], "Call");
    assert_eq!(messages[0]["version"], "1.0.0");
    assert_eq!(events[1], "start");
    let start = &messages[1];
    let stream_sid = start["streamSid"].as_str().unwrap();
    assert!(stream_sid.starts_with("MZ") && stream_sid.len() == 34);
    assert_eq!(start["sequenceNumber"], "1");
    assert_eq!(start["start"]["callSid"], created.sid.as_str());
    assert_eq!(start["start"]["accountSid"], ACCOUNT);
    assert_eq!(start["start"]["customParameters"]["callId"], "abc");
    assert_eq!(start["start"]["tracks"], json!(["inbound"]));
    assert_eq!(
        start["start"]["mediaFormat"],
        json!({"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1})
    );
    assert_eq!(*events.last().unwrap(), "stop");
    assert_eq!(
        messages.last().unwrap()["stop"]["callSid"],
        created.sid.as_str()
    );

    let media: Vec<&Value> = messages.iter().filter(|m| m["event"] == "media").collect();
    // 1.5 s at 20 ms a frame is 75; allow for a slow machine.
    assert!(media.len() >= 40, "{} media frames", media.len());
    for (i, frame) in media.iter().enumerate() {
        assert_eq!(frame["streamSid"], stream_sid);
        assert_eq!(frame["media"]["track"], "inbound");
        assert_eq!(frame["media"]["chunk"], (i + 1).to_string());
        assert_eq!(frame["media"]["timestamp"], (i * 20).to_string());
        let payload = BASE64
            .decode(frame["media"]["payload"].as_str().unwrap())
            .unwrap();
        assert_eq!(payload.len(), 160);
    }
    // Sequence numbers run on across media and marks.
    let sequence: Vec<u64> = messages[1..]
        .iter()
        .map(|m| m["sequenceNumber"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(
        sequence.windows(2).all(|w| w[1] == w[0] + 1),
        "{sequence:?}"
    );

    // The mark comes back once the 200 ms queued before it have played.
    let echoed: Vec<&Value> = messages.iter().filter(|m| m["event"] == "mark").collect();
    assert_eq!(echoed.len(), 1);
    assert_eq!(echoed[0]["mark"]["name"], "m1");
    let delay = env.log.mark_delay.lock().unwrap().expect("mark echoed");
    assert!(delay >= Duration::from_millis(180), "{delay:?}");

    let upgrade_signature = env.log.ws_signature.lock().unwrap().clone().unwrap();
    let ws_url = format!("{}/media", env.app_url.replacen("http://", "ws://", 1));
    assert!(verify_signature(TOKEN, &ws_url, &[], &upgrade_signature));

    let call = env.sim.call(&created.sid).unwrap();
    assert!(call.stream_opened);
    assert_eq!(call.frames_received, 10);
    assert_eq!(call.marks_received, 1);
    assert_eq!(call.marks_echoed, 1);
    assert_eq!(call.clears_received, 0);
    assert_eq!(call.invalid_messages, 0);
    assert_eq!(call.frames_sent as usize, media.len());
    assert_eq!(call.status, "completed");
    let counts: HashMap<&str, usize> = events.iter().fold(HashMap::new(), |mut m, e| {
        *m.entry(*e).or_default() += 1;
        m
    });
    assert_eq!(counts.get("start"), Some(&1));
    assert_eq!(counts.get("stop"), Some(&1));

    // What a benchmark in another process reads of it, over HTTP.
    let http = reqwest::Client::new();
    let calls: Vec<CallState> = http
        .get(format!("{}/_sim/calls", env.sim_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let state = &calls[0];
    assert_eq!(state.sid, created.sid);
    assert_eq!(state.status, "completed");
    assert!(
        state.stream_opened && state.stream_closed && state.ended,
        "{state:?}"
    );
    assert_eq!(state.frames_received, 10);
    let observed: Observations = http
        .get(format!("{}/_sim/observations", env.sim_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // A tick per caller frame sent, and each of our ten frames timed against its pace.
    assert_eq!(observed.tick_lateness_us.len() as u64, call.frames_sent);
    assert_eq!(observed.frame_lateness_us.len(), 10);
}

/// A media-stream server that takes `connected` and `start`, then ends the stream: with a
/// close frame (`close`), or by dropping the socket without one. Returns its `ws://` URL.
async fn stream_ending_after_start(close: bool) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_url = format!("ws://{}/", listener.local_addr().unwrap());
    let server = Router::new().route(
        "/",
        get(move |ws: WebSocketUpgrade| async move {
            ws.on_upgrade(move |mut socket| async move {
                let _ = socket.recv().await;
                let _ = socket.recv().await;
                if close {
                    let _ = socket.send(WsMessage::Close(None)).await;
                }
            })
        }),
    );
    tokio::spawn(async move { axum::serve(listener, server).await });
    ws_url
}

#[tokio::test]
async fn closing_a_connect_stream_ends_the_call() {
    let mut settings = settings();
    settings.call_length = Duration::from_secs(30);
    // Hang up from our side.
    let ws_url = stream_ending_after_start(true).await;
    let env = start(settings, move |_| {
        format!(r#"<Response><Connect><Stream url="{ws_url}"/></Connect></Response>"#)
    })
    .await;
    env.client
        .create_call(&env.call("+15551234567"))
        .await
        .unwrap();
    env.wait_for_callbacks(4).await;
    assert_eq!(env.statuses()[3], "completed");
}

#[tokio::test]
async fn a_lost_connect_stream_goes_on_to_the_say_after_it_then_hangs_up() {
    let mut settings = settings();
    settings.call_length = Duration::from_secs(30);
    // The socket just goes away (a dying instance): no close frame.
    let ws_url = stream_ending_after_start(false).await;
    let env = start(settings, move |_| {
        format!(
            r#"<Response><Connect><Stream url="{ws_url}"/></Connect><Say>Sorry, we lost the line.</Say><Hangup/></Response>"#
        )
    })
    .await;
    let created = env
        .client
        .create_call(&env.call("+15551234567"))
        .await
        .unwrap();
    env.wait_for_callbacks(4).await;
    assert_eq!(env.statuses()[3], "completed");
    let call = env.sim.call(&created.sid).unwrap();
    assert_eq!(call.said_after_stream, 1);
    assert_eq!(
        super::media::says_after_connect(
            "<Response><Say>before</Say><Connect><Stream url=\"x\"/></Connect><Say voice=\"alice\">a &amp; b</Say><Hangup/></Response>"
        ),
        ["a & b"]
    );
}

#[test]
fn settings_from_variables() {
    let vars: HashMap<&str, &str> = [
        ("SIM_TWILIO_RING_MS", "250"),
        ("SIM_TWILIO_CALL_SECONDS", "5"),
        ("SIM_TWILIO_OUTCOME", "no-answer"),
        ("SIM_TWILIO_DUPLICATE_CALLBACKS", "1"),
        ("SIM_TWILIO_FAIL_EVERY", "3"),
        ("SIM_TWILIO_CALLER_TURNS", "1000:500"),
        ("TWILIO_ACCOUNT_SID", "AC1"),
        ("SIM_TWILIO_AUTH_TOKEN", "tok"),
    ]
    .into_iter()
    .collect();
    let s = Settings::from_lookup(&|k| vars.get(k).map(|v| v.to_string()));
    assert_eq!(s.ring, Duration::from_millis(250));
    assert_eq!(s.call_length, Duration::from_secs(5));
    assert_eq!(s.outcome, Outcome::NoAnswer);
    assert!(s.duplicate_callbacks && !s.reorder_callbacks);
    assert_eq!(s.faults.fail_every, 3);
    assert_eq!(s.caller.turns, [(1000, 500)]);
    assert!(!s.caller.waits_to_hear);
    let waits = Settings::from_lookup(&|k| {
        (k == "SIM_TWILIO_CALLER_WAITS_TO_HEAR").then(|| "1".to_string())
    });
    assert!(waits.caller.waits_to_hear);
    assert_eq!(waits.caller.turns, CallerScript::default().turns);
    assert_eq!(s.account_sid, "AC1");
    assert_eq!(s.auth_token, "tok");

    let d = Settings::default();
    assert_eq!(d.ring, Duration::from_secs(1));
    assert_eq!(d.call_length, Duration::from_secs(30));
    assert_eq!(d.outcome, Outcome::Answer);
    assert_eq!(d.account_sid, DEFAULT_ACCOUNT_SID);
    assert_eq!(d.caller, CallerScript::default());
    let bad = Settings::from_lookup(&|k| (k == "SIM_TWILIO_OUTCOME").then(|| "maybe".to_string()));
    assert_eq!(bad.outcome, Outcome::Answer);
}

#[tokio::test]
async fn clear_drops_queued_audio_and_echoes_pending_marks_at_once() {
    let mut settings = settings();
    settings.call_length = Duration::from_millis(1500);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_url = format!("ws://{}/", listener.local_addr().unwrap());
    let echo_delay = Arc::new(Mutex::new(None::<Duration>));
    let recorded = echo_delay.clone();
    let server = Router::new().route(
        "/",
        get(move |ws: WebSocketUpgrade| {
            let recorded = recorded.clone();
            async move {
                ws.on_upgrade(move |mut socket| async move {
                    let mut cleared_at = None;
                    while let Some(Ok(WsMessage::Text(text))) = socket.recv().await {
                        let value: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
                        let sid = value["streamSid"].as_str().unwrap_or_default().to_string();
                        match value["event"].as_str() {
                            Some("start") => {
                                // Five seconds of audio, a mark behind it, then barge-in.
                                let audio = BASE64.encode([0xFFu8; 40_000]);
                                for message in [
                                    json!({"event": "media", "streamSid": sid, "media": {"payload": audio}}),
                                    json!({"event": "mark", "streamSid": sid, "mark": {"name": "late"}}),
                                    json!({"event": "clear", "streamSid": sid}),
                                    json!({"event": "clear", "streamSid": "MZwrong"}),
                                ] {
                                    let _ = socket.send(WsMessage::Text(message.to_string().into())).await;
                                }
                                cleared_at = Some(Instant::now());
                            }
                            Some("mark") => {
                                *recorded.lock().unwrap() = cleared_at.map(|at| at.elapsed());
                            }
                            Some("stop") => break,
                            _ => {}
                        }
                    }
                })
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, server).await });
    let env = start(settings, move |_| {
        format!(r#"<Response><Connect><Stream url="{ws_url}"/></Connect></Response>"#)
    })
    .await;
    let created = env
        .client
        .create_call(&env.call("+15551234567"))
        .await
        .unwrap();
    env.wait_for_callbacks(4).await;
    let delay = echo_delay.lock().unwrap().expect("mark echoed");
    assert!(delay < Duration::from_millis(500), "{delay:?}");
    let call = env.sim.call(&created.sid).unwrap();
    assert_eq!(call.frames_received, 1);
    assert_eq!(call.marks_received, 1);
    assert_eq!(call.marks_echoed, 1);
    assert_eq!(call.clears_received, 1);
    assert_eq!(call.invalid_messages, 1);
}
