//! What every voice session of the instance shares: the providers' clients, the settings, the
//! cache of fixed phrases and the outbound pacing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cmb_domain::call::{Call, CallCommand};
use cmb_domain::cost::CostKind;
use cmb_domain::pricing::PriceTable;
use cmb_domain::system_cost::{RecordSystemCost, SystemCost};
use cmb_domain::{Actor, CommandContext};
use cmb_providers::deepgram::Deepgram;
use cmb_providers::elevenlabs::ElevenLabs;
use cmb_providers::llm::Llm;
use cmb_providers::twilio::Twilio;
use cmb_providers::ProviderError;

use super::outbound::Pacing;
use crate::backbone::store::EventStore;
use crate::clock::Clock;

#[derive(Debug, Clone)]
pub struct VoiceSettings {
    pub tts_model: String,
    /// A reply whose first token is later than this switches to the fallback LLM.
    pub first_token_timeout: Duration,
    pub max_reply_tokens: u32,
    pub warning_before_end: Duration,
}

/// What a session needs, shared by every session of the instance.
pub struct Voice {
    pub store: EventStore,
    pub deepgram: Deepgram,
    pub llm: Llm,
    pub fallback: Option<Llm>,
    pub elevenlabs: ElevenLabs,
    pub twilio: Twilio,
    pub clock: Clock,
    pub settings: VoiceSettings,
    /// Synthesised fixed phrases (greetings, reminders), by voice and text.
    pub tts_cache: Mutex<HashMap<(String, String), Bytes>>,
    pub pacing: Arc<Pacing>,
    /// How much of the prompt memory may take, in tokens (`MEMORY_PROMPT_TOKENS`).
    pub memory_prompt_tokens: usize,
    pub knowledge: KnowledgeSettings,
    /// Mints and checks the media-stream tokens of the answer TwiML (`super::tokens`).
    pub stream_tokens: super::tokens::StreamTokens,
    /// Which live sessions' calls have ended (one event-log query for all of them).
    pub call_ends: Arc<super::guard::CallEnds>,
}

/// Persona knowledge in calls (see `super::knowledge`).
#[derive(Clone)]
pub struct KnowledgeSettings {
    /// Embeds the caller's words, off the reply's path.
    pub embeddings: cmb_providers::embeddings::Embeddings,
    /// How much of a reply's context passages may take (`KNOWLEDGE_PROMPT_TOKENS`).
    pub prompt_tokens: usize,
    /// The most passages a call loads (`KNOWLEDGE_SESSION_PASSAGES`).
    pub session_passages: usize,
    /// The personas' indexes, shared by their calls.
    pub indexes: Arc<super::indexes::SharedIndexes>,
}

impl Voice {
    /// Audio for a fixed phrase, from the cache or synthesised once (the greeting is warmed
    /// while the phone rings), and the characters this call to it was billed (0 from cache).
    pub async fn phrase(&self, voice_id: &str, text: &str) -> Result<(Bytes, u64), ProviderError> {
        let key = (voice_id.to_string(), text.to_string());
        if let Some(audio) = self.tts_cache.lock().expect("cache").get(&key) {
            return Ok((audio.clone(), 0));
        }
        let audio = self
            .elevenlabs
            .synthesize(voice_id, &self.settings.tts_model, text)
            .await?;
        self.tts_cache
            .lock()
            .expect("cache")
            .insert(key, audio.clone());
        Ok((audio, text.chars().count() as u64))
    }

    /// Records provider usage that no call pays for (a start-up greeting for the cache, a
    /// voice check): a `system_cost` of its own, priced by the table in force.
    pub async fn record_system_cost(
        &self,
        purpose: &str,
        subject: &str,
        kind: CostKind,
        quantity: i64,
    ) {
        let prices = match crate::usecases::prices::current(&self.store, self.clock.now()).await {
            Ok(prices) => prices,
            Err(e) => {
                tracing::warn!(error = %e, "no price table; the launch prices are used");
                PriceTable::LAUNCH
            }
        };
        let ctx = CommandContext::for_request(
            uuid::Uuid::new_v4().to_string(),
            Actor::Worker("voice".into()),
        );
        let command = RecordSystemCost {
            purpose: purpose.into(),
            subject: subject.into(),
            cost: prices.cost(kind, quantity, false),
        };
        if let Err(e) = self
            .store
            .execute::<SystemCost>(&uuid::Uuid::new_v4().to_string(), command, &ctx)
            .await
        {
            tracing::warn!(error = %e, purpose, "recording a system cost failed");
        }
    }

    /// Synthesises persona's greeting for call `call_id` (usually cached already); when it
    /// was synthesised for this call, its cost is this call's.
    pub async fn warm_greeting(
        self: Arc<Self>,
        call_id: String,
        prices: PriceTable,
        voice_id: String,
        greeting: String,
    ) {
        match self.phrase(&voice_id, &greeting).await {
            Ok((_, chars)) if chars > 0 => {
                let cost = prices.cost(CostKind::TtsCharacters, chars as i64, false);
                let ctx = CommandContext::for_request(
                    uuid::Uuid::new_v4().to_string(),
                    Actor::Worker("voice".into()),
                );
                if let Err(e) = self
                    .store
                    .execute::<Call>(&call_id, CallCommand::RecordCost(cost), &ctx)
                    .await
                {
                    tracing::warn!(error = %e, "recording the greeting's cost failed");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "greeting pre-synthesis failed"),
        }
    }
}
