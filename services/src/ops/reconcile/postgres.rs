//! The reconcile from the Postgres event store: either every event streamed in commit order
//! (for `replay events` and filtered reconciles), or the reconcile done by Postgres itself —
//! aggregates over the `jsonb` payloads, one row per call back — which gives the same report.

use chrono::{DateTime, Utc};
use cmb_domain::call::{Outcome, Reversal};
use cmb_domain::EventEnvelope;
use serde::Deserialize as _;
use sqlx::Row;
use uuid::Uuid;

use super::{CallFact, Reconciler, Report};
use crate::backbone::outbox::{envelope_from_row, CommitPosition, SELECT_ENVELOPE};

/// An event's place in commit order as one number (see [`Reconciler`]).
pub fn position(at: CommitPosition) -> u128 {
    ((at.commit_xid as u64 as u128) << 64) | at.global_position as u64 as u128
}

/// Events from Postgres in commit order (the same order the stream has), every event committed
/// when the read starts: one repeatable-read snapshot, so neither a transaction still open
/// elsewhere nor the publisher's progress decides what the report sees.
pub async fn from_postgres(
    pool: &sqlx::PgPool,
    tx: tokio::sync::mpsc::Sender<EventEnvelope>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> anyhow::Result<()> {
    let mut db = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *db)
        .await?;
    let mut after = CommitPosition::default();
    loop {
        let rows = sqlx::query(&format!(
            "{} WHERE (xact_id, global_position) > ($1::text::xid8, $2)
              ORDER BY xact_id, global_position
              LIMIT 5000",
            SELECT_ENVELOPE
        ))
        .bind(after.commit_xid)
        .bind(after.global_position)
        .fetch_all(&mut *db)
        .await?;
        let batch = rows
            .iter()
            .map(envelope_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let Some(last) = batch.last() else {
            return Ok(());
        };
        after = CommitPosition::of(last);
        for e in batch {
            if from.is_some_and(|f| e.occurred_at < f) || to.is_some_and(|t| e.occurred_at >= t) {
                continue;
            }
            if tx.send(e).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// Per call, what its events say, summed by Postgres: the facts set once per call (request,
/// placement, end, settlement) with how often each occurred, and the costs per provider.
const CALL_FACTS: &str = "
WITH lines AS MATERIALIZED (
  SELECT aggregate_id, event_type, xact_id, global_position, recorded_at,
         CASE event_type WHEN 'CostRecorded' THEN payload -> 'CostRecorded'
                         WHEN 'CallRequested' THEN payload -> 'CallRequested'
                         WHEN 'CallEnded' THEN payload -> 'CallEnded'
                         WHEN 'CallPlaced' THEN payload -> 'CallPlaced'
                         WHEN 'CallSettled' THEN payload -> 'CallSettled'
                         WHEN 'PaymentReversed' THEN payload -> 'PaymentReversed' END AS p
    FROM events
   WHERE aggregate_type = 'call' AND event_type = ANY($1)
), per_service AS (
  SELECT aggregate_id,
         count(*) FILTER (WHERE event_type = 'CallRequested') AS requests,
         max(recorded_at) FILTER (WHERE event_type = 'CallRequested') AS requested_at,
         max(p ->> 'user_id') FILTER (WHERE event_type = 'CallRequested') AS user_id,
         max(p -> 'payment' ->> 'method') FILTER (WHERE event_type = 'CallRequested') AS method,
         max(p -> 'payment' ->> 'payment_intent_id')
           FILTER (WHERE event_type = 'CallRequested') AS payment_intent,
         max(xact_id::text::bigint) FILTER (WHERE event_type = 'CallRequested') AS request_xid,
         max(global_position) FILTER (WHERE event_type = 'CallRequested') AS request_position,
         count(*) FILTER (WHERE event_type = 'CallPlaced') AS placed,
         max(p ->> 'call_sid') FILTER (WHERE event_type = 'CallPlaced') AS call_sid,
         count(*) FILTER (WHERE event_type = 'CallEnded') AS ended,
         max(p ->> 'outcome') FILTER (WHERE event_type = 'CallEnded') AS outcome,
         max((p ->> 'answered_secs')::bigint) FILTER (WHERE event_type = 'CallEnded') AS answered_secs,
         max((p ->> 'price_cents')::bigint) FILTER (WHERE event_type = 'CallEnded') AS price_cents,
         count(*) FILTER (WHERE event_type = 'CallSettled') AS settled,
         max((p ->> 'charged_cents')::bigint) FILTER (WHERE event_type = 'CallSettled') AS charged_cents,
         count(*) FILTER (WHERE event_type = 'PaymentReversed') AS reversals,
         count(*) FILTER (WHERE event_type = 'PaymentReversed'
                            AND p ->> 'kind' IN ('refund', 'dispute')
                            AND jsonb_typeof(p -> 'amount_cents') = 'number') AS reversals_read,
         sum((p ->> 'amount_cents')::numeric)
           FILTER (WHERE event_type = 'PaymentReversed' AND p ->> 'kind' = 'refund') AS refunded,
         sum((p ->> 'amount_cents')::numeric)
           FILTER (WHERE event_type = 'PaymentReversed' AND p ->> 'kind' = 'dispute') AS disputed,
         CASE WHEN event_type = 'CostRecorded' THEN p ->> 'service' END AS service,
         CASE WHEN event_type = 'CostRecorded'
              THEN COALESCE(jsonb_typeof(p -> 'billed_reference') = 'string', false)
         END AS billed,
         sum((p ->> 'total_micros')::bigint) FILTER (WHERE event_type = 'CostRecorded') AS micros
    FROM lines
   GROUP BY aggregate_id, 21, 22
)
SELECT aggregate_id,
       sum(requests)::int8 AS requests, max(requested_at) AS requested_at,
       max(user_id) AS user_id, max(method) AS method, max(payment_intent) AS payment_intent,
       max(request_xid) AS request_xid, max(request_position) AS request_position,
       sum(placed)::int8 AS placed, max(call_sid) AS call_sid,
       sum(ended)::int8 AS ended, max(outcome) AS outcome,
       max(answered_secs) AS answered_secs, max(price_cents) AS price_cents,
       sum(settled)::int8 AS settled, max(charged_cents) AS charged_cents,
       sum(reversals)::int8 AS reversals, sum(reversals_read)::int8 AS reversals_read,
       sum(refunded)::text AS refunded, sum(disputed)::text AS disputed,
       array_agg(service) FILTER (WHERE service IS NOT NULL) AS services,
       array_agg(billed) FILTER (WHERE service IS NOT NULL) AS billed,
       array_agg(micros::int8) FILTER (WHERE service IS NOT NULL) AS micros
  FROM per_service
 GROUP BY aggregate_id";

/// The reconcile, added up by Postgres over one repeatable-read snapshot (every event
/// committed when it starts): per call one row of its facts and cost sums; system costs and
/// Stripe refunds (few) read whole. A call whose row does not read as one request, one end …
/// (two of a fact the aggregate records once, a value that does not parse) is folded from its
/// own events instead, so the report is the one the event-by-event reconcile gives.
pub async fn reconcile_in_sql(
    pool: &sqlx::PgPool,
    range: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
) -> anyhow::Result<Report> {
    let mut db = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *db)
        .await?;
    // The aggregates sort nothing: hashing 100k calls wants more than the default 4 MB.
    sqlx::query("SET LOCAL work_mem = '256MB'")
        .execute(&mut *db)
        .await?;
    let known: Vec<&str> = cmb_domain::events::KNOWN
        .iter()
        .find(|(t, _)| *t == "call")
        .map(|(_, types)| types.to_vec())
        .unwrap_or_default();
    let mut r = Reconciler::requested_between(range);
    let mut refold = Vec::new();
    let mut rows = sqlx::query(CALL_FACTS).bind(&known).fetch(&mut *db);
    use futures::TryStreamExt as _;
    while let Some(row) = rows.try_next().await? {
        let id: String = row.try_get("aggregate_id")?;
        if !add_call_row(&mut r, &id, &row)? {
            refold.push(id);
        }
    }
    drop(rows);
    // The calls to fold event by event, and the few events of other types the reconcile
    // reads (both found through the primary key).
    let others = format!(
        "{SELECT_ENVELOPE}
          WHERE aggregate_type IN ('system_cost', 'stripe_event')
             OR (aggregate_type = 'call' AND aggregate_id = ANY($1))
          ORDER BY xact_id, global_position"
    );
    let mut rows = sqlx::query(&others).bind(&refold).fetch(&mut *db);
    while let Some(row) = rows.try_next().await? {
        let e: EventEnvelope = envelope_from_row(&row)?;
        r.add_at(position(CommitPosition::of(&e)), &e);
    }
    drop(rows);
    db.commit().await?;
    Ok(r.report())
}

/// Adds a call's row of [`CALL_FACTS`]; false (and nothing added) when the row is not what
/// one call's events folded once each give, so the call must be folded event by event.
fn add_call_row(r: &mut Reconciler, id: &str, row: &sqlx::postgres::PgRow) -> anyhow::Result<bool> {
    let count = |name: &str| row.try_get::<i64, _>(name);
    let (requests, placed, ended, settled) = (
        count("requests")?,
        count("placed")?,
        count("ended")?,
        count("settled")?,
    );
    if requests > 1 || placed > 1 || ended > 1 || settled > 1 {
        return Ok(false);
    }
    let mut facts = Vec::new();
    if requests == 1 {
        let at: Option<DateTime<Utc>> = row.try_get("requested_at")?;
        let user: Option<String> = row.try_get("user_id")?;
        let method: Option<String> = row.try_get("method")?;
        let payment_intent: Option<String> = row.try_get("payment_intent")?;
        let (Some(at), Some(Ok(user_id))) = (at, user.as_deref().map(Uuid::parse_str)) else {
            return Ok(false);
        };
        let payment_intent = match (method.as_deref(), payment_intent) {
            (Some("card"), Some(pi)) => Some(pi.into()),
            (Some("credits"), _) => None,
            _ => return Ok(false),
        };
        let at_log = CommitPosition {
            commit_xid: row.try_get::<Option<i64>, _>("request_xid")?.unwrap_or(0),
            global_position: row
                .try_get::<Option<i64>, _>("request_position")?
                .unwrap_or(0),
        };
        facts.push((
            position(at_log),
            CallFact::Requested {
                at,
                user_id,
                payment_intent,
            },
        ));
    }
    if placed == 1 {
        let Some(sid) = row.try_get::<Option<String>, _>("call_sid")? else {
            return Ok(false);
        };
        facts.push((
            0,
            CallFact::Placed {
                call_sid: sid.into(),
            },
        ));
    }
    if ended == 1 {
        let outcome: Option<String> = row.try_get("outcome")?;
        let outcome = outcome.as_deref().and_then(|o| {
            Outcome::deserialize(
                serde::de::value::StrDeserializer::<serde::de::value::Error>::new(o),
            )
            .ok()
        });
        let secs = row.try_get::<Option<i64>, _>("answered_secs")?;
        let price = row.try_get::<Option<i64>, _>("price_cents")?;
        let (Some(outcome), Some(Ok(answered_secs)), Some(price_cents)) =
            (outcome, secs.map(u32::try_from), price)
        else {
            return Ok(false);
        };
        facts.push((
            0,
            CallFact::Ended {
                outcome,
                answered_secs,
                price_cents,
            },
        ));
    }
    if settled == 1 {
        let Some(charged_cents) = row.try_get::<Option<i64>, _>("charged_cents")? else {
            return Ok(false);
        };
        facts.push((0, CallFact::Settled { charged_cents }));
    }
    // Reversals add up; each must be one `PaymentReversed` the aggregate could have written
    // (a known kind, a whole number of cents).
    if count("reversals")? != count("reversals_read")? {
        return Ok(false);
    }
    for (column, kind) in [
        ("refunded", Reversal::Refund),
        ("disputed", Reversal::Dispute),
    ] {
        let cents: Option<String> = row.try_get(column)?;
        if let Some(cents) = cents {
            let Ok(amount_cents) = cents.parse::<i64>() else {
                return Ok(false);
            };
            facts.push((0, CallFact::Reversed { kind, amount_cents }));
        }
    }
    let services: Option<Vec<Option<String>>> = row.try_get("services")?;
    let billed: Option<Vec<Option<bool>>> = row.try_get("billed")?;
    let micros: Option<Vec<Option<i64>>> = row.try_get("micros")?;
    for ((service, billed), total) in services
        .unwrap_or_default()
        .into_iter()
        .zip(billed.unwrap_or_default())
        .zip(micros.unwrap_or_default())
    {
        let (Some(service), Some(billed), Some(total_micros)) = (service, billed, total) else {
            return Ok(false);
        };
        facts.push((
            0,
            CallFact::Cost {
                service: service.into(),
                total_micros,
                billed,
            },
        ));
    }
    if facts.is_empty() {
        facts.push((0, CallFact::Other));
    }
    for (at, fact) in facts {
        r.add_call_fact(at, id, fact);
    }
    Ok(true)
}
