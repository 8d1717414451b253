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
    let Some((consumer, range)) = Range::open(js, settings, filter, start, until).await? else {
        return Ok(rx);
    };
    let mut messages = consumer.messages().await?;
    tokio::spawn(async move {
        let mut reached = 0;
        loop {
            // A slow stream is waited for; one that stops delivering for a long time is an
            // error, never a silent early end.
            let next = tokio::time::timeout(STALL_LIMIT, messages.next()).await;
            let message = match next {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => {
                    let _ = tx.send(Err(ReplayError::Nats(e.into()))).await;
                    return;
                }
                Ok(None) | Err(_) => {
                    let stalled = ReplayError::Stalled {
                        reached,
                        until: range.last,
                    };
                    let _ = tx.send(Err(stalled)).await;
                    return;
                }
            };
            let stream_sequence = match message.info() {
                Ok(info) => info.stream_sequence,
                Err(e) => {
                    let _ = tx.send(Err(ReplayError::Nats(e.to_string().into()))).await;
                    return;
                }
            };
            let step = range.step(reached, stream_sequence);
            if step == Step::Skip {
                continue;
            }
            if step == Step::Past {
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
            if tx.send(item).await.is_err() || failed || step == Step::Last {
                return;
            }
        }
    });
    Ok(rx)
}

/// A range of the stream to read on one filter (by an ordered consumer).
///
/// The range ends at a stream sequence known before reading — `until`, or the last message
/// on the filter when that comes earlier — never at a count of messages: the server's count
/// of what matches a filter from a sequence on (`num_pending`, for the consumer and in each
/// message's metadata) is not exact on the NATS servers this runs on (2.9: off by up to
/// hundreds either way for a consumer starting mid-stream, at 200,000 messages), and a range
/// ended by it lost its last few messages.
#[derive(Debug, Clone, Copy)]
struct Range {
    /// The first stream sequence of the range.
    first: u64,
    /// The last stream sequence of the range to be read (a message on the filter), or
    /// `until` when the filter has messages after it (one of which ends the read).
    last: u64,
    until: u64,
}

type OrderedConsumer = consumer::Consumer<consumer::pull::OrderedConfig>;

/// What to do with a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// In the range: hand it over.
    Take,
    /// In the range, and the range ends with it.
    Last,
    /// Before the range, or already handed over (an ordered consumer the client library
    /// remade before its first delivery starts over at the stream's first message): skip.
    Skip,
    /// After the range: the range ended before it.
    Past,
}

impl Range {
    /// The range of `filter` from `start` up to `until` and the consumer that reads it, or
    /// None when the range holds no message.
    async fn open(
        js: &jetstream::Context,
        settings: &StreamSettings,
        filter: &str,
        start: Start,
        until: u64,
    ) -> Result<Option<(OrderedConsumer, Range)>, async_nats::Error> {
        if until == 0 {
            return Ok(None);
        }
        let stream = js.get_stream(&settings.stream).await?;
        // The last message on the filter now, which is where the range ends if before `until`.
        let last_on_filter = match stream.get_last_raw_message_by_subject(filter).await {
            Ok(m) => m.sequence,
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(None)
            }
            Err(e) => return Err(e.into()),
        };
        let deliver_policy = match start {
            Start::Beginning => consumer::DeliverPolicy::All,
            Start::Sequence(start_sequence) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start_sequence.max(1),
            },
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
        // Where the server starts delivering (for a start by time too): one past what the
        // consumer counts as delivered when it is made.
        let first = consumer.cached_info().delivered.stream_sequence + 1;
        let last = until.min(last_on_filter);
        Ok((first <= last).then_some((consumer, Range { first, last, until })))
    }

    /// What to do with the message at `sequence`, the last one handed over being at `reached`.
    fn step(&self, reached: u64, sequence: u64) -> Step {
        if sequence < self.first || sequence <= reached {
            Step::Skip
        } else if sequence > self.until {
            Step::Past
        } else if sequence >= self.last {
            Step::Last
        } else {
            Step::Take
        }
    }
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
    let Some((consumer, range)) = Range::open(js, settings, filter, start, until).await? else {
        return Ok(0);
    };
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
            Ok(None) | Err(_) => {
                return Err(ReplayError::Stalled {
                    reached,
                    until: range.last,
                })
            }
        };
        for message in batch {
            let message = message.map_err(|e| ReplayError::Nats(e.into()))?;
            let info = message
                .info()
                .map_err(|e| ReplayError::Nats(e.to_string().into()))?;
            let stream_sequence = info.stream_sequence;
            match range.step(reached, stream_sequence) {
                Step::Skip => continue,
                Step::Past => return Ok(handed),
                step => {
                    reached = stream_sequence;
                    each(stream_sequence, &message)?;
                    handed += 1;
                    if step == Step::Last {
                        return Ok(handed);
                    }
                }
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

#[cfg(test)]
mod tests {
    use super::{Range, Step};

    #[test]
    fn a_range_ends_at_a_sequence_and_skips_what_came_before_it() {
        let range = Range {
            first: 10,
            last: 20,
            until: 25,
        };
        // A consumer remade before its first delivery starts over at the stream's start.
        assert_eq!(range.step(0, 3), Step::Skip);
        assert_eq!(range.step(0, 10), Step::Take);
        assert_eq!(range.step(12, 12), Step::Skip, "handed over already");
        assert_eq!(range.step(12, 19), Step::Take);
        assert_eq!(range.step(19, 20), Step::Last, "the filter's last message");
        assert_eq!(range.step(12, 26), Step::Past, "after the range");
        // A share of the stream whose filter has messages after it: the first one past it ends
        // the read.
        let share = Range {
            first: 1,
            last: 25,
            until: 25,
        };
        assert_eq!(share.step(24, 25), Step::Last);
        assert_eq!(share.step(7, 31), Step::Past);
    }
}
