//! The ElevenLabs TTS client against the simulator on loopback.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use cmb_providers::elevenlabs::{billed_characters, ElevenLabs, TtsAudio};
use cmb_providers::ProviderError;

const RACHEL: &str = "21m00Tcm4TlvDq8ikWAM";
const MODEL: &str = "eleven_flash_v2_5";

async fn start(tts: TtsSettings) -> (ElevenLabsSim, ElevenLabs, CancellationToken) {
    let sim = ElevenLabsSim::new(Faults::default(), tts);
    let shutdown = CancellationToken::new();
    let url = crate::serve(
        "elevenlabs",
        sim.router(),
        shutdown.clone(),
        &TaskTracker::new(),
    )
    .await
    .unwrap();
    let client = ElevenLabs::new(cmb_providers::http_client(), &url, "key");
    (sim, client, shutdown)
}

fn fast() -> TtsSettings {
    TtsSettings {
        first_byte: Duration::from_millis(20),
        realtime_factor: 50.0,
        fail_every: 0,
        ms_per_char: DEFAULT_MS_PER_CHAR,
        break_after_chunks: 0,
    }
}

fn expected_bytes(text: &str) -> f64 {
    8.0 * speech_ms(text, DEFAULT_MS_PER_CHAR) as f64
}

/// Audio bytes, and whether `Final` came, until the stream ends.
async fn drain(audio: &mut mpsc::Receiver<TtsAudio>) -> (usize, usize, Option<TtsAudio>) {
    let (mut bytes, mut chunks) = (0, 0);
    while let Some(a) = audio.recv().await {
        match a {
            TtsAudio::Chunk(b, _) => {
                bytes += b.len();
                chunks += 1;
            }
            end => return (bytes, chunks, Some(end)),
        }
    }
    (bytes, chunks, None)
}

#[tokio::test]
async fn two_sentences_over_the_socket_give_audio_of_their_length_and_final() {
    let (sim, client, _stop) = start(fast()).await;
    let mut stream = client.stream_tts(RACHEL, MODEL).await.unwrap();
    let sentences = ["Hello there, it is good to hear you.", "How was your day"];
    for s in sentences {
        stream.text.send(s.to_string()).await.unwrap();
    }
    drop(stream.text);
    let (bytes, chunks, end) = drain(&mut stream.audio).await;
    assert_eq!(end, Some(TtsAudio::Final));
    let billed: u64 = sentences.iter().map(|s| billed_characters(s)).sum();
    assert_eq!(billed, 37 + 17, "a space is added to each chunk");
    assert_eq!(sim.characters_total(), billed);
    let expected = expected_bytes(&sentences.map(|s| format!("{s} ")).concat());
    assert!(
        (bytes as f64 - expected).abs() <= expected * 0.1,
        "{bytes} vs {expected}"
    );
    assert!(chunks > 2, "{chunks} chunks");
    assert_eq!(sim.syntheses(), 1);
    let deadline = Instant::now() + Duration::from_secs(2);
    while sim.open_sockets() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sim.open_sockets(), 0);
}

#[tokio::test]
async fn dropping_the_stream_closes_the_server_socket() {
    // Slow synthesis, so that the drop lands mid-audio.
    let (sim, client, _stop) = start(TtsSettings {
        first_byte: Duration::from_millis(10),
        realtime_factor: 1.0,
        fail_every: 0,
        ms_per_char: DEFAULT_MS_PER_CHAR,
        break_after_chunks: 0,
    })
    .await;
    let mut stream = client.stream_tts(RACHEL, MODEL).await.unwrap();
    stream
        .text
        .send("This is a long sentence that would take a few seconds to say.".into())
        .await
        .unwrap();
    assert!(matches!(
        stream.audio.recv().await,
        Some(TtsAudio::Chunk(..))
    ));
    assert_eq!(sim.open_sockets(), 1);
    let dropped = Instant::now();
    drop(stream);
    while sim.open_sockets() > 0 && dropped.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sim.open_sockets(), 0, "the server socket stayed open");
    assert!(
        dropped.elapsed() < Duration::from_millis(500),
        "{:?}",
        dropped.elapsed()
    );
}

#[tokio::test]
async fn a_failing_socket_synthesis_is_an_error_without_audio() {
    let (sim, client, _stop) = start(TtsSettings {
        fail_every: 1,
        ..fast()
    })
    .await;
    let mut stream = client.stream_tts(RACHEL, MODEL).await.unwrap();
    stream.text.send("Hello.".into()).await.unwrap();
    let (bytes, _, end) = drain(&mut stream.audio).await;
    assert_eq!(bytes, 0);
    assert!(
        matches!(end, Some(TtsAudio::Error(ref e)) if e.contains("injected failure")),
        "{end:?}"
    );
    assert_eq!(sim.characters_total(), 0);
}

#[tokio::test]
async fn a_socket_without_a_key_is_refused() {
    let (_sim, client, _stop) = start(fast()).await;
    let url = client_base(&client);
    let anonymous = ElevenLabs::new(cmb_providers::http_client(), &url, "");
    let mut stream = anonymous.stream_tts(RACHEL, MODEL).await.unwrap();
    let (bytes, _, end) = drain(&mut stream.audio).await;
    assert_eq!(bytes, 0);
    assert!(matches!(end, Some(TtsAudio::Error(_))), "{end:?}");
}

fn client_base(client: &ElevenLabs) -> String {
    client.base_url().to_string()
}

#[tokio::test]
async fn http_synthesis_returns_audio_of_the_right_length() {
    let (sim, client, _stop) = start(fast()).await;
    let text = "Good evening, it's me again.";
    let audio = client.synthesize(RACHEL, MODEL, text).await.unwrap();
    let chars = text.chars().count() as u64;
    assert_eq!(audio.len() as f64, expected_bytes(text));
    assert_eq!(sim.characters_total(), chars);
    // A tone, not silence: most samples are far from zero.
    let loud = audio
        .iter()
        .filter(|&&b| crate::twilio::mulaw_to_linear(b).unsigned_abs() > 1000)
        .count();
    assert!(loud > audio.len() / 2, "{loud} of {}", audio.len());
}

#[tokio::test]
async fn a_failing_http_synthesis_is_an_error_never_audio() {
    let (sim, client, _stop) = start(TtsSettings {
        fail_every: 2,
        ..fast()
    })
    .await;
    assert!(client.synthesize(RACHEL, MODEL, "One.").await.is_ok());
    match client.synthesize(RACHEL, MODEL, "Two.").await {
        Err(e @ ProviderError::Status { status: 500, .. }) => {
            assert!(e.retryable());
            assert!(e.to_string().contains("injected failure"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.syntheses(), 2);
    match client.synthesize("no-such-voice", MODEL, "Three.").await {
        Err(e @ ProviderError::Status { status: 400, .. }) => assert!(!e.retryable()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_2xx_that_is_not_audio_is_an_error() {
    let router = Router::new().route(
        "/v1/text-to-speech/{voice_id}",
        post(|| async { Json(json!({ "detail": { "message": "not audio" } })) }),
    );
    let shutdown = CancellationToken::new();
    let url = crate::serve("fake", router, shutdown.clone(), &TaskTracker::new())
        .await
        .unwrap();
    let client = ElevenLabs::new(cmb_providers::http_client(), &url, "key");
    let err = client.synthesize(RACHEL, MODEL, "Hi.").await.unwrap_err();
    assert!(err.to_string().contains("not audio"), "{err}");
}

#[test]
fn speech_is_cut_in_100_ms_chunks_with_alignment() {
    let mut sample = 0;
    let chunks = speak("Hi there", &mut sample, 50.0);
    // H 45, i 70, space 30, t 45, h 45, e 70, r 45, e 70: 420 ms, 3360 samples → 4 full
    // chunks and one of 160; each character for a time of its own, none the 65 ms once assumed.
    assert_eq!(chunks.len(), 5);
    assert_eq!(chunks[4].audio.len(), 160);
    assert_eq!(chunks[0].chars, vec!["H", "i"]);
    assert_eq!(chunks[0].starts, vec![0, 45]);
    assert_eq!(chunks[0].durations, vec![45, 70]);
    assert_eq!(chunks[1].chars, vec![" ", "t", "h"]);
    assert_eq!(chunks[1].starts, vec![15, 45, 90]);
    let aligned: usize = chunks.iter().map(|c| c.chars.len()).sum();
    assert_eq!(aligned, 8);
    assert_eq!(billed_characters(" "), 0);
    assert_eq!(billed_characters("Hi."), 4);
}

#[test]
fn speech_kept_for_a_text_is_the_speech_made_for_it() {
    // Two segments in a row, twice (as two replies would speak them): the second time comes
    // from the cache, and each time the frames are those the synthesis makes, the tone
    // continuing from where the first segment ended.
    let texts = ["Okay. ", "Tell me more, I am listening."];
    let mut made = Vec::new();
    let mut sample = 0;
    for text in texts {
        made.extend(speak(text, &mut sample, 50.0).iter().map(audio_frame_open));
    }
    let made_samples = sample;
    for _ in 0..2 {
        let mut sample = 0;
        let frames: Vec<String> = texts
            .iter()
            .flat_map(|t| spoken(t, &mut sample, 50.0).frames.clone())
            .collect();
        assert_eq!(frames, made);
        assert_eq!(sample, made_samples);
    }
    let (mut a, mut b) = (0, 0);
    assert!(Arc::ptr_eq(
        &spoken(texts[1], &mut a, 50.0),
        &spoken(texts[1], &mut b, 50.0)
    ));
    // Another place in the tone is other audio.
    let mut later = 1;
    assert_ne!(
        spoken(texts[1], &mut later, 50.0).frames,
        spoken(texts[1], &mut 0, 50.0).frames
    );
    // A message is the frame and the socket's own field, as JSON.
    let Message::Text(text) = audio_message(&made[0], "contextId", "\"c1\"") else {
        panic!("a text message");
    };
    let v: Value = serde_json::from_str(text.as_str()).expect("JSON");
    assert_eq!(v["contextId"], "c1");
    assert_eq!(v["alignment"]["chars"][0], "O");
    assert_eq!(v["alignment"], v["normalizedAlignment"]);
}

#[test]
fn tts_settings_from_variables() {
    let s = TtsSettings::from_lookup(&|k| match k {
        "SIM_ELEVENLABS_TTS_FIRST_BYTE_MS" => Some("50".into()),
        "SIM_ELEVENLABS_TTS_SPEED" => Some("2.5".into()),
        "SIM_ELEVENLABS_TTS_FAIL_EVERY" => Some("3".into()),
        "SIM_ELEVENLABS_TTS_MS_PER_CHAR" => Some("80".into()),
        "SIM_ELEVENLABS_TTS_BREAK_AFTER_CHUNKS" => Some("4".into()),
        _ => None,
    });
    assert_eq!(s.break_after_chunks, 4);
    assert_eq!(s.ms_per_char, 80.0);
    assert_eq!(s.first_byte, Duration::from_millis(50));
    assert_eq!(s.realtime_factor, 2.5);
    assert_eq!(s.fail_every, 3);
    let d = TtsSettings::from_lookup(&|_| None);
    assert_eq!(d.first_byte, Duration::from_millis(120));
    assert_eq!(d.realtime_factor, 4.0);
    assert_eq!(d.break_after_chunks, 0);
}

#[tokio::test]
async fn socket_audio_carries_the_alignment_of_its_characters() {
    let (_sim, client, _stop) = start(TtsSettings {
        ms_per_char: 90.0,
        ..fast()
    })
    .await;
    let mut stream = client.stream_tts(RACHEL, MODEL).await.unwrap();
    stream.text.send("Well, hello.".to_string()).await.unwrap();
    drop(stream.text);
    let (mut said, mut ends, mut offset_ms) = (String::new(), Vec::new(), 0u64);
    while let Some(a) = stream.audio.recv().await {
        match a {
            TtsAudio::Chunk(audio, alignment) => {
                for i in 0..alignment.chars.len() {
                    said.push_str(&alignment.chars[i]);
                    ends.push(offset_ms + alignment.starts_ms[i] + alignment.durations_ms[i]);
                }
                offset_ms += audio.len() as u64 / 8;
            }
            TtsAudio::Final => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(said, "Well, hello. ");
    let expected: Vec<u64> = timings("Well, hello. ", 90.0)
        .iter()
        .map(|(_, s, d)| s + d)
        .collect();
    assert_eq!(ends, expected);
    // Not one rate for every character.
    let durations: std::collections::BTreeSet<u64> =
        expected.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(durations.len() >= 3, "{durations:?}");
}

#[tokio::test]
async fn one_socket_carries_a_call_s_replies_each_a_context_of_its_own() {
    use cmb_providers::elevenlabs::TtsSession;
    let (sim, client, _stop) = start(fast()).await;
    let session = TtsSession::new(client, RACHEL, MODEL);
    session.open().await.unwrap();
    for (turn, text) in [("1", "Hello there."), ("2", "How was your day? Tell me.")] {
        let (context, mut audio) = session.context(turn).await.unwrap();
        context.send(text).await.unwrap();
        context.end().await;
        let (bytes, _, end) = drain(&mut audio).await;
        assert_eq!(end, Some(TtsAudio::Final), "{turn}");
        let expected = expected_bytes(&format!("{text} "));
        assert!(
            (bytes as f64 - expected).abs() <= expected * 0.1,
            "{bytes} vs {expected}"
        );
    }
    // A reply cut off: its context is closed and nothing of it arrives afterwards.
    let (context, mut audio) = session.context("3").await.unwrap();
    context
        .send("This one is long enough to be cut off by the caller.")
        .await
        .unwrap();
    assert!(matches!(audio.recv().await, Some(TtsAudio::Chunk(..))));
    drop(context);
    drop(audio);
    let (context, mut audio) = session.context("4").await.unwrap();
    context.send("Sorry, go on.").await.unwrap();
    context.end().await;
    assert_eq!(drain(&mut audio).await.2, Some(TtsAudio::Final));
    assert_eq!(session.sockets_opened(), 1);
    assert_eq!(sim.sockets_opened(), 1);
    assert_eq!(sim.contexts_opened(), 4);
    let billed: u64 = [
        "Hello there.",
        "How was your day? Tell me.",
        "This one is long enough to be cut off by the caller.",
        "Sorry, go on.",
    ]
    .iter()
    .map(|s| billed_characters(s))
    .sum();
    assert_eq!(sim.characters_total(), billed);
    // The last handle gone, the socket is closed.
    drop(session);
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.open_sockets() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sim.open_sockets(), 0);
}

#[tokio::test]
async fn a_closed_session_socket_is_opened_again_for_the_next_reply() {
    use cmb_providers::elevenlabs::TtsSession;
    let (sim, client, stop) = start(fast()).await;
    let session = TtsSession::new(client.clone(), RACHEL, MODEL);
    let (context, mut audio) = session.context("1").await.unwrap();
    context.send("Hi.").await.unwrap();
    context.end().await;
    assert_eq!(drain(&mut audio).await.2, Some(TtsAudio::Final));
    // Six contexts at once is more than ElevenLabs allows: it closes the socket.
    let mut open = Vec::new();
    for turn in 2..8 {
        let (context, audio) = session.context(&turn.to_string()).await.unwrap();
        open.push((context, audio));
    }
    let (_, last) = open.last_mut().unwrap();
    assert!(matches!(drain(last).await.2, Some(TtsAudio::Error(_))));
    drop(open);
    let (context, mut audio) = session.context("8").await.unwrap();
    context.send("Still here.").await.unwrap();
    context.end().await;
    assert_eq!(drain(&mut audio).await.2, Some(TtsAudio::Final));
    assert_eq!(session.sockets_opened(), 2);
    assert_eq!(sim.sockets_opened(), 2);
    stop.cancel();
}

#[tokio::test]
async fn a_socket_set_to_break_fails_its_context_mid_reply() {
    use cmb_providers::elevenlabs::TtsSession;
    let (_sim, client, _stop) = start(TtsSettings {
        break_after_chunks: 2,
        ..fast()
    })
    .await;
    let session = TtsSession::new(client, RACHEL, MODEL);
    let (context, mut audio) = session.context("1").await.unwrap();
    context
        .send("This reply is long enough for many chunks of audio, far more than two.")
        .await
        .unwrap();
    context.end().await;
    let (_, chunks, end) = drain(&mut audio).await;
    assert_eq!(chunks, 2, "the audio sent before the break");
    assert!(
        matches!(end, Some(TtsAudio::Error(ref e)) if e.contains("injected failure")),
        "{end:?}"
    );
}
