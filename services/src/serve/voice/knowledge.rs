//! Persona knowledge in a call: the persona's passages are loaded at session start (`load`)
//! into an in-process index that the persona's calls running at the same time share (one copy
//! however many of them run, built by the first, dropped with the last; a changed set of
//! documents is a new index); on each caller turn the best of them for what the caller said
//! are added to that reply's context within `KNOWLEDGE_PROMPT_TOKENS` (`for_turn`), ranked in
//! process (BM25 over stemmed words, fused with cosine against the passages' vectors). The
//! caller's words are embedded off the reply's path as soon as the transcript is stable
//! (`prefetch`: a final segment, or an interim seen twice); the vector is used only if it is
//! there when the turn ends. No provider call ever waits in the reply's path.

use std::sync::{Arc, Mutex};

use cmb_domain::call::{Call, CallCommand};
use cmb_domain::cost::CostKind;
use cmb_domain::knowledge::rank::KnowledgeIndex;
use cmb_domain::knowledge::DocumentStatus;
use cmb_domain::persona::Persona;
use cmb_domain::pricing::PriceTable;
use cmb_domain::{Actor, CommandContext};

use super::error::SessionError;
use super::indexes::Slot;
use super::shared::Voice;

/// Passages added to one reply, at most.
const PASSAGES_PER_TURN: usize = 3;

/// A call's knowledge: its persona's passages, and the caller's words embedded so far.
pub(super) struct CallKnowledge {
    index: Arc<KnowledgeIndex>,
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

/// What a call's index is built from: the persona's indexed documents (an id is never reused
/// for other text), what ranks them at load, and how many are loaded. `None`: no document.
fn index_key(persona: &Persona, limit: usize) -> Option<String> {
    let mut ids: Vec<&str> = persona
        .knowledge
        .iter()
        .filter(|d| matches!(d.status, DocumentStatus::Indexed { .. }))
        .map(|d| d.document.document_id.as_str())
        .collect();
    if ids.is_empty() {
        return None;
    }
    ids.sort_unstable();
    Some(format!(
        "{limit}\n{}\n{}\n{}\n{}",
        ids.join(","),
        persona.name,
        persona.description,
        persona.tags.join(",")
    ))
}

/// The persona's passages for a call (none when it has no indexed document): the index its
/// calls share, loaded and built if none is up to date.
pub(super) async fn load(
    voice: &Voice,
    persona_id: &str,
    persona: &Persona,
) -> Result<Option<CallKnowledge>, SessionError> {
    let limit = voice.knowledge.session_passages;
    let Some(key) = index_key(persona, limit) else {
        return Ok(None);
    };
    let slot = voice.knowledge.indexes.slot(persona_id);
    let mut slot = slot.lock().await;
    let index = match slot.index.upgrade().filter(|_| slot.key == key) {
        Some(index) => index,
        None => {
            let loaded = crate::usecases::knowledge::passages(
                voice.store.pool(),
                persona_id,
                persona,
                limit,
            )
            .await?;
            if loaded.passages.is_empty() {
                return Ok(None);
            }
            if loaded.left_out > 0 {
                tracing::info!(persona = %persona_id, loaded = loaded.passages.len(), left_out = loaded.left_out, "knowledge passages beyond KNOWLEDGE_SESSION_PASSAGES left out of the calls");
            }
            // Thousands of passages take milliseconds to index: off the runtime's threads.
            let passages = loaded.passages;
            let index = tokio::task::spawn_blocking(move || KnowledgeIndex::new(passages))
                .await
                .map(Arc::new)
                .map_err(|e| SessionError::Knowledge(e.to_string()))?;
            *slot = Slot {
                key,
                index: Arc::downgrade(&index),
            };
            index
        }
    };
    Ok(Some(CallKnowledge {
        index,
        state: Arc::default(),
    }))
}

/// What a caller's turn drew from the persona's knowledge.
pub(super) struct Retrieved {
    /// The passages as a note for the LLM (`None`: nothing matched).
    pub note: Option<String>,
    /// Their ids, for the transcript.
    pub ids: Vec<String>,
    /// How long choosing them took, in microseconds.
    pub us: u32,
    /// Whether the caller's words were embedded in time (cosine fused with the words' rank).
    pub with_vector: bool,
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

    /// The passages for the reply to `text`. Measured (`cmb_knowledge_retrieval_us`, and the
    /// turn's timings): it sits on the turn's path.
    pub(super) fn for_turn(&self, text: &str, call: ForCall<'_>) -> Retrieved {
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
        Retrieved {
            note: (!hits.is_empty()).then(|| note(&hits)),
            ids: hits.iter().map(|h| h.passage.id.clone()).collect(),
            us: u32::try_from(took.as_micros()).unwrap_or(u32::MAX),
            with_vector: vector.is_some(),
        }
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
