//! Places calls through Twilio when they are requested (or when a scheduled one fires).
//!
//! Never the same call twice: the dialer records the attempt it expects to make
//! (`StartDial { attempt }` → `DialAttempted`), and only the handler whose command recorded it
//! asks Twilio (a second delivery handled at the same time records nothing and does not dial).
//! An attempt whose outcome is unknown (its handler is still waiting for Twilio, died between
//! Twilio's answer and recording the SID, or lost the connection after Twilio acted) is waited
//! for while it may be in flight ([`IN_FLIGHT`]), then looked for at Twilio (calls to the
//! number since the attempt) and recorded instead of dialling again. Twilio's own `initiated`
//! callback, which carries our call id, records the SID too. The worker's runner extends the
//! message's ack deadline while the handler works.
//! Retries 5xx and unreachable with backoff (by redelivery); after `MAX_DIAL_ATTEMPTS`, or on a
//! refusal, the call fails and the settlement worker releases its hold.
//!
//! Before the first attempt the dialer checks again what the request checked, since a
//! scheduled call fires days later (and the policy may have changed since): the destination
//! policy, the one-active-call rule (a scheduled call claims the user's slot now) and the daily
//! counts of its number and its user (`usecases::calls::dials`, counted now for a scheduled
//! call). A call refused then fails without being dialled, and its hold is released.

use std::time::Duration;

use chrono::{DateTime, Utc};
use cmb_domain::call::{Call, CallCommand, CallEvent, MAX_DIAL_ATTEMPTS};
use cmb_domain::{Actor, CallId, CommandContext, EventEnvelope, UserId};

use super::runner::{decode, Failure, NotACallId};
use crate::backbone::store::EventStore;
use crate::clock::Clock;
use crate::usecases::calls::dials::CallPolicy;
use crate::usecases::calls::{active, sids};
use cmb_providers::twilio::{CallResource, CreateCall, Twilio};
use cmb_providers::ProviderError;

/// What became of an attempt whose outcome was unknown.
enum Open {
    /// Twilio placed the call: its CallSid.
    Placed(String),
    /// The call needs no dialling any more (placed, ended).
    Done,
    /// Another handler recorded an outcome or a new attempt: decide again.
    Changed,
    /// Twilio has no such call: dial again.
    NotAtTwilio,
}

pub const NAME: &str = "dialer";

#[derive(Clone)]
pub struct Dialer {
    pub store: EventStore,
    pub twilio: Twilio,
    pub from: String,
    pub public_base_url: String,
    pub clock: Clock,
    pub policy: CallPolicy,
}

fn created_at(call: &CallResource) -> Option<DateTime<Utc>> {
    call.date_created
        .as_deref()
        .and_then(|d| DateTime::parse_from_rfc2822(d).ok())
        .map(|d| d.with_timezone(&Utc))
}

/// The call's id as the typed id; a message about anything else can never be handled.
fn call_id(id: &str) -> Result<CallId, Failure> {
    id.parse().map_err(|source| {
        Failure::from(NotACallId {
            id: id.to_string(),
            source,
        })
    })
}

/// How long a dial attempt may be in flight at Twilio (the HTTP client's timeout and a
/// margin): before that, an attempt whose outcome is unknown may belong to a handler still
/// waiting for Twilio's answer, so nobody else dials.
pub const IN_FLIGHT: Duration = Duration::from_secs(20);

impl Dialer {
    /// Dials a call when it is requested (a call scheduled for later is not due yet and is
    /// left alone) or when its scheduled time comes.
    pub async fn handle(&self, event: EventEnvelope) -> Result<(), Failure> {
        match decode::<CallEvent>(&event)? {
            Some(CallEvent::CallRequested { .. } | CallEvent::ScheduledCallFired { .. }) => {
                self.place(&event).await
            }
            _ => Ok(()),
        }
    }

    /// Places the call at Twilio at most once: only the handler that recorded attempt N
    /// (`StartDial { attempt: N }`) asks Twilio for it; a handler that finds an attempt whose
    /// outcome is unknown waits for it (up to [`IN_FLIGHT`]) and then looks for it at Twilio
    /// before dialling again.
    async fn place(&self, event: &EventEnvelope) -> Result<(), Failure> {
        let id = event.aggregate_id.clone();
        let ctx = CommandContext::caused_by(event, Actor::Worker(NAME.into()));
        // Another handler may take the attempt between our read and our write: read again.
        for _ in 0..3 {
            let (call, _) = self.load(&id).await?;
            if !call.due_for_dialing() {
                return Ok(());
            }
            let phone = call
                .phone
                .clone()
                .ok_or_else(|| Failure::skip(format!("call {id} has no phone")))?;
            if call.dial_attempts == 0 {
                if let Some(reason) = self.refusal(&id, &call, &phone).await? {
                    tracing::warn!(call = %id, %reason, "call refused before dialling");
                    metrics::counter!("cmb_calls_refused_by_dialer_total").increment(1);
                    let failed = CallCommand::DialFailed {
                        reason,
                        give_up: true,
                        at: self.clock.now(),
                    };
                    return self.record(&id, failed, &ctx).await;
                }
            }
            if call.dial_attempts > 0 && !call.last_attempt_settled {
                match self.open_attempt(&id, &call, phone.as_str()).await? {
                    Open::Placed(sid) => {
                        tracing::info!(call = %id, %sid, "found the call an earlier attempt placed");
                        return self
                            .record(&id, CallCommand::RecordPlaced { call_sid: sid }, &ctx)
                            .await;
                    }
                    Open::Done => return Ok(()),
                    Open::Changed => continue,
                    Open::NotAtTwilio => {}
                }
            }
            let attempt = call.dial_attempts + 1;
            let started = self
                .store
                .execute::<Call>(
                    &id,
                    CallCommand::StartDial {
                        attempt,
                        at: self.clock.now(),
                    },
                    &ctx,
                )
                .await
                .map_err(|e| Failure::retry(format!("recording on call {id}"), e))?;
            if started.events == 0 {
                continue; // another handler recorded this attempt: it dials, not us
            }
            crate::faults::crash_point("dialer.after_attempt");
            return self.dial(&id, &call, attempt, phone.as_str(), &ctx).await;
        }
        Err(Failure::Retry(
            format!("call {id}: other handlers keep taking the dial attempt").into(),
        ))
    }

    /// Why the call may not be dialled, if it may not: the destination policy, another call of
    /// the user's under way (a scheduled call claims the slot here), or a daily count.
    async fn refusal(
        &self,
        id: &str,
        call: &Call,
        phone: &cmb_domain::values::PhoneNumber,
    ) -> Result<Option<String>, Failure> {
        if let Err(refused) = self.policy.destination(phone) {
            return Ok(Some(refused.to_string()));
        }
        let call_id = call_id(id)?;
        let user: UserId = call
            .user_id
            .ok_or_else(|| Failure::skip(format!("call {id} has no user")))?
            .into();
        let pool = self.store.pool();
        if call.scheduled_for.is_some() && !active::claim(pool, user, call_id).await? {
            return Ok(Some(
                "another of your calls was in progress when this scheduled call fell due (one \
                 call at a time)"
                    .into(),
            ));
        }
        let now = self.clock.now();
        if let Err(refused) = self.policy.claim(pool, call_id, user, phone, now).await? {
            return Ok(Some(refused.to_string()));
        }
        Ok(None)
    }

    /// Asks Twilio for the call of `attempt`, which this handler recorded.
    async fn dial(
        &self,
        id: &str,
        call: &Call,
        attempt: u32,
        phone: &str,
        ctx: &CommandContext,
    ) -> Result<(), Failure> {
        let request = CreateCall {
            to: phone.to_string(),
            from: self.from.clone(),
            url: format!("{}/api/twilio/answer?call_id={id}", self.public_base_url),
            status_callback: format!("{}/api/twilio/callback?call_id={id}", self.public_base_url),
            time_limit_secs: call.max_minutes * 60,
        };
        match self.twilio.create_call(&request).await {
            Ok(placed) => {
                crate::faults::crash_point("dialer.after_twilio");
                tracing::info!(call = %id, sid = %placed.sid, attempt, "call placed");
                metrics::counter!("cmb_calls_placed_total").increment(1);
                // The initiated callback may have recorded it already: same SID, no change.
                self.record(
                    id,
                    CallCommand::RecordPlaced {
                        call_sid: placed.sid,
                    },
                    ctx,
                )
                .await
            }
            Err(e @ ProviderError::Unreachable { .. }) => {
                // Twilio may have placed it before the connection failed: the attempt stays
                // open, and the redelivery looks for it at Twilio before dialling again.
                tracing::warn!(call = %id, attempt, error = %e, "dialling: no answer from Twilio");
                Err(Failure::retry(
                    format!("attempt {attempt}: no answer from Twilio"),
                    e,
                ))
            }
            Err(e) => {
                let give_up = !e.retryable() || attempt >= MAX_DIAL_ATTEMPTS;
                tracing::warn!(call = %id, attempt, give_up, error = %e, "dialling failed");
                self.record(
                    id,
                    CallCommand::DialFailed {
                        reason: e.to_string(),
                        give_up,
                        at: self.clock.now(),
                    },
                    ctx,
                )
                .await?;
                if give_up {
                    Ok(())
                } else {
                    // Redelivered later (with backoff), which tries again.
                    Err(Failure::retry(format!("attempt {attempt} failed"), e))
                }
            }
        }
    }

    /// An attempt whose outcome is unknown: its handler may still be waiting for Twilio (its
    /// `initiated` callback may be on the way), or it died after asking. Waits for the outcome
    /// while the attempt may be in flight, then looks for the call at Twilio.
    async fn open_attempt(&self, id: &str, call: &Call, phone: &str) -> Result<Open, Failure> {
        let since = call.last_attempt_at.unwrap_or_else(|| self.clock.now());
        let age = (self.clock.now() - since).to_std().unwrap_or_default();
        let deadline = tokio::time::Instant::now() + IN_FLIGHT.saturating_sub(age);
        loop {
            let (now, _) = self.load(id).await?;
            if !now.due_for_dialing() {
                return Ok(Open::Done);
            }
            if now.dial_attempts != call.dial_attempts || now.last_attempt_settled {
                return Ok(Open::Changed);
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        match self.find_earlier_attempt(id, since, phone).await? {
            Some(sid) => Ok(Open::Placed(sid)),
            None => Ok(Open::NotAtTwilio),
        }
    }

    async fn load(&self, id: &str) -> Result<(Call, u64), Failure> {
        self.store
            .load::<Call>(id)
            .await
            .map_err(|e| Failure::retry(format!("loading call {id}"), e))
    }

    async fn record(
        &self,
        id: &str,
        command: CallCommand,
        ctx: &CommandContext,
    ) -> Result<(), Failure> {
        self.store
            .execute::<Call>(id, command, ctx)
            .await
            .map(|_| ())
            .map_err(|e| Failure::retry(format!("recording on call {id}"), e))
    }

    /// A call Twilio placed for an earlier attempt (made at `since`) whose answer we never
    /// recorded: the newest call to `phone` since then that no other call of ours knows.
    async fn find_earlier_attempt(
        &self,
        id: &str,
        since: DateTime<Utc>,
        phone: &str,
    ) -> Result<Option<String>, Failure> {
        let listed = self
            .twilio
            .list_calls_to(phone, since.date_naive())
            .await
            .map_err(|e| Failure::retry("listing calls at Twilio", e))?;
        let sids: Vec<String> = listed.iter().map(|c| c.sid.clone()).collect();
        let known = sids::taken_by_others(self.store.pool(), &sids, call_id(id)?).await?;
        let window = since - chrono::Duration::seconds(5);
        Ok(listed
            .into_iter()
            .filter(|c| !known.contains(&c.sid))
            .filter(|c| created_at(c).is_none_or(|t| t >= window))
            .max_by_key(created_at)
            .map(|c| c.sid))
    }
}
