//! The real client against the simulator on loopback. Audio is pushed as fast as the socket
//! takes it: the simulator's clock is the audio itself, so nothing here waits in real time.

use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::twilio::FRAME_BYTES;
use cmb_providers::deepgram::{Deepgram, SttEvent, SttOptions, SttStream};
use cmb_providers::ProviderError;

const SCRIPT: [&str; 2] = ["Hi, is this about my order?", "Yes, tomorrow works for me."];

struct Running {
    sim: DeepgramSim,
    url: String,
    shutdown: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(settings: Settings) -> Running {
    let sim = DeepgramSim::new(settings);
    let shutdown = CancellationToken::new();
    let url = crate::serve(
        "deepgram",
        sim.router(),
        shutdown.clone(),
        &TaskTracker::new(),
    )
    .await
    .expect("binds loopback");
    Running { sim, url, shutdown }
}

fn scripted() -> Settings {
    Settings {
        script: SCRIPT.iter().map(|s| s.to_string()).collect(),
        ..Settings::default()
    }
}

fn options(endpointing_ms: u32) -> SttOptions {
    SttOptions {
        model: "nova-2".into(),
        language: "en".into(),
        endpointing_ms,
        utterance_end_ms: 1000,
    }
}

/// Plays `audio` into a new stream, closes it, and returns every event up to `Closed`.
async fn transcribe(
    client: &Deepgram,
    opts: &SttOptions,
    audio: Vec<[u8; FRAME_BYTES]>,
) -> Vec<SttEvent> {
    let SttStream {
        audio: sender,
        mut events,
    } = client.connect(opts).await.expect("connects");
    tokio::spawn(async move {
        for frame in audio {
            if sender.send(Bytes::copy_from_slice(&frame)).await.is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("the stream ends")
            .expect("ends with Closed");
        let closed = matches!(event, SttEvent::Closed { .. });
        seen.push(event);
        if closed {
            return seen;
        }
    }
}

fn finals(events: &[SttEvent]) -> Vec<(String, f64, f64)> {
    events
        .iter()
        .filter_map(|e| match e {
            SttEvent::Transcript {
                text,
                is_final: true,
                speech_final: true,
                start,
                duration,
            } => Some((text.clone(), *start, *duration)),
            _ => None,
        })
        .collect()
}

fn billed(events: &[SttEvent]) -> f64 {
    match events.last() {
        Some(SttEvent::Closed { billed_secs }) => *billed_secs,
        other => panic!("expected Closed last, got {other:?}"),
    }
}

fn close_to(a: f64, b: f64) -> bool {
    (a - b).abs() < 0.011
}

#[tokio::test]
async fn an_utterance_is_heard_transcribed_and_ended() {
    let running = start(scripted()).await;
    let client = Deepgram::new(&running.url, "test-key");
    let audio = [
        silence_frames(1000),
        speech_frames(1500),
        silence_frames(1000),
    ]
    .concat();
    let events = transcribe(&client, &options(300), audio).await;

    assert!(
        matches!(events[0], SttEvent::SpeechStarted { timestamp } if close_to(timestamp, 1.0)),
        "{events:?}"
    );
    let interims: Vec<&SttEvent> = events
        .iter()
        .filter(|e| {
            matches!(
                e,
                SttEvent::Transcript {
                    is_final: false,
                    ..
                }
            )
        })
        .collect();
    assert!(!interims.is_empty(), "{events:?}");
    let finals = finals(&events);
    assert_eq!(finals.len(), 1, "{events:?}");
    assert_eq!(finals[0].0, SCRIPT[0]);
    assert!(close_to(finals[0].1, 1.0));
    let ended = events.iter().position(
        |e| matches!(e, SttEvent::UtteranceEnd { last_word_end } if close_to(*last_word_end, 2.5)),
    );
    let final_at = events.iter().position(|e| {
        matches!(
            e,
            SttEvent::Transcript {
                speech_final: true,
                ..
            }
        )
    });
    assert!(ended > final_at, "{events:?}");
    assert!(!events.iter().any(|e| matches!(e, SttEvent::Error(_))));
    assert!(close_to(billed(&events), 3.5), "{events:?}");
    assert!(close_to(running.sim.billed_seconds_total(), 3.5));
    assert_eq!(running.sim.connections(), 1);
}

#[tokio::test]
async fn each_utterance_takes_the_next_line_and_backchannels_do_not() {
    let running = start(scripted()).await;
    let client = Deepgram::new(&running.url, "test-key");
    let audio = [
        silence_frames(500),
        speech_frames(200),
        silence_frames(800),
        speech_frames(1200),
        silence_frames(800),
        speech_frames(1000),
        silence_frames(800),
        speech_frames(900),
        silence_frames(800),
    ]
    .concat();
    let events = transcribe(&client, &options(300), audio.clone()).await;
    let texts: Vec<String> = finals(&events).into_iter().map(|f| f.0).collect();
    assert_eq!(
        texts,
        [
            "mm-hmm",
            SCRIPT[0],
            SCRIPT[1],
            "this is the caller speaking"
        ]
    );
    // A new connection starts from the top of the script.
    let again = transcribe(&client, &options(300), audio).await;
    assert_eq!(finals(&again)[1].0, SCRIPT[0]);
    let total = billed(&events) + billed(&again);
    assert!(close_to(total, 2.0 * 7.0), "{total}");
    assert!(close_to(running.sim.billed_seconds_total(), total));
}

#[tokio::test]
async fn latency_delays_results_without_reordering_them() {
    let running = start(Settings {
        latency: Duration::from_millis(50),
        ..scripted()
    })
    .await;
    let client = Deepgram::new(&running.url, "test-key");
    let audio = [
        silence_frames(500),
        speech_frames(1000),
        silence_frames(1200),
    ]
    .concat();
    let begun = std::time::Instant::now();
    let events = transcribe(&client, &options(300), audio).await;
    assert!(begun.elapsed() >= Duration::from_millis(50));
    assert!(matches!(events[0], SttEvent::SpeechStarted { .. }));
    assert_eq!(finals(&events)[0].0, SCRIPT[0]);
    assert!(matches!(
        events[events.len() - 2],
        SttEvent::UtteranceEnd { .. }
    ));
    assert!(close_to(billed(&events), 2.7));
}

#[tokio::test]
async fn longer_endpointing_waits_longer_in_audio_time() {
    let running = start(scripted()).await;
    let client = Deepgram::new(&running.url, "test-key");
    let audio = || {
        [
            silence_frames(500),
            speech_frames(1000),
            silence_frames(1500),
        ]
        .concat()
    };
    let silence_began = 1.5;
    let mut waited = Vec::new();
    for endpointing in [200, 800] {
        let events = transcribe(&client, &options(endpointing), audio()).await;
        let (_, start, duration) = finals(&events)[0].clone();
        waited.push(start + duration - silence_began);
    }
    assert!(close_to(waited[0], 0.2), "{waited:?}");
    assert!(close_to(waited[1], 0.8), "{waited:?}");
}

#[tokio::test]
async fn closing_mid_utterance_flushes_it_and_bills_the_audio() {
    let running = start(scripted()).await;
    let client = Deepgram::new(&running.url, "test-key");
    let audio = [silence_frames(300), speech_frames(700)].concat();
    let events = transcribe(&client, &options(300), audio).await;
    assert!(events.iter().any(|e| matches!(
        e,
        SttEvent::Transcript { text, is_final: true, speech_final: false, .. } if text == SCRIPT[0]
    )));
    assert!(close_to(billed(&events), 1.0), "{events:?}");
}

#[tokio::test]
async fn a_bad_key_is_refused_for_good() {
    let running = start(scripted()).await;
    for key in ["", "   "] {
        let refused = Deepgram::new(&running.url, key)
            .connect(&options(300))
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(refused, ProviderError::Status { status: 401, .. }),
            "{refused}"
        );
        assert!(!refused.retryable());
    }
    assert_eq!(running.sim.connections(), 0);
}

#[tokio::test]
async fn injected_failures_and_unreachable_hosts_are_retryable() {
    let running = start(Settings {
        faults: Faults::new(Duration::ZERO, 2),
        ..scripted()
    })
    .await;
    let client = Deepgram::new(&running.url, "test-key");
    assert!(client.connect(&options(300)).await.is_ok());
    // The second handshake is refused (503): the client tries again and the third is accepted.
    assert!(client.connect(&options(300)).await.is_ok());
    // Refused every time: the error, after three attempts.
    let refusing = start(Settings {
        faults: Faults::new(Duration::ZERO, 1),
        ..scripted()
    })
    .await;
    let failed = Deepgram::new(&refusing.url, "test-key")
        .connect(&options(300))
        .await
        .err()
        .expect("503");
    assert!(
        matches!(failed, ProviderError::Status { status: 503, .. }),
        "{failed}"
    );
    assert!(failed.retryable());

    // Nothing listens on the port of a listener we just closed.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let unreachable = Deepgram::new(&format!("http://127.0.0.1:{port}"), "k")
        .connect(&options(300))
        .await
        .err()
        .expect("unreachable");
    assert!(matches!(unreachable, ProviderError::Unreachable { .. }));
    assert!(unreachable.retryable());
}

#[tokio::test]
async fn a_dropped_socket_is_an_error_then_closed() {
    let running = start(Settings {
        disconnect_after: Some(Duration::from_millis(2000)),
        ..scripted()
    })
    .await;
    let client = Deepgram::new(&running.url, "test-key");
    let audio = [
        silence_frames(500),
        speech_frames(1000),
        silence_frames(3000),
    ]
    .concat();
    let events = transcribe(&client, &options(300), audio).await;
    let n = events.len();
    assert!(
        matches!(events[n - 2], SttEvent::Error(_)),
        "{:?}",
        &events[n.saturating_sub(3)..]
    );
    // Without Metadata, the bill is what we sent: at least up to the cut. (What the simulator
    // sent before the cut may be lost: closing with unread audio resets the connection.)
    assert!(billed(&events) >= 2.0);
}

/// Real time on purpose: the client's keep-alive timer is wall-clock (5 s), and the
/// simulator closes a stream idle for 10 s, as Deepgram does.
#[tokio::test]
async fn a_quiet_stream_is_kept_alive() {
    let running = start(scripted()).await;
    let client = Deepgram::new(&running.url, "test-key");
    let SttStream { audio, mut events } = client.connect(&options(300)).await.expect("connects");
    for frame in silence_frames(200) {
        audio.send(Bytes::copy_from_slice(&frame)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(5400)).await;
    assert_eq!(running.sim.keepalives(), 1);
    drop(audio);
    let mut seen = Vec::new();
    while let Some(event) = events.recv().await {
        seen.push(event);
    }
    assert_eq!(seen, [SttEvent::Closed { billed_secs: 0.2 }]);
}

/// The idle timer runs from the last message of any kind: a KeepAlive moves it, and a stream
/// quiet for the whole timeout is closed with `NET-0001`, as Deepgram closes it.
#[tokio::test]
async fn a_stream_idle_too_long_is_closed_and_any_message_postpones_it() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message as WsMessage};
    let idle = Duration::from_millis(400);
    let running = start(Settings {
        idle_timeout: idle,
        ..scripted()
    })
    .await;
    let url = format!(
        "{}/v1/listen?encoding=mulaw&sample_rate=8000&channels=1",
        running.url.replacen("http", "ws", 1)
    );
    let mut request = url.into_client_request().expect("a request");
    request
        .headers_mut()
        .insert("authorization", "Token k".parse().expect("a header"));
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("connects");
    ws.send(WsMessage::binary(vec![0xFFu8; FRAME_BYTES]))
        .await
        .expect("sends");
    tokio::time::sleep(Duration::from_millis(250)).await;
    ws.send(WsMessage::text(r#"{"type":"KeepAlive"}"#))
        .await
        .expect("sends");
    let kept_alive = std::time::Instant::now();
    // 500 ms after the audio, past the timeout counted from it: still open.
    let early = tokio::time::timeout(Duration::from_millis(250), ws.next()).await;
    assert!(early.is_err(), "closed early: {early:?}");
    let closed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("closed in time");
    let quiet_for = kept_alive.elapsed();
    match closed {
        Some(Ok(WsMessage::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1011);
            assert_eq!(frame.reason.as_str(), "NET-0001");
        }
        other => panic!("not a close frame: {other:?}"),
    }
    assert!(quiet_for >= idle, "closed after {quiet_for:?} of quiet");
    assert_eq!(running.sim.keepalives(), 1);
}

#[test]
fn settings_come_from_the_environment() {
    let vars = [
        ("SIM_DEEPGRAM_SCRIPT", "one two | three|"),
        ("SIM_DEEPGRAM_BACKCHANNEL_MS", "500"),
        ("SIM_DEEPGRAM_LATENCY_MS", "40"),
        ("SIM_DEEPGRAM_DISCONNECT_AFTER_MS", "9000"),
        ("SIM_DEEPGRAM_FAIL_EVERY", "3"),
    ];
    let get = |name: &str| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let settings = Settings::from_lookup(&get);
    assert_eq!(settings.script, ["one two", "three"]);
    assert_eq!(settings.default_utterance, "this is the caller speaking");
    assert_eq!(settings.backchannel_ms, 500);
    assert_eq!(settings.latency, Duration::from_millis(40));
    assert_eq!(settings.disconnect_after, Some(Duration::from_secs(9)));
    assert_eq!(settings.faults.fail_every, 3);
    let defaults = Settings::default();
    assert!(defaults.script.is_empty());
    assert_eq!(defaults.backchannel_ms, 350);
    assert_eq!(defaults.disconnect_after, None);
}

#[tokio::test]
async fn a_socket_dropped_mid_stream_is_reopened_and_the_words_after_it_heard() {
    let running = start(Settings {
        disconnect_after: Some(Duration::from_millis(2500)),
        ..scripted()
    })
    .await;
    let client = Deepgram::new(&running.url, "test-key");
    let SttStream { audio, mut events } = client.connect(&options(300)).await.expect("connects");
    // Two turns; the first socket drops in the silence between them.
    let frames = [
        silence_frames(500),
        speech_frames(800),
        silence_frames(1500),
        speech_frames(800),
        silence_frames(1000),
    ]
    .concat();
    let sent_secs = frames.len() as f64 * 0.02;
    let feeder = tokio::spawn(async move {
        for frame in frames {
            if audio.send(Bytes::copy_from_slice(&frame)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Kept open until the last words are back, as a call would.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        drop(audio);
    });
    let mut seen = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
        seen.push(event);
    }
    feeder.await.unwrap();
    let turns = seen
        .iter()
        .filter(|e| {
            matches!(
                e,
                SttEvent::Transcript {
                    speech_final: true,
                    ..
                }
            )
        })
        .count();
    assert_eq!(turns, 2, "{seen:?}");
    assert!(running.sim.connections() >= 2);
    // Billed on every socket, the audio sent again included.
    assert!(billed(&seen) >= sent_secs, "{seen:?}");
}
