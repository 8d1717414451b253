//! What a call costs us: one [`Cost`] line per use of a provider, of a [`CostKind`]
//! (provider × operation × unit), priced by the call's price table
//! ([`crate::pricing::PriceTable::cost`]). The names are the ones production records; the
//! live session, the workers, `simulate` and `synthetic` all go through here, so simulated
//! histories look like production.

use serde::{Deserialize, Serialize};

fn one() -> i64 {
    1
}

/// A billable use of a provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cost {
    /// `twilio`, `deepgram`, `cerebras`, `openai`, `elevenlabs`.
    pub service: String,
    pub operation: String,
    pub quantity: i64,
    pub unit: String,
    /// The rate: `unit_cost_micros` per `per_units` units (e.g. per 1,000,000 tokens).
    pub unit_cost_micros: i64,
    #[serde(default = "one")]
    pub per_units: i64,
    /// `quantity × unit_cost_micros / per_units`, rounded half up once, here.
    pub total_micros: i64,
    /// True when counted by us rather than reported by the provider.
    pub estimated: bool,
    /// Set on a figure taken from a provider's bill (`replay reconcile --record`): the bill's
    /// reference for the call (our call id or the provider's own, e.g. a CallSid). For that
    /// call and provider, billed lines replace every other cost line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billed_reference: Option<String>,
}

impl Cost {
    /// A cost line at a rate, rounded once (half up) to the micro-dollar. Lines of a
    /// [`CostKind`] come from `PriceTable::cost`; this is for figures with a rate of their own
    /// (a provider's bill).
    pub fn priced(
        service: &str,
        operation: &str,
        quantity: i64,
        unit: &str,
        unit_cost_micros: i64,
        per_units: i64,
        estimated: bool,
    ) -> Cost {
        let per = per_units.max(1);
        Cost {
            service: service.into(),
            operation: operation.into(),
            quantity,
            unit: unit.into(),
            unit_cost_micros,
            per_units: per,
            total_micros: (quantity * unit_cost_micros + per / 2) / per,
            estimated,
            billed_reference: None,
        }
    }
}

/// An LLM provider (same wire format, same rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LlmProvider {
    Cerebras,
    OpenAi,
}

impl LlmProvider {
    pub fn as_str(self) -> &'static str {
        match self {
            LlmProvider::Cerebras => "cerebras",
            LlmProvider::OpenAi => "openai",
        }
    }

    /// `cerebras` or `openai`.
    pub fn from_name(name: &str) -> Option<LlmProvider> {
        match name {
            "cerebras" => Some(LlmProvider::Cerebras),
            "openai" => Some(LlmProvider::OpenAi),
            _ => None,
        }
    }
}

/// What a provider bills for: provider × operation × unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CostKind {
    /// Twilio outbound voice, per started minute.
    TwilioVoiceMinutes,
    /// Deepgram streaming speech-to-text, per second of audio.
    DeepgramStreamingStt,
    /// A voice reply's tokens (prompt and completion).
    ChatTokens(LlmProvider),
    /// ElevenLabs text-to-speech, per character.
    TtsCharacters,
    /// Memory extraction after a call (every attempt).
    MemoryExtractionTokens(LlmProvider),
    /// Memory's embeddings (on the OpenAI-compatible endpoint).
    MemoryEmbeddingTokens,
    /// Persona knowledge: documents' passages embedded when indexed (billed to the persona's
    /// owner) and callers' words embedded during a call (billed on the call).
    KnowledgeEmbeddingTokens,
}

impl CostKind {
    /// The provider, as cost lines name it.
    pub fn service(self) -> &'static str {
        match self {
            CostKind::TwilioVoiceMinutes => "twilio",
            CostKind::DeepgramStreamingStt => "deepgram",
            CostKind::ChatTokens(llm) | CostKind::MemoryExtractionTokens(llm) => llm.as_str(),
            CostKind::TtsCharacters => "elevenlabs",
            CostKind::MemoryEmbeddingTokens | CostKind::KnowledgeEmbeddingTokens => "openai",
        }
    }

    pub fn operation(self) -> &'static str {
        match self {
            CostKind::TwilioVoiceMinutes => "outbound-voice-minutes",
            CostKind::DeepgramStreamingStt => "streaming-stt",
            CostKind::ChatTokens(_) => "chat-tokens",
            CostKind::TtsCharacters => "tts-characters",
            CostKind::MemoryExtractionTokens(_) => "memory-extraction-tokens",
            CostKind::MemoryEmbeddingTokens => "memory-embedding-tokens",
            CostKind::KnowledgeEmbeddingTokens => "knowledge-embedding-tokens",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            CostKind::TwilioVoiceMinutes => "minute",
            CostKind::DeepgramStreamingStt => "second",
            CostKind::ChatTokens(_)
            | CostKind::MemoryExtractionTokens(_)
            | CostKind::MemoryEmbeddingTokens
            | CostKind::KnowledgeEmbeddingTokens => "token",
            CostKind::TtsCharacters => "character",
        }
    }
}

/// Our estimate of the tokens `words` words make (4 tokens per 3 words, rounded up): what an
/// LLM reply cut off before the provider reported its usage is billed by, and what prompt
/// budgets and knowledge passages are measured in.
pub fn estimated_tokens(words: u64) -> u64 {
    (words * 4).div_ceil(3)
}

/// The production name of an operation that histories written before the names were unified
/// used (`simulate` and `synthetic` recorded `stt-streaming` and `llm-tokens`): read models
/// and reports use this, so old and new lines group together. Events are never edited.
pub fn canonical_operation(operation: &str) -> &str {
    match operation {
        "stt-streaming" => "streaming-stt",
        "llm-tokens" => "chat-tokens",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_estimated_at_four_per_three_words_rounded_up() {
        assert_eq!(estimated_tokens(0), 0);
        assert_eq!(estimated_tokens(3), 4);
        assert_eq!(estimated_tokens(4), 6);
        assert_eq!(crate::knowledge::tokens("one two three four"), 6);
    }

    #[test]
    fn every_kind_has_its_production_name() {
        let names: Vec<_> = [
            CostKind::TwilioVoiceMinutes,
            CostKind::DeepgramStreamingStt,
            CostKind::ChatTokens(LlmProvider::Cerebras),
            CostKind::TtsCharacters,
            CostKind::MemoryExtractionTokens(LlmProvider::OpenAi),
            CostKind::MemoryEmbeddingTokens,
        ]
        .iter()
        .map(|k| format!("{}/{}/{}", k.service(), k.operation(), k.unit()))
        .collect();
        assert_eq!(
            names,
            [
                "twilio/outbound-voice-minutes/minute",
                "deepgram/streaming-stt/second",
                "cerebras/chat-tokens/token",
                "elevenlabs/tts-characters/character",
                "openai/memory-extraction-tokens/token",
                "openai/memory-embedding-tokens/token",
            ]
        );
        assert_eq!(canonical_operation("stt-streaming"), "streaming-stt");
        assert_eq!(canonical_operation("llm-tokens"), "chat-tokens");
        assert_eq!(canonical_operation("chat-tokens"), "chat-tokens");
    }
}
