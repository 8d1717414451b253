//! Learns from each finished call what its persona should remember about the user: sends the
//! transcript and the current memory to the LLM (primary, then fallback) with an extraction
//! prompt, validates the JSON answer (a malformed or oversized one is asked again once, then
//! the call is skipped with the reason), embeds the new facts, and records it all on the
//! user × persona's memory aggregate. Its LLM tokens and embeddings are cost events on the
//! call. A call is digested once (`CallDigested`), however often its end is delivered.

use cmb_domain::call::{Call, CallCommand, CallEvent, Cost};
use cmb_domain::cost::{CostKind, LlmProvider};
use cmb_domain::memory::extraction::{self, Extraction};
use cmb_domain::memory::{memory_id, Digest, Fact, Memory, MemoryCommand};
use cmb_domain::persona::preference::{preference_id, Preference};
use cmb_domain::pricing::PriceTable;
use cmb_domain::{Actor, CommandContext, EventEnvelope};

use super::runner::{decode, Failure, NotACallId};
use crate::backbone::store::EventStore;
use cmb_providers::embeddings::Embeddings;
use cmb_providers::llm::{ChatMessage, ChatRequest, Llm, LlmChunk};

pub const NAME: &str = "memory";
/// The longest transcript sent for extraction, in characters (the end of a long call is kept).
const MAX_TRANSCRIPT_CHARS: usize = 12_000;

#[derive(Clone)]
pub struct MemoryWorker {
    pub store: EventStore,
    pub llm: Llm,
    pub fallback: Option<Llm>,
    pub embeddings: Embeddings,
}

/// Token use of the extraction, per provider.
#[derive(Default)]
struct Spent {
    tokens: Vec<(&'static str, i64, bool)>,
}

impl MemoryWorker {
    pub async fn handle(&self, event: EventEnvelope) -> Result<(), Failure> {
        let Some(CallEvent::VoiceSessionEnded { .. }) = decode(&event)? else {
            return Ok(());
        };
        self.digest_call(&event).await
    }

    /// Extracts what the call taught and records it on the memory (once per call).
    async fn digest_call(&self, event: &EventEnvelope) -> Result<(), Failure> {
        let call_id = event.aggregate_id.clone();
        let ctx = CommandContext::caused_by(event, Actor::Worker(NAME.into()));
        let (call, _) = self
            .store
            .load::<Call>(&call_id)
            .await
            .map_err(|e| Failure::retry(format!("loading call {call_id}"), e))?;
        let (Some(user), Some(persona)) = (call.user_id, call.persona_id.clone()) else {
            return Err(Failure::skip(format!(
                "call {call_id} has no owner or persona"
            )));
        };
        let (pref, _) = self
            .store
            .load::<Preference>(&preference_id(user, &persona))
            .await
            .map_err(|e| Failure::retry("loading the preference", e))?;
        if !pref.customization.unwrap_or_default().memory_enabled {
            return Ok(());
        }
        let id = memory_id(user, &persona);
        let (memory, _) = self
            .store
            .load::<Memory>(&id)
            .await
            .map_err(|e| Failure::retry(format!("loading memory {id}"), e))?;
        if memory.digested.contains(&call_id) {
            return Ok(());
        }
        let call_uuid = uuid::Uuid::parse_str(&call_id).map_err(|source| NotACallId {
            id: call_id.clone(),
            source,
        })?;
        let lines = crate::serve::transcripts::lines(self.store.pool(), call_uuid).await?;
        let execute = |command: MemoryCommand| async {
            self.store
                .execute::<Memory>(&id, command, &ctx)
                .await
                .map_err(|e| Failure::retry(format!("recording memory {id}"), e))
        };
        if !lines
            .iter()
            .any(|(s, t)| s == "caller" && !t.trim().is_empty())
        {
            execute(MemoryCommand::Skip {
                call_id: call_id.clone(),
                reason: "the caller said nothing".into(),
            })
            .await?;
            return Ok(());
        }
        let prompt = extraction_prompt(&memory, &lines);
        let mut spent = Spent::default();
        let mut outcome = Err("not tried".to_string());
        for attempt in 1..=2 {
            let answer = match self.complete(&prompt, &mut spent).await {
                Ok(a) => a,
                Err(e) => {
                    // Nothing usable from either LLM: try the whole message again later.
                    self.record_costs(&call_id, &call, &spent, 0, &ctx).await;
                    return Err(Failure::retry(
                        format!("memory extraction for {call_id}"),
                        e,
                    ));
                }
            };
            match extraction::parse(&answer) {
                Ok(x) => {
                    outcome = Ok(x);
                    break;
                }
                Err(e) => {
                    tracing::warn!(call = %call_id, attempt, error = %e, "memory extraction answer refused");
                    outcome = Err(e.to_string());
                }
            }
        }
        let mut embedding_tokens = 0;
        match outcome {
            Ok(x) => {
                let (digest, tokens) = self.digest(&call_id, &memory, x, event.occurred_at).await?;
                embedding_tokens = tokens;
                execute(MemoryCommand::Digest(digest)).await?;
            }
            Err(reason) => {
                tracing::warn!(call = %call_id, %reason, "memory extraction skipped after a retry");
                execute(MemoryCommand::Skip {
                    call_id: call_id.clone(),
                    reason,
                })
                .await?;
            }
        }
        self.record_costs(&call_id, &call, &spent, embedding_tokens, &ctx)
            .await;
        Ok(())
    }

    /// Ids for the new facts and items, and the facts' embeddings.
    async fn digest(
        &self,
        call_id: &str,
        memory: &Memory,
        x: Extraction,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(Digest, i64), Failure> {
        // A fact already remembered word for word is not learned again.
        let known: Vec<String> = memory
            .facts
            .iter()
            .map(|f| f.fact.text.to_lowercase())
            .collect();
        let new: Vec<(String, String)> = x
            .facts
            .into_iter()
            .filter(|(t, _)| !known.contains(&t.to_lowercase()))
            .collect();
        let texts: Vec<String> = new.iter().map(|(t, _)| t.clone()).collect();
        let embedded = self
            .embeddings
            .embed(&texts)
            .await
            .map_err(|e| Failure::retry("embedding facts", e))?;
        let facts = new
            .into_iter()
            .zip(embedded.vectors)
            .map(|((text, kind), embedding)| Fact {
                id: format!("f-{}", uuid::Uuid::now_v7().simple()),
                text,
                kind,
                at,
                embedding,
            })
            .collect();
        let digest = Digest {
            call_id: call_id.to_string(),
            facts,
            summary: x.summary,
            open_items: x
                .open_items
                .into_iter()
                .map(|t| (format!("o-{}", uuid::Uuid::now_v7().simple()), t))
                .collect(),
            closed_items: x.closed_items,
            at,
        };
        Ok((digest, embedded.prompt_tokens as i64))
    }

    /// One non-streamed answer (the stream collected), from the primary or else the fallback.
    async fn complete(&self, prompt: &[ChatMessage], spent: &mut Spent) -> Result<String, String> {
        let request = ChatRequest {
            messages: prompt.to_vec(),
            max_tokens: 1500,
            temperature: 0.0,
        };
        let mut errors = Vec::new();
        for llm in std::iter::once(&self.llm).chain(self.fallback.iter()) {
            match collect(llm, &request).await {
                Ok((text, tokens, estimated)) => {
                    spent.tokens.push((llm.provider(), tokens, estimated));
                    return Ok(text);
                }
                Err((e, tokens)) => {
                    if tokens > 0 {
                        spent.tokens.push((llm.provider(), tokens, true));
                    }
                    errors.push(e);
                }
            }
        }
        Err(errors.join("; then "))
    }

    async fn record_costs(
        &self,
        call_id: &str,
        call: &Call,
        spent: &Spent,
        embedding_tokens: i64,
        ctx: &CommandContext,
    ) {
        let p = call.prices.unwrap_or(PriceTable::LAUNCH);
        let mut costs: Vec<Cost> = spent
            .tokens
            .iter()
            .filter_map(|(provider, n, estimated)| {
                let llm = LlmProvider::from_name(provider)?;
                Some(p.cost(CostKind::MemoryExtractionTokens(llm), *n, *estimated))
            })
            .collect();
        if embedding_tokens > 0 {
            costs.push(p.cost(CostKind::MemoryEmbeddingTokens, embedding_tokens, false));
        }
        for cost in costs {
            if let Err(e) = self
                .store
                .execute::<Call>(call_id, CallCommand::RecordCost(cost), ctx)
                .await
            {
                tracing::error!(call = %call_id, error = %e, "recording a memory cost failed");
            }
        }
    }
}

/// The whole reply of a streamed completion: (text, tokens, estimated) or (error, tokens).
async fn collect(llm: &Llm, request: &ChatRequest) -> Result<(String, i64, bool), (String, i64)> {
    let mut rx = llm
        .stream(request)
        .await
        .map_err(|e| (format!("{}: {e}", llm.provider()), 0))?;
    let mut text = String::new();
    let mut usage = None;
    let estimate = |text: &str| {
        cmb_domain::cost::estimated_tokens(text.split_whitespace().count() as u64) as i64
    };
    loop {
        match rx.recv().await {
            Some(LlmChunk::Delta(d)) => text.push_str(&d),
            Some(LlmChunk::Usage {
                prompt_tokens,
                completion_tokens,
            }) => usage = Some(i64::from(prompt_tokens) + i64::from(completion_tokens)),
            Some(LlmChunk::Done) => break,
            Some(LlmChunk::Error(e)) => {
                return Err((format!("{}: {e}", llm.provider()), estimate(&text)))
            }
            None => {
                return Err((
                    format!("{}: stream ended early", llm.provider()),
                    estimate(&text),
                ))
            }
        }
    }
    match usage {
        Some(n) => Ok((text, n, false)),
        None => {
            let n = estimate(&text);
            Ok((text, n, true))
        }
    }
}

/// The extraction prompt: instructions, the current memory (items with their
/// ids, so the LLM can close them), and the transcript.
pub fn extraction_prompt(memory: &Memory, lines: &[(String, String)]) -> Vec<ChatMessage> {
    let system = format!(
        "You maintain what a phone companion remembers about the person it calls. \
         From the call transcript and the current memory, answer with strict JSON only, no \
         prose and no code fence, exactly of this shape:\n\
         {{\"facts\":[{{\"text\":\"…\",\"kind\":\"preference|person|goal|event|other\"}}],\
         \"summary\":\"…\",\"open_items\":[{{\"text\":\"…\"}}],\"closed_items\":[\"<open item id>\"]}}\n\
         facts: new lasting facts about the caller (at most {facts}, each under {chars} \
         characters, with dates where known), not ones already remembered. summary: the whole \
         relationship so far rewritten in at most {summary} characters. open_items: things to \
         follow up on next time (at most {items}). closed_items: ids of open items this call \
         resolved.",
        facts = extraction::MAX_FACTS,
        chars = extraction::MAX_ITEM_CHARS,
        summary = cmb_domain::memory::SUMMARY_MAX_CHARS,
        items = extraction::MAX_ITEMS,
    );
    let mut current = String::from("Current memory:\n");
    match &memory.summary {
        Some(s) => current.push_str(&format!("Summary: {s}\n")),
        None => current.push_str("Summary: (none yet)\n"),
    }
    for f in &memory.facts {
        current.push_str(&format!("Fact: {}\n", f.fact.text));
    }
    for o in &memory.open_items {
        current.push_str(&format!("Open item {}: {}\n", o.id, o.text));
    }
    let mut transcript: Vec<String> = lines
        .iter()
        .map(|(speaker, text)| {
            let who = if speaker == "caller" { "Caller" } else { "You" };
            format!("{who}: {text}")
        })
        .collect();
    // Keep the end of a long call within bounds.
    while transcript.iter().map(|l| l.len() + 1).sum::<usize>() > MAX_TRANSCRIPT_CHARS
        && transcript.len() > 1
    {
        transcript.remove(0);
    }
    vec![
        ChatMessage::new("system", &system),
        ChatMessage::new(
            "user",
            &format!("{current}\nTranscript:\n{}", transcript.join("\n"),),
        ),
    ]
}
