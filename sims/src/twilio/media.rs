//! The media side of a simulated call: the TwiML `<Stream>` it finds, the caller's voice it
//! makes up, and the Media Streams WebSocket session it runs against our server (Twilio's
//! Media Streams messages). Kept apart from the REST side so each reads on its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use cmb_providers::twilio::stream::{Inbound, Mark, MediaFormat, Start, Stop, StreamMessage};
use futures::{FutureExt as _, SinkExt, StreamExt};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

pub use super::mulaw::{linear_to_mulaw, mulaw_to_linear};
use super::observe::{Observations, Observer};
use super::playback::Playback;

/// One 20 ms frame of 8 kHz μ-law, the unit Twilio streams in.
pub const FRAME_BYTES: usize = 160;
const FRAME: Duration = Duration::from_millis(20);
/// μ-law of a zero sample.
const MULAW_SILENCE: u8 = 0xFF;

/// What the simulated callee says: some silence first (people pause after picking up), then
/// turns of speech each followed by silence, so a voice-activity detector on our side has clear
/// turn ends to find.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerScript {
    /// Silence before the first turn.
    pub lead_silence_ms: u32,
    /// `(speech_ms, silence_ms)` per turn.
    pub turns: Vec<(u32, u32)>,
    /// How much silence the listener on the other end takes to end a turn (its endpointing),
    /// when known: only for the observations (see `observe`); 0 when unknown.
    pub endpointing_ms: u32,
    /// The caller keeps quiet until it has heard the other end (the first mark of our server's
    /// audio played and echoed), and only then follows the script, lead silence first — as a
    /// person waits for "hello" after picking up. A server that never sends marks hears silence.
    pub waits_to_hear: bool,
}

impl Default for CallerScript {
    fn default() -> Self {
        CallerScript {
            lead_silence_ms: 1200,
            turns: vec![(1500, 1500); 3],
            endpointing_ms: 0,
            waits_to_hear: false,
        }
    }
}

impl CallerScript {
    /// Parses `SIM_TWILIO_CALLER_TURNS`, e.g. `1500:1500,1200:2000`, keeping the default lead
    /// silence. `None` on anything malformed, so a typo does not silently become a mute caller.
    pub fn parse_turns(spec: &str) -> Option<Self> {
        let turns = spec
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|turn| {
                let (speech, silence) = turn.split_once(':')?;
                Some((speech.trim().parse().ok()?, silence.trim().parse().ok()?))
            })
            .collect::<Option<Vec<(u32, u32)>>>()?;
        (!turns.is_empty()).then(|| CallerScript {
            turns,
            ..CallerScript::default()
        })
    }
}

/// The caller's audio as 20 ms μ-law frames: the script, then silence for ever (the callee
/// stays on the line, quiet, until someone hangs up). Speech is a voiced, syllable-modulated
/// tone mix with a little noise, far louder than the silence frames.
pub fn caller_audio(script: &CallerScript) -> impl Iterator<Item = [u8; FRAME_BYTES]> {
    caller_frames(script).map(|(_, frame)| frame)
}

/// Frames of speech, made once and shared by every simulated caller (a benchmark runs hundreds
/// of callers in one process; synthesising each sample of each would be most of its CPU).
const SPEECH_FRAMES: usize = 250;
static SPEECH: std::sync::LazyLock<Vec<[u8; FRAME_BYTES]>> = std::sync::LazyLock::new(|| {
    let mut sample_index: u64 = 0;
    let mut noise: u32 = 0x1234_5678;
    (0..SPEECH_FRAMES)
        .map(|_| {
            let mut frame = [MULAW_SILENCE; FRAME_BYTES];
            for byte in frame.iter_mut() {
                let t = sample_index as f64 / 8000.0;
                // xorshift: cheap deterministic noise, no RNG needed.
                noise ^= noise << 13;
                noise ^= noise >> 17;
                noise ^= noise << 5;
                let hiss = (noise as f64 / u32::MAX as f64 - 0.5) * 0.1;
                let syllables = 0.6 + 0.4 * (2.0 * std::f64::consts::PI * 4.0 * t).sin();
                let voice = [(140.0, 0.5), (280.0, 0.3), (420.0, 0.15), (900.0, 0.1)]
                    .iter()
                    .map(|(hz, amp)| amp * (2.0 * std::f64::consts::PI * hz * t).sin())
                    .sum::<f64>();
                let sample = (voice * syllables + hiss) * 12000.0;
                *byte = linear_to_mulaw(sample.clamp(-32768.0, 32767.0) as i16);
                sample_index += 1;
            }
            frame
        })
        .collect()
});

/// [`caller_audio`], each frame with whether it is speech.
pub fn caller_frames(script: &CallerScript) -> impl Iterator<Item = (bool, [u8; FRAME_BYTES])> {
    caller_plan(script).map(|speech| match speech {
        Some(i) => (true, SPEECH[i]),
        None => (false, [MULAW_SILENCE; FRAME_BYTES]),
    })
}

/// The caller's frames as which frame of [`SPEECH`] each is (`None`: silence), for ever.
fn caller_plan(script: &CallerScript) -> impl Iterator<Item = Option<usize>> {
    let frames_of = |ms: u32| ms.div_ceil(20) as usize;
    let mut plan: Vec<bool> = vec![false; frames_of(script.lead_silence_ms)];
    for &(speech, silence) in &script.turns {
        plan.extend(std::iter::repeat_n(true, frames_of(speech)));
        plan.extend(std::iter::repeat_n(false, frames_of(silence)));
    }
    let mut voiced_frames = 0usize;
    plan.into_iter()
        .chain(std::iter::repeat(false))
        .map(move |voiced| {
            voiced.then(|| {
                voiced_frames += 1;
                (voiced_frames - 1) % SPEECH_FRAMES
            })
        })
}

/// The base64 of each frame of [`SPEECH`], and of a silent frame: every caller says the same
/// frames, so each is encoded once per process, not once per frame sent.
static SPEECH_BASE64: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(|| SPEECH.iter().map(|f| BASE64.encode(f)).collect());
static SILENCE_BASE64: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| BASE64.encode([MULAW_SILENCE; FRAME_BYTES]));

/// Writes a caller's `media` messages as Twilio words them (`sequenceNumber`, `streamSid`,
/// `media.track`, `chunk`, `timestamp` as strings, the payload base64), straight into one
/// string per frame: no JSON tree and no base64 encoding per frame (see [`SPEECH_BASE64`]).
struct MediaWriter {
    /// `","streamSid":"MZ…","media":{"track":"inbound","chunk":"`.
    middle: String,
}

impl MediaWriter {
    fn new(stream_sid: &str) -> Self {
        // A stream sid is `MZ` and hex: nothing in it needs escaping.
        MediaWriter {
            middle: format!(
                r#"","streamSid":"{stream_sid}","media":{{"track":"inbound","chunk":""#
            ),
        }
    }

    /// The `media` message with `sequence`, `chunk` (from 1; its timestamp is 20 ms a chunk)
    /// and the frame `speech` (an index into [`SPEECH`], `None`: silence).
    fn frame(&self, sequence: u64, chunk: u64, speech: Option<usize>) -> String {
        use std::fmt::Write as _;
        let payload = match speech {
            Some(i) => SPEECH_BASE64[i].as_str(),
            None => SILENCE_BASE64.as_str(),
        };
        let mut text = String::with_capacity(self.middle.len() + payload.len() + 96);
        // Writing to a String cannot fail.
        let _ = write!(
            text,
            r#"{{"event":"media","sequenceNumber":"{sequence}{}{chunk}","timestamp":"{}","payload":"{payload}"}}}}"#,
            self.middle,
            (chunk - 1) * 20,
        );
        text
    }
}

/// A `<Stream>` found in the TwiML of an answered call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRequest {
    pub url: String,
    /// `<Connect><Stream>` (two-way, the call waits on the socket) rather than `<Start><Stream>`.
    pub bidirectional: bool,
    /// `<Parameter name value/>` children, handed back in `start.customParameters`.
    pub parameters: Vec<(String, String)>,
}

/// Finds the first `<Stream>` under `<Connect>` or `<Start>`. A small tolerant scan rather than
/// an XML parser: TwiML is flat and we need one element and its children.
pub fn parse_stream(twiml: &str) -> Option<StreamRequest> {
    let start = twiml.find("<Stream")?;
    let before = &twiml[..start];
    let connect = before.rfind("<Connect");
    let start_verb = before.rfind("<Start");
    let bidirectional = match (connect, start_verb) {
        (Some(c), Some(s)) => c > s,
        (Some(_), None) => true,
        (None, Some(_)) => false,
        (None, None) => return None,
    };
    let tag_end = start + twiml[start..].find('>')?;
    let tag = &twiml[start..=tag_end];
    let url = attribute(tag, "url")?;
    let mut parameters = Vec::new();
    if !tag.ends_with("/>") {
        let body_end = twiml[tag_end..]
            .find("</Stream")
            .map_or(twiml.len(), |i| tag_end + i);
        let mut rest = &twiml[tag_end..body_end];
        while let Some(p) = rest.find("<Parameter") {
            let Some(close) = rest[p..].find('>') else {
                break;
            };
            let end = p + close;
            let element = &rest[p..=end];
            if let (Some(name), Some(value)) =
                (attribute(element, "name"), attribute(element, "value"))
            {
                parameters.push((name, value));
            }
            rest = &rest[end + 1..];
        }
    }
    Some(StreamRequest {
        url,
        bidirectional,
        parameters,
    })
}

/// The text of each `<Say>` after `</Connect>`: what Twilio speaks, in order, once a
/// `<Connect>`ed stream ends without the call having been hung up.
pub fn says_after_connect(twiml: &str) -> Vec<String> {
    let Some(after) = twiml.find("</Connect>").map(|i| &twiml[i..]) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut rest = after;
    while let Some(open) = rest.find("<Say") {
        let Some(tag_end) = rest[open..].find('>').map(|i| open + i) else {
            break;
        };
        let Some(close) = rest[tag_end..].find("</Say>").map(|i| tag_end + i) else {
            break;
        };
        out.push(unescape(&rest[tag_end + 1..close]));
        rest = &rest[close..];
    }
    out
}

/// The value of `name="…"` (or `'…'`) in a tag, XML entities decoded.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let mut search = tag;
    loop {
        let at = search.find(name)?;
        let preceded_by_space = search[..at].chars().last().is_some_and(char::is_whitespace);
        let after = search[at + name.len()..].trim_start();
        if preceded_by_space {
            if let Some(after_eq) = after.strip_prefix('=') {
                let after_eq = after_eq.trim_start();
                let quote = after_eq
                    .chars()
                    .next()
                    .filter(|c| *c == '"' || *c == '\'')?;
                let value = &after_eq[1..];
                let end = value.find(quote)?;
                return Some(unescape(&value[..end]));
            }
        }
        search = &search[at + name.len()..];
    }
}

fn unescape(value: &str) -> String {
    value
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// What the simulator saw of our server's side of one stream, read by `TwilioSim::calls`.
#[derive(Debug, Default)]
pub struct StreamCounters {
    pub opened: AtomicU64,
    pub frames_sent: AtomicU64,
    pub frames_received: AtomicU64,
    pub marks_received: AtomicU64,
    pub marks_echoed: AtomicU64,
    pub clears_received: AtomicU64,
    pub invalid_messages: AtomicU64,
    /// `<Say>` verbs after `<Connect>` spoken once the stream ended (Twilio carries on with the
    /// next verb when a `<Connect><Stream>` socket closes or breaks).
    pub said_after_stream: AtomicU64,
    /// The stream ended (opened streams minus these are live).
    pub closed: AtomicU64,
    /// What the caller side measured, filed when the stream ended.
    pub observed: std::sync::Mutex<Observations>,
}

/// Who the stream belongs to.
pub struct StreamContext {
    pub account_sid: String,
    pub call_sid: String,
    pub auth_token: String,
    pub script: CallerScript,
    pub counters: Arc<StreamCounters>,
}

/// How a stream session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The call ended (`stop` was sent).
    Stopped,
    /// Our server closed the socket, or it broke, or it never opened.
    Closed,
}

/// Opens the stream's WebSocket, as Twilio does after fetching the TwiML, and plays the
/// caller's audio into it every 20 ms until `stop` is cancelled (the call ended: send `stop`)
/// or our server closes it.
pub async fn run_stream(
    ctx: StreamContext,
    stream: StreamRequest,
    stop: CancellationToken,
) -> StreamEnd {
    let call_sid = ctx.call_sid.as_str();
    let mut request = match stream.url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%call_sid, url = %stream.url, error = %e, "TwiML stream URL is not a WebSocket URL");
            return StreamEnd::Closed;
        }
    };
    // Twilio signs the upgrade like any webhook: HMAC-SHA1 with the auth token over the stream
    // URL of the TwiML (`wss://…`; `ws://` on loopback), no parameters. Our server refuses an
    // upgrade signed otherwise (403), so the simulator signs exactly as Twilio does.
    let signature = cmb_providers::twilio::signature(&ctx.auth_token, &stream.url, &[]);
    if let Ok(value) = HeaderValue::from_str(&signature) {
        request.headers_mut().insert("X-Twilio-Signature", value);
    }
    let connected = tokio::time::timeout(
        Duration::from_secs(5),
        // Small buffers (tungstenite's default read buffer is 128 KiB, zero-filled before
        // each read): a benchmark runs hundreds of these streams in one process.
        tokio_tungstenite::connect_async_with_config(
            request,
            Some(cmb_providers::ws_config(1 << 20)),
            true,
        ),
    )
    .await;
    let ws = match connected {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => {
            tracing::warn!(%call_sid, url = %stream.url, error = %e, "media stream connection failed");
            return StreamEnd::Closed;
        }
        Err(_) => {
            tracing::warn!(%call_sid, url = %stream.url, "media stream connection timed out");
            return StreamEnd::Closed;
        }
    };
    ctx.counters.opened.fetch_add(1, Ordering::Relaxed);
    let mut observer = Observer::new(ctx.script.endpointing_ms);
    let end = converse(&ctx, &stream, ws, stop, &mut observer).await;
    // Filed before the stream counts as closed: whoever sees it closed reads its figures.
    if let Ok(mut observed) = ctx.counters.observed.lock() {
        *observed = observer.figures;
    }
    ctx.counters.closed.fetch_add(1, Ordering::Relaxed);
    end
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The open stream: `connected` and `start`, then caller audio every 20 ms and our server's
/// audio, marks and clears, until `stop` is cancelled or our server closes the socket.
async fn converse(
    ctx: &StreamContext,
    stream: &StreamRequest,
    ws: Socket,
    stop: CancellationToken,
    observer: &mut Observer,
) -> StreamEnd {
    let call_sid = ctx.call_sid.as_str();
    let (mut sink, mut source) = ws.split();
    let stream_sid = format!("MZ{:032x}", rand::random::<u128>());
    let opening = [
        StreamMessage::Connected {
            protocol: "Call".into(),
            version: "1.0.0".into(),
        },
        StreamMessage::Start {
            sequence_number: Some("1".into()),
            stream_sid: Some(stream_sid.as_str().into()),
            start: Start {
                account_sid: ctx.account_sid.clone(),
                stream_sid: stream_sid.clone(),
                call_sid: call_sid.to_string(),
                tracks: vec!["inbound".into()],
                custom_parameters: stream.parameters.iter().cloned().collect(),
                media_format: Some(MediaFormat {
                    encoding: "audio/x-mulaw".into(),
                    sample_rate: 8000,
                    channels: 1,
                }),
            },
        },
    ];
    for message in opening {
        if sink.send(Message::text(message.to_text())).await.is_err() {
            return StreamEnd::Closed;
        }
    }
    tracing::debug!(%call_sid, %stream_sid, "media stream started");

    let mut sequence: u64 = 2;
    let mut chunk: u64 = 1;
    let mut audio = caller_plan(&ctx.script);
    let media = MediaWriter::new(&stream_sid);
    // Until the caller has heard us (when it waits to), it is quiet and its script waits.
    let mut heard = !ctx.script.waits_to_hear;
    let mut ticker = tokio::time::interval(FRAME);
    // A caller speaks in real time: after a late tick, the frames due meanwhile go at once
    // rather than the audio clock falling behind the wall clock.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut playback = Playback::default();
    // Made once, not per turn of the loop: a fresh wait on the token or a fresh timer each
    // time (50 a second and more) would register and deregister with the runtime each time.
    let cancelled = stop.cancelled();
    tokio::pin!(cancelled);
    let mark_timer = tokio::time::sleep_until(Instant::now());
    tokio::pin!(mark_timer);
    let mut mark_timer_at: Option<Instant> = None;
    loop {
        let next_mark = playback.pending.front().map(|(_, at)| *at);
        if next_mark.is_some() && next_mark != mark_timer_at {
            if let Some(at) = next_mark {
                mark_timer.as_mut().reset(at);
            }
        }
        mark_timer_at = next_mark;
        let mut outgoing: Vec<String> = Vec::new();
        tokio::select! {
            _ = &mut cancelled => {
                let message = StreamMessage::Stop {
                    sequence_number: Some(sequence.to_string().into()),
                    stream_sid: stream_sid.as_str().into(),
                    stop: Some(Stop {
                        account_sid: ctx.account_sid.clone(),
                        call_sid: call_sid.to_string(),
                    }),
                };
                let _ = sink.send(Message::text(message.to_text())).await;
                let _ = sink.close().await;
                tracing::debug!(%call_sid, %stream_sid, "media stream stopped");
                return StreamEnd::Stopped;
            }
            due = ticker.tick() => {
                // Every frame due by now goes in this one write: after a late wake-up (this
                // process waited for a core) the frames due meanwhile leave together, as they
                // would from a late sender on a real network, not one write each.
                let mut due = Some(due);
                while let Some(at) = due {
                    let speech = if heard { audio.next().flatten() } else { None };
                    let now = Instant::now();
                    observer.caller_frame(at, now, speech.is_some(), playback.playing(now));
                    outgoing.push(media.frame(sequence, chunk, speech));
                    sequence += 1;
                    chunk += 1;
                    ctx.counters.frames_sent.fetch_add(1, Ordering::Relaxed);
                    due = ticker.tick().now_or_never();
                }
            }
            received = source.next() => match received {
                Some(Ok(Message::Text(text))) => {
                    for name in handle_server_message(ctx, stream, &stream_sid, &text, &mut playback, observer) {
                        outgoing.push(mark_echo(ctx, &mut sequence, &stream_sid, name));
                    }
                }
                Some(Ok(Message::Close(_))) | None => {
                    tracing::debug!(%call_sid, "our server closed the media stream");
                    return StreamEnd::Closed;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(%call_sid, error = %e, "media stream broke");
                    return StreamEnd::Closed;
                }
            },
            _ = &mut mark_timer, if next_mark.is_some() => {
                for name in playback.due(Instant::now()) {
                    // Played, so heard (marks echoed on a `clear` were not).
                    heard = true;
                    outgoing.push(mark_echo(ctx, &mut sequence, &stream_sid, name));
                }
            }
        }
        let last = outgoing.len();
        for (i, message) in outgoing.into_iter().enumerate() {
            let message = Message::text(message);
            // One write for what this moment produced.
            let sent = if i + 1 == last {
                sink.send(message).await
            } else {
                sink.feed(message).await
            };
            if sent.is_err() {
                return StreamEnd::Closed;
            }
        }
    }
}

fn mark_echo(ctx: &StreamContext, sequence: &mut u64, stream_sid: &str, name: String) -> String {
    let message = StreamMessage::Mark {
        sequence_number: Some(sequence.to_string().into()),
        stream_sid: stream_sid.into(),
        mark: Mark { name: name.into() },
    };
    *sequence += 1;
    ctx.counters.marks_echoed.fetch_add(1, Ordering::Relaxed);
    message.to_text()
}

/// Counts one message from our server and updates the playback queue; returns the marks that
/// are due right away (after a `clear`). Twilio rejects a wrong `streamSid`, an unknown event or
/// outbound messages on a one-way stream (error 31951); the simulator logs and counts them.
fn handle_server_message(
    ctx: &StreamContext,
    stream: &StreamRequest,
    stream_sid: &str,
    text: &str,
    playback: &mut Playback,
    observer: &mut Observer,
) -> Vec<String> {
    let counters = &ctx.counters;
    let invalid = |why: &str| {
        counters.invalid_messages.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(call_sid = %ctx.call_sid, why, "invalid media stream message (Twilio error 31951)");
        Vec::new()
    };
    // Read in one pass, borrowed (hundreds of streams in a benchmark process).
    let Some(message) = Inbound::parse(text) else {
        return invalid("not a media stream message");
    };
    if message.stream_sid.as_deref() != Some(stream_sid) {
        return invalid("wrong or missing streamSid");
    }
    if !stream.bidirectional {
        return invalid("outbound message on a one-way <Start><Stream>");
    }
    match (message.event.as_ref(), message.media, message.mark) {
        ("media", Some(media), _) => {
            // Frames are small: decoded on the stack, a larger payload into a vector.
            let mut frame = [0u8; 1024];
            let decoded = match BASE64.decode_slice(media.payload.as_bytes(), &mut frame) {
                Err(base64::DecodeSliceError::OutputSliceTooSmall) => BASE64
                    .decode(media.payload.as_bytes())
                    .map(|v| v.len())
                    .ok(),
                other => other.ok(),
            };
            match decoded {
                Some(bytes) => {
                    counters.frames_received.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    observer.persona_frame(now, !playback.playing(now));
                    playback.queue_audio(bytes);
                    Vec::new()
                }
                None => invalid("media payload is not base64"),
            }
        }
        ("mark", _, Some(mark)) => {
            counters.marks_received.fetch_add(1, Ordering::Relaxed);
            playback.queue_mark(mark.name.into_owned());
            Vec::new()
        }
        ("clear", _, _) => {
            counters.clears_received.fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            observer.clear(now, playback.played(now));
            playback.clear()
        }
        _ => invalid("unknown event"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn energy(frame: &[u8; FRAME_BYTES]) -> f64 {
        frame
            .iter()
            .map(|b| f64::from(mulaw_to_linear(*b)).powi(2))
            .sum::<f64>()
            / FRAME_BYTES as f64
    }

    #[test]
    fn mulaw_round_trips_and_zero_is_0xff() {
        assert_eq!(linear_to_mulaw(0), 0xFF);
        assert_eq!(mulaw_to_linear(0xFF), 0);
        for s in [-32000i16, -1000, -100, 100, 1000, 8000, 32000] {
            let back = mulaw_to_linear(linear_to_mulaw(s));
            assert!(
                (i32::from(back) - i32::from(s)).abs() <= i32::from(s).abs() / 16 + 8,
                "{s} -> {back}"
            );
        }
    }

    #[test]
    fn default_caller_speaks_three_loud_turns_after_a_pause() {
        let frames: Vec<[u8; FRAME_BYTES]> =
            caller_audio(&CallerScript::default()).take(400).collect();
        // 1.2 s lead silence = 60 frames, then 75 voiced, 75 silent, three times: 510 frames.
        let voiced: Vec<bool> = frames.iter().map(|f| energy(f) > 1_000_000.0).collect();
        assert!(voiced[..60].iter().all(|v| !v));
        assert!(voiced[60..135].iter().all(|v| *v));
        assert!(voiced[135..210].iter().all(|v| !v));
        assert!(voiced[210..285].iter().all(|v| *v));
        assert!(frames[..60].iter().all(|f| f.iter().all(|b| *b == 0xFF)));
        // After the script: silence for ever.
        let after = caller_audio(&CallerScript::default()).nth(600);
        assert_eq!(after, Some([0xFF; FRAME_BYTES]));
    }

    #[test]
    fn media_messages_are_twilio_s_with_the_caller_s_audio() {
        let writer = MediaWriter::new("MZ0123abcd");
        let script = CallerScript {
            lead_silence_ms: 20,
            turns: vec![(40, 20)],
            ..CallerScript::default()
        };
        let expected: Vec<[u8; FRAME_BYTES]> = caller_audio(&script).take(5).collect();
        for (i, speech) in caller_plan(&script).take(5).enumerate() {
            let (sequence, chunk) = (i as u64 + 2, i as u64 + 1);
            let text = writer.frame(sequence, chunk, speech);
            let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
            assert_eq!(v["event"], "media");
            assert_eq!(v["sequenceNumber"], sequence.to_string());
            assert_eq!(v["streamSid"], "MZ0123abcd");
            assert_eq!(v["media"]["track"], "inbound");
            assert_eq!(v["media"]["chunk"], chunk.to_string());
            assert_eq!(v["media"]["timestamp"], ((chunk - 1) * 20).to_string());
            let payload = v["media"]["payload"].as_str().expect("payload");
            assert_eq!(BASE64.decode(payload).expect("base64"), expected[i]);
        }
        // Silence, two frames of speech, silence.
        let plan: Vec<bool> = caller_plan(&script).take(5).map(|s| s.is_some()).collect();
        assert_eq!(plan, [false, true, true, false, false]);
    }

    #[test]
    fn caller_turns_parse() {
        assert_eq!(
            CallerScript::parse_turns("1500:1500, 1200:2000"),
            Some(CallerScript {
                lead_silence_ms: 1200,
                turns: vec![(1500, 1500), (1200, 2000)],
                endpointing_ms: 0,
                waits_to_hear: false,
            })
        );
        assert_eq!(CallerScript::parse_turns("1500"), None);
        assert_eq!(CallerScript::parse_turns("a:b"), None);
        assert_eq!(CallerScript::parse_turns(""), None);
    }

    #[test]
    fn finds_connect_and_start_streams() {
        let twiml = r#"<?xml version="1.0" encoding="UTF-8"?>
<Response><Connect><Stream url="ws://127.0.0.1:9/media?x=1&amp;y=2" name="s">
  <Parameter name="callId" value="abc"/><Parameter name='n' value='1 &lt; 2'/>
</Stream></Connect></Response>"#;
        assert_eq!(
            parse_stream(twiml),
            Some(StreamRequest {
                url: "ws://127.0.0.1:9/media?x=1&y=2".into(),
                bidirectional: true,
                parameters: vec![
                    ("callId".into(), "abc".into()),
                    ("n".into(), "1 < 2".into())
                ],
            })
        );
        let one_way =
            r#"<Response><Start><Stream url="wss://h/p"/></Start><Pause length="60"/></Response>"#;
        let found = parse_stream(one_way).expect("a stream");
        assert!(!found.bidirectional);
        assert_eq!(found.url, "wss://h/p");
        assert!(found.parameters.is_empty());
        assert_eq!(parse_stream("<Response><Say>hi</Say></Response>"), None);
        assert_eq!(parse_stream("<Stream"), None);
        assert_eq!(parse_stream("<Connect><Stream name=\"x\"/>"), None);
        assert_eq!(parse_stream("<Connect><Stream url=\"unterminated"), None);
    }
}
