//! The call aggregate: decides on commands, applies events.

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{CallCommand, CallEvent, Cost, Outcome, Payment, Status};
use crate::cost::CostKind;
use crate::pricing::PriceTable;
use crate::values::PhoneNumber;

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
    /// The last attempt's outcome is known (it failed, or Twilio's CallSid was recorded); when
    /// not, Twilio may have placed the call for it.
    #[serde(default)]
    pub last_attempt_settled: bool,
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
    /// Cents of the capture given back (refunds and disputes), per reversal reference.
    #[serde(default)]
    pub reversed: std::collections::BTreeMap<String, i64>,
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
            prices.price_of_call(answered_secs, self.max_minutes).0
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
            events.push(CallEvent::CostRecorded(prices.cost(
                CostKind::TwilioVoiceMinutes,
                minutes,
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
                    user_id: r.user_id.uuid(),
                    persona_id: r.persona_id.into(),
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
                if self.user_id != Some(by.uuid()) {
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
            CallCommand::StartDial { attempt, at } => {
                if self.due_for_dialing() && attempt == self.dial_attempts + 1 {
                    vec![CallEvent::DialAttempted { attempt, at }]
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
                    // Recorded in clear: never with the number a provider's message names.
                    let mut events = vec![CallEvent::DialFailed {
                        attempt: self.dial_attempts,
                        reason: crate::privacy::without_numbers(&reason),
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
                costs,
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
                    let mut events: Vec<CallEvent> =
                        costs.into_iter().map(CallEvent::CostRecorded).collect();
                    events.push(CallEvent::VoiceSessionEnded {
                        turns,
                        barge_ins,
                        early_replies,
                        reason,
                        greeting_ms,
                        barge_in_stop_ms,
                        first_audio_ms,
                    });
                    events
                }
            }
            CallCommand::RecordPaymentReversal {
                kind,
                reference,
                amount_cents,
                at,
            } => {
                let claimed = amount_cents - self.reversed.get(&reference).unwrap_or(&0);
                let left = self.max_price_cents - self.reversed.values().sum::<i64>();
                let amount_cents = claimed.min(left);
                if amount_cents > 0 {
                    vec![CallEvent::PaymentReversed {
                        kind,
                        reference,
                        amount_cents,
                        at,
                    }]
                } else {
                    vec![]
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
                self.last_attempt_settled = false;
            }
            CallEvent::DialFailed { .. } => self.last_attempt_settled = true,
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
            CallEvent::PaymentReversed {
                reference,
                amount_cents,
                ..
            } => *self.reversed.entry(reference).or_default() += amount_cents,
            CallEvent::TurnCompleted { turn, .. } => self.turns_recorded.push(turn),
            CallEvent::VoiceSessionEnded { .. } => self.session_ended = true,
        }
    }
}
