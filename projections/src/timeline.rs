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
        self.apply_all(db, &[e]).await
    }

    /// One insert for the whole batch; a status change's summary names the status before it,
    /// from the batch or, for an aggregate's first status change in it, from one read of the
    /// aggregates' last status so far.
    async fn apply_all(
        &self,
        db: &mut PgConnection,
        events: &[&EventEnvelope],
    ) -> Result<(), sqlx::Error> {
        use std::collections::HashMap;
        if events.is_empty() {
            return Ok(());
        }
        let stories: Vec<(Option<String>, Option<String>)> = events
            .iter()
            .map(|e| match e.aggregate_type.as_str() {
                "call" => e.decode::<CallEvent>().ok().map(|event| call_story(&event)),
                _ => None,
            })
            .map(Option::unwrap_or_default)
            .collect();
        // The aggregates whose first status change in the batch comes before any other status
        // of theirs in it: the status before is in the table (below that event's sequence).
        let mut first_change: HashMap<(&str, &str), Option<i64>> = HashMap::new();
        for (e, (status, summary)) in events.iter().zip(&stories) {
            if status.is_none() {
                continue;
            }
            first_change
                .entry((e.aggregate_type.as_str(), e.aggregate_id.as_str()))
                .or_insert_with(|| summary.is_none().then_some(e.sequence as i64));
        }
        let (mut types, mut ids, mut below) = (Vec::new(), Vec::new(), Vec::new());
        for ((t, i), sequence) in &first_change {
            if let Some(sequence) = sequence {
                types.push(*t);
                ids.push(*i);
                below.push(*sequence);
            }
        }
        let mut last_status: HashMap<(String, String), String> = HashMap::new();
        if !types.is_empty() {
            let rows: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT u.t, u.i, l.status
                   FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(t, i, s)
                  CROSS JOIN LATERAL (
                        SELECT status FROM rm_timeline
                         WHERE aggregate_type = u.t AND aggregate_id = u.i AND sequence < u.s
                           AND status IS NOT NULL
                         ORDER BY sequence DESC LIMIT 1) AS l",
            )
            .bind(&types)
            .bind(&ids)
            .bind(&below)
            .fetch_all(&mut *db)
            .await?;
            last_status.extend(rows.into_iter().map(|(t, i, status)| ((t, i), status)));
        }
        let n = events.len();
        let mut rows = Rows {
            aggregate_type: Vec::with_capacity(n),
            aggregate_id: Vec::with_capacity(n),
            sequence: Vec::with_capacity(n),
            event_type: Vec::with_capacity(n),
            occurred_at: Vec::with_capacity(n),
            actor: Vec::with_capacity(n),
            request_id: Vec::with_capacity(n),
            correlation_id: Vec::with_capacity(n),
            causation_id: Vec::with_capacity(n),
            status: Vec::with_capacity(n),
            summary: Vec::with_capacity(n),
        };
        for (e, (status, summary)) in events.iter().zip(stories) {
            let key = (e.aggregate_type.clone(), e.aggregate_id.clone());
            let summary = match (&status, summary) {
                // From the status before, in the same aggregate's story.
                (Some(to), None) => Some(match last_status.get(&key) {
                    Some(from) => format!("status {from} → {to}"),
                    None => format!("status → {to}"),
                }),
                (_, summary) => summary,
            };
            if let Some(to) = &status {
                last_status.insert(key, to.clone());
            }
            rows.aggregate_type.push(e.aggregate_type.as_str());
            rows.aggregate_id.push(e.aggregate_id.as_str());
            rows.sequence.push(e.sequence as i64);
            rows.event_type.push(e.event_type.as_str());
            rows.occurred_at.push(e.occurred_at);
            rows.actor.push(e.metadata.actor.as_str());
            rows.request_id.push(e.metadata.request_id.as_str());
            rows.correlation_id.push(e.metadata.correlation_id.as_str());
            rows.causation_id.push(e.metadata.causation_id.as_str());
            rows.status.push(status);
            rows.summary.push(summary);
        }
        sqlx::query(
            "INSERT INTO rm_timeline (aggregate_type, aggregate_id, sequence, event_type, occurred_at,
                                      actor, request_id, correlation_id, causation_id, status, summary)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[],
                                  $5::timestamptz[], $6::text[], $7::text[], $8::text[],
                                  $9::text[], $10::text[], $11::text[])
             ON CONFLICT DO NOTHING",
        )
        .bind(&rows.aggregate_type)
        .bind(&rows.aggregate_id)
        .bind(&rows.sequence)
        .bind(&rows.event_type)
        .bind(&rows.occurred_at)
        .bind(&rows.actor)
        .bind(&rows.request_id)
        .bind(&rows.correlation_id)
        .bind(&rows.causation_id)
        .bind(&rows.status)
        .bind(&rows.summary)
        .execute(db)
        .await?;
        Ok(())
    }
}

/// The timeline rows of a batch, column by column (bound as arrays).
struct Rows<'e> {
    aggregate_type: Vec<&'e str>,
    aggregate_id: Vec<&'e str>,
    sequence: Vec<i64>,
    event_type: Vec<&'e str>,
    occurred_at: Vec<chrono::DateTime<chrono::Utc>>,
    actor: Vec<&'e str>,
    request_id: Vec<&'e str>,
    correlation_id: Vec<&'e str>,
    causation_id: Vec<&'e str>,
    status: Vec<Option<String>>,
    summary: Vec<Option<String>>,
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
