//! `callmeback events verify`: the stream compared with the event store up to the publisher's
//! checkpoint, and what a lost JetStream write left missing republished in commit order —
//! never behind a later event of its aggregate (README "Publication").

use async_nats::jetstream;
use cmb_domain::EventEnvelope;
use cmb_nats::contract::Outgoing;
use cmb_nats::StreamSettings;
use sqlx::PgPool;

use super::outbox::{envelope_from_row, CommitPosition, COVERED, PUBLISHER};

/// What `events verify` found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub in_store: u64,
    pub in_stream: u64,
    pub missing: Vec<String>,
    pub republished: u64,
    pub unknown_in_stream: u64,
    /// Missing events whose aggregate already has a later event on the stream: republishing
    /// them would put them after it, so they are left alone (see [`UNREPAIRABLE_HINT`]).
    pub unrepairable: Vec<String>,
}

/// What to do when `verify` finds a loss it cannot repair in order.
pub const UNREPAIRABLE_HINT: &str = "the stream holds later events of these aggregates, so \
republishing the lost ones would break their order. Rebuild the stream from the store: stop \
every instance, delete the stream (nats stream rm), DELETE FROM publisher_checkpoints, start \
one `callmeback serve` (the publisher republishes the whole log in commit order), then \
`callmeback projections rebuild NAME` for each projection.";

/// Events the checkpoint says are on the stream, after `after` in commit order.
async fn read_covered(
    pool: &PgPool,
    after: CommitPosition,
    limit: i64,
) -> Result<Vec<EventEnvelope>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version,
                e.payload, e.metadata, e.global_position, e.xact_id::text::bigint AS commit_xid,
                e.recorded_at
           FROM events e, publisher_checkpoints c
          WHERE c.name = $1 AND {COVERED}
            AND (e.xact_id, e.global_position) > ($2::text::xid8, $3)
          ORDER BY e.xact_id, e.global_position
          LIMIT $4"
    ))
    .bind(PUBLISHER)
    .bind(after.commit_xid)
    .bind(after.global_position)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(envelope_from_row).collect()
}

/// Compares the stream with the event store up to the publisher's checkpoint (what the
/// publisher has not reached yet is its job, not a loss) and, with `repair`, republishes what
/// is missing, in commit order — but never an event whose aggregate already has a later one
/// on the stream (that would break the aggregate's order: it is reported as unrepairable).
pub async fn verify(
    pool: &PgPool,
    js: &jetstream::Context,
    settings: &StreamSettings,
    repair: bool,
) -> Result<VerifyReport, async_nats::Error> {
    use std::collections::{HashMap, HashSet};
    let until = cmb_nats::replay::last_sequence(js, settings).await?;
    let mut seen: HashSet<String> = HashSet::new();
    // Per aggregate, the highest sequence the stream holds.
    let mut highest: HashMap<(String, String), u64> = HashMap::new();
    let mut rx = cmb_nats::replay::open(
        js,
        settings,
        &settings.all_subjects(),
        cmb_nats::replay::Start::Beginning,
        until,
    )
    .await?;
    while let Some(item) = rx.recv().await {
        let r = item.map_err(|e| async_nats::Error::from(e.to_string()))?;
        let top = highest
            .entry((r.event.aggregate_type.clone(), r.event.aggregate_id.clone()))
            .or_default();
        *top = (*top).max(r.event.sequence);
        seen.insert(r.event.event_id());
    }
    let mut report = VerifyReport {
        in_stream: seen.len() as u64,
        ..Default::default()
    };
    let mut after = CommitPosition::default();
    // Aggregates with an unrepairable loss: none of their later events is republished either.
    let mut broken: HashSet<(String, String)> = HashSet::new();
    loop {
        let batch = read_covered(pool, after, 5_000).await?;
        let Some(last) = batch.last() else { break };
        after = CommitPosition::of(last);
        let mut missing = Vec::new();
        for e in batch {
            report.in_store += 1;
            if seen.remove(&e.event_id()) {
                continue;
            }
            report.missing.push(e.event_id());
            let key = (e.aggregate_type.clone(), e.aggregate_id.clone());
            if broken.contains(&key) || highest.get(&key).is_some_and(|&top| top > e.sequence) {
                report.unrepairable.push(e.event_id());
                broken.insert(key);
            } else {
                missing.push(e);
            }
        }
        if repair && !missing.is_empty() {
            let missing: Vec<Outgoing> = missing.iter().map(Outgoing::of).collect();
            let acks = cmb_nats::publish::publish_in_order(js, settings, &missing).await?;
            report.republished += acks.iter().filter(|a| !a.duplicate).count() as u64;
        }
    }
    report.unknown_in_stream = seen.len() as u64;
    Ok(report)
}
