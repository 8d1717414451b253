//! An ordered reader over a range of the stream, for rebuilds and analysts' replays.
//!
//! It uses an ordered (ephemeral, flow-controlled) consumer, so reading needs no state on the
//! server and a gap in delivery is repaired by the client library.

use async_nats::jetstream::{self, consumer};
use cmb_domain::EventEnvelope;
use futures::StreamExt;

use crate::contract::{decode_body, ContractError};
use crate::stream::StreamSettings;

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Beginning,
    Sequence(u64),
    Time(chrono::DateTime<chrono::Utc>),
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("nats: {0}")]
    Nats(#[from] async_nats::Error),
    #[error("{0}")]
    Contract(#[from] ContractError),
    #[error("the stream stopped delivering at sequence {reached}, before {until}")]
    Stalled { reached: u64, until: u64 },
}

/// One replayed event and its place in the stream.
#[derive(Debug, Clone)]
pub struct Replayed {
    pub stream_sequence: u64,
    pub event: EventEnvelope,
}

/// The stream's last sequence now: a replay that starts now reads up to here.
pub async fn last_sequence(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<u64, async_nats::Error> {
    let mut stream = js.get_stream(&settings.stream).await?;
    Ok(stream.info().await?.state.last_sequence)
}

/// Opens a reader of the events on `filter` (a subject pattern) from `start` up to and
/// including stream sequence `until`. Events arrive on the returned channel in stream order;
/// the channel closes at the end (or after the first error, which it carries).
pub async fn open(
    js: &jetstream::Context,
    settings: &StreamSettings,
    filter: &str,
    start: Start,
    until: u64,
) -> Result<tokio::sync::mpsc::Receiver<Result<Replayed, ReplayError>>, async_nats::Error> {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    if until == 0 {
        return Ok(rx);
    }
    let Some(consumer) = ordered_consumer(js, settings, filter, start).await? else {
        return Ok(rx);
    };
    let mut messages = consumer.messages().await?;
    tokio::spawn(async move {
        let mut reached = 0;
        loop {
            // The range ends at `until`, or earlier when a message says nothing matching the
            // filter follows it (`pending` = 0). A slow stream is waited for; one that stops
            // delivering for a long time is an error, never a silent early end.
            let next = tokio::time::timeout(STALL_LIMIT, messages.next()).await;
            let message = match next {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => {
                    let _ = tx.send(Err(ReplayError::Nats(e.into()))).await;
                    return;
                }
                Ok(None) => {
                    let _ = tx.send(Err(ReplayError::Stalled { reached, until })).await;
                    return;
                }
                Err(_) => {
                    let _ = tx.send(Err(ReplayError::Stalled { reached, until })).await;
                    return;
                }
            };
            let (stream_sequence, pending) = match message.info() {
                Ok(info) => (info.stream_sequence, info.pending),
                Err(e) => {
                    let _ = tx.send(Err(ReplayError::Nats(e.to_string().into()))).await;
                    return;
                }
            };
            if stream_sequence > until {
                return;
            }
            reached = stream_sequence;
            let item = decode_body(&message.payload)
                .map(|event| Replayed {
                    stream_sequence,
                    event,
                })
                .map_err(ReplayError::from);
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed || stream_sequence == until || pending == 0 {
                return;
            }
        }
    });
    Ok(rx)
}

/// An ordered consumer of `filter` from `start`, or None when nothing on the filter follows
/// `start` (an empty range).
async fn ordered_consumer(
    js: &jetstream::Context,
    settings: &StreamSettings,
    filter: &str,
    start: Start,
) -> Result<Option<consumer::Consumer<consumer::pull::OrderedConfig>>, async_nats::Error> {
    let stream = js.get_stream(&settings.stream).await?;
    let deliver_policy = match start {
        Start::Beginning => consumer::DeliverPolicy::All,
        Start::Sequence(start_sequence) => {
            consumer::DeliverPolicy::ByStartSequence { start_sequence }
        }
        Start::Time(t) => consumer::DeliverPolicy::ByStartTime {
            start_time: time_from_chrono(t),
        },
    };
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter.to_string(),
            deliver_policy,
            ..Default::default()
        })
        .await?;
    Ok((consumer.cached_info().num_pending > 0).then_some(consumer))
}

/// Reads the messages on `filter` from `start` up to and including stream sequence `until`,
/// in stream order, and hands each to `each` (with its stream sequence) right here, in the
/// caller's task: the messages that arrived together are taken as one batch, with no channel
/// and no await per message between the connection and `each`. Returns how many it handed
/// over. Several readers over disjoint sequence ranges (each on a connection of its own) read
/// a stream in parallel.
pub async fn read<F>(
    js: &jetstream::Context,
    settings: &StreamSettings,
    filter: &str,
    start: Start,
    until: u64,
    mut each: F,
) -> Result<u64, ReplayError>
where
    F: FnMut(u64, &jetstream::Message) -> Result<(), ContractError>,
{
    if until == 0 {
        return Ok(0);
    }
    let Some(consumer) = ordered_consumer(js, settings, filter, start).await? else {
        return Ok(0);
    };
    // What matched the filter from `start` when the consumer was made: everything up to
    // `until` (which was on the stream already) is in it. The range ends when that many were
    // read, not on a message's own "pending" count (seen at 0 too early on a consumer
    // starting mid-stream).
    let present = consumer.cached_info().num_pending;
    let mut batches = consumer
        .messages()
        .await
        .map_err(|e| ReplayError::Nats(e.into()))?
        .ready_chunks(4_096);
    let (mut reached, mut handed) = (0, 0);
    loop {
        // A slow stream is waited for; one that stops delivering for a long time is an error,
        // never a silent early end.
        let batch = match tokio::time::timeout(STALL_LIMIT, batches.next()).await {
            Ok(Some(batch)) => batch,
            Ok(None) | Err(_) => return Err(ReplayError::Stalled { reached, until }),
        };
        for message in batch {
            let message = message.map_err(|e| ReplayError::Nats(e.into()))?;
            let info = message
                .info()
                .map_err(|e| ReplayError::Nats(e.to_string().into()))?;
            let stream_sequence = info.stream_sequence;
            if stream_sequence > until {
                return Ok(handed);
            }
            reached = stream_sequence;
            each(stream_sequence, &message)?;
            handed += 1;
            // The range ends at `until`, or earlier when nothing matching the filter follows.
            if stream_sequence == until || handed >= present {
                return Ok(handed);
            }
        }
    }
}

/// How long a replay waits for the next message before it calls the stream stalled.
const STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

fn time_from_chrono(t: chrono::DateTime<chrono::Utc>) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
        t.timestamp_nanos_opt().unwrap_or(0),
    ))
    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}
