//! A call: requested now or scheduled, paid by a hold before dialling, placed through Twilio,
//! followed through Twilio's status callbacks, priced when it ends, then settled.
//!
//! Status only moves forward (scheduled → initiated → ringing → in-progress → an end), so a
//! duplicated or late callback changes nothing. The price is fixed by the price table that was
//! in force when the call was requested, carried in `CallRequested`.

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::pricing::PriceTable;
use crate::values::PhoneNumber;

/// Paid duration bounds, in minutes.
pub const MIN_MINUTES: u32 = 1;
pub const MAX_MINUTES: u32 = 30;
pub const DEFAULT_MINUTES: u32 = 5;
/// How many times the dialer tries Twilio before the call fails.
pub const MAX_DIAL_ATTEMPTS: u32 = 5;

/// How a call is paid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "method")]
pub enum Payment {
    /// Credits reserved on the user's wallet under the call's id.
    Credits { credits: i64 },
    /// A Stripe PaymentIntent with manual capture, authorised for the maximum price.
    Card { payment_intent_id: String },
}

/// What settling a call's hold comes to: what the user is charged and what goes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    /// Credits taken from a credits hold (0: release it all); 0 for a card.
    pub credits_used: i64,
    pub charged_cents: i64,
    pub released_cents: i64,
}

impl Payment {
    /// Settles a hold of `max_price_cents` for a call priced `price_cents`: exactly the price
    /// (in whole credits, rounded up, for a credits hold), never more than the hold.
    pub fn settle(&self, price_cents: i64, max_price_cents: i64) -> Settlement {
        match self {
            Payment::Credits { credits } => {
                let used =
                    crate::pricing::credits_for(crate::values::Cents(price_cents)).min(*credits);
                Settlement {
                    credits_used: used,
                    charged_cents: used * crate::wallet::CENTS_PER_CREDIT,
                    released_cents: (credits - used) * crate::wallet::CENTS_PER_CREDIT,
                }
            }
            Payment::Card { .. } => {
                let charged = price_cents.clamp(0, max_price_cents.max(0));
                Settlement {
                    credits_used: 0,
                    charged_cents: charged,
                    released_cents: max_price_cents - charged,
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Completed,
    Busy,
    NoAnswer,
    Failed,
    Canceled,
    /// A scheduled call whose time passed while the service was down, past the grace period.
    Expired,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Busy => "busy",
            Outcome::NoAnswer => "no-answer",
            Outcome::Failed => "failed",
            Outcome::Canceled => "canceled",
            Outcome::Expired => "expired",
        }
    }
}

/// A call's status as the API shows it, in the order a call goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Scheduled,
    Initiated,
    Ringing,
    InProgress,
    Ended(Outcome),
}

impl Status {
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Scheduled => "scheduled",
            Status::Initiated => "initiated",
            Status::Ringing => "ringing",
            Status::InProgress => "in-progress",
            Status::Ended(o) => o.as_str(),
        }
    }

    /// Twilio's `CallStatus` values.
    pub fn from_twilio(s: &str) -> Option<Status> {
        Some(match s {
            "queued" | "initiated" => Status::Initiated,
            "ringing" => Status::Ringing,
            "in-progress" | "answered" => Status::InProgress,
            "completed" => Status::Ended(Outcome::Completed),
            "busy" => Status::Ended(Outcome::Busy),
            "no-answer" => Status::Ended(Outcome::NoAnswer),
            "failed" => Status::Ended(Outcome::Failed),
            "canceled" => Status::Ended(Outcome::Canceled),
            "expired" => Status::Ended(Outcome::Expired),
            _ => return None,
        })
    }

    pub fn is_final(&self) -> bool {
        matches!(self, Status::Ended(_))
    }
}

fn one() -> i64 {
    1
}

impl Cost {
    /// A cost line at a rate, rounded once (half up) to the micro-dollar.
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
}

#[derive(Debug, Clone, PartialEq)]
pub struct CallRequest {
    pub user_id: Uuid,
    pub persona_id: String,
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
        by: Uuid,
        at: DateTime<Utc>,
        min_notice: chrono::Duration,
    },
    /// The dialer is about to ask Twilio.
    StartDial {
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
    RecordTurn {
        turn: u32,
        timings: TurnTimings,
        interrupted: bool,
        llm_provider: String,
        fell_back: bool,
    },
    RecordSessionEnd {
        turns: u32,
        barge_ins: u32,
        early_replies: u32,
        reason: String,
        greeting_ms: Option<u32>,
        barge_in_stop_ms: Option<u32>,
        first_audio_ms: Option<[u32; 3]>,
    },
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
            CallEvent::TurnCompleted { .. } => "TurnCompleted",
            CallEvent::VoiceSessionEnded { .. } => "VoiceSessionEnded",
        }
        .to_string()
    }
    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    #[error("call not found")]
    NotFound,
    #[error("this call already exists")]
    AlreadyExists,
    #[error("this call is someone else's")]
    NotOwner,
    #[error("only a scheduled call can be cancelled")]
    NotScheduled,
    #[error("a scheduled call cannot be cancelled less than {0} minutes before it")]
    TooLate(i64),
    #[error("callback for call {got}, but this call is {expected}")]
    WrongCallSid { expected: String, got: String },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Call {
    pub user_id: Option<Uuid>,
    pub phone: Option<PhoneNumber>,
    pub payment: Option<Payment>,
    pub prices: Option<PriceTable>,
    pub max_minutes: u32,
    pub max_price_cents: i64,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub status: Option<Status>,
    pub fired: bool,
    pub dial_attempts: u32,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub call_sid: Option<String>,
    pub answered_at: Option<DateTime<Utc>>,
    pub price_cents: Option<i64>,
    pub settled: bool,
    pub costs_micros: i64,
    #[serde(default)]
    pub turns_recorded: Vec<u32>,
    #[serde(default)]
    pub session_ended: bool,
    /// Who the user called (the memory worker needs it).
    #[serde(default)]
    pub persona_id: Option<String>,
    /// `provider:reference` of every billed figure recorded.
    #[serde(default)]
    pub billed: Vec<String>,
}

impl Call {
    pub fn exists(&self) -> bool {
        self.status.is_some()
    }
    pub fn ended(&self) -> bool {
        self.status.is_some_and(|s| s.is_final())
    }
    /// Whether the dialer should (still) place this call.
    pub fn due_for_dialing(&self) -> bool {
        matches!(self.status, Some(Status::Initiated)) && self.call_sid.is_none()
    }

    fn end(
        &self,
        outcome: Outcome,
        duration_secs: Option<u32>,
        at: DateTime<Utc>,
    ) -> Vec<CallEvent> {
        let prices = self.prices.unwrap_or(PriceTable::LAUNCH);
        // Twilio reports `completed` only for answered calls (others end busy, no-answer or
        // failed), even when the in-progress callback was lost.
        let answered = outcome == Outcome::Completed;
        let answered_secs = if answered {
            duration_secs.unwrap_or_else(|| {
                self.answered_at
                    .map(|a| (at - a).num_seconds().max(0) as u32)
                    .unwrap_or(0)
            })
        } else {
            0
        };
        // Never more than the paid duration, whatever the provider says.
        let billed_minutes = PriceTable::billed_minutes(answered_secs).min(self.max_minutes);
        let price_cents = if answered {
            (prices.connection_fee_cents + prices.per_minute_cents * billed_minutes as i64)
                .min(self.max_price_cents)
        } else {
            0
        };
        let mut events = vec![CallEvent::CallEnded {
            outcome,
            answered_secs,
            billed_minutes,
            price_cents,
            at,
        }];
        if answered_secs > 0 {
            let minutes = PriceTable::billed_minutes(answered_secs) as i64;
            events.push(CallEvent::CostRecorded(Cost::priced(
                "twilio",
                "outbound-voice-minutes",
                minutes,
                "minute",
                prices.twilio_per_minute_micros,
                1,
                duration_secs.is_none(),
            )));
        }
        events
    }
}

impl Aggregate for Call {
    const TYPE: &'static str = "call";
    type Command = CallCommand;
    type Event = CallEvent;
    type Error = CallError;
    type Services = ();

    async fn handle(
        &mut self,
        command: CallCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), CallError> {
        if !matches!(command, CallCommand::Request(_)) && !self.exists() {
            return Err(CallError::NotFound);
        }
        let events = match command {
            CallCommand::Request(r) => {
                if self.exists() {
                    return Err(CallError::AlreadyExists);
                }
                vec![CallEvent::CallRequested {
                    user_id: r.user_id,
                    persona_id: r.persona_id,
                    persona_name: r.persona_name,
                    phone: r.phone,
                    max_minutes: r.max_minutes,
                    max_price_cents: r.prices.max_price(r.max_minutes).0,
                    payment: r.payment,
                    prices: r.prices,
                    scheduled_for: r.scheduled_for,
                    timezone: r.timezone,
                }]
            }
            CallCommand::Fire { at } => {
                if self.status == Some(Status::Scheduled) && !self.fired {
                    vec![CallEvent::ScheduledCallFired { at }]
                } else {
                    vec![]
                }
            }
            CallCommand::Expire { at } => {
                if self.status == Some(Status::Scheduled) && !self.fired {
                    vec![CallEvent::CallEnded {
                        outcome: Outcome::Expired,
                        answered_secs: 0,
                        billed_minutes: 0,
                        price_cents: 0,
                        at,
                    }]
                } else {
                    vec![]
                }
            }
            CallCommand::Cancel { by, at, min_notice } => {
                if self.user_id != Some(by) {
                    return Err(CallError::NotOwner);
                }
                if self.status == Some(Status::Ended(Outcome::Canceled)) {
                    vec![]
                } else if self.status != Some(Status::Scheduled) {
                    return Err(CallError::NotScheduled);
                } else if self
                    .scheduled_for
                    .is_some_and(|when| when - at < min_notice)
                {
                    return Err(CallError::TooLate(min_notice.num_minutes()));
                } else {
                    vec![
                        CallEvent::CallCancelled { at },
                        CallEvent::CallEnded {
                            outcome: Outcome::Canceled,
                            answered_secs: 0,
                            billed_minutes: 0,
                            price_cents: 0,
                            at,
                        },
                    ]
                }
            }
            CallCommand::StartDial { at } => {
                if self.due_for_dialing() {
                    vec![CallEvent::DialAttempted {
                        attempt: self.dial_attempts + 1,
                        at,
                    }]
                } else {
                    vec![]
                }
            }
            CallCommand::DialFailed {
                reason,
                give_up,
                at,
            } => {
                if self.ended() || self.call_sid.is_some() {
                    vec![]
                } else {
                    let mut events = vec![CallEvent::DialFailed {
                        attempt: self.dial_attempts,
                        reason,
                    }];
                    if give_up {
                        events.extend(self.end(Outcome::Failed, None, at));
                    }
                    events
                }
            }
            CallCommand::RecordPlaced { call_sid } => match &self.call_sid {
                Some(sid) if *sid == call_sid => vec![],
                Some(sid) => {
                    return Err(CallError::WrongCallSid {
                        expected: sid.clone(),
                        got: call_sid,
                    })
                }
                None => vec![CallEvent::CallPlaced { call_sid }],
            },
            CallCommand::RecordStatus {
                call_sid,
                status,
                sequence,
                duration_secs,
                at,
            } => {
                let mut events = vec![];
                match &self.call_sid {
                    Some(sid) if *sid != call_sid => {
                        return Err(CallError::WrongCallSid {
                            expected: sid.clone(),
                            got: call_sid,
                        })
                    }
                    Some(_) => {}
                    // The callback can beat the dialer's own record of the SID.
                    None => events.push(CallEvent::CallPlaced { call_sid }),
                }
                let current = self.status.unwrap_or(Status::Initiated);
                if current.is_final() || status <= current {
                    // A duplicate or a late callback: nothing new.
                } else if let Status::Ended(outcome) = status {
                    events.push(CallEvent::CallStatusChanged {
                        status,
                        sequence,
                        at,
                    });
                    events.extend(self.end(outcome, duration_secs, at));
                } else {
                    events.push(CallEvent::CallStatusChanged {
                        status,
                        sequence,
                        at,
                    });
                }
                events
            }
            CallCommand::RecordCost(cost) => vec![CallEvent::CostRecorded(cost)],
            CallCommand::RecordBilledCost { reference, cost } => {
                if self
                    .billed
                    .contains(&format!("{}:{reference}", cost.service))
                {
                    vec![]
                } else {
                    vec![CallEvent::CostRecorded(Cost {
                        estimated: false,
                        billed_reference: Some(reference),
                        ..cost
                    })]
                }
            }
            CallCommand::RecordTurn {
                turn,
                timings,
                interrupted,
                llm_provider,
                fell_back,
            } => {
                if self.turns_recorded.contains(&turn) {
                    vec![]
                } else {
                    vec![CallEvent::TurnCompleted {
                        turn,
                        timings,
                        interrupted,
                        llm_provider,
                        fell_back,
                    }]
                }
            }
            CallCommand::RecordSessionEnd {
                turns,
                barge_ins,
                early_replies,
                reason,
                greeting_ms,
                barge_in_stop_ms,
                first_audio_ms,
            } => {
                if self.session_ended {
                    vec![]
                } else {
                    vec![CallEvent::VoiceSessionEnded {
                        turns,
                        barge_ins,
                        early_replies,
                        reason,
                        greeting_ms,
                        barge_in_stop_ms,
                        first_audio_ms,
                    }]
                }
            }
            CallCommand::RecordSettlement {
                charged_cents,
                released_cents,
            } => {
                if self.settled {
                    vec![]
                } else {
                    vec![CallEvent::CallSettled {
                        charged_cents,
                        released_cents,
                    }]
                }
            }
        };
        for event in events {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: CallEvent) {
        match event {
            CallEvent::CallRequested {
                user_id,
                persona_id,
                phone,
                max_minutes,
                payment,
                prices,
                max_price_cents,
                scheduled_for,
                ..
            } => {
                self.user_id = Some(user_id);
                self.persona_id = Some(persona_id);
                self.phone = Some(phone);
                self.max_minutes = max_minutes;
                self.payment = Some(payment);
                self.prices = Some(prices);
                self.max_price_cents = max_price_cents;
                self.scheduled_for = scheduled_for;
                self.status = Some(if scheduled_for.is_some() {
                    Status::Scheduled
                } else {
                    Status::Initiated
                });
            }
            CallEvent::ScheduledCallFired { .. } => {
                self.fired = true;
                self.status = Some(Status::Initiated);
            }
            CallEvent::CallCancelled { .. } => {}
            CallEvent::DialAttempted { attempt, at } => {
                self.dial_attempts = attempt;
                self.last_attempt_at = Some(at);
            }
            CallEvent::DialFailed { .. } => {}
            CallEvent::CallPlaced { call_sid } => self.call_sid = Some(call_sid),
            CallEvent::CallStatusChanged { status, at, .. } => {
                if status == Status::InProgress {
                    self.answered_at = Some(at);
                }
                self.status = Some(status);
            }
            CallEvent::CallEnded {
                outcome,
                price_cents,
                ..
            } => {
                self.status = Some(Status::Ended(outcome));
                self.price_cents = Some(price_cents);
            }
            CallEvent::CostRecorded(cost) => {
                self.costs_micros += cost.total_micros;
                if let Some(reference) = cost.billed_reference {
                    self.billed.push(format!("{}:{reference}", cost.service));
                }
            }
            CallEvent::CallSettled { .. } => self.settled = true,
            CallEvent::TurnCompleted { turn, .. } => self.turns_recorded.push(turn),
            CallEvent::VoiceSessionEnded { .. } => self.session_ended = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;
    use cqrs_es::test::TestFramework;

    use super::*;

    fn requested(scheduled_for: Option<DateTime<Utc>>) -> CallEvent {
        CallEvent::CallRequested {
            user_id: Uuid::nil(),
            persona_id: "brad_001".into(),
            persona_name: "Brad".into(),
            phone: PhoneNumber::parse("phone", "+14155550123").unwrap(),
            max_minutes: 5,
            payment: Payment::Credits { credits: 45 },
            prices: PriceTable::LAUNCH,
            max_price_cents: 225,
            scheduled_for,
            timezone: None,
        }
    }

    fn status(s: &str, sequence: u32, at: DateTime<Utc>) -> CallCommand {
        CallCommand::RecordStatus {
            call_sid: "CA1".into(),
            status: Status::from_twilio(s).unwrap(),
            sequence: Some(sequence),
            duration_secs: (s == "completed").then_some(61),
            at,
        }
    }

    #[test]
    fn a_completed_call_is_priced_per_started_minute_and_costs_twilio_minutes() {
        let t = Utc::now();
        TestFramework::<Call>::with(())
            .given(vec![
                requested(None),
                CallEvent::CallPlaced {
                    call_sid: "CA1".into(),
                },
                CallEvent::CallStatusChanged {
                    status: Status::InProgress,
                    sequence: Some(2),
                    at: t,
                },
            ])
            .when(status("completed", 3, t + Duration::seconds(61)))
            .then_expect_events(vec![
                CallEvent::CallStatusChanged {
                    status: Status::Ended(Outcome::Completed),
                    sequence: Some(3),
                    at: t + Duration::seconds(61),
                },
                CallEvent::CallEnded {
                    outcome: Outcome::Completed,
                    answered_secs: 61,
                    billed_minutes: 2,
                    price_cents: 105,
                    at: t + Duration::seconds(61),
                },
                CallEvent::CostRecorded(Cost {
                    service: "twilio".into(),
                    operation: "outbound-voice-minutes".into(),
                    quantity: 2,
                    unit: "minute".into(),
                    unit_cost_micros: 14_000,
                    per_units: 1,
                    total_micros: 28_000,
                    estimated: false,
                    billed_reference: None,
                }),
            ]);
    }

    #[test]
    fn late_and_duplicate_callbacks_never_move_a_call_backwards() {
        let t = Utc::now();
        let given = vec![
            requested(None),
            CallEvent::CallPlaced {
                call_sid: "CA1".into(),
            },
            CallEvent::CallStatusChanged {
                status: Status::InProgress,
                sequence: Some(2),
                at: t,
            },
        ];
        for late in ["ringing", "initiated", "in-progress"] {
            TestFramework::<Call>::with(())
                .given(given.clone())
                .when(status(late, 1, t))
                .then_expect_events(vec![]);
        }
        TestFramework::<Call>::with(())
            .given(given)
            .when(CallCommand::RecordStatus {
                call_sid: "CA2".into(),
                status: Status::Ringing,
                sequence: None,
                at: t,
                duration_secs: None,
            })
            .then_expect_error(CallError::WrongCallSid {
                expected: "CA1".into(),
                got: "CA2".into(),
            });
    }

    #[test]
    fn an_unanswered_call_costs_nothing() {
        let t = Utc::now();
        TestFramework::<Call>::with(())
            .given(vec![requested(None)])
            .when(status("no-answer", 2, t))
            .then_expect_events(vec![
                CallEvent::CallPlaced {
                    call_sid: "CA1".into(),
                },
                CallEvent::CallStatusChanged {
                    status: Status::Ended(Outcome::NoAnswer),
                    sequence: Some(2),
                    at: t,
                },
                CallEvent::CallEnded {
                    outcome: Outcome::NoAnswer,
                    answered_secs: 0,
                    billed_minutes: 0,
                    price_cents: 0,
                    at: t,
                },
            ]);
    }

    #[test]
    fn scheduled_calls_fire_once_and_cancel_only_with_notice() {
        let t = Utc::now();
        let when = t + Duration::minutes(30);
        TestFramework::<Call>::with(())
            .given(vec![
                requested(Some(when)),
                CallEvent::ScheduledCallFired { at: when },
            ])
            .when(CallCommand::Fire { at: when })
            .then_expect_events(vec![]);
        TestFramework::<Call>::with(())
            .given(vec![requested(Some(when))])
            .when(CallCommand::Cancel {
                by: Uuid::nil(),
                at: when - Duration::minutes(4),
                min_notice: Duration::minutes(5),
            })
            .then_expect_error(CallError::TooLate(5));
        TestFramework::<Call>::with(())
            .given(vec![requested(Some(when))])
            .when(CallCommand::Cancel {
                by: Uuid::now_v7(),
                at: t,
                min_notice: Duration::minutes(5),
            })
            .then_expect_error(CallError::NotOwner);
    }

    #[test]
    fn a_call_is_never_billed_past_its_paid_duration() {
        let t = Utc::now();
        let events = TestFramework::<Call>::with(())
            .given(vec![
                requested(None),
                CallEvent::CallPlaced {
                    call_sid: "CA1".into(),
                },
                CallEvent::CallStatusChanged {
                    status: Status::InProgress,
                    sequence: Some(2),
                    at: t,
                },
            ])
            .when(CallCommand::RecordStatus {
                call_sid: "CA1".into(),
                status: Status::Ended(Outcome::Completed),
                sequence: Some(3),
                duration_secs: Some(3600),
                at: t,
            })
            .inspect_result()
            .expect("accepted");
        let ended = events
            .iter()
            .find_map(|e| match e {
                CallEvent::CallEnded {
                    billed_minutes,
                    price_cents,
                    ..
                } => Some((*billed_minutes, *price_cents)),
                _ => None,
            })
            .expect("the call ended");
        assert_eq!(ended, (5, 225), "5 paid minutes at most, the held price");
    }

    #[test]
    fn a_billed_figure_is_recorded_once_per_provider_and_reference() {
        let billed = Cost::priced("twilio", "billed", 1, "call", 44_000, 1, true);
        let recorded = CallEvent::CostRecorded(Cost {
            estimated: false,
            billed_reference: Some("CA1".into()),
            ..billed.clone()
        });
        TestFramework::<Call>::with(())
            .given(vec![requested(None)])
            .when(CallCommand::RecordBilledCost {
                reference: "CA1".into(),
                cost: billed.clone(),
            })
            .then_expect_events(vec![recorded.clone()]);
        TestFramework::<Call>::with(())
            .given(vec![requested(None), recorded])
            .when(CallCommand::RecordBilledCost {
                reference: "CA1".into(),
                cost: billed,
            })
            .then_expect_events(vec![]);
    }
}
