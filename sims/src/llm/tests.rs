//! The LLM client against the simulator on loopback.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use cmb_providers::llm::{ChatMessage, ChatRequest, Llm, LlmChunk};
use cmb_providers::ProviderError;

fn settings(name: &'static str, vars: &[(&str, &str)]) -> Settings {
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Settings::from_lookup(name, &|k| {
        vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    })
}

async fn start(sim: &LlmSim) -> (String, CancellationToken) {
    let shutdown = CancellationToken::new();
    let url = crate::serve("llm", sim.router(), shutdown.clone(), &TaskTracker::new())
        .await
        .unwrap();
    (url, shutdown)
}

fn request(user: &str) -> ChatRequest {
    ChatRequest {
        messages: vec![
            ChatMessage::new("system", "You are a warm friend on the phone."),
            ChatMessage::new("user", user),
        ],
        max_tokens: 200,
        temperature: 0.7,
    }
}

/// Everything until `Done` or `Error` (included).
async fn collect(mut rx: mpsc::Receiver<LlmChunk>) -> Vec<LlmChunk> {
    let mut out = Vec::new();
    while let Some(c) = rx.recv().await {
        let last = matches!(c, LlmChunk::Done | LlmChunk::Error(_));
        out.push(c);
        if last {
            break;
        }
    }
    out
}

fn text(chunks: &[LlmChunk]) -> String {
    chunks
        .iter()
        .filter_map(|c| match c {
            LlmChunk::Delta(t) => Some(t.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn cerebras_stream_reassembles_with_usage_and_first_token_latency() {
    let sim = LlmSim::new(settings(
        "CEREBRAS",
        &[("SIM_CEREBRAS_FIRST_TOKEN_MS", "200")],
    ));
    let (url, _stop) = start(&sim).await;
    let llm = Llm::cerebras(cmb_providers::http_client(), &url, "key", "llama-3.3-70b");
    assert_eq!(llm.provider(), "cerebras");
    let started = Instant::now();
    let mut rx = llm
        .stream(&request("I  had a long day at work"))
        .await
        .unwrap();
    let first = rx.recv().await.unwrap();
    let first_token = started.elapsed();
    assert!(matches!(first, LlmChunk::Delta(_)), "{first:?}");
    assert!(first_token >= Duration::from_millis(200), "{first_token:?}");
    assert!(first_token < Duration::from_millis(1500), "{first_token:?}");
    let mut chunks = vec![first];
    chunks.extend(collect(rx).await);

    let expected = reply_for(&[("user".into(), "I had a long day at work".into())]);
    assert_eq!(
        expected,
        "Got it: \"I had a long day at work\". That sounds important to you. Tell me more about it."
    );
    assert_eq!(text(&chunks), expected);
    let words = expected.split_inclusive(' ').count() as u32;
    // (8 + 7) words × 4/3 = 20.
    let usage = LlmChunk::Usage {
        prompt_tokens: 20,
        completion_tokens: words,
    };
    assert!(chunks.contains(&usage), "{chunks:?}");
    assert_eq!(chunks.last(), Some(&LlmChunk::Done));
    assert!(!chunks.iter().any(|c| matches!(c, LlmChunk::Error(_))));
    assert_eq!(sim.requests(), 1);
    assert_eq!(sim.completion_tokens_total(), u64::from(words));
    assert_eq!(sim.prompt_tokens_total(), 20);
}

#[tokio::test]
async fn openai_base_url_with_v1_and_cerebras_without_both_reach_the_route() {
    let sim = LlmSim::new(settings(
        "OPENAI",
        &[
            ("SIM_OPENAI_FIRST_TOKEN_MS", "0"),
            ("SIM_OPENAI_REPLY", "Fixed reply here."),
        ],
    ));
    let (url, _stop) = start(&sim).await;
    let openai = Llm::openai(
        cmb_providers::http_client(),
        &format!("{url}/v1/"),
        "k",
        "gpt-4o-mini",
    );
    assert_eq!(openai.provider(), "openai");
    let chunks = collect(openai.stream(&request("hello")).await.unwrap()).await;
    assert_eq!(text(&chunks), "Fixed reply here.");
    let cerebras = Llm::cerebras(cmb_providers::http_client(), &format!("{url}/"), "k", "m");
    let chunks = collect(cerebras.stream(&request("hello")).await.unwrap()).await;
    assert_eq!(chunks.last(), Some(&LlmChunk::Done));
    assert_eq!(sim.requests(), 2);
}

#[tokio::test]
async fn bad_key_is_401_not_retryable_and_fail_every_is_500_retryable() {
    let sim = LlmSim::new(settings(
        "OPENAI",
        &[
            ("SIM_OPENAI_FAIL_EVERY", "2"),
            ("SIM_OPENAI_FIRST_TOKEN_MS", "0"),
        ],
    ));
    let (url, _stop) = start(&sim).await;
    let base = format!("{url}/v1");
    let http = cmb_providers::http_client();
    let bad = Llm::openai(http.clone(), &base, "", "gpt-4o-mini");
    match bad.stream(&request("hi")).await {
        Err(e @ ProviderError::Status { status: 401, .. }) => {
            assert!(!e.retryable());
            assert!(e.to_string().contains("Incorrect API key"), "{e}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    let good = Llm::openai(http, &base, "key", "gpt-4o-mini");
    match good.stream(&request("hi")).await {
        Err(e @ ProviderError::Status { status: 500, .. }) => {
            assert!(e.retryable());
            assert!(e.to_string().contains("injected failure"), "{e}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    let chunks = collect(good.stream(&request("hi")).await.unwrap()).await;
    assert_eq!(chunks.last(), Some(&LlmChunk::Done));
}

#[tokio::test]
async fn dropping_the_receiver_stops_the_server_stream() {
    let sim = LlmSim::new(settings(
        "CEREBRAS",
        &[
            ("SIM_CEREBRAS_FIRST_TOKEN_MS", "0"),
            ("SIM_CEREBRAS_TOKENS_PER_SEC", "20"),
        ],
    ));
    let (url, _stop) = start(&sim).await;
    let llm = Llm::cerebras(cmb_providers::http_client(), &url, "key", "m");
    let long = "word ".repeat(100);
    let mut rx = llm.stream(&request(&long)).await.unwrap();
    assert!(matches!(rx.recv().await, Some(LlmChunk::Delta(_))));
    assert_eq!(sim.active_streams(), 1);
    drop(rx);
    let deadline = Instant::now() + Duration::from_secs(3);
    while sim.active_streams() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sim.active_streams(), 0, "the server kept streaming");
    let sent = sim.completion_tokens_total();
    assert!(sent < 20, "{sent} tokens sent after a drop");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sim.completion_tokens_total(), sent);
    assert_eq!(sim.requests(), 1);
}

#[tokio::test]
async fn a_stall_ends_in_an_error_after_the_idle_timeout() {
    let sim = LlmSim::new(settings("OPENAI", &[("SIM_OPENAI_STALL_EVERY", "1")]));
    let (url, _stop) = start(&sim).await;
    let llm = Llm::openai(cmb_providers::http_client(), &format!("{url}/v1"), "k", "m")
        .with_idle_timeout(Duration::from_millis(300));
    let chunks = collect(llm.stream(&request("hi")).await.unwrap()).await;
    assert!(
        matches!(chunks.as_slice(), [LlmChunk::Error(e)] if e.contains("stalled")),
        "{chunks:?}"
    );
}

#[test]
fn max_tokens_and_empty_messages() {
    assert_eq!(prompt_tokens(&[("user".into(), "a b c".into())]), 4);
    assert!(parse_messages(&json!({ "messages": [] })).is_none());
    assert!(parse_messages(&json!({})).is_none());
}

#[test]
fn a_reply_draws_on_the_turns_context_but_not_on_the_instructions() {
    let messages = |context: &str| {
        vec![
            (
                "system".to_string(),
                "You are a coach. The gym closes at ten.".to_string(),
            ),
            ("system".to_string(), context.to_string()),
            (
                "user".to_string(),
                "When does the gym open on Sundays?".to_string(),
            ),
        ]
    };
    let reply = reply_for(&messages(
        "Notes:\n[FAQ] We sell water. On Sundays the gym opens at nine.",
    ));
    assert_eq!(
        reply,
        "Good question. On Sundays the gym opens at nine. Does that help?"
    );
    // One shared word is not enough, and the instructions are not context.
    let reply = reply_for(&messages("Notes:\n[FAQ] The pool is heated."));
    assert!(reply.starts_with("Got it:"), "{reply}");
}
