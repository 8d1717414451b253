//! Voice sessions end to end: the Twilio simulator answers and streams a scripted caller, the
//! Deepgram simulator hears it, the LLM and ElevenLabs simulators answer, and the session runs
//! the conversation in between.

use crate::common;

use std::time::Duration;

use callmeback::app::Running;
use common::{eventually, request_call, wait_for_event, Api};
use serde_json::{json, Value};

/// Calls, and waits until the call has ended and its voice session is recorded.
async fn converse(app: &Running, user: &Api, persona_id: &str) -> (String, Value) {
    let id = request_call(user, persona_id, 2).await;
    assert!(
        wait_for_event(&app.state.pool, &id, "VoiceSessionEnded").await,
        "the voice session of {id} never ended"
    );
    // And the read models have caught up with it.
    let caught_up = eventually(Duration::from_secs(20), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM rm_call_costs WHERE call_id = $1::uuid AND service = 'deepgram'",
        )
        .bind(&id)
        .fetch_one(&app.state.pool)
        .await
        .unwrap();
        (n == 1).then_some(())
    })
    .await;
    assert!(
        caught_up.is_some(),
        "the costs of {id} reached the read model"
    );
    let call = user.get(&format!("/api/calls/{id}")).await;
    (id, call.body)
}

fn lines(call: &Value) -> Vec<(String, String, bool)> {
    call["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["speaker"].as_str().unwrap().to_string(),
                l["text"].as_str().unwrap().to_string(),
                l["cut_off"].as_bool().unwrap(),
            )
        })
        .collect()
}

async fn events_of(app: &Running, id: &str, event_type: &str) -> Vec<Value> {
    sqlx::query_scalar::<_, Value>(
        "SELECT payload FROM events WHERE aggregate_id = $1 AND event_type = $2 ORDER BY sequence",
    )
    .bind(id)
    .bind(event_type)
    .fetch_all(&app.state.pool)
    .await
    .unwrap()
}

/// The call's `VoiceSessionEnded`, once recorded: the session records it when its socket
/// closes, which may come after the call was settled on a busy machine.
async fn session_end(app: &Running, id: &str) -> Vec<Value> {
    eventually(Duration::from_secs(30), || async {
        let end = events_of(app, id, "VoiceSessionEnded").await;
        (!end.is_empty()).then_some(end)
    })
    .await
    .expect("the voice session's end is recorded")
}

/// The call's LLM token costs per provider: (tokens, whether any were estimated).
async fn llm_costs(app: &Running, id: &str) -> std::collections::HashMap<String, (i64, bool)> {
    let rows: Vec<(String, i64, bool)> = sqlx::query_as(
        "SELECT service, sum(quantity)::bigint, bool_or(estimated) FROM rm_call_costs
          WHERE call_id = $1::uuid AND service IN ('cerebras', 'openai') GROUP BY service",
    )
    .bind(id)
    .fetch_all(&app.state.pool)
    .await
    .unwrap();
    rows.into_iter().map(|(s, q, e)| (s, (q, e))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_turn_conversation_follows_the_script_and_bills_what_was_used() {
    let common::Voice {
        env,
        app,
        user,
        persona_id,
    } = common::voice(14, "1000:3000,1000:3000,1000:3000")
        .set(
            "SIM_DEEPGRAM_SCRIPT",
            "I ran five miles today|my knee hurts a bit|thanks that helps",
        )
        .set("SIM_CEREBRAS_REPLY", "Okay, noted.")
        .greeting("Hi there.")
        // The simulator's token counts are compared with the call's voice costs: no memory work.
        .memory_off()
        .start()
        .await;
    let (id, call) = converse(&app, &user, &persona_id).await;
    let transcript = lines(&call);
    let expected: Vec<(String, String, bool)> = [
        ("persona", "Hi there."),
        ("caller", "I ran five miles today"),
        ("persona", "Okay, noted."),
        ("caller", "my knee hurts a bit"),
        ("persona", "Okay, noted."),
        ("caller", "thanks that helps"),
        ("persona", "Okay, noted."),
    ]
    .iter()
    .map(|(s, t)| (s.to_string(), t.to_string(), false))
    .collect();
    assert_eq!(transcript, expected);

    // Three turns with their timings.
    let turns = events_of(&app, &id, "TurnCompleted").await;
    assert_eq!(turns.len(), 3, "{turns:?}");
    // The greeting's latency is recorded (how fast it is, `bench voice` shows, not a test).
    let end = session_end(&app, &id).await;
    assert!(end[0]["VoiceSessionEnded"]["greeting_ms"]
        .as_u64()
        .is_some());
    let e2e = end[0]["VoiceSessionEnded"]["first_audio_ms"]
        .as_array()
        .expect("p50/p90/p99");
    assert_eq!(e2e.len(), 3);
    assert!(e2e[0].as_u64() <= e2e[2].as_u64());

    // Transcripts go after the retention period.
    sqlx::query(
        "UPDATE call_transcripts SET at = now() - interval '31 days' WHERE call_id = $1::uuid",
    )
    .bind(&id)
    .execute(&app.state.pool)
    .await
    .unwrap();
    let purged = callmeback::serve::transcripts::purge(&app.state.pool, 30)
        .await
        .unwrap();
    assert_eq!(purged, 7);
    assert!(
        user.get(&format!("/api/calls/{id}")).await.body["transcript"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    for t in &turns {
        let t = &t["TurnCompleted"];
        assert_eq!(t["interrupted"], false);
        assert_eq!(t["llm_provider"], "cerebras");
        let first_audio = t["timings"]["first_audio_ms"]
            .as_u64()
            .expect("audio went out");
        let first_token = t["timings"]["llm_first_token_ms"].as_u64().unwrap();
        assert!(first_token <= first_audio, "{t}");
    }
    // Costs: what the simulators counted.
    let costs: Vec<(String, i64)> = sqlx::query_as(
        "SELECT service, sum(quantity)::bigint FROM rm_call_costs WHERE call_id = $1::uuid
          GROUP BY service ORDER BY service",
    )
    .bind(&id)
    .fetch_all(&app.state.pool)
    .await
    .unwrap();
    let cost = |s: &str| costs.iter().find(|(k, _)| k == s).map(|(_, q)| *q);
    let llm = app.sims.cerebras.as_ref().unwrap();
    assert_eq!(
        cost("cerebras"),
        Some((llm.prompt_tokens_total() + llm.completion_tokens_total()) as i64),
        "{costs:?}"
    );
    let deepgram = app.sims.deepgram.as_ref().unwrap().billed_seconds_total();
    assert_eq!(cost("deepgram"), Some(deepgram.ceil() as i64), "{costs:?}");
    // ElevenLabs also voiced the system personas' greetings once at start-up, for no call.
    let warm_up: usize = cmb_domain::persona::system::system_personas()
        .iter()
        .map(|p| p.draft.greeting.chars().count())
        .sum();
    let tts = app.sims.elevenlabs.as_ref().unwrap();
    assert_eq!(
        cost("elevenlabs"),
        Some(tts.characters_total() as i64 - warm_up as i64),
        "{costs:?}"
    );
    assert!(cost("twilio").is_some());
    // One text-to-speech socket for the whole call, each reply a context of its own on it
    // (the greeting came over HTTP), closed when the call ended.
    assert_eq!(tts.sockets_opened(), 1, "one ElevenLabs socket per call");
    assert_eq!(tts.contexts_opened(), 3, "a context per reply");
    let closed = eventually(Duration::from_secs(10), || async {
        (tts.open_sockets() == 0).then_some(())
    })
    .await;
    assert!(closed.is_some(), "the call's socket was closed");
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_cuts_the_reply_to_what_was_heard_and_backchannels_do_not() {
    // The caller speaks, lets the persona start its long reply, then says a 200 ms "mm-hmm",
    // then talks over it. The last reply (about 10 s of audio from this slow speaker, from
    // about 7 s into the call) must end before the call does, even on a busy machine: 24 s
    // leaves it 6 s.
    let common::Voice {
        env,
        app,
        user,
        persona_id,
    } = common::voice(24, "1000:1500,200:1200,1200:6000")
        // A slow speaker: twice the 65 ms a character a fixed rate would assume.
        .set("SIM_ELEVENLABS_TTS_MS_PER_CHAR", "130")
        .set("SIM_DEEPGRAM_SCRIPT", "tell me a long story|no wait stop")
        .memory_off()
        .start()
        .await;
    let (id, call) = converse(&app, &user, &persona_id).await;
    let transcript = lines(&call);
    let cut: Vec<&(String, String, bool)> = transcript.iter().filter(|l| l.2).collect();
    assert_eq!(cut.len(), 1, "one reply cut: {transcript:?}");
    let full =
        "Got it: \"tell me a long story\". That sounds important to you. Tell me more about it.";
    let heard = cut[0].1.trim_end_matches('—');
    assert!(
        full.starts_with(heard) && heard.len() < full.len(),
        "{heard:?}"
    );
    // What was heard is what the simulator's alignment says was said within the reply's
    // audio before the caller talked over it: at most the 2.6 s from the end of the caller's
    // first turn and its endpointing (300 ms) to their third turn (1.5 + 0.2 + 1.2 s later).
    // At a fixed 65 ms a character, that would have been 40 characters.
    let timed = cmb_sims::elevenlabs::timings(full, 130.0);
    let n = heard.chars().count();
    if n > 0 {
        let (_, start, duration) = timed[n - 1];
        assert!(
            start + duration <= 2_600,
            "{heard:?} ends {} ms into the reply",
            start + duration
        );
    }
    assert!(
        !transcript.iter().any(|l| l.1 == "mm-hmm"),
        "the backchannel is not a turn: {transcript:?}"
    );
    let end = session_end(&app, &id).await;
    assert_eq!(end[0]["VoiceSessionEnded"]["barge_ins"], 1, "{end:?}");
    // How soon the audio stopped is recorded (`bench voice` measures it from outside).
    assert!(end[0]["VoiceSessionEnded"]["barge_in_stop_ms"]
        .as_u64()
        .is_some());
    let sim = app.sims.twilio.as_ref().unwrap();
    assert!(sim.calls()[0].clears_received >= 1);
    // The reply cut off is billed too. When Cerebras had finished writing it before the
    // caller talked over it, its usage came and the line is exact; when the barge-in cancelled
    // the request first, its prompt and the words written are counted by our estimate (which
    // differs from the simulator's count: within a factor of two).
    let costs = llm_costs(&app, &id).await;
    let cerebras = app.sims.cerebras.as_ref().unwrap();
    let (recorded, estimated) = costs["cerebras"];
    let seen = (cerebras.prompt_tokens_total() + cerebras.completion_tokens_total()) as i64;
    if estimated {
        assert!(
            recorded * 2 >= seen && recorded <= seen * 2,
            "Cerebras read and wrote {seen} tokens, {recorded} recorded"
        );
    } else {
        assert_eq!(recorded, seen, "every token Cerebras counted is billed");
    }
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backchannel_pauses_the_reply_which_then_resumes_whole() {
    // Speak, let the persona start its long reply, a 200 ms "mm-hmm", then quiet.
    let common::Voice {
        env,
        app,
        user,
        persona_id,
    } = common::voice(16, "1000:1500,200:12000")
        .set("SIM_DEEPGRAM_SCRIPT", "tell me a long story")
        .start()
        .await;
    let (id, call) = converse(&app, &user, &persona_id).await;
    let transcript = lines(&call);
    let full =
        "Got it: \"tell me a long story\". That sounds important to you. Tell me more about it.";
    assert!(
        transcript
            .iter()
            .any(|l| l.0 == "persona" && l.1 == full && !l.2),
        "the reply was said whole: {transcript:?}"
    );
    assert!(
        !transcript.iter().any(|l| l.2),
        "nothing cut: {transcript:?}"
    );
    assert!(
        !transcript.iter().any(|l| l.1 == "mm-hmm"),
        "the backchannel is not a turn: {transcript:?}"
    );
    let end = session_end(&app, &id).await;
    assert_eq!(end[0]["VoiceSessionEnded"]["barge_ins"], 0, "{end:?}");
    // The speech onset paused the audio: Twilio was told to drop its buffer.
    let sim = app.sims.twilio.as_ref().unwrap();
    assert!(sim.calls()[0].clears_received >= 1);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deepgram_dropping_mid_call_is_reconnected_and_the_next_turns_answered() {
    let common::Voice {
        env,
        app,
        user,
        persona_id,
    } = common::voice(14, "1000:2500,1000:2500,1000:2500")
        // Every socket is dropped, without a close frame, after 4 s of audio.
        .set("SIM_DEEPGRAM_DISCONNECT_AFTER_MS", "4000")
        .set("SIM_CEREBRAS_REPLY", "Okay, noted.")
        .start()
        .await;
    let (id, call) = converse(&app, &user, &persona_id).await;
    let deepgram = app.sims.deepgram.as_ref().unwrap();
    assert!(
        deepgram.connections() >= 2,
        "{} connections",
        deepgram.connections()
    );
    // Each of the caller's three turns was heard and answered, the ones after a drop too.
    let transcript = lines(&call);
    let callers = transcript.iter().filter(|l| l.0 == "caller").count();
    assert_eq!(callers, 3, "{transcript:?}");
    for (i, line) in transcript.iter().enumerate() {
        if line.0 == "caller" {
            assert_eq!(
                transcript.get(i + 1).map(|l| (l.0.as_str(), l.1.as_str())),
                Some(("persona", "Okay, noted.")),
                "{transcript:?}"
            );
        }
    }
    let end = session_end(&app, &id).await;
    assert_eq!(
        end[0]["VoiceSessionEnded"]["reason"], "caller hung up",
        "{end:?}"
    );
    // The seconds billed add up across the sockets: what Deepgram counted, give or take the
    // audio in flight when a socket dropped (sent by us, perhaps never read by Deepgram).
    let billed: i64 = sqlx::query_scalar(
        "SELECT sum(quantity)::bigint FROM rm_call_costs WHERE call_id = $1::uuid AND service = 'deepgram'",
    )
    .bind(&id)
    .fetch_one(&app.state.pool)
    .await
    .unwrap();
    let counted = deepgram.billed_seconds_total().ceil() as i64;
    assert!(
        (billed - counted).abs() <= 1,
        "billed {billed} s, Deepgram counted {counted} s"
    );
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_slow_llm_falls_back_for_that_turn() {
    let common::Voice {
        env,
        app,
        user,
        persona_id,
    } = common::voice(9, "800:3500,800:3000")
        .set("SIM_DEEPGRAM_SCRIPT", "first question|second question")
        .set("SIM_CEREBRAS_FAIL_EVERY", "2")
        .set("SIM_CEREBRAS_STALL_EVERY", "1")
        .set("SIM_OPENAI_REPLY", "Fallback here.")
        .set("LLM_FIRST_TOKEN_TIMEOUT_MS", "700")
        // Only the replies' LLM requests reach the simulators: no memory extraction after the call.
        .memory_off()
        .start()
        .await;
    let (id, call) = converse(&app, &user, &persona_id).await;
    let turns = events_of(&app, &id, "TurnCompleted").await;
    assert_eq!(turns.len(), 2, "{turns:?}");
    for t in &turns {
        assert_eq!(t["TurnCompleted"]["llm_provider"], "openai", "{t}");
        assert_eq!(t["TurnCompleted"]["fell_back"], true);
    }
    let persona_lines: Vec<String> = lines(&call)
        .into_iter()
        .filter(|l| l.0 == "persona")
        .map(|l| l.1)
        .collect();
    assert_eq!(persona_lines, ["Hi.", "Fallback here.", "Fallback here."]);
    // Both costs of a hedge are recorded: OpenAI's answer as its usage said, and the prompt
    // the stalled Cerebras request read (it never said its usage: estimated, by our own count,
    // which differs from the simulator's, so within a factor of two of what it counted). The
    // failed request (a 500) read nothing and costs nothing.
    let costs = llm_costs(&app, &id).await;
    let (openai, cerebras) = (
        app.sims.openai.as_ref().unwrap(),
        app.sims.cerebras.as_ref().unwrap(),
    );
    assert_eq!(
        costs.get("openai"),
        Some(&(
            (openai.prompt_tokens_total() + openai.completion_tokens_total()) as i64,
            false
        )),
        "{costs:?}"
    );
    let seen = (cerebras.prompt_tokens_total() + cerebras.completion_tokens_total()) as i64;
    let (recorded, estimated) = costs["cerebras"];
    assert!(seen > 0 && estimated, "{costs:?}, Cerebras saw {seen}");
    assert!(
        recorded * 2 >= seen && recorded <= seen * 2,
        "Cerebras read {seen} tokens, {recorded} recorded"
    );
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_gets_a_reminder_then_a_goodbye_and_a_hang_up() {
    let common::Voice {
        env,
        app,
        user,
        persona_id,
    } = common::voice(60, "0:60000")
        .turn_taking(300, 3000, 5000)
        .start()
        .await;
    let started = std::time::Instant::now();
    let (id, call) = converse(&app, &user, &persona_id).await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "hung up, not left to run"
    );
    let persona_lines: Vec<String> = lines(&call)
        .into_iter()
        .filter(|l| l.0 == "persona")
        .map(|l| l.1)
        .collect();
    assert_eq!(persona_lines.len(), 3, "{persona_lines:?}");
    assert_eq!(persona_lines[1], "Are you still there?");
    let end = session_end(&app, &id).await;
    assert_eq!(end[0]["VoiceSessionEnded"]["reason"], "silence");
    let done = eventually(Duration::from_secs(10), || async {
        let s: String = sqlx::query_scalar("SELECT status FROM rm_calls WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.state.pool)
            .await
            .unwrap();
        (s == "completed").then_some(())
    })
    .await;
    assert!(done.is_some(), "Twilio ended the call after our hang-up");
    // We hung up through the REST API before the socket closed: the apology TwiML keeps for a
    // lost stream was never reached.
    let sim = app.sims.twilio.as_ref().unwrap();
    assert_eq!(sim.calls()[0].said_after_stream, 0);
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_paid_duration_is_a_hard_cap_with_a_warning_first() {
    // Quiet, then talking from 45 s to 75 s into the stream: over the goodbye, which
    // starts 4 s before the paid minute ends.
    let common::Voice {
        env,
        app,
        user,
        persona_id,
    } = common::voice(300, "0:43800,30000:300000")
        .turn_taking(300, 120_000, 300_000)
        .start()
        .await;
    let id = request_call(&user, &persona_id, 1).await;
    let completed = eventually(Duration::from_secs(75), || async {
        let row: Option<(String, i32)> =
            sqlx::query_as("SELECT status, billed_minutes FROM rm_calls WHERE id = $1::uuid AND charged_cents IS NOT NULL")
                .bind(&id)
                .fetch_optional(&app.state.pool)
                .await
                .unwrap();
        row
    })
    .await;
    assert_eq!(
        completed,
        Some(("completed".to_string(), 1)),
        "ended within the paid minute"
    );
    let end = session_end(&app, &id).await;
    assert_eq!(
        end[0]["VoiceSessionEnded"]["reason"],
        "paid duration reached"
    );
    let call = user.get(&format!("/api/calls/{id}")).await;
    let transcript = lines(&call.body);
    let said: Vec<&String> = transcript.iter().map(|l| &l.1).collect();
    assert!(
        said.iter().any(|l| l.contains("about a minute left")),
        "{said:?}"
    );
    // Talking over the goodbye neither cut it nor kept the call open.
    let last = transcript.last().unwrap();
    assert!(
        last.0 == "persona" && last.1.contains("our time") && !last.2,
        "{transcript:?}"
    );
    // The caller was talking from 45 s into the stream until the hang-up: the goodbye (from
    // 56 s into the session) was said over their words.
    let sim = app.sims.twilio.as_ref().unwrap();
    let lasted = sim.calls()[0].duration_secs.unwrap_or(0);
    assert!((50..=62).contains(&lasted), "the call lasted {lasted} s");
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_lowered_during_a_call_ends_it_gracefully() {
    let common::Voice {
        env,
        app,
        user,
        persona_id,
    } = common::voice(300, "0:300000")
        .turn_taking(300, 120_000, 300_000)
        .start()
        .await;
    let id = request_call(&user, &persona_id, 5).await;
    // Once the call is under way, the user lowers their daily limit below its price.
    let answered = eventually(Duration::from_secs(10), || async {
        let s: String = sqlx::query_scalar("SELECT status FROM rm_calls WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.state.pool)
            .await
            .unwrap();
        (s == "in-progress").then_some(())
    })
    .await;
    assert!(answered.is_some());
    assert_eq!(
        user.put("/api/user/budget", json!({ "max_daily_spend_cents": 50 }))
            .await
            .status,
        200
    );
    let ended = eventually(Duration::from_secs(40), || async {
        let e = events_of(&app, &id, "VoiceSessionEnded").await;
        e.first().cloned()
    })
    .await
    .expect("the session ended");
    assert_eq!(ended["VoiceSessionEnded"]["reason"], "budget reached");
    app.stop().await;
    env.cleanup().await;
}

/// Waits for the call's `CallSettled`: the call ended and its money was settled.
async fn settled(app: &Running, id: &str) -> bool {
    eventually(Duration::from_secs(60), || async {
        (!events_of(app, id, "CallSettled").await.is_empty()).then_some(())
    })
    .await
    .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deepgram_refusing_the_call_gets_an_apology_and_a_clean_end() {
    let common::Voice {
        env,
        app,
        user,
        persona_id,
    } = common::voice(40, "1000:30000")
        // Every handshake refused (503), the retries too.
        .set("SIM_DEEPGRAM_FAIL_EVERY", "1")
        .greeting("Hi there.")
        .start()
        .await;
    let started = std::time::Instant::now();
    let id = request_call(&user, &persona_id, 2).await;
    let end = session_end(&app, &id).await;
    assert_eq!(
        end[0]["VoiceSessionEnded"]["reason"], "speech-to-text unavailable",
        "{end:?}"
    );
    assert!(settled(&app, &id).await, "the call was settled");
    assert!(
        started.elapsed() < Duration::from_secs(35),
        "we hung up rather than leave the caller talking to nobody"
    );
    let call = user.get(&format!("/api/calls/{id}")).await.body;
    let persona_lines: Vec<(String, bool)> = lines(&call)
        .into_iter()
        .filter(|l| l.0 == "persona")
        .map(|l| (l.1, l.2))
        .collect();
    assert_eq!(
        persona_lines,
        [(
            "Sorry, I'm having trouble hearing you. Let's talk again later. Bye!".to_string(),
            false
        )],
        "the apology, said whole, instead of a greeting nobody could answer"
    );
    // Nothing was transcribed, so nothing is billed for it.
    let deepgram: Option<i64> = sqlx::query_scalar(
        "SELECT sum(quantity)::bigint FROM rm_call_costs WHERE call_id = $1::uuid AND service = 'deepgram'",
    )
    .bind(&id)
    .fetch_one(&app.state.pool)
    .await
    .unwrap();
    assert_eq!(deepgram.unwrap_or(0), 0);
    let sim = app.sims.twilio.as_ref().unwrap();
    assert_eq!(sim.calls()[0].said_after_stream, 0, "we hung up ourselves");
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greeting_talked_over_keeps_what_was_heard_of_it() {
    let greeting = "Hello and welcome to this call, I am so glad that you picked up the phone today because there is a lot to talk about, and I have been looking forward to it all week long.";
    let common::Voice {
        env,
        app,
        user,
        persona_id,
    } = common::voice(24, "1200:12000")
        // The caller waits until it has heard the greeting start (its first 500 ms played and
        // its mark echoed), then 1.2 s more (the default lead silence), then talks over it for
        // 1.2 s — however late the greeting started on a busy machine.
        .set("SIM_TWILIO_CALLER_WAITS_TO_HEAR", "1")
        .set("SIM_DEEPGRAM_SCRIPT", "sorry who is this")
        .set("SIM_CEREBRAS_REPLY", "It is me.")
        .greeting(greeting)
        .start()
        .await;
    let (_, call) = converse(&app, &user, &persona_id).await;
    let transcript = lines(&call);
    let first = &transcript[0];
    assert_eq!(first.0, "persona", "{transcript:?}");
    assert!(first.2, "the greeting was cut: {transcript:?}");
    let heard = first.1.as_str();
    assert!(
        !heard.is_empty() && greeting.starts_with(heard) && heard.len() < greeting.len(),
        "some of it was heard (its first mark was echoed before the caller spoke), not all: {heard:?}"
    );
    assert_eq!(
        transcript.get(1).map(|l| (l.0.as_str(), l.1.as_str())),
        Some(("caller", "sorry who is this")),
        "{transcript:?}"
    );
    // What is kept is at most what had played when our server cleared Twilio's buffer (the
    // simulator's playback clock says how much; marks come every 500 ms, so up to 500 ms less).
    // The greeting synthesised over HTTP has no alignment: its characters are spread evenly
    // over its audio, which the simulator made at its own rate.
    let sim = app.sims.twilio.as_ref().unwrap();
    let played_ms = eventually(Duration::from_secs(30), || async {
        sim.observations()
            .first()
            .and_then(|o| o.played_before_clear_ms.first().copied())
    })
    .await
    .expect("the simulator saw a clear");
    let audio_ms =
        cmb_sims::elevenlabs::speech_ms(greeting, cmb_sims::elevenlabs::DEFAULT_MS_PER_CHAR);
    let heard_ms = audio_ms * heard.chars().count() as u64 / greeting.chars().count() as u64;
    // 20 ms: the last frame's padding.
    assert!(
        heard_ms <= played_ms + 20,
        "{heard:?} ends {heard_ms} ms into the greeting; {played_ms} ms had played"
    );
    app.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_to_speech_failing_mid_reply_stops_the_llm_and_keeps_what_was_said() {
    let reply = "Sure, I can tell you all about that. It started long ago in a small town by the sea, where the fishermen went out every morning before dawn and came back with stories.";
    let common::Voice {
        env,
        app,
        user,
        persona_id,
    } = common::voice(24, "1000:20000")
        .set("SIM_DEEPGRAM_SCRIPT", "tell me a story")
        // A slow LLM (about 12 s for the reply's 36 words, its first sentence after 3 s), and a
        // TTS socket that breaks after 600 ms of the reply's audio.
        .set("SIM_CEREBRAS_REPLY", reply)
        .set("SIM_CEREBRAS_TOKENS_PER_SEC", "3")
        .set("SIM_ELEVENLABS_TTS_BREAK_AFTER_CHUNKS", "6")
        .memory_off()
        .start()
        .await;
    let (id, call) = converse(&app, &user, &persona_id).await;
    let transcript = lines(&call);
    let said: Vec<&(String, String, bool)> = transcript
        .iter()
        .filter(|l| l.0 == "persona" && l.1 != "Hi.")
        .collect();
    assert_eq!(said.len(), 1, "{transcript:?}");
    let (_, text, cut) = said[0];
    // What was voiced before the break (600 ms at the simulator's rate), never the rest.
    assert!(*cut, "{transcript:?}");
    assert!(reply.starts_with(text.as_str()), "{text:?}");
    let timed = cmb_sims::elevenlabs::timings(reply, cmb_sims::elevenlabs::DEFAULT_MS_PER_CHAR);
    let n = text.chars().count();
    if n > 0 {
        let (_, start, duration) = timed[n - 1];
        assert!(
            start + duration <= 600,
            "{text:?} ends {} ms in",
            start + duration
        );
    }
    // The LLM was stopped: it streamed far fewer tokens than the reply's words (the first
    // sentence's 8, and what came while the break was noticed), well before the call ended.
    let llm = app.sims.cerebras.as_ref().unwrap();
    let words = reply.split_whitespace().count() as u64;
    assert!(
        llm.completion_tokens_total() < words - 10,
        "{} of {words} tokens streamed",
        llm.completion_tokens_total()
    );
    let turns = events_of(&app, &id, "TurnCompleted").await;
    assert_eq!(turns.len(), 1, "{turns:?}");
    assert_eq!(turns[0]["TurnCompleted"]["interrupted"], true, "{turns:?}");
    app.stop().await;
    env.cleanup().await;
}
