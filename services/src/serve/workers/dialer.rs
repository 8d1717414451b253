//! Places calls through Twilio when they are requested (or when a scheduled one fires).
//!
//! Never the same call twice: before asking Twilio, the dialer records `DialAttempted`; if it
//! finds an attempt without a CallSid (it died between Twilio's answer and recording the SID,
//! or the request timed out after Twilio acted), it first looks for that call at Twilio (calls
//! to the number since the attempt) and records it instead of dialling again. Twilio's own
//! `initiated` callback, which carries our call id, records the SID too.
//! Retries 5xx and timeouts with backoff (by redelivery); after `MAX_DIAL_ATTEMPTS`, or on a
//! refusal, the call fails and the settlement worker releases its hold.

use std::time::Duration;

use chrono::{DateTime, Utc};
use cmb_domain::call::{Call, CallCommand, MAX_DIAL_ATTEMPTS};
use cmb_domain::{Actor, CommandContext, EventEnvelope};

use crate::backbone::store::EventStore;
use crate::clock::Clock;
use cmb_providers::twilio::{CallResource, CreateCall, Twilio};

pub const NAME: &str = "dialer";

#[derive(Clone)]
pub struct Dialer {
    pub store: EventStore,
    pub twilio: Twilio,
    pub from: String,
    pub public_base_url: String,
    pub clock: Clock,
}

fn created_at(call: &CallResource) -> Option<DateTime<Utc>> {
    call.date_created
        .as_deref()
        .and_then(|d| DateTime::parse_from_rfc2822(d).ok())
        .map(|d| d.with_timezone(&Utc))
}

impl Dialer {
    pub async fn handle(&self, event: EventEnvelope) -> anyhow::Result<()> {
        if !matches!(
            event.event_type.as_str(),
            "CallRequested" | "ScheduledCallFired"
        ) {
            return Ok(());
        }
        let id = event.aggregate_id.clone();
        let ctx = CommandContext::caused_by(&event, Actor::Worker(NAME.into()));
        let (call, _) = self.load(&id).await?;
        if !call.due_for_dialing() {
            return Ok(());
        }
        let phone = call
            .phone
            .clone()
            .ok_or_else(|| anyhow::anyhow!("call {id} has no phone"))?;

        if call.dial_attempts > 0 {
            if let Some(sid) = self
                .find_earlier_attempt(&id, &call, phone.as_str())
                .await?
            {
                tracing::info!(call = %id, %sid, "found the call placed before a crash");
                self.record(&id, CallCommand::RecordPlaced { call_sid: sid }, &ctx)
                    .await?;
                return Ok(());
            }
        }
        let now = self.clock.now();
        self.record(&id, CallCommand::StartDial { at: now }, &ctx)
            .await?;
        let attempt = call.dial_attempts + 1;
        let request = CreateCall {
            to: phone.as_str().to_string(),
            from: self.from.clone(),
            url: format!("{}/api/twilio/answer?call_id={id}", self.public_base_url),
            status_callback: format!("{}/api/twilio/callback?call_id={id}", self.public_base_url),
            time_limit_secs: call.max_minutes * 60,
        };
        match self.twilio.create_call(&request).await {
            Ok(placed) => {
                tracing::info!(call = %id, sid = %placed.sid, to = %phone.masked(), "call placed");
                metrics::counter!("cmb_calls_placed_total").increment(1);
                // The initiated callback may have recorded it already: same SID, no change.
                self.record(
                    &id,
                    CallCommand::RecordPlaced {
                        call_sid: placed.sid,
                    },
                    &ctx,
                )
                .await
            }
            Err(e) => {
                let give_up = !e.retryable() || attempt >= MAX_DIAL_ATTEMPTS;
                tracing::warn!(call = %id, attempt, give_up, error = %e, "dialling failed");
                self.record(
                    &id,
                    CallCommand::DialFailed {
                        reason: e.to_string(),
                        give_up,
                        at: self.clock.now(),
                    },
                    &ctx,
                )
                .await?;
                if give_up {
                    Ok(())
                } else {
                    // Redelivered later (with backoff), which tries again.
                    Err(anyhow::anyhow!("attempt {attempt} failed: {e}"))
                }
            }
        }
    }

    async fn load(&self, id: &str) -> anyhow::Result<(Call, u64)> {
        self.store
            .load::<Call>(id)
            .await
            .map_err(|e| anyhow::anyhow!("loading call {id}: {e}"))
    }

    async fn record(
        &self,
        id: &str,
        command: CallCommand,
        ctx: &CommandContext,
    ) -> anyhow::Result<()> {
        self.store
            .execute::<Call>(id, command, ctx)
            .await
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("recording on call {id}: {e}"))
    }

    /// A call Twilio placed for an earlier attempt whose answer we never recorded.
    async fn find_earlier_attempt(
        &self,
        id: &str,
        call: &Call,
        phone: &str,
    ) -> anyhow::Result<Option<String>> {
        // Its `initiated` callback may be on the way: give it a moment.
        for _ in 0..10 {
            let (now, _) = self.load(id).await?;
            if now.call_sid.is_some() || !now.due_for_dialing() {
                return Ok(now.call_sid);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let since = call.last_attempt_at.unwrap_or_else(|| self.clock.now());
        let listed = self
            .twilio
            .list_calls_to(phone, since.date_naive())
            .await
            .map_err(|e| anyhow::anyhow!("listing calls at Twilio: {e}"))?;
        let known = cmb_projections::calls::other_sids_to(
            self.store.pool(),
            phone,
            uuid::Uuid::parse_str(id)?,
        )
        .await?;
        let window = since - chrono::Duration::seconds(5);
        Ok(listed
            .into_iter()
            .filter(|c| !known.contains(&c.sid))
            .filter(|c| created_at(c).is_none_or(|t| t >= window))
            .max_by_key(created_at)
            .map(|c| c.sid))
    }
}
