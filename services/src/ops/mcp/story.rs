//! A call's story (its events, who acted, how long each step took, what it cost and how it
//! was paid) and the raw events of a call, user or type, page by page.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use cmb_domain::call::{CallEvent, Payment};
use cmb_domain::EventEnvelope;
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use super::answers::{range, Answer, Paging, ToolError};
use super::log::{Log, Scope};
use crate::ops::reconcile::{Filter, Reconciler};

#[derive(Debug, Serialize, JsonSchema)]
pub struct StoryEvent {
    pub sequence: u64,
    pub event_type: String,
    pub occurred_at: String,
    /// `user:<id>`, `system`, `webhook:twilio`, `worker:<name>`, …
    pub actor: String,
    pub causation_id: String,
    /// The event as recorded.
    pub payload: Value,
}

/// Milliseconds from the call's start (its request, or its firing when scheduled).
#[derive(Debug, Default, Serialize, JsonSchema)]
pub struct Latencies {
    pub first_dial_ms: Option<i64>,
    pub placed_ms: Option<i64>,
    pub ringing_ms: Option<i64>,
    pub answered_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    /// From the end of the call to its settlement.
    pub settled_after_end_ms: Option<i64>,
    /// Conversation time, seconds.
    pub answered_secs: u32,
}

#[derive(Debug, Default, Serialize, JsonSchema)]
pub struct PaymentStory {
    /// `credits` or `card`.
    pub method: Option<String>,
    pub credits_held: Option<i64>,
    pub payment_intent: Option<String>,
    /// The hold: the most the call could cost.
    pub max_price_cents: Option<i64>,
    pub price_cents: Option<i64>,
    pub charged_cents: Option<i64>,
    pub released_cents: Option<i64>,
    pub refunded_cents: i64,
    /// Cents of the capture the cardholder disputed (chargebacks).
    pub disputed_cents: i64,
    /// Each refund or dispute recorded on the call: kind, reference, amount, when.
    pub reversals: Vec<Value>,
    pub revenue_cents: i64,
    pub margin_cents: i64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Timeline {
    pub call_id: String,
    pub user_id: Option<String>,
    pub persona_id: Option<String>,
    pub persona_name: Option<String>,
    /// The last status the call reached (`initiated`, `ringing`, `in-progress`, `completed`, …).
    pub status: Option<String>,
    pub requested_at: Option<String>,
    pub events: Vec<StoryEvent>,
    /// Who caused the call's events, and how many each.
    pub actors: BTreeMap<String, usize>,
    pub latencies: Latencies,
    /// Each persona turn's timings (ms from the caller's end of turn) from `TurnCompleted`.
    pub turns: Vec<Value>,
    /// The voice session's summary (`VoiceSessionEnded`), when there was one.
    pub voice_session: Option<Value>,
    /// Every cost line recorded on the call.
    pub cost_lines: Vec<Value>,
    /// Per provider (cents, each rounded once; a recorded bill replaces our estimate).
    pub cost_cents: BTreeMap<String, i64>,
    pub total_cost_cents: i64,
    pub payment: PaymentStory,
    /// What `reconcile` finds wrong with this call.
    pub anomalies: Vec<Value>,
}

fn ms(start: Option<DateTime<Utc>>, at: DateTime<Utc>) -> Option<i64> {
    start.map(|s| (at - s).num_milliseconds())
}

/// The story of `call_id`, from every event of the call (and the refunds of its payment).
pub async fn call_timeline(log: &Log, call_id: &str) -> Answer<Timeline> {
    let id = Uuid::parse_str(call_id.trim())
        .map_err(|_| ToolError(format!("call_id: expected a call's UUID, got {call_id:?}")))?
        .to_string();
    let mut events = Vec::new();
    log.each(&Scope::aggregate("call", &id), |e| events.push(e))
        .await?;
    if events.is_empty() {
        return Err(ToolError(format!(
            "no call {id} in the event log (find calls with `reconcile` or `events`)"
        )));
    }
    // The call's line as reconcile makes it: its events, then Stripe's (a refund reported
    // only as `charge.refunded` counts against the call whose payment it refunds).
    let mut reconciler = Reconciler::default();
    events.iter().for_each(|e| reconciler.add(e));
    log.each(&Scope::of_type("stripe_event"), |e| reconciler.add(&e))
        .await?;
    let report = reconciler.report();
    let line = report.calls.iter().find(|c| c.call_id == id);
    let mut story = Timeline {
        call_id: id.clone(),
        user_id: None,
        persona_id: None,
        persona_name: None,
        status: None,
        requested_at: None,
        events: Vec::new(),
        actors: BTreeMap::new(),
        latencies: Latencies::default(),
        turns: Vec::new(),
        voice_session: None,
        cost_lines: Vec::new(),
        cost_cents: line.map(|l| l.cost_cents.clone()).unwrap_or_default(),
        total_cost_cents: line.map(|l| l.total_cost_cents).unwrap_or_default(),
        payment: PaymentStory::default(),
        anomalies: report
            .anomalies
            .iter()
            .filter(|a| a.call_id == id)
            .map(|a| serde_json::to_value(a).expect("serialisable"))
            .collect(),
    };
    let mut start = None;
    let mut ended_at = None;
    for e in &events {
        *story.actors.entry(e.metadata.actor.clone()).or_default() += 1;
        tell(&mut story, e, &mut start, &mut ended_at);
        story.events.push(StoryEvent {
            sequence: e.sequence,
            event_type: e.event_type.clone(),
            occurred_at: e.occurred_at.to_rfc3339(),
            actor: e.metadata.actor.clone(),
            causation_id: e.metadata.causation_id.clone(),
            payload: e.payload.clone(),
        });
    }
    if let Some(line) = line {
        story.payment.refunded_cents = line.refunded_cents;
        story.payment.disputed_cents = line.disputed_cents;
        story.payment.revenue_cents = line.revenue_cents;
        story.payment.margin_cents = line.margin_cents;
    }
    Ok(story)
}

/// What one event adds to the story.
fn tell(
    story: &mut Timeline,
    e: &EventEnvelope,
    start: &mut Option<DateTime<Utc>>,
    ended_at: &mut Option<DateTime<Utc>>,
) {
    let Ok(event) = e.decode::<CallEvent>() else {
        return;
    };
    let l = &mut story.latencies;
    let p = &mut story.payment;
    match event {
        CallEvent::CallRequested {
            user_id,
            persona_id,
            persona_name,
            payment,
            max_price_cents,
            scheduled_for,
            ..
        } => {
            story.user_id = Some(user_id.to_string());
            story.persona_id = Some(persona_id);
            story.persona_name = Some(persona_name);
            story.requested_at = Some(e.occurred_at.to_rfc3339());
            story.status = Some(
                if scheduled_for.is_some() {
                    "scheduled"
                } else {
                    "initiated"
                }
                .into(),
            );
            if scheduled_for.is_none() {
                *start = Some(e.occurred_at);
            }
            p.max_price_cents = Some(max_price_cents);
            match payment {
                Payment::Credits { credits } => {
                    p.method = Some("credits".into());
                    p.credits_held = Some(credits);
                }
                Payment::Card { payment_intent_id } => {
                    p.method = Some("card".into());
                    p.payment_intent = Some(payment_intent_id);
                }
            }
        }
        CallEvent::ScheduledCallFired { at } => {
            *start = Some(at);
            story.status = Some("initiated".into());
        }
        CallEvent::DialAttempted { at, .. } => {
            if l.first_dial_ms.is_none() {
                l.first_dial_ms = ms(*start, at);
            }
        }
        CallEvent::CallPlaced { .. } => l.placed_ms = ms(*start, e.occurred_at),
        CallEvent::CallStatusChanged { status, at, .. } => {
            match status.as_str() {
                "ringing" if l.ringing_ms.is_none() => l.ringing_ms = ms(*start, at),
                "in-progress" if l.answered_ms.is_none() => l.answered_ms = ms(*start, at),
                _ => {}
            }
            story.status = Some(status.as_str().into());
        }
        CallEvent::CallEnded {
            outcome,
            answered_secs,
            price_cents,
            at,
            ..
        } => {
            l.ended_ms = ms(*start, at);
            l.answered_secs = answered_secs;
            *ended_at = Some(at);
            p.price_cents = Some(price_cents);
            story.status = Some(outcome.as_str().into());
        }
        CallEvent::CallCancelled { .. } => story.status = Some("canceled".into()),
        CallEvent::CallSettled {
            charged_cents,
            released_cents,
        } => {
            p.charged_cents = Some(charged_cents);
            p.released_cents = Some(released_cents);
            l.settled_after_end_ms = ms(*ended_at, e.occurred_at);
        }
        CallEvent::CostRecorded(cost) => story
            .cost_lines
            .push(serde_json::to_value(cost).expect("serialisable")),
        CallEvent::TurnCompleted { .. } | CallEvent::VoiceSessionEnded { .. } => {
            let body = e.payload[&e.event_type].clone();
            if e.event_type == "TurnCompleted" {
                story.turns.push(body);
            } else {
                story.voice_session = Some(body);
            }
        }
        CallEvent::PaymentReversed {
            kind,
            reference,
            amount_cents,
            at,
        } => p.reversals.push(serde_json::json!({
            "kind": kind.as_str(),
            "reference": reference,
            "amount_cents": amount_cents,
            "at": at.to_rfc3339(),
        })),
        CallEvent::DialFailed { .. } => {}
    }
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct EventsAnswer {
    /// This page of events, in log order, each as on the stream (the message contract's body).
    pub events: Vec<Value>,
    pub returned: usize,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// The events of a call, a user (their own aggregates and their calls) or an aggregate type,
/// optionally in a time range: `replay events` with the same filters, a page at a time.
pub async fn events(
    log: &Log,
    filter: Filter,
    event_type: Option<String>,
    from: Option<&str>,
    to: Option<&str>,
    paging: Paging,
) -> Answer<EventsAnswer> {
    let span = range(from, to)?;
    let mut seen = 0usize;
    let mut page = Vec::new();
    let mut more = false;
    log.events(&filter, event_type, span, |e| {
        if seen >= paging.offset {
            if page.len() < paging.limit {
                page.push(serde_json::to_value(&e).expect("serialisable"));
            } else {
                more = true;
            }
        }
        seen += 1;
    })
    .await?;
    let next_cursor = more.then(|| (paging.offset + page.len()).to_string());
    Ok(EventsAnswer {
        returned: page.len(),
        events: page,
        next_cursor,
    })
}
