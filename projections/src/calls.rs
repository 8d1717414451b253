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

type Time = chrono::DateTime<chrono::Utc>;

/// What a batch changes in one call's row: each field its last value in the batch (as the
/// events' updates one after the other would leave it), payment reversals added up.
#[derive(Default)]
struct Patch {
    status: Option<&'static str>,
    updated_at: Option<Time>,
    dial_attempts: Option<i32>,
    call_sid: Option<String>,
    answered_at: Option<Time>,
    duration_secs: Option<i32>,
    billed_minutes: Option<i32>,
    price_cents: Option<i64>,
    ended_at: Option<Time>,
    charged_cents: Option<i64>,
    reversed_cents: i64,
}

/// The patch of call `id`, touched (its `updated_at` moved) at `at`.
fn touch(patches: &mut std::collections::BTreeMap<Uuid, Patch>, id: Uuid, at: Time) -> &mut Patch {
    let patch = patches.entry(id).or_default();
    patch.updated_at = Some(at);
    patch
}

/// New calls of a batch, column by column (bound as arrays).
#[derive(Default)]
struct NewCalls {
    id: Vec<Uuid>,
    user_id: Vec<Uuid>,
    persona_id: Vec<String>,
    persona_name: Vec<String>,
    phone: Vec<String>,
    status: Vec<&'static str>,
    max_minutes: Vec<i32>,
    max_price_cents: Vec<i64>,
    payment_method: Vec<&'static str>,
    payment_ref: Vec<String>,
    price_version: Vec<i32>,
    scheduled_for: Vec<Option<Time>>,
    timezone: Vec<Option<String>>,
    created_at: Vec<Time>,
}

/// Cost lines of a batch, column by column.
#[derive(Default)]
struct CostLines {
    call_id: Vec<Uuid>,
    sequence: Vec<i64>,
    service: Vec<String>,
    operation: Vec<String>,
    quantity: Vec<i64>,
    unit: Vec<String>,
    unit_cost_micros: Vec<i64>,
    total_micros: Vec<i64>,
    estimated: Vec<bool>,
    at: Vec<Time>,
    billed_reference: Vec<Option<String>>,
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
        self.apply_all(db, &[e]).await
    }

    /// Set-based: the batch's new calls in one insert, every other change to a call folded
    /// into one patch per call and written by one update, its cost lines in one insert, then
    /// the lines a bill supersedes and the calls' cost totals, one statement each.
    async fn apply_all(
        &self,
        db: &mut PgConnection,
        events: &[&EventEnvelope],
    ) -> Result<(), sqlx::Error> {
        use std::collections::{BTreeMap, BTreeSet};
        let mut new = NewCalls::default();
        // By id, so the rows are updated in one order whoever updates them.
        let mut patches: BTreeMap<Uuid, Patch> = BTreeMap::new();
        let mut costs = CostLines::default();
        let mut costed: BTreeSet<Uuid> = BTreeSet::new();
        let mut billed: BTreeSet<(Uuid, String)> = BTreeSet::new();
        for e in events {
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
                    new.id.push(id);
                    new.user_id.push(user_id);
                    new.persona_id.push(persona_id);
                    new.persona_name.push(persona_name);
                    new.phone.push(phone.as_str().to_string());
                    new.status.push(status.as_str());
                    new.max_minutes.push(max_minutes as i32);
                    new.max_price_cents.push(max_price_cents);
                    new.payment_method.push(method);
                    new.payment_ref.push(reference);
                    new.price_version.push(prices.version as i32);
                    new.scheduled_for.push(scheduled_for);
                    new.timezone.push(timezone);
                    new.created_at.push(e.occurred_at);
                }
                CallEvent::ScheduledCallFired { .. } => {
                    touch(&mut patches, id, e.occurred_at).status =
                        Some(Status::Initiated.as_str());
                }
                CallEvent::CallCancelled { .. }
                | CallEvent::DialFailed { .. }
                | CallEvent::TurnCompleted { .. }
                | CallEvent::VoiceSessionEnded { .. } => {}
                CallEvent::DialAttempted { attempt, .. } => {
                    touch(&mut patches, id, e.occurred_at).dial_attempts = Some(attempt as i32);
                }
                CallEvent::CallPlaced { call_sid } => {
                    touch(&mut patches, id, e.occurred_at).call_sid = Some(call_sid);
                }
                CallEvent::CallStatusChanged { status, at, .. } => {
                    let patch = touch(&mut patches, id, e.occurred_at);
                    if status == Status::InProgress {
                        patch.answered_at = Some(at);
                    }
                    patch.status = Some(status.as_str());
                }
                CallEvent::CallEnded {
                    outcome,
                    answered_secs,
                    billed_minutes,
                    price_cents,
                    at,
                } => {
                    let patch = touch(&mut patches, id, e.occurred_at);
                    patch.status = Some(outcome.as_str());
                    patch.duration_secs = Some(answered_secs as i32);
                    patch.billed_minutes = Some(billed_minutes as i32);
                    patch.price_cents = Some(price_cents);
                    patch.ended_at = Some(at);
                }
                CallEvent::CostRecorded(cost) => {
                    costed.insert(id);
                    if cost.billed_reference.is_some() {
                        billed.insert((id, cost.service.clone()));
                    }
                    costs.call_id.push(id);
                    costs.sequence.push(e.sequence as i64);
                    costs
                        .operation
                        .push(cmb_domain::cost::canonical_operation(&cost.operation).to_string());
                    costs.service.push(cost.service);
                    costs.quantity.push(cost.quantity);
                    costs.unit.push(cost.unit);
                    costs.unit_cost_micros.push(cost.unit_cost_micros);
                    costs.total_micros.push(cost.total_micros);
                    costs.estimated.push(cost.estimated);
                    costs.at.push(e.occurred_at);
                    costs.billed_reference.push(cost.billed_reference);
                }
                CallEvent::PaymentReversed { amount_cents, .. } => {
                    touch(&mut patches, id, e.occurred_at).reversed_cents += amount_cents;
                }
                CallEvent::CallSettled { charged_cents, .. } => {
                    touch(&mut patches, id, e.occurred_at).charged_cents = Some(charged_cents);
                }
            }
        }
        if !new.id.is_empty() {
            sqlx::query(
                "INSERT INTO rm_calls (id, user_id, persona_id, persona_name, phone, status, max_minutes,
                                       max_price_cents, payment_method, payment_ref, price_version,
                                       scheduled_for, timezone, created_at, updated_at)
                 SELECT id, user_id, persona_id, persona_name, phone, status, max_minutes,
                        max_price_cents, payment_method, payment_ref, price_version,
                        scheduled_for, timezone, created_at, created_at
                   FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                               $6::text[], $7::int4[], $8::int8[], $9::text[], $10::text[],
                               $11::int4[], $12::timestamptz[], $13::text[], $14::timestamptz[])
                     AS u(id, user_id, persona_id, persona_name, phone, status, max_minutes,
                          max_price_cents, payment_method, payment_ref, price_version,
                          scheduled_for, timezone, created_at)",
            )
            .bind(&new.id)
            .bind(&new.user_id)
            .bind(&new.persona_id)
            .bind(&new.persona_name)
            .bind(&new.phone)
            .bind(&new.status)
            .bind(&new.max_minutes)
            .bind(&new.max_price_cents)
            .bind(&new.payment_method)
            .bind(&new.payment_ref)
            .bind(&new.price_version)
            .bind(&new.scheduled_for)
            .bind(&new.timezone)
            .bind(&new.created_at)
            .execute(&mut *db)
            .await?;
        }
        if !patches.is_empty() {
            let mut ids = Vec::with_capacity(patches.len());
            let mut status = Vec::with_capacity(patches.len());
            let mut updated_at = Vec::with_capacity(patches.len());
            let mut dial_attempts = Vec::with_capacity(patches.len());
            let mut call_sid = Vec::with_capacity(patches.len());
            let mut answered_at = Vec::with_capacity(patches.len());
            let mut duration_secs = Vec::with_capacity(patches.len());
            let mut billed_minutes = Vec::with_capacity(patches.len());
            let mut price_cents = Vec::with_capacity(patches.len());
            let mut ended_at = Vec::with_capacity(patches.len());
            let mut charged_cents = Vec::with_capacity(patches.len());
            let mut reversed_cents = Vec::with_capacity(patches.len());
            for (id, p) in patches {
                ids.push(id);
                status.push(p.status);
                updated_at.push(p.updated_at);
                dial_attempts.push(p.dial_attempts);
                call_sid.push(p.call_sid);
                answered_at.push(p.answered_at);
                duration_secs.push(p.duration_secs);
                billed_minutes.push(p.billed_minutes);
                price_cents.push(p.price_cents);
                ended_at.push(p.ended_at);
                charged_cents.push(p.charged_cents);
                reversed_cents.push(p.reversed_cents);
            }
            sqlx::query(
                "UPDATE rm_calls c
                    SET status = COALESCE(u.status, c.status),
                        updated_at = COALESCE(u.updated_at, c.updated_at),
                        dial_attempts = COALESCE(u.dial_attempts, c.dial_attempts),
                        call_sid = COALESCE(u.call_sid, c.call_sid),
                        answered_at = COALESCE(u.answered_at, c.answered_at),
                        duration_secs = COALESCE(u.duration_secs, c.duration_secs),
                        billed_minutes = COALESCE(u.billed_minutes, c.billed_minutes),
                        price_cents = COALESCE(u.price_cents, c.price_cents),
                        ended_at = COALESCE(u.ended_at, c.ended_at),
                        charged_cents = COALESCE(u.charged_cents, c.charged_cents),
                        reversed_cents = c.reversed_cents + u.reversed_cents
                   FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::int4[], $5::text[],
                               $6::timestamptz[], $7::int4[], $8::int4[], $9::int8[],
                               $10::timestamptz[], $11::int8[], $12::int8[])
                     AS u(id, status, updated_at, dial_attempts, call_sid, answered_at,
                          duration_secs, billed_minutes, price_cents, ended_at, charged_cents,
                          reversed_cents)
                  WHERE c.id = u.id",
            )
            .bind(&ids)
            .bind(&status)
            .bind(&updated_at)
            .bind(&dial_attempts)
            .bind(&call_sid)
            .bind(&answered_at)
            .bind(&duration_secs)
            .bind(&billed_minutes)
            .bind(&price_cents)
            .bind(&ended_at)
            .bind(&charged_cents)
            .bind(&reversed_cents)
            .execute(&mut *db)
            .await?;
        }
        if costed.is_empty() {
            return Ok(());
        }
        // A billed line supersedes the call's other lines for its provider, earlier or later:
        // a line is inserted superseded when a billed one is there already, and the batch's
        // billed lines then supersede the rest (this batch's lines too).
        sqlx::query(
            "INSERT INTO rm_call_costs (call_id, sequence, user_id, service, operation, quantity, unit,
                                        unit_cost_micros, total_micros, estimated, at,
                                        billed_reference, superseded)
             SELECT u.call_id, u.sequence, c.user_id, u.service, u.operation, u.quantity, u.unit,
                    u.unit_cost_micros, u.total_micros, u.estimated, u.at, u.billed_reference,
                    u.billed_reference IS NULL AND EXISTS (
                        SELECT 1 FROM rm_call_costs b
                         WHERE b.call_id = u.call_id AND b.service = u.service
                           AND b.billed_reference IS NOT NULL)
               FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::text[], $5::int8[], $6::text[],
                           $7::int8[], $8::int8[], $9::bool[], $10::timestamptz[], $11::text[])
                 AS u(call_id, sequence, service, operation, quantity, unit, unit_cost_micros,
                      total_micros, estimated, at, billed_reference)
               JOIN rm_calls c ON c.id = u.call_id",
        )
        .bind(&costs.call_id)
        .bind(&costs.sequence)
        .bind(&costs.service)
        .bind(&costs.operation)
        .bind(&costs.quantity)
        .bind(&costs.unit)
        .bind(&costs.unit_cost_micros)
        .bind(&costs.total_micros)
        .bind(&costs.estimated)
        .bind(&costs.at)
        .bind(&costs.billed_reference)
        .execute(&mut *db)
        .await?;
        if !billed.is_empty() {
            let (calls, services): (Vec<Uuid>, Vec<String>) = billed.into_iter().unzip();
            sqlx::query(
                "UPDATE rm_call_costs k SET superseded = true
                   FROM unnest($1::uuid[], $2::text[]) AS u(call_id, service)
                  WHERE k.call_id = u.call_id AND k.service = u.service
                    AND k.billed_reference IS NULL AND NOT k.superseded",
            )
            .bind(&calls)
            .bind(&services)
            .execute(&mut *db)
            .await?;
        }
        let costed: Vec<Uuid> = costed.into_iter().collect();
        sqlx::query(
            "UPDATE rm_calls c SET cost_micros = (
                SELECT COALESCE(sum(total_micros), 0) FROM rm_call_costs
                 WHERE call_id = c.id AND NOT superseded)
              WHERE c.id = ANY($1::uuid[])",
        )
        .bind(&costed)
        .execute(db)
        .await?;
        Ok(())
    }
}
