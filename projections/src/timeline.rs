//! Every event's place in its aggregate's story: what happened, when, and who caused it.

use async_trait::async_trait;
use cmb_domain::call::{CallEvent, Payment};
use cmb_domain::EventEnvelope;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::Projection;

pub struct Timeline;

#[async_trait]
impl Projection for Timeline {
    fn name(&self) -> &'static str {
        "timeline"
    }
    fn tables(&self) -> &'static [&'static str] {
        &["rm_timeline"]
    }
    fn aggregate_types(&self) -> &'static [&'static str] {
        &[]
    }
    async fn apply(&self, db: &mut PgConnection, e: &EventEnvelope) -> Result<(), sqlx::Error> {
        let story = match e.aggregate_type.as_str() {
            "call" => e.decode::<CallEvent>().ok().map(|event| call_story(&event)),
            _ => None,
        };
        let (status, summary) = story.unwrap_or_default();
        let summary = match (&status, summary) {
            // From the status before, in the same aggregate's story.
            (Some(to), None) => {
                let from: Option<String> = sqlx::query_scalar(
                    "SELECT status FROM rm_timeline
                      WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence < $3
                        AND status IS NOT NULL
                      ORDER BY sequence DESC LIMIT 1",
                )
                .bind(&e.aggregate_type)
                .bind(&e.aggregate_id)
                .bind(e.sequence as i64)
                .fetch_optional(&mut *db)
                .await?;
                Some(match from {
                    Some(from) => format!("status {from} → {to}"),
                    None => format!("status → {to}"),
                })
            }
            (_, summary) => summary,
        };
        sqlx::query(
            "INSERT INTO rm_timeline (aggregate_type, aggregate_id, sequence, event_type, occurred_at,
                                      actor, request_id, correlation_id, causation_id, status, summary)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT DO NOTHING",
        )
        .bind(&e.aggregate_type)
        .bind(&e.aggregate_id)
        .bind(e.sequence as i64)
        .bind(&e.event_type)
        .bind(e.occurred_at)
        .bind(&e.metadata.actor)
        .bind(&e.metadata.request_id)
        .bind(&e.metadata.correlation_id)
        .bind(&e.metadata.causation_id)
        .bind(&status)
        .bind(&summary)
        .execute(db)
        .await?;
        Ok(())
    }
}

/// One line of a timeline.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct Entry {
    pub sequence: i64,
    pub event_type: String,
    pub occurred_at: chrono::DateTime<chrono::Utc>,
    pub actor: String,
    pub correlation_id: String,
    pub causation_id: String,
    /// The status the event moved the call to, when it moved it.
    pub status: Option<String>,
    /// What happened, for people: `status ringing → in-progress`, `settled: 65 ¢ captured,
    /// 0 ¢ released`, `turn 2: first audio after 640 ms (cerebras)`, …
    pub summary: Option<String>,
}

/// The status a call event moves the call to, and what it says (a status change's summary,
/// `from → to`, is written by `apply`, which knows the status before).
fn call_story(event: &CallEvent) -> (Option<String>, Option<String>) {
    let cents = |c: i64| format!("{c} ¢");
    match event {
        CallEvent::CallRequested {
            max_minutes,
            max_price_cents,
            payment,
            scheduled_for,
            ..
        } => {
            let hold = match payment {
                Payment::Credits { credits } => format!("{credits} credits reserved"),
                Payment::Card { payment_intent_id } => {
                    format!(
                        "{} held on card ({payment_intent_id})",
                        cents(*max_price_cents)
                    )
                }
            };
            let (status, when) = match scheduled_for {
                Some(at) => ("scheduled", format!(" for {}", at.to_rfc3339())),
                None => ("initiated", String::new()),
            };
            (
                Some(status.into()),
                Some(format!(
                    "requested{when}: up to {max_minutes} min, at most {}; {hold}",
                    cents(*max_price_cents)
                )),
            )
        }
        CallEvent::ScheduledCallFired { .. } => (
            Some("initiated".into()),
            Some("status scheduled → initiated: the scheduled time came".into()),
        ),
        CallEvent::CallCancelled { .. } => (
            Some("canceled".into()),
            Some("cancelled; the hold is released in full".into()),
        ),
        CallEvent::DialAttempted { attempt, .. } => (None, Some(format!("dial attempt {attempt}"))),
        CallEvent::DialFailed { attempt, reason } => (
            None,
            Some(format!("dial attempt {attempt} failed: {reason}")),
        ),
        CallEvent::CallPlaced { call_sid } => {
            (None, Some(format!("placed with Twilio ({call_sid})")))
        }
        CallEvent::CallStatusChanged { status, .. } => (Some(status.as_str().into()), None),
        CallEvent::CallEnded {
            outcome,
            answered_secs,
            billed_minutes,
            price_cents,
            ..
        } => (
            Some(outcome.as_str().into()),
            Some(format!(
                "ended {}: answered {answered_secs} s, {billed_minutes} min billed, price {}",
                outcome.as_str(),
                cents(*price_cents)
            )),
        ),
        CallEvent::CallSettled {
            charged_cents,
            released_cents,
            ..
        } => (
            None,
            Some(format!(
                "settled: {} captured, {} released",
                cents(*charged_cents),
                cents(*released_cents)
            )),
        ),
        CallEvent::PaymentReversed {
            kind, amount_cents, ..
        } => (
            None,
            Some(format!(
                "{} of the captured payment: {} given back",
                kind.as_str(),
                cents(*amount_cents)
            )),
        ),
        // Usage only: what a provider charges us is internal (it would tell the margin).
        CallEvent::CostRecorded(cost) => (
            None,
            Some(format!(
                "{} {}: {} {}{}",
                cost.service,
                cost.operation,
                cost.quantity,
                cost.unit,
                if cost.estimated { " (estimated)" } else { "" }
            )),
        ),
        CallEvent::TurnCompleted {
            turn,
            timings,
            interrupted,
            llm_provider,
            ..
        } => {
            let latency = timings
                .first_audio_ms
                .map(|ms| format!("first audio after {ms} ms"))
                .unwrap_or_else(|| "no reply audio".into());
            let cut = if *interrupted { ", interrupted" } else { "" };
            (
                None,
                Some(format!("turn {turn}: {latency} ({llm_provider}){cut}")),
            )
        }
        CallEvent::VoiceSessionEnded {
            turns,
            barge_ins,
            reason,
            ..
        } => (
            None,
            Some(format!(
                "voice session ended ({reason}): {turns} turns, {barge_ins} barge-ins"
            )),
        ),
        #[allow(unreachable_patterns)]
        _ => (None, None),
    }
}

/// An aggregate's events in order.
pub async fn of(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Vec<Entry>, sqlx::Error> {
    sqlx::query_as(
        "SELECT sequence, event_type, occurred_at, actor, correlation_id, causation_id, status,
                summary
           FROM rm_timeline WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::call_story;
    use cmb_domain::call::{CallEvent, Reversal, TurnTimings};

    /// What a user reads on the call detail: the amount captured and released, the amount
    /// given back, a turn's latency (the LLM that answered, and whether the caller cut it).
    #[test]
    fn the_timeline_says_amounts_and_a_turns_latency() {
        let settled = CallEvent::CallSettled {
            charged_cents: 65,
            released_cents: 10,
        };
        assert_eq!(
            call_story(&settled).1.as_deref(),
            Some("settled: 65 ¢ captured, 10 ¢ released")
        );
        let refunded = CallEvent::PaymentReversed {
            kind: Reversal::Refund,
            reference: "re_1".into(),
            amount_cents: 65,
            at: chrono::Utc::now(),
        };
        let said = call_story(&refunded).1.unwrap();
        assert!(said.contains("65 ¢ given back"), "{said}");
        let turn = CallEvent::TurnCompleted {
            turn: 2,
            timings: TurnTimings {
                first_audio_ms: Some(640),
                ..TurnTimings::default()
            },
            interrupted: true,
            llm_provider: "cerebras".into(),
            fell_back: false,
        };
        assert_eq!(
            call_story(&turn).1.as_deref(),
            Some("turn 2: first audio after 640 ms (cerebras), interrupted")
        );
    }
}
