//! Calls (history, scheduled calls, usage) and their cost events.

use async_trait::async_trait;
use cmb_domain::call::{CallEvent, Payment, Status};
use cmb_domain::EventEnvelope;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Projection;

mod queries;
pub use queries::*;

pub struct Calls;

fn call_id(e: &EventEnvelope) -> Result<Uuid, sqlx::Error> {
    Uuid::parse_str(&e.aggregate_id).map_err(|err| sqlx::Error::Decode(Box::new(err)))
}

async fn set_status(
    db: &mut PgConnection,
    id: Uuid,
    status: &str,
    e: &EventEnvelope,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE rm_calls SET status = $2, updated_at = $3 WHERE id = $1")
        .bind(id)
        .bind(status)
        .bind(e.occurred_at)
        .execute(db)
        .await?;
    Ok(())
}

#[async_trait]
impl Projection for Calls {
    fn name(&self) -> &'static str {
        "calls"
    }
    fn tables(&self) -> &'static [&'static str] {
        &["rm_calls", "rm_call_costs"]
    }
    fn aggregate_types(&self) -> &'static [&'static str] {
        &["call"]
    }
    async fn apply(&self, db: &mut PgConnection, e: &EventEnvelope) -> Result<(), sqlx::Error> {
        let id = call_id(e)?;
        let event: CallEvent = e
            .decode()
            .map_err(|err| sqlx::Error::Decode(Box::new(err)))?;
        match event {
            CallEvent::CallRequested {
                user_id,
                persona_id,
                persona_name,
                phone,
                max_minutes,
                payment,
                prices,
                max_price_cents,
                scheduled_for,
                timezone,
            } => {
                let (method, reference) = match payment {
                    Payment::Credits { credits } => ("credits", credits.to_string()),
                    Payment::Card { payment_intent_id } => ("card", payment_intent_id),
                };
                let status = if scheduled_for.is_some() {
                    Status::Scheduled
                } else {
                    Status::Initiated
                };
                sqlx::query(
                    "INSERT INTO rm_calls (id, user_id, persona_id, persona_name, phone, status, max_minutes,
                                           max_price_cents, payment_method, payment_ref, price_version,
                                           scheduled_for, timezone, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14)",
                )
                .bind(id)
                .bind(user_id)
                .bind(persona_id)
                .bind(persona_name)
                .bind(phone.as_str())
                .bind(status.as_str())
                .bind(max_minutes as i32)
                .bind(max_price_cents)
                .bind(method)
                .bind(reference)
                .bind(prices.version as i32)
                .bind(scheduled_for)
                .bind(timezone)
                .bind(e.occurred_at)
                .execute(db)
                .await?;
            }
            CallEvent::ScheduledCallFired { .. } => {
                set_status(db, id, Status::Initiated.as_str(), e).await?;
            }
            CallEvent::CallCancelled { .. }
            | CallEvent::DialFailed { .. }
            | CallEvent::TurnCompleted { .. }
            | CallEvent::VoiceSessionEnded { .. } => {}
            CallEvent::DialAttempted { attempt, .. } => {
                sqlx::query(
                    "UPDATE rm_calls SET dial_attempts = $2, updated_at = $3 WHERE id = $1",
                )
                .bind(id)
                .bind(attempt as i32)
                .bind(e.occurred_at)
                .execute(db)
                .await?;
            }
            CallEvent::CallPlaced { call_sid } => {
                sqlx::query("UPDATE rm_calls SET call_sid = $2, updated_at = $3 WHERE id = $1")
                    .bind(id)
                    .bind(call_sid)
                    .bind(e.occurred_at)
                    .execute(db)
                    .await?;
            }
            CallEvent::CallStatusChanged { status, at, .. } => {
                if status == Status::InProgress {
                    sqlx::query("UPDATE rm_calls SET answered_at = $2 WHERE id = $1")
                        .bind(id)
                        .bind(at)
                        .execute(&mut *db)
                        .await?;
                }
                set_status(db, id, status.as_str(), e).await?;
            }
            CallEvent::CallEnded {
                outcome,
                answered_secs,
                billed_minutes,
                price_cents,
                at,
            } => {
                sqlx::query(
                    "UPDATE rm_calls SET status = $2, duration_secs = $3, billed_minutes = $4,
                            price_cents = $5, ended_at = $6, updated_at = $7 WHERE id = $1",
                )
                .bind(id)
                .bind(outcome.as_str())
                .bind(answered_secs as i32)
                .bind(billed_minutes as i32)
                .bind(price_cents)
                .bind(at)
                .bind(e.occurred_at)
                .execute(db)
                .await?;
            }
            CallEvent::CostRecorded(cost) => {
                // A billed line supersedes the call's other lines for its provider (and any
                // estimate arriving after it).
                sqlx::query(
                    "INSERT INTO rm_call_costs (call_id, sequence, user_id, service, operation, quantity, unit,
                                                unit_cost_micros, total_micros, estimated, at,
                                                billed_reference, superseded)
                     SELECT $1, $2, user_id, $3, $4, $5, $6, $7, $8, $9, $10, $11,
                            $11::text IS NULL AND EXISTS (
                                SELECT 1 FROM rm_call_costs b
                                 WHERE b.call_id = $1 AND b.service = $3
                                   AND b.billed_reference IS NOT NULL)
                       FROM rm_calls WHERE id = $1",
                )
                .bind(id)
                .bind(e.sequence as i64)
                .bind(&cost.service)
                .bind(cmb_domain::cost::canonical_operation(&cost.operation))
                .bind(cost.quantity)
                .bind(&cost.unit)
                .bind(cost.unit_cost_micros)
                .bind(cost.total_micros)
                .bind(cost.estimated)
                .bind(e.occurred_at)
                .bind(&cost.billed_reference)
                .execute(&mut *db)
                .await?;
                if cost.billed_reference.is_some() {
                    sqlx::query(
                        "UPDATE rm_call_costs SET superseded = true
                          WHERE call_id = $1 AND service = $2 AND billed_reference IS NULL",
                    )
                    .bind(id)
                    .bind(&cost.service)
                    .execute(&mut *db)
                    .await?;
                }
                sqlx::query(
                    "UPDATE rm_calls SET cost_micros = (
                        SELECT COALESCE(sum(total_micros), 0) FROM rm_call_costs
                         WHERE call_id = $1 AND NOT superseded)
                      WHERE id = $1",
                )
                .bind(id)
                .execute(db)
                .await?;
            }
            CallEvent::PaymentReversed { amount_cents, .. } => {
                sqlx::query(
                    "UPDATE rm_calls SET reversed_cents = reversed_cents + $2, updated_at = $3
                      WHERE id = $1",
                )
                .bind(id)
                .bind(amount_cents)
                .bind(e.occurred_at)
                .execute(db)
                .await?;
            }
            CallEvent::CallSettled { charged_cents, .. } => {
                sqlx::query(
                    "UPDATE rm_calls SET charged_cents = $2, updated_at = $3 WHERE id = $1",
                )
                .bind(id)
                .bind(charged_cents)
                .bind(e.occurred_at)
                .execute(db)
                .await?;
            }
        }
        Ok(())
    }
}
