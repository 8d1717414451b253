//! Persona knowledge in a call: the persona's passages are loaded at session start (`load`)
//! into an in-process index that the persona's calls running at the same time share (one copy
//! however many of them run, built by the first, dropped with the last; a changed set of
//! documents is a new index); on each caller turn the best of them for what the caller said
//! are added to that reply's context within `KNOWLEDGE_PROMPT_TOKENS` (`for_turn`), ranked in
//! process (BM25 over stemmed words, fused with cosine against the passages' vectors). The
//! caller's words are embedded off the reply's path (`prefetch`): each interim transcript once it
//! has held still for [`SETTLE`] (a final segment at once), by one task per call with at most
//! one request in flight (newer words wait and replace older ones); the latest vector is used
//! only if it is there when the turn ends and its words are most of the turn's. Once the
//! embedded words have held still almost as long as the persona's endpointing (so the final is
//! probably next), the same task ranks the passages for them; a final transcript with the same
//! words reuses that ranking, and the turn's path does no ranking work at all; one with other
//! words (the caller said another after the last interim) ranks by its words there, fused with
//! the passages nearest the vector found ahead (the costly half, done). Otherwise the turn
//! ranks in full, a few hundred microseconds of CPU that a preempted thread can stretch to
//! milliseconds. No provider call ever waits in the reply's path. The embeddings' tokens are
//! billed to the call with the session's other costs (`embedding_tokens`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cmb_domain::knowledge::rank::{KnowledgeIndex, Near};
use cmb_domain::knowledge::DocumentStatus;
use cmb_domain::persona::Persona;
use cmb_domain::CallId;
use tokio::sync::watch;

use super::error::SessionError;
use super::indexes::Slot;
use super::shared::Voice;

/// Passages added to one reply, at most.
const PASSAGES_PER_TURN: usize = 3;

/// An interim transcript is embedded once no newer one came for this long (Deepgram sends a
/// new one every few hundred milliseconds while the caller talks; the one that holds still is
/// the caller pausing or done). Short beside any endpointing a persona may set (100 ms and up
/// after the last word, before the final) plus an embedding's round trip, so the vector is
/// usually there by the final.
const SETTLE: Duration = Duration::from_millis(150);

/// The passages are ranked ahead for embedded words once they have held still for the
/// persona's endpointing less this (the final transcript comes no sooner than the endpointing
/// after the last word): ready before the final, and once per pause rather than per interim.
const RANK_BEFORE_FINAL: Duration = Duration::from_millis(60);

/// A call's knowledge: its persona's passages, and the caller's words embedded so far.
pub(super) struct CallKnowledge {
    index: Arc<KnowledgeIndex>,
    /// This turn's number and words so far, for the embedding task (started on first use;
    /// it ends when this is dropped, with the session).
    said: OnceLock<watch::Sender<Said>>,
    /// The caller turns ended so far.
    turn: AtomicU64,
    /// The latest vector that came back.
    embedded: Arc<Mutex<Option<Embedded>>>,
    /// Tokens of every embedding of the caller's words, billed with the session's end.
    tokens: Arc<AtomicU64>,
    /// How long the caller's words hold still before the final comes (the persona's
    /// endpointing): when to rank ahead.
    endpointing: Duration,
}

#[derive(Clone, Default, PartialEq)]
struct Said {
    turn: u64,
    text: String,
    /// A final segment: embedded at once.
    settled: bool,
}

struct Embedded {
    turn: u64,
    text: String,
    vector: Vec<f32>,
    /// The passages ranked ahead for `text` with `vector`, once its words held still, and
    /// the vector's half of that ranking (the passages nearest it).
    ranked: Option<(Ranked, Near)>,
}

/// A ranking made ahead of the turn's end: what [`Retrieved`] carries of it.
struct Ranked {
    note: Option<String>,
    ids: Vec<String>,
}

impl Ranked {
    fn of(hits: &[cmb_domain::knowledge::rank::Hit<'_>]) -> Ranked {
        Ranked {
            note: (!hits.is_empty()).then(|| note(hits)),
            ids: hits.iter().map(|h| h.passage.id.clone()).collect(),
        }
    }
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
    let endpointing = Duration::from_millis(u64::from(persona.turn_taking.endpointing_ms));
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
        said: OnceLock::new(),
        turn: AtomicU64::new(0),
        embedded: Arc::default(),
        tokens: Arc::default(),
        endpointing,
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
    /// The thread's CPU time for it, in microseconds (`us` less this: preempted).
    pub cpu_us: u32,
    /// Whether the caller's words were embedded in time (cosine fused with the words' rank).
    pub with_vector: bool,
    /// Whether the passages were ranked ahead, for the same words, off the turn's path.
    pub preranked: bool,
}

/// Where a call's knowledge work is billed and logged.
pub(super) struct ForCall<'a> {
    pub voice: &'a Arc<Voice>,
    pub call_id: CallId,
}

impl CallKnowledge {
    /// The caller's words so far in this turn (`text`: what is pending of it and the new
    /// segment), to be embedded in the background once they hold still. A segment that ends
    /// the turn (`speech_final`) is not: the passages are chosen at once.
    pub(super) fn prefetch(
        &self,
        text: String,
        is_final: bool,
        ends_turn: bool,
        call: ForCall<'_>,
    ) {
        if ends_turn {
            return;
        }
        let said = Said {
            turn: self.turn.load(Ordering::Relaxed),
            text,
            settled: is_final,
        };
        let sender = self.said.get_or_init(|| {
            let (tx, rx) = watch::channel(Said::default());
            tokio::spawn(embed_task(
                call.voice.clone(),
                call.call_id.to_string(),
                rx,
                Ahead {
                    index: self.index.clone(),
                    still: self
                        .endpointing
                        .saturating_sub(RANK_BEFORE_FINAL)
                        .max(SETTLE),
                },
                self.embedded.clone(),
                self.tokens.clone(),
            ));
            tx
        });
        sender.send_if_modified(|now| {
            let changed = *now != said;
            *now = said;
            changed
        });
    }

    /// Tokens the embeddings of the caller's words took so far.
    pub(super) fn embedding_tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }

    /// The passages for the reply to `text`. Measured (`cmb_knowledge_retrieval_us`, and the
    /// turn's timings): it sits on the turn's path.
    pub(super) fn for_turn(&self, text: &str, call: ForCall<'_>) -> Retrieved {
        let started = std::time::Instant::now();
        let cpu_started = crate::telemetry::thread_cpu_ns();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let embedded = self
            .embedded
            .lock()
            .expect("embedded")
            .take()
            .filter(|e| e.turn == turn && covers(&e.text, text));
        let budget = call.voice.knowledge.prompt_tokens;
        let (ranked, with_vector, preranked) = match embedded {
            // Ranked ahead for these very words: nothing to do here.
            Some(Embedded {
                ranked: Some((ranked, near)),
                text: ahead,
                ..
            }) => {
                if words(&ahead) == words(text) {
                    (ranked, true, true)
                } else {
                    // Other words (a word or two more): ranked by them now, fused with the
                    // passages nearest the vector found ahead — the costly half is done.
                    let hits = self
                        .index
                        .search_near(text, Some(&near), PASSAGES_PER_TURN, budget);
                    (Ranked::of(&hits), true, false)
                }
            }
            embedded => {
                let vector = embedded.map(|e| e.vector);
                let hits = self
                    .index
                    .search(text, vector.as_deref(), PASSAGES_PER_TURN, budget);
                (Ranked::of(&hits), vector.is_some(), false)
            }
        };
        let took = started.elapsed();
        let cpu_us = crate::telemetry::thread_cpu_ns().saturating_sub(cpu_started) / 1_000;
        metrics::histogram!("cmb_knowledge_retrieval_us").record(took.as_micros() as f64);
        metrics::histogram!("cmb_knowledge_retrieval_cpu_us").record(cpu_us as f64);
        tracing::debug!(call = %call.call_id, us = took.as_micros() as u64, found = ranked.ids.len(), with_vector, preranked, "knowledge retrieval");
        Retrieved {
            note: ranked.note,
            ids: ranked.ids,
            us: u32::try_from(took.as_micros()).unwrap_or(u32::MAX),
            cpu_us: u32::try_from(cpu_us).unwrap_or(u32::MAX),
            with_vector,
            preranked,
        }
    }
}

/// What the embedding task needs to rank ahead: the call's index, and how long the words must
/// hold still first.
struct Ahead {
    index: Arc<KnowledgeIndex>,
    still: Duration,
}

/// Embeds what the caller said, as it changes: a final segment at once, an interim once it has
/// held still for [`SETTLE`]; one request at a time (what came meanwhile is the next one, the
/// latest words only). Once the embedded words have held still for `ahead.still`, ranks the
/// passages for them (see [`CallKnowledge::for_turn`]). Ends with the call's session.
async fn embed_task(
    voice: Arc<Voice>,
    call_id: String,
    mut said: watch::Receiver<Said>,
    ahead: Ahead,
    embedded: Arc<Mutex<Option<Embedded>>>,
    tokens: Arc<AtomicU64>,
) {
    let mut last = Said::default();
    // Newer words came while waiting to rank: handled without waiting for another change.
    let mut pending = false;
    loop {
        if !std::mem::take(&mut pending) && said.changed().await.is_err() {
            return;
        }
        // When the words last changed.
        let mut since = tokio::time::Instant::now();
        // Wait for the words to hold still.
        while !said.borrow_and_update().settled {
            tokio::select! {
                _ = tokio::time::sleep(SETTLE) => break,
                changed = said.changed() => {
                    if changed.is_err() { return }
                    since = tokio::time::Instant::now();
                }
            }
        }
        let now = said.borrow_and_update().clone();
        if now.text.is_empty() || (now.turn == last.turn && words(&now.text) == words(&last.text)) {
            continue;
        }
        last = now.clone();
        let vector = match voice
            .knowledge
            .embeddings
            .embed(std::slice::from_ref(&now.text))
            .await
        {
            Ok(mut e) if e.vectors.len() == 1 => {
                tokens.fetch_add(e.prompt_tokens, Ordering::Relaxed);
                e.vectors.pop().unwrap_or_default()
            }
            Ok(e) => {
                tokens.fetch_add(e.prompt_tokens, Ordering::Relaxed);
                continue;
            }
            Err(e) => {
                tracing::debug!(call = %call_id, error = %e, "embedding the caller's words failed; full-text only");
                continue;
            }
        };
        *embedded.lock().expect("embedded") = Some(Embedded {
            turn: now.turn,
            text: now.text.clone(),
            vector: vector.clone(),
            ranked: None,
        });
        // The words held still this long: the final is probably next, rank for them now.
        tokio::select! {
            _ = tokio::time::sleep_until(since + ahead.still) => {}
            changed = said.changed() => {
                if changed.is_err() { return }
                pending = true;
                continue;
            }
        }
        let near = ahead.index.near(&vector);
        let hits = ahead.index.search_near(
            &now.text,
            Some(&near),
            PASSAGES_PER_TURN,
            voice.knowledge.prompt_tokens,
        );
        let ranked = (Ranked::of(&hits), near);
        // Unless the turn ended meanwhile (its vector taken) or newer words replaced these.
        if let Some(e) = embedded
            .lock()
            .expect("embedded")
            .as_mut()
            .filter(|e| e.turn == now.turn && e.text == now.text)
        {
            e.ranked = Some(ranked);
        }
    }
}

/// Lower-cased words, without punctuation.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Whether a vector of `embedded` stands for `turn`: their words agree from the start over
/// at least two thirds of the longer (an interim is often a word or two short of the final).
fn covers(embedded: &str, turn: &str) -> bool {
    let (e, t) = (words(embedded), words(turn));
    let same = e.iter().zip(&t).take_while(|(a, b)| a == b).count();
    same > 0 && 3 * same >= 2 * e.len().max(t.len())
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
