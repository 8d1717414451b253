//! Persona knowledge in a call: the persona's passages are loaded once at session start
//! (`load`); on each caller turn the best of them for what the caller said are added to that
//! reply's context within `KNOWLEDGE_PROMPT_TOKENS` (`for_turn`), ranked in process (BM25 over
//! stemmed words, fused with cosine against the passages' vectors). The caller's words are
//! embedded off the reply's path as soon as the transcript is stable (`prefetch`: a final
//! segment, or an interim seen twice); the vector is used only if it is there when the turn
//! ends. No provider call ever waits in the reply's path.

use std::sync::{Arc, Mutex};

use cmb_domain::call::{Call, CallCommand};
use cmb_domain::cost::CostKind;
use cmb_domain::knowledge::rank::KnowledgeIndex;
use cmb_domain::persona::Persona;
use cmb_domain::pricing::PriceTable;
use cmb_domain::{Actor, CommandContext};

use super::error::SessionError;
use super::shared::Voice;

/// Passages added to one reply, at most.
const PASSAGES_PER_TURN: usize = 3;

/// A call's knowledge: its passages, and the caller's words embedded so far.
pub(super) struct CallKnowledge {
    index: KnowledgeIndex,
    state: Arc<Mutex<Prefetch>>,
}

#[derive(Default)]
struct Prefetch {
    /// The last interim transcript seen (an interim seen twice is stable).
    last_interim: String,
    /// The last text sent to be embedded.
    requested: String,
    /// The latest (text, vector) that came back.
    embedded: Option<(String, Vec<f32>)>,
}

/// The persona's passages for a call (none when it has no indexed document).
pub(super) async fn load(
    voice: &Voice,
    persona_id: &str,
    persona: &Persona,
) -> Result<Option<CallKnowledge>, SessionError> {
    let loaded = crate::usecases::knowledge::passages(
        voice.store.pool(),
        persona_id,
        persona,
        voice.knowledge.session_passages,
    )
    .await?;
    if loaded.passages.is_empty() {
        return Ok(None);
    }
    if loaded.left_out > 0 {
        tracing::info!(persona = %persona_id, loaded = loaded.passages.len(), left_out = loaded.left_out, "knowledge passages beyond KNOWLEDGE_SESSION_PASSAGES left out of the call");
    }
    Ok(Some(CallKnowledge {
        index: KnowledgeIndex::new(loaded.passages),
        state: Arc::default(),
    }))
}

/// Where a call's knowledge work is billed and logged.
pub(super) struct ForCall<'a> {
    pub voice: &'a Arc<Voice>,
    pub call_id: &'a str,
    pub prices: PriceTable,
}

impl CallKnowledge {
    /// Embeds the caller's words so far (`text`: what is pending of the turn and the new
    /// segment) when they are stable, in the background.
    pub(super) fn prefetch(&self, text: String, is_final: bool, call: ForCall<'_>) {
        let k = self;
        {
            let mut state = k.state.lock().expect("knowledge state");
            let stable = is_final || state.last_interim == text;
            if !is_final {
                state.last_interim = text.clone();
            }
            if !stable || state.requested == text {
                return;
            }
            state.requested = text.clone();
        }
        let state = k.state.clone();
        let voice = call.voice.clone();
        let call_id = call.call_id.to_string();
        let prices = call.prices;
        tokio::spawn(async move {
            match voice
                .knowledge
                .embeddings
                .embed(std::slice::from_ref(&text))
                .await
            {
                Ok(mut e) if e.vectors.len() == 1 => {
                    let vector = e.vectors.pop().unwrap_or_default();
                    state.lock().expect("knowledge state").embedded = Some((text, vector));
                    if e.prompt_tokens > 0 {
                        let cost = prices.cost(
                            CostKind::KnowledgeEmbeddingTokens,
                            e.prompt_tokens as i64,
                            false,
                        );
                        let ctx = CommandContext::for_request(
                            uuid::Uuid::new_v4().to_string(),
                            Actor::Worker("voice".into()),
                        );
                        if let Err(e) = voice
                            .store
                            .execute::<Call>(&call_id, CallCommand::RecordCost(cost), &ctx)
                            .await
                        {
                            tracing::warn!(call = %call_id, error = %e, "recording a knowledge embedding's cost failed");
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(call = %call_id, error = %e, "embedding the caller's words failed; full-text only")
                }
            }
        });
    }

    /// The passages for the reply to `text`, as a note for the LLM, and their ids for the
    /// transcript. Measured (`cmb_knowledge_retrieval_us`): it sits on the turn's path.
    pub(super) fn for_turn(&self, text: &str, call: ForCall<'_>) -> Option<(String, Vec<String>)> {
        let k = self;
        let started = std::time::Instant::now();
        let vector = {
            let mut state = k.state.lock().expect("knowledge state");
            let ready = state
                .embedded
                .take()
                .filter(|(t, _)| !t.is_empty() && text.starts_with(t.as_str()));
            *state = Prefetch::default();
            ready.map(|(_, v)| v)
        };
        let hits = k.index.search(
            text,
            vector.as_deref(),
            PASSAGES_PER_TURN,
            call.voice.knowledge.prompt_tokens,
        );
        let took = started.elapsed();
        metrics::histogram!("cmb_knowledge_retrieval_us").record(took.as_micros() as f64);
        tracing::debug!(call = %call.call_id, us = took.as_micros() as u64, found = hits.len(), with_vector = vector.is_some(), "knowledge retrieval");
        if hits.is_empty() {
            return None;
        }
        let ids = hits.iter().map(|h| h.passage.id.clone()).collect();
        Some((note(&hits), ids))
    }
}

/// The context note for a reply: the passages with their sources.
fn note(hits: &[cmb_domain::knowledge::rank::Hit<'_>]) -> String {
    let mut out = String::from(
        "From your own notes (use what helps answer the caller, in your own words; don't read it out):",
    );
    for h in hits {
        let p = h.passage;
        let source = match &p.heading {
            Some(heading) => format!("{} — {heading}", p.document_title),
            None => p.document_title.clone(),
        };
        out.push_str(&format!("\n[{source}] {}", p.text.replace('\n', " ")));
    }
    out
}
