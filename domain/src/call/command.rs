//! What can be asked of a call.

use chrono::{DateTime, Utc};

use super::{Cost, Payment, Status, TurnTimings};
use crate::ids::{PersonaId, UserId};
use crate::pricing::PriceTable;
use crate::values::PhoneNumber;

#[derive(Debug, Clone, PartialEq)]
pub struct CallRequest {
    pub user_id: UserId,
    pub persona_id: PersonaId,
    pub persona_name: String,
    pub phone: PhoneNumber,
    pub max_minutes: u32,
    pub payment: Payment,
    pub prices: PriceTable,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub timezone: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CallCommand {
    Request(CallRequest),
    /// The scheduler: the time has come.
    Fire {
        at: DateTime<Utc>,
    },
    /// The scheduler: the time passed too long ago (the service was down); never dialled.
    Expire {
        at: DateTime<Utc>,
    },
    /// The owner cancels a scheduled call, at least `min_notice` before it.
    Cancel {
        by: UserId,
        at: DateTime<Utc>,
        min_notice: chrono::Duration,
    },
    /// The dialer is about to ask Twilio for dial attempt `attempt` (the call's attempts so
    /// far + 1, as the dialer read them). Records nothing when another handler took that
    /// attempt first: only the handler that recorded an attempt asks Twilio.
    StartDial {
        attempt: u32,
        at: DateTime<Utc>,
    },
    DialFailed {
        reason: String,
        give_up: bool,
        at: DateTime<Utc>,
    },
    RecordPlaced {
        call_sid: String,
    },
    /// A Twilio status callback (or the dialer's own observation).
    RecordStatus {
        call_sid: String,
        status: Status,
        sequence: Option<u32>,
        duration_secs: Option<u32>,
        at: DateTime<Utc>,
    },
    RecordCost(Cost),
    /// A provider's billed figure for this call: recorded once per (provider, reference), so
    /// recording the same bill twice changes nothing.
    RecordBilledCost {
        reference: String,
        cost: Cost,
    },
    RecordSettlement {
        charged_cents: i64,
        released_cents: i64,
    },
    /// Stripe reports money of the call's capture given back: a refund (`amount_cents` is the
    /// charge's refunded total so far) or a dispute (its amount). Recorded once per
    /// `reference` (`refund:<charge>`, `dispute:<dispute>`) for what it claims beyond what was
    /// already recorded under it, never more than the hold in all.
    RecordPaymentReversal {
        kind: super::Reversal,
        reference: String,
        amount_cents: i64,
        at: DateTime<Utc>,
    },
    RecordTurn {
        turn: u32,
        timings: TurnTimings,
        interrupted: bool,
        llm_provider: String,
        fell_back: bool,
    },
    /// The voice session's end with what it used: the costs are recorded with it, once per
    /// call (a replayed session records nothing).
    RecordSessionEnd {
        costs: Vec<Cost>,
        turns: u32,
        barge_ins: u32,
        early_replies: u32,
        reason: String,
        greeting_ms: Option<u32>,
        barge_in_stop_ms: Option<u32>,
        first_audio_ms: Option<[u32; 3]>,
    },
}
