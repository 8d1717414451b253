//! The end of a session: every turn's timings, the costs as used and the transcript are
//! recorded, then the event that says the session ended.

use std::collections::HashMap;

use cmb_domain::call::{Call, CallCommand};
use cmb_domain::cost::{estimated_tokens, CostKind, LlmProvider};
use cmb_domain::{Actor, CommandContext};

use super::error::SessionError;
use super::outbound::Out;
use super::session::Session;
use crate::serve::transcripts;

impl Session {
    /// Records turns, costs and the transcript; closes the writer.
    pub(super) async fn finish(
        mut self,
        reason: String,
        billed_secs: Option<f64>,
    ) -> Result<(), SessionError> {
        if let Some(reply) = self.reply.take() {
            reply.task.abort();
            let heard = self.heard(&reply);
            let whole = heard.len() >= reply.text.len();
            self.close_reply(reply, heard, !whole);
        }
        let _ = self.out.send(Out::Close).await;
        let _ = (&mut self.writer).await;
        let store = &self.voice.store;
        let ctx_cmd = CommandContext::for_request(
            uuid::Uuid::new_v4().to_string(),
            Actor::Worker("voice".into()),
        );
        let id = self.ctx.call_id.to_string();
        let record = |command: CallCommand| {
            let ctx = ctx_cmd.clone();
            let id = id.clone();
            async move {
                if let Err(e) = store.execute::<Call>(&id, command, &ctx).await {
                    tracing::error!(call = %id, error = %e, "recording the voice session failed");
                }
            }
        };
        for (turn, timings, interrupted, provider, fell_back) in self.timings.clone() {
            record(CallCommand::RecordTurn {
                turn,
                timings,
                interrupted,
                llm_provider: provider.to_string(),
                fell_back,
            })
            .await;
        }
        // Costs as used: audio seconds, tokens per provider, characters — recorded with the
        // session's end, in one command, so a session's costs are recorded once.
        let p = self.ctx.prices;
        let audio_secs = billed_secs.unwrap_or_else(|| self.started.elapsed().as_secs_f64());
        let mut costs = vec![p.cost(
            CostKind::DeepgramStreamingStt,
            audio_secs.ceil() as i64,
            billed_secs.is_none(),
        )];
        let mut tokens: HashMap<LlmProvider, (i64, bool)> = HashMap::new();
        let mut chars = 0i64;
        for u in &self.usage {
            chars += u.tts_chars as i64;
            // The slower request of a hedge read the prompt too.
            for (provider, prompt) in &u.abandoned {
                if let Some(llm) = LlmProvider::from_name(provider) {
                    let entry = tokens.entry(llm).or_default();
                    entry.0 += *prompt as i64;
                    entry.1 = true;
                }
            }
            let Some(llm) = LlmProvider::from_name(u.provider) else {
                continue;
            };
            let (n, estimated) = if u.prompt_tokens + u.completion_tokens > 0 {
                ((u.prompt_tokens + u.completion_tokens) as i64, false)
            } else {
                // Cut off before the provider said: the prompt it read and the words it wrote.
                ((u.prompt_estimate + estimated_tokens(u.words)) as i64, true)
            };
            let entry = tokens.entry(llm).or_default();
            entry.0 += n;
            entry.1 |= estimated;
        }
        for (llm, (n, estimated)) in tokens {
            costs.push(p.cost(CostKind::ChatTokens(llm), n, estimated));
        }
        if chars > 0 {
            costs.push(p.cost(CostKind::TtsCharacters, chars, true));
        }
        // The caller's words embedded for persona knowledge (a request still out is not).
        let embedded = self
            .ctx
            .knowledge
            .as_ref()
            .map_or(0, |k| k.embedding_tokens());
        if embedded > 0 {
            costs.push(p.cost(CostKind::KnowledgeEmbeddingTokens, embedded as i64, false));
        }
        // The transcript first: the session's end event says everything is recorded.
        transcripts::save(store.pool(), self.ctx.call_id.uuid(), &self.transcript).await?;
        record(CallCommand::RecordSessionEnd {
            costs,
            turns: self.turns,
            barge_ins: self.barge_ins,
            early_replies: self.early_replies,
            reason: reason.clone(),
            greeting_ms: self.greeting_ms,
            barge_in_stop_ms: self.barge_in_stop_ms,
            first_audio_ms: {
                let mut e2e: Vec<u32> = self
                    .timings
                    .iter()
                    .filter_map(|t| t.1.first_audio_ms)
                    .collect();
                e2e.sort_unstable();
                let at = |p: f64| e2e[((e2e.len() - 1) as f64 * p).round() as usize];
                (!e2e.is_empty()).then(|| [at(0.5), at(0.9), at(0.99)])
            },
        })
        .await;
        tracing::info!(call = %self.ctx.call_id, turns = self.turns, barge_ins = self.barge_ins, %reason, "voice session ended");
        Ok(())
    }
}
