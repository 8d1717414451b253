//! Media streams only for the call they belong to (issue 13). The test plays Twilio: it signs
//! the answer request and the WebSocket upgrade with the auth token, and speaks the Media
//! Streams protocol itself, while the simulator keeps the real call ringing (so nothing but
//! the test opens a stream). Seen from outside: the upgrade's status, whether the server
//! speaks (the greeting's `media` frames) or closes the socket, the event log, and the
//! simulators' open sockets.

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use callmeback::app::Running;
use callmeback::config::DEV_TWILIO_AUTH_TOKEN;
use common::{eventually, grant, request_call, Api, TestEnv, PASSWORD};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The simulator rings for ten minutes: the test answers the call itself.
fn env() -> TestEnv {
    TestEnv::new().set("SIM_TWILIO_RING_MS", "600000")
}

/// A call placed at the simulator and ringing: (our id, its CallSid, its owner).
async fn ringing_call(app: &Running, api: &Api) -> (String, String, Api) {
    let (user, profile) = api.register(PASSWORD).await;
    grant(app, &profile, 100).await;
    let id = request_call(&user, "brad_001", 2).await;
    let sid = eventually(Duration::from_secs(60), || async {
        let call = user.get(&format!("/api/calls/{id}")).await;
        call.body["call"]["call_sid"].as_str().map(str::to_string)
    })
    .await
    .expect("the call was placed");
    (id, sid, user)
}

fn form(params: &[(&str, &str)]) -> (Vec<(String, String)>, String) {
    let params: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter())
        .finish();
    (params, body)
}

/// Posts a signed Twilio webhook (`path` with its query) and returns the reply.
async fn webhook(api: &Api, path: &str, params: &[(&str, &str)]) -> (u16, String) {
    let (params, body) = form(params);
    let sig = cmb_providers::twilio::signature(
        DEV_TWILIO_AUTH_TOKEN,
        &format!("{}{path}", api.base),
        &params,
    );
    let reply = reqwest::Client::new()
        .post(format!("{}{path}", api.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", sig)
        .body(body)
        .send()
        .await
        .expect("the API answers");
    let status = reply.status().as_u16();
    (status, reply.text().await.unwrap_or_default())
}

/// Twilio asks for the answer TwiML of an answered call: the stream token in it.
async fn answer(api: &Api, id: &str, sid: &str) -> String {
    let (status, twiml) = webhook(
        api,
        &format!("/api/twilio/answer?call_id={id}"),
        &[("CallSid", sid), ("CallStatus", "in-progress")],
    )
    .await;
    assert_eq!(status, 200, "{twiml}");
    let at = twiml
        .find(r#"name="token" value=""#)
        .unwrap_or_else(|| panic!("a token in {twiml}"));
    let rest = &twiml[at + r#"name="token" value=""#.len()..];
    rest[..rest.find('"').unwrap()].to_string()
}

/// Twilio's hang-up callback.
async fn completed(api: &Api, id: &str, sid: &str) {
    let (status, body) = webhook(
        api,
        &format!("/api/twilio/callback?call_id={id}"),
        &[
            ("CallSid", sid),
            ("CallStatus", "completed"),
            ("CallDuration", "20"),
        ],
    )
    .await;
    assert_eq!(status, 204, "{body}");
}

/// Upgrades to the media stream, signed over `signed_url` with `auth_token` (or unsigned).
async fn upgrade(app: &Running, sign: Option<(&str, &str)>) -> Result<Ws, u16> {
    let url = format!("ws://{}/api/twilio/stream", app.addr);
    let mut request = url.as_str().into_client_request().unwrap();
    if let Some((auth_token, signed_url)) = sign {
        let sig = cmb_providers::twilio::signature(auth_token, signed_url, &[]);
        request
            .headers_mut()
            .insert("X-Twilio-Signature", HeaderValue::from_str(&sig).unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("upgrade failed: {e}"),
    }
}

/// An upgrade signed as Twilio signs it: over the `ws://` (here; `wss://` behind TLS) URL.
async fn signed(app: &Running) -> Ws {
    let url = format!("ws://{}/api/twilio/stream", app.addr);
    upgrade(app, Some((DEV_TWILIO_AUTH_TOKEN, &url)))
        .await
        .expect("a signed upgrade is accepted")
}

/// One stream as the test plays Twilio on it.
struct Caller {
    /// `media` frames the server sent (the persona speaking).
    heard: Arc<AtomicU64>,
    /// Fires when the server closes the socket (or it breaks).
    closed: oneshot::Receiver<()>,
    /// Set once it has.
    gone: Arc<AtomicBool>,
    /// Stops the caller's frames (the socket then falls silent).
    hush: Option<oneshot::Sender<()>>,
    /// One frame of this size, once (a frame over the limit).
    oversize: Option<oneshot::Sender<usize>>,
}

fn start(call_sid: &str, params: serde_json::Value) -> Message {
    Message::text(
        json!({
            "event": "start", "sequenceNumber": "1", "streamSid": "MZ00000000000000000000000000000001",
            "start": {
                "accountSid": "AC00000000000000000000000000000000",
                "streamSid": "MZ00000000000000000000000000000001",
                "callSid": call_sid, "tracks": ["inbound"],
                "customParameters": params,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
            }
        })
        .to_string(),
    )
}

/// Sends `connected` and `start` (when given), then a silent 20 ms frame every 100 ms until
/// hushed; counts what the server says and notices when it closes.
fn call(ws: Ws, start: Option<Message>) -> Caller {
    let heard = Arc::new(AtomicU64::new(0));
    let (closed_tx, closed) = oneshot::channel();
    let (hush, mut hushed) = oneshot::channel::<()>();
    let (oversize, mut big) = oneshot::channel::<usize>();
    let count = heard.clone();
    let gone = Arc::new(AtomicBool::new(false));
    let went = gone.clone();
    tokio::spawn(async move {
        let (mut sink, mut source) = ws.split();
        let connected = json!({"event": "connected", "protocol": "Call", "version": "1.0.0"});
        let _ = sink.send(Message::text(connected.to_string())).await;
        if let Some(start) = start {
            let _ = sink.send(start).await;
        }
        let media = json!({
            "event": "media", "sequenceNumber": "2", "streamSid": "MZ00000000000000000000000000000001",
            "media": {"track": "inbound", "chunk": "1", "timestamp": "0", "payload": "/".repeat(216)}
        })
        .to_string();
        let (mut talking, mut sent_big) = (true, false);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick(), if talking => {
                    let _ = sink.send(Message::text(media.clone())).await;
                }
                _ = &mut hushed, if talking => talking = false,
                size = &mut big, if !sent_big => {
                    sent_big = true;
                    if let Ok(size) = size {
                        let _ = sink.send(Message::text("x".repeat(size))).await;
                    }
                }
                msg = source.next() => match msg {
                    Some(Ok(Message::Text(t))) if t.contains("\"media\"") => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
            }
        }
        went.store(true, Ordering::Relaxed);
        let _ = closed_tx.send(());
    });
    Caller {
        heard,
        closed,
        gone,
        hush: Some(hush),
        oversize: Some(oversize),
    }
}

impl Caller {
    /// Whether the server closed the socket within `within`.
    async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, &mut self.closed).await.is_ok()
    }

    /// Whether the persona spoke (a session runs) within `within`.
    async fn spoken_to(&self, within: Duration) -> bool {
        let heard = self.heard.clone();
        eventually(within, || {
            let heard = heard.clone();
            async move { (heard.load(Ordering::Relaxed) > 0).then_some(()) }
        })
        .await
        .is_some()
    }

    /// Refused: closed without a word.
    async fn refused(&mut self) -> bool {
        self.closed_within(Duration::from_secs(30)).await && self.heard.load(Ordering::Relaxed) == 0
    }
}

async fn sessions_ended(app: &Running, id: &str) -> Vec<serde_json::Value> {
    sqlx::query_scalar(
        "SELECT payload -> 'VoiceSessionEnded' FROM events
          WHERE aggregate_id = $1 AND event_type = 'VoiceSessionEnded'",
    )
    .bind(id)
    .fetch_all(&app.state.pool)
    .await
    .unwrap()
}

/// The session of `id` ended (once), for `reason`; every provider socket of it is closed.
async fn ended_for(app: &Running, id: &str, reason: &str) {
    let ended = eventually(Duration::from_secs(60), || async {
        let e = sessions_ended(app, id).await;
        (!e.is_empty()).then_some(e)
    })
    .await
    .expect("the session ended");
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0]["reason"], reason, "{ended:?}");
    let sims = &app.sims;
    let closed = eventually(Duration::from_secs(30), || async {
        let open = (
            sims.deepgram.as_ref().unwrap().open_connections(),
            sims.elevenlabs.as_ref().unwrap().open_sockets(),
            sims.cerebras.as_ref().unwrap().active_streams(),
        );
        (open == (0, 0, 0)).then_some(())
    })
    .await;
    assert!(
        closed.is_some(),
        "every provider socket closed with the session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_and_wrongly_signed_upgrades_are_refused_before_the_upgrade() {
    let env = env();
    let app = env.spawn_app().await;
    let ws_url = format!("ws://{}/api/twilio/stream", app.addr);
    let https_url = format!("http://{}/api/twilio/stream", app.addr);
    let wrong_path = format!("ws://{}/api/twilio/streams", app.addr);
    assert_eq!(upgrade(&app, None).await.err(), Some(403), "unsigned");
    for (token, url) in [
        ("not-the-auth-token", ws_url.as_str()),
        (DEV_TWILIO_AUTH_TOKEN, wrong_path.as_str()),
    ] {
        assert_eq!(
            upgrade(&app, Some((token, url))).await.err(),
            Some(403),
            "signed with {token} over {url}"
        );
    }
    // The 403 is the API's JSON error, and comes before any upgrade.
    let plain = reqwest::get(format!("http://{}/api/twilio/stream", app.addr))
        .await
        .unwrap();
    assert_eq!(plain.status().as_u16(), 403);
    let body: serde_json::Value = plain.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden", "{body}");
    // Signed over the WebSocket URL Twilio was given, or its https form: let in. A socket
    // that then says no `start` within 5 s is closed.
    for url in [&ws_url, &https_url] {
        let ws = upgrade(&app, Some((DEV_TWILIO_AUTH_TOKEN, url)))
            .await
            .unwrap_or_else(|s| panic!("signed over {url}: {s}"));
        let mut caller = call(ws, None);
        assert!(caller.refused().await, "no start: closed");
    }
    assert_eq!(app.sims.deepgram.as_ref().unwrap().connections(), 0);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_streams_for_completed_cancelled_or_someone_elses_calls_are_refused() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let secret = env.vars["JWT_SECRET"].clone();
    let tokens = callmeback::serve::voice::StreamTokens::new(&secret);
    let soon = chrono::Utc::now() + chrono::Duration::minutes(1);

    // Completed: its token was good while it was answered; Twilio has hung up since.
    let (done, done_sid, _) = ringing_call(&app, &api).await;
    let token = answer(&api, &done, &done_sid).await;
    completed(&api, &done, &done_sid).await;
    let params = json!({ "call_id": done, "token": token });
    let mut caller = call(signed(&app).await, Some(start(&done_sid, params)));
    assert!(caller.refused().await, "a completed call");

    // Cancelled: even a token signed with the server's secret opens nothing.
    let (owner, profile) = api.register(PASSWORD).await;
    grant(&app, &profile, 100).await;
    let scheduled = owner
        .post(
            "/api/calls/schedule",
            json!({ "persona_id": "brad_001", "use_credits": true, "duration": 2,
                    "scheduled_time": (chrono::Utc::now() + chrono::Duration::days(2)).to_rfc3339() }),
        )
        .await;
    assert_eq!(scheduled.status, 201, "{scheduled:?}");
    let cancelled = scheduled.body["call"]["id"].as_str().unwrap().to_string();
    let gone = owner
        .delete(&format!("/api/calls/schedule/{cancelled}"))
        .await;
    assert!(gone.status < 300, "{gone:?}");
    let sid = "CA0123456789abcdef0123456789abcdef";
    let forged = tokens.mint(cancelled.parse().unwrap(), sid, soon);
    let params = json!({ "call_id": cancelled, "token": forged });
    let mut caller = call(signed(&app).await, Some(start(sid, params)));
    assert!(caller.refused().await, "a cancelled call");

    // Someone else's: a live call of B's, reached with A's token or with another CallSid.
    let (a, a_sid, _) = ringing_call(&app, &api).await;
    let (b, b_sid, _) = ringing_call(&app, &api).await;
    let a_token = answer(&api, &a, &a_sid).await;
    let b_token = answer(&api, &b, &b_sid).await;
    for (sid, params) in [
        (&a_sid, json!({ "call_id": b, "token": a_token })),
        (&b_sid, json!({ "call_id": b, "token": a_token })),
        (&a_sid, json!({ "call_id": b, "token": b_token })),
        (&a_sid, json!({ "token": b_token })),
    ] {
        let mut caller = call(signed(&app).await, Some(start(sid, params.clone())));
        assert!(caller.refused().await, "{sid} {params}");
    }
    assert_eq!(app.sims.deepgram.as_ref().unwrap().connections(), 0);
    // B's own stream, with its own token and CallSid, is let in (the refusals used nothing).
    let params = json!({ "call_id": b, "token": b_token });
    let caller = call(signed(&app).await, Some(start(&b_sid, params)));
    assert!(
        caller.spoken_to(Duration::from_secs(30)).await,
        "B's own stream"
    );
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_tokens_are_refused() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (id, sid, _) = ringing_call(&app, &api).await;
    let token = answer(&api, &id, &sid).await;
    let soon = chrono::Utc::now() + chrono::Duration::minutes(1);
    let other_secret = callmeback::serve::voice::StreamTokens::new("not the server's secret");
    let expiry = token.split('.').nth(3).unwrap().to_string();
    for forged in [
        String::new(),
        "v1.garbage".to_string(),
        other_secret.mint(id.parse().unwrap(), &sid, soon),
        // The genuine token, its expiry pushed back.
        token.replacen(
            &format!(".{expiry}."),
            &format!(".{}.", soon.timestamp() + 3600),
            1,
        ),
    ] {
        let params = json!({ "call_id": id, "token": forged });
        let mut caller = call(signed(&app).await, Some(start(&sid, params)));
        assert!(caller.refused().await, "forged {forged:?}");
    }
    // The genuine token opens the session once.
    let params = json!({ "call_id": id, "token": token });
    let mut first = call(signed(&app).await, Some(start(&sid, params.clone())));
    assert!(first.spoken_to(Duration::from_secs(30)).await);
    let mut replay = call(signed(&app).await, Some(start(&sid, params.clone())));
    assert!(replay.refused().await, "replayed while the session runs");
    // Twilio hangs up: the session ends, and the token is spent for good.
    completed(&api, &id, &sid).await;
    assert!(first.closed_within(Duration::from_secs(30)).await);
    ended_for(&app, &id, "call ended").await;
    let mut replay = call(signed(&app).await, Some(start(&sid, params)));
    assert!(replay.refused().await, "replayed after the session");
    assert_eq!(sessions_ended(&app, &id).await.len(), 1);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sockets_for_one_live_call_give_one_session() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (id, sid, _) = ringing_call(&app, &api).await;
    // Ten sockets with one token, ten with a token each (Twilio asked for the answer again).
    let shared = answer(&api, &id, &sid).await;
    let mut tokens = vec![shared; 10];
    for _ in 0..10 {
        tokens.push(answer(&api, &id, &sid).await);
    }
    let mut sockets = Vec::new();
    for _ in &tokens {
        sockets.push(signed(&app).await);
    }
    let callers: Vec<Caller> = sockets
        .into_iter()
        .zip(tokens)
        .map(|(ws, token)| {
            call(
                ws,
                Some(start(&sid, json!({ "call_id": id, "token": token }))),
            )
        })
        .collect();
    // Each is either let in (the persona speaks) or refused (closed without a word).
    let outcome = || {
        let spoken = callers
            .iter()
            .filter(|c| c.heard.load(Ordering::Relaxed) > 0)
            .count();
        let refused = callers
            .iter()
            .filter(|c| c.gone.load(Ordering::Relaxed) && c.heard.load(Ordering::Relaxed) == 0)
            .count();
        (spoken, refused)
    };
    let settled = eventually(Duration::from_secs(60), || async {
        let (spoken, refused) = outcome();
        (spoken + refused == 20).then_some(())
    })
    .await;
    assert!(
        settled.is_some(),
        "every socket let in or refused: {:?}",
        outcome()
    );
    assert_eq!(outcome(), (1, 19), "one session, nineteen refused");
    assert_eq!(app.sims.deepgram.as_ref().unwrap().connections(), 1);
    // The one session ends with the call; nothing else ever started.
    completed(&api, &id, &sid).await;
    ended_for(&app, &id, "call ended").await;
    assert_eq!(app.sims.deepgram.as_ref().unwrap().connections(), 1);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_socket_is_closed_and_its_provider_sockets_with_it() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (id, sid, _) = ringing_call(&app, &api).await;
    let token = answer(&api, &id, &sid).await;
    let params = json!({ "call_id": id, "token": token });
    let mut caller = call(signed(&app).await, Some(start(&sid, params)));
    assert!(caller.spoken_to(Duration::from_secs(30)).await);
    assert_eq!(app.sims.deepgram.as_ref().unwrap().open_connections(), 1);
    let _ = caller.hush.take().unwrap().send(());
    assert!(
        caller.closed_within(Duration::from_secs(60)).await,
        "closed after 10 s of silence"
    );
    ended_for(&app, &id, "socket silent").await;
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_64_kib_closes_the_socket() {
    let env = env();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    // Before `start`.
    let mut early = call(signed(&app).await, None);
    let _ = early.oversize.take().unwrap().send(65 * 1024);
    assert!(early.refused().await, "an oversized frame before start");
    // In a session: it ends, recorded, and its provider sockets close.
    let (id, sid, _) = ringing_call(&app, &api).await;
    let token = answer(&api, &id, &sid).await;
    let params = json!({ "call_id": id, "token": token });
    let mut caller = call(signed(&app).await, Some(start(&sid, params)));
    assert!(caller.spoken_to(Duration::from_secs(30)).await);
    let _ = caller.oversize.take().unwrap().send(65 * 1024);
    assert!(caller.closed_within(Duration::from_secs(30)).await);
    ended_for(&app, &id, "stream closed").await;
    app.stop().await;
    env.cleanup().await;
}
