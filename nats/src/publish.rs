//! Ordered publication of committed events.
//!
//! Publishes are pipelined for throughput, but an aggregate's event `n + 1` is never sent
//! before JetStream has acknowledged its event `n`: a batch goes out in *waves*, wave `k`
//! holding the `k`-th event of each aggregate in the batch. If a publish fails (a dropped
//! connection can lose a message while later ones on the same connection get through), the
//! later events of that aggregate have not been sent, so retrying the batch — with JetStream
//! dropping the copies it already has by `Nats-Msg-Id` — keeps per-aggregate order.

use std::collections::HashMap;

use async_nats::jetstream;

use crate::contract::Outgoing;
use crate::stream::StreamSettings;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("publishing {event_id} failed: {source}")]
    Publish {
        event_id: String,
        #[source]
        source: jetstream::context::PublishError,
    },
}

/// What JetStream said of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    pub stream_sequence: u64,
    /// JetStream already had it (a republish inside the duplicate window).
    pub duplicate: bool,
}

/// The batch split into waves, each a list of indexes into `events` in commit order.
pub fn waves(events: &[Outgoing]) -> Vec<Vec<usize>> {
    let mut rank: HashMap<(&str, &str), usize> = HashMap::new();
    let mut waves: Vec<Vec<usize>> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let k = rank
            .entry((e.aggregate_type.as_str(), e.aggregate_id.as_str()))
            .or_insert(0);
        if waves.len() <= *k {
            waves.push(Vec::new());
        }
        waves[*k].push(i);
        *k += 1;
    }
    waves
}

/// Publishes `events` (in commit order) keeping each aggregate's order; returns one ack per
/// event, in the same order. On error, nothing after the failed event's wave was sent.
pub async fn publish_in_order(
    js: &jetstream::Context,
    settings: &StreamSettings,
    events: &[Outgoing],
) -> Result<Vec<Acked>, PublishError> {
    let mut acks = vec![
        Acked {
            stream_sequence: 0,
            duplicate: false
        };
        events.len()
    ];
    for wave in waves(events) {
        for (i, ack) in wave
            .iter()
            .zip(publish_wave(js, settings, events, &wave).await?)
        {
            acks[*i] = ack;
        }
    }
    Ok(acks)
}

/// Publishes one wave (indexes into `events`, at most one per aggregate) and waits for every
/// acknowledgement; returns them in the wave's order, or the first failure.
pub async fn publish_wave(
    js: &jetstream::Context,
    settings: &StreamSettings,
    events: &[Outgoing],
    wave: &[usize],
) -> Result<Vec<Acked>, PublishError> {
    let mut pending = Vec::with_capacity(wave.len());
    for &i in wave {
        let event = &events[i];
        let subject = settings.subject(&event.aggregate_type, &event.aggregate_id);
        let ack = js
            .publish_with_headers(subject, event.headers(), event.body.clone())
            .await
            .map_err(|source| PublishError::Publish {
                event_id: event.event_id(),
                source,
            })?;
        pending.push((i, ack));
    }
    // Await every ack of the wave, then report the first failure (if any).
    let results = futures::future::join_all(
        pending
            .into_iter()
            .map(|(i, ack)| async move { (i, ack.await) }),
    )
    .await;
    results
        .into_iter()
        .map(|(i, result)| {
            result
                .map(|ack| Acked {
                    stream_sequence: ack.sequence,
                    duplicate: ack.duplicate,
                })
                .map_err(|source| PublishError::Publish {
                    event_id: events[i].event_id(),
                    source,
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(agg: &str, seq: u64) -> Outgoing {
        Outgoing {
            aggregate_type: "t".into(),
            aggregate_id: agg.into(),
            sequence: seq,
            event_type: "E".into(),
            body: Default::default(),
        }
    }

    #[test]
    fn an_aggregates_next_event_waits_for_the_next_wave() {
        let events = vec![
            event("a", 1),
            event("b", 1),
            event("a", 2),
            event("c", 1),
            event("a", 3),
            event("b", 2),
        ];
        assert_eq!(waves(&events), vec![vec![0, 1, 3], vec![2, 5], vec![4]]);
    }
}
