//! What happened to a call: its events, facts never edited.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Cost, Outcome, Payment, Status};
use crate::pricing::PriceTable;
use crate::values::PhoneNumber;

/// One persona turn's timings, in milliseconds from the moment the caller's turn was judged
/// finished (the endpoint). `None` when the turn never got that far (interrupted, failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TurnTimings {
    /// From the caller's first word of the turn to the final transcript.
    pub stt_final_ms: Option<u32>,
    pub llm_first_token_ms: Option<u32>,
    pub tts_first_byte_ms: Option<u32>,
    /// The first audio frame of the reply sent to Twilio: the end-to-end latency.
    pub first_audio_ms: Option<u32>,
    /// Persona knowledge: how long choosing this reply's passages took, in microseconds (on
    /// the turn's path, before the LLM request), and whether the caller's words were embedded
    /// in time to rank by cosine too. `None` for a persona without knowledge (added later:
    /// older events lack them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knowledge_us: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knowledge_vector: Option<bool>,
    /// The CPU time of that choice (the thread's own clock), in microseconds: what
    /// `knowledge_us` is beyond it is waiting (the thread preempted), not work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knowledge_cpu_us: Option<u32>,
    /// Whether the passages had been ranked ahead, off the turn's path, for the final
    /// transcript's very words (the stable interim's), so the turn only took that ranking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knowledge_preranked: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CallEvent {
    CallRequested {
        user_id: Uuid,
        persona_id: String,
        persona_name: String,
        phone: PhoneNumber,
        max_minutes: u32,
        payment: Payment,
        prices: PriceTable,
        max_price_cents: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scheduled_for: Option<DateTime<Utc>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timezone: Option<String>,
    },
    ScheduledCallFired {
        at: DateTime<Utc>,
    },
    CallCancelled {
        at: DateTime<Utc>,
    },
    DialAttempted {
        attempt: u32,
        at: DateTime<Utc>,
    },
    DialFailed {
        attempt: u32,
        reason: String,
    },
    CallPlaced {
        call_sid: String,
    },
    CallStatusChanged {
        status: Status,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sequence: Option<u32>,
        at: DateTime<Utc>,
    },
    CallEnded {
        outcome: Outcome,
        answered_secs: u32,
        billed_minutes: u32,
        price_cents: i64,
        at: DateTime<Utc>,
    },
    CostRecorded(Cost),
    CallSettled {
        charged_cents: i64,
        released_cents: i64,
    },
    /// Money of the call's capture given back at Stripe (`amount_cents` more under
    /// `reference`).
    PaymentReversed {
        kind: super::Reversal,
        reference: String,
        amount_cents: i64,
        at: DateTime<Utc>,
    },
    TurnCompleted {
        turn: u32,
        timings: TurnTimings,
        /// The caller spoke over this reply and it was cut.
        interrupted: bool,
        llm_provider: String,
        fell_back: bool,
    },
    VoiceSessionEnded {
        turns: u32,
        /// The caller interrupted the persona.
        barge_ins: u32,
        /// The persona started replying and the caller turned out not to have finished.
        early_replies: u32,
        reason: String,
        /// From the stream's start to the greeting's first audio frame.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        greeting_ms: Option<u32>,
        /// The longest time from hearing the caller over the persona to stopping its audio.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        barge_in_stop_ms: Option<u32>,
        /// End-to-end latency of the call's replies (endpoint to first audio), p50/p90/p99.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        first_audio_ms: Option<[u32; 3]>,
    },
}

impl DomainEvent for CallEvent {
    fn event_type(&self) -> String {
        match self {
            CallEvent::CallRequested { .. } => "CallRequested",
            CallEvent::ScheduledCallFired { .. } => "ScheduledCallFired",
            CallEvent::CallCancelled { .. } => "CallCancelled",
            CallEvent::DialAttempted { .. } => "DialAttempted",
            CallEvent::DialFailed { .. } => "DialFailed",
            CallEvent::CallPlaced { .. } => "CallPlaced",
            CallEvent::CallStatusChanged { .. } => "CallStatusChanged",
            CallEvent::CallEnded { .. } => "CallEnded",
            CallEvent::CostRecorded(_) => "CostRecorded",
            CallEvent::CallSettled { .. } => "CallSettled",
            CallEvent::PaymentReversed { .. } => "PaymentReversed",
            CallEvent::TurnCompleted { .. } => "TurnCompleted",
            CallEvent::VoiceSessionEnded { .. } => "VoiceSessionEnded",
        }
        .to_string()
    }
    fn event_version(&self) -> String {
        "1".into()
    }
}
