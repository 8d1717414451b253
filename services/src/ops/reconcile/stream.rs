//! The reconcile read from JetStream at full speed: only the subjects of the aggregate types
//! it reads (the server skips the rest), call events over several ordered consumers at once —
//! each on a connection of its own, over its own range of stream sequences — each folding the
//! bodies it receives in place; the partial reconciles merged in stream order.

use chrono::{DateTime, Utc};
use cmb_nats::replay::{self, Start};
use cmb_nats::StreamSettings;

use super::{Error, Reconciler, Report};

/// The aggregate types the reconcile reads, besides calls.
const OTHER_TYPES: [&str; 2] = ["system_cost", "stripe_event"];

/// How many consumers read the call subjects at once by default (`bench replay --partitions`
/// tries others): two read fastest on a 2-core host, where each more is the server's work too
/// (README "Benchmarks", bench replay).
pub const PARTITIONS: u64 = 2;

/// How a reconcile from the stream went.
#[derive(Debug, Clone, Copy)]
pub struct Read {
    /// Messages the server delivered (the reconcile's subjects only).
    pub messages: u64,
}

/// The reconcile of the events from `start` up to stream sequence `until`, read by
/// `partitions` consumers of the call subjects (at least one) and one per other type, each
/// on a connection of its own that reads the deliveries in place
/// ([`cmb_nats::replay::read_bodies`]).
pub async fn reconcile(
    nats_url: &str,
    settings: &StreamSettings,
    start: u64,
    until: u64,
    range: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
    partitions: u64,
) -> Result<(Report, Read), Error> {
    let start = start.max(1);
    let partitions = partitions.clamp(1, until.saturating_sub(start) + 1);
    let span = (until + 1).saturating_sub(start);
    let mut parts = Vec::new();
    for i in 0..partitions {
        let (a, b) = (
            start + span * i / partitions,
            start + span * (i + 1) / partitions - 1,
        );
        parts.push((settings.type_subjects("call"), a, b));
    }
    for t in OTHER_TYPES {
        parts.push((settings.type_subjects(t), start, until));
    }
    // Consumers are made and deleted on this one; messages arrive on each reader's own.
    let client = cmb_nats::connect(nats_url, "callmeback reconcile").await?;
    let mut readers = Vec::new();
    for (filter, a, b) in parts {
        let (client, url, settings) = (client.clone(), nats_url.to_string(), settings.clone());
        readers.push(tokio::spawn(async move {
            let mut r = Reconciler::requested_between(range);
            let start = Start::Sequence(a);
            let n =
                replay::read_bodies(&client, &url, &settings, &filter, start, b, |seq, body| {
                    Ok(r.add_body(u128::from(seq), body)?)
                })
                .await?;
            Ok::<_, Error>((r, n))
        }));
    }
    // Call partitions first, in stream order (the first taken whole as the start of the fold:
    // merged into nothing it needs no copy); then the other types (whose order against calls
    // matters only for refunds, which carry their stream sequence).
    let mut whole = Reconciler::requested_between(range);
    let mut messages = 0;
    for reader in readers {
        let (part, n) = reader.await??;
        whole.merge(part);
        messages += n;
    }
    Ok((whole.report(), Read { messages }))
}
