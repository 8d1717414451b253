//! An ordered reader over a range of the stream, for rebuilds and analysts' replays.
//!
//! It uses an ordered (ephemeral, flow-controlled) consumer, so reading needs no state on the
//! server and a gap in delivery is repaired by the client library.

use async_nats::jetstream::{self, consumer};
use cmb_domain::EventEnvelope;
use futures::StreamExt;

use crate::contract::{decode_body, ContractError};
use crate::stream::StreamSettings;
use crate::wire::{self, Connection, Op, WireError};

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
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("a delivery's reply subject is not a JetStream one: {0:?}")]
    NotJetStream(String),
    #[error("the server sent status {0} to a replay")]
    Status(u16),
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
        let Some(last_on_filter) = last_on(&stream, filter).await? else {
            return Ok(None);
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter.to_string(),
                deliver_policy: deliver_policy(start),
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

/// Reads as [`read`] does, each body handed to `each` as a slice of the read buffer: over a
/// connection of its own that parses the deliveries in place ([`crate::wire`]) from an
/// ordered push consumer (no acknowledgements; flow-control requests answered as they are
/// read; a gap in the consumer's sequence, or a heartbeat saying one was missed, makes a new
/// consumer from the last message handed over). `client` makes and deletes the consumers; a
/// `nats_url` this connection cannot speak (TLS) is read by [`read`] instead.
pub async fn read_bodies<F>(
    client: &async_nats::Client,
    nats_url: &str,
    settings: &StreamSettings,
    filter: &str,
    start: Start,
    until: u64,
    mut each: F,
) -> Result<u64, ReplayError>
where
    F: FnMut(u64, &[u8]) -> Result<(), ContractError>,
{
    if until == 0 {
        return Ok(0);
    }
    let js = jetstream::new(client.clone());
    let mut connection = match Connection::connect(nats_url, "callmeback replay").await {
        Ok(c) => c,
        Err(WireError::Unsupported(_)) => {
            let each = |seq: u64, m: &jetstream::Message| each(seq, &m.payload);
            return read(&js, settings, filter, start, until, each).await;
        }
        Err(e) => return Err(e.into()),
    };
    let stream = js
        .get_stream(&settings.stream)
        .await
        .map_err(|e| ReplayError::Nats(e.into()))?;
    let Some(last_on_filter) = last_on(&stream, filter).await? else {
        return Ok(0);
    };
    let (mut reached, mut handed) = (0, 0);
    let (mut range, mut sid) = (None, 0);
    loop {
        sid += 1;
        let inbox = client.new_inbox();
        connection.output.subscribe(&inbox, sid);
        connection.sync(|_| {}).await?;
        let from = match reached {
            0 => start,
            reached => Start::Sequence(reached + 1),
        };
        let consumer = stream
            .create_consumer(consumer::push::Config {
                deliver_subject: inbox,
                filter_subject: filter.to_string(),
                deliver_policy: deliver_policy(from),
                ack_policy: consumer::AckPolicy::None,
                max_deliver: 1,
                flow_control: true,
                idle_heartbeat: HEARTBEAT,
                memory_storage: true,
                num_replicas: 1,
                inactive_threshold: std::time::Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(|e| ReplayError::Nats(e.into()))?;
        let name = consumer.cached_info().name.clone();
        let range = *range.get_or_insert_with(|| Range {
            first: consumer.cached_info().delivered.stream_sequence + 1,
            last: until.min(last_on_filter),
            until,
        });
        let read = if range.first > range.last {
            Ok(Delivery::End)
        } else {
            deliver(
                &mut connection,
                sid,
                range,
                &mut reached,
                &mut handed,
                &mut each,
            )
            .await
        };
        connection.output.unsubscribe(sid);
        connection.flush().await?;
        // Gone by itself once nobody listens (inactive threshold); deleted now to be tidy.
        let _ = stream.delete_consumer(&name).await;
        match read? {
            Delivery::End => return Ok(handed),
            Delivery::Gap => {
                tracing::debug!(
                    reached,
                    "replay: a gap in delivery, reading on with a new consumer"
                );
            }
        }
    }
}

/// How one consumer's delivery ended.
enum Delivery {
    /// The range was read.
    End,
    /// A message was missed: read on with a new consumer.
    Gap,
}

/// Reads subscription `sid`'s deliveries (an ordered push consumer's) on `connection`.
async fn deliver<F>(
    connection: &mut Connection,
    sid: u64,
    range: Range,
    reached: &mut u64,
    handed: &mut u64,
    each: &mut F,
) -> Result<Delivery, ReplayError>
where
    F: FnMut(u64, &[u8]) -> Result<(), ContractError>,
{
    let mut consumer_sequence = 0;
    loop {
        // A slow stream is waited for; one that stops delivering for a long time is an error,
        // never a silent early end.
        match tokio::time::timeout(STALL_LIMIT, connection.fill()).await {
            Ok(filled) => filled?,
            Err(_) => {
                return Err(ReplayError::Stalled {
                    reached: *reached,
                    until: range.last,
                })
            }
        }
        while let Some(op) = connection.input.next_op()? {
            let m = match op {
                Op::Msg(m) if m.sid == sid => m,
                // An earlier consumer's, sent before it was unsubscribed.
                Op::Msg(_) | Op::Pong | Op::Other => continue,
                Op::Ping => {
                    connection.output.pong();
                    continue;
                }
                Op::Err(e) => return Err(wire::server_error(e).into()),
            };
            if let Some(status) = wire::status(m.headers) {
                if status != 100 {
                    return Err(ReplayError::Status(status));
                }
                // A flow-control request (its reply subject), or a heartbeat that says the
                // server waits for one answered (stalled) and which message it sent last.
                if !m.reply.is_empty() {
                    connection.output.publish_empty(m.reply);
                }
                if let Some(subject) = wire::header(m.headers, "Nats-Consumer-Stalled") {
                    connection.output.publish_empty(subject);
                }
                let last = wire::header(m.headers, "Nats-Last-Consumer").and_then(wire::number);
                if last.is_some_and(|last| last != consumer_sequence) {
                    return Ok(Delivery::Gap);
                }
                continue;
            }
            let (stream_sequence, delivered) = ack_sequences(m.reply).ok_or_else(|| {
                ReplayError::NotJetStream(String::from_utf8_lossy(m.reply).into())
            })?;
            if delivered != consumer_sequence + 1 {
                return Ok(Delivery::Gap);
            }
            consumer_sequence = delivered;
            match range.step(*reached, stream_sequence) {
                Step::Skip => continue,
                Step::Past => return Ok(Delivery::End),
                step => {
                    *reached = stream_sequence;
                    each(stream_sequence, m.payload)?;
                    *handed += 1;
                    if step == Step::Last {
                        return Ok(Delivery::End);
                    }
                }
            }
        }
        connection.flush().await?;
    }
}

/// The stream and consumer sequences of a JetStream delivery, from its reply subject:
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`, or
/// with a domain and account hash after `ACK` (and a token at the end) on newer servers.
fn ack_sequences(reply: &[u8]) -> Option<(u64, u64)> {
    let mut tokens = [&reply[..0]; 12];
    let mut count = 0;
    for token in reply.split(|&b| b == b'.') {
        *tokens.get_mut(count)? = token;
        count += 1;
    }
    if tokens[0] != b"$JS" || tokens[1] != b"ACK" {
        return None;
    }
    let at = match count {
        9 => 5,
        c if c >= 11 => 7,
        _ => return None,
    };
    Some((wire::number(tokens[at])?, wire::number(tokens[at + 1])?))
}

/// How often a replay's push consumer sends a heartbeat when it has nothing to deliver.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a replay waits for the next message before it calls the stream stalled.
const STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The last message on `filter` now (where a range ends if before its `until`), None when
/// the filter has none.
async fn last_on(
    stream: &jetstream::stream::Stream,
    filter: &str,
) -> Result<Option<u64>, async_nats::Error> {
    match stream.get_last_raw_message_by_subject(filter).await {
        Ok(m) => Ok(Some(m.sequence)),
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

fn deliver_policy(start: Start) -> consumer::DeliverPolicy {
    match start {
        Start::Beginning => consumer::DeliverPolicy::All,
        Start::Sequence(start_sequence) => consumer::DeliverPolicy::ByStartSequence {
            start_sequence: start_sequence.max(1),
        },
        Start::Time(t) => consumer::DeliverPolicy::ByStartTime {
            start_time: time_from_chrono(t),
        },
    }
}

fn time_from_chrono(t: chrono::DateTime<chrono::Utc>) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
        t.timestamp_nanos_opt().unwrap_or(0),
    ))
    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::{ack_sequences, Range, Step};

    #[test]
    fn a_delivery_s_sequences_are_read_from_its_reply_subject() {
        assert_eq!(
            ack_sequences(b"$JS.ACK.CMB_EVENTS.abc.1.4207.12.1700000000000000000.99"),
            Some((4207, 12))
        );
        assert_eq!(
            ack_sequences(
                b"$JS.ACK.hub.ACCHASH.CMB_EVENTS.abc.1.4207.12.1700000000000000000.99.tok"
            ),
            Some((4207, 12))
        );
        assert_eq!(ack_sequences(b"_INBOX.abc"), None);
        assert_eq!(ack_sequences(b"$JS.ACK.S.C.1.x.12.0.0"), None);
        assert_eq!(ack_sequences(b""), None);
    }

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
