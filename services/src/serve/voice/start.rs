//! A media stream from the upgrade to the session: `start` within `START_WAIT`, admission
//! (`admission`), the session with its guard, and the live-session row given back at the end.
//! A stream that is refused is closed (1008) before any provider is reached.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use cmb_providers::twilio::stream::StreamMessage;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};

use super::admission::{admit, release, Admitted};
use super::context::load_context;
use super::error::SessionError;
use super::guard::Guard;
use super::session::Session;
use super::shared::Voice;
use super::tokens::Refusal;

/// A stream must say `start` this soon after the upgrade.
pub const START_WAIT: Duration = Duration::from_secs(5);

/// `start`: the stream's id, Twilio's CallSid and our parameters.
type Start = (String, String, BTreeMap<String, String>);

/// Runs one media stream: admitted, the session until it ends; refused, closed at once.
pub async fn run(voice: Arc<Voice>, socket: WebSocket) -> Result<(), SessionError> {
    let (sink, mut inbound) = socket.split();
    let start = match tokio::time::timeout(START_WAIT, wait_for_start(&mut inbound)).await {
        Err(_) => return refuse(sink, Refusal::NoStart).await,
        Ok(Ok(Some(start))) => start,
        // Closed, or stopped, before it started.
        Ok(Ok(None)) => return Ok(()),
        // Broken, or a frame over the limit.
        Ok(Err(e)) => return Err(e),
    };
    let (stream_sid, call_sid, params) = start;
    let admitted = match admit(&voice, &call_sid, &params).await? {
        Ok(admitted) => admitted,
        Err(why) => return refuse(sink, why).await,
    };
    let outcome = session(voice.clone(), &admitted, sink, inbound, stream_sid).await;
    release(voice.store.pool(), &admitted).await;
    outcome
}

async fn session(
    voice: Arc<Voice>,
    admitted: &Admitted,
    sink: SplitSink<WebSocket, Message>,
    inbound: SplitStream<WebSocket>,
    stream_sid: String,
) -> Result<(), SessionError> {
    let call_id = admitted.call_id;
    // Only the CallSid recorded for the call is ever used (to hang up), never the client's.
    let ctx = load_context(&voice, call_id, &admitted.call_sid).await?;
    let cap = Duration::from_secs(u64::from(ctx.max_minutes) * 60);
    let guard = Guard::spawn(&voice.call_ends, voice.store.pool(), admitted.call_id, cap);
    tracing::info!(call = %call_id, %stream_sid, "voice session started");
    Session::new(voice, ctx, sink, stream_sid)
        .run(inbound, guard)
        .await
}

/// Reads up to `start` (after `connected`); None when the stream closed or stopped first.
async fn wait_for_start(
    inbound: &mut SplitStream<WebSocket>,
) -> Result<Option<Start>, SessionError> {
    while let Some(msg) = inbound.next().await {
        let Message::Text(text) = msg? else { continue };
        match StreamMessage::parse(&text) {
            Some(StreamMessage::Start {
                stream_sid, start, ..
            }) => {
                let sid = match stream_sid {
                    Some(sid) if start.stream_sid.is_empty() => sid.into_owned(),
                    _ => start.stream_sid,
                };
                return Ok(Some((sid, start.call_sid, start.custom_parameters)));
            }
            Some(StreamMessage::Stop { .. }) => return Ok(None),
            _ => continue,
        }
    }
    Ok(None)
}

async fn refuse(mut sink: SplitSink<WebSocket, Message>, why: Refusal) -> Result<(), SessionError> {
    metrics::counter!("cmb_voice_streams_refused_total", "reason" => why.label()).increment(1);
    let close = CloseFrame {
        code: 1008,
        reason: "refused".into(),
    };
    let _ = sink.send(Message::Close(Some(close))).await;
    let _ = sink.close().await;
    Err(SessionError::Refused(why))
}
