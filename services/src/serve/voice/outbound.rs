//! The outbound half of a Twilio media stream: audio paced by a wall-clock schedule with a
//! lead (the first frames at once, then one every 20 ms, catching up after a late wake-up), so
//! Twilio's buffer holds about `LEAD` of audio and a real network does not underrun it; marks
//! after each chunk; `clear` at once on a barge-in, or a pause that can resume from the last
//! played mark. Every chunk carries its turn id; a chunk of an older turn than the current one
//! is dropped, so audio of a cancelled reply that is still in flight never reaches the caller.
//!
//! Per frame: one string (the JSON around the payload is made once per stream), one
//! base64 encoding; one wake-up and one write for the frames due within the next [`AHEAD`]
//! (three at a time). No timer runs while there is nothing to send. Frame lateness against the schedule goes into a histogram of the session's
//! own, merged into the instance's [`Pacing`] when the stream ends.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use cmb_providers::twilio::stream::{MediaFrames, StreamMessage};
use futures::stream::SplitSink;
use futures::SinkExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub const FRAME_BYTES: usize = 160;
pub const FRAME: Duration = Duration::from_millis(20);
/// How far ahead of playback the schedule runs: Twilio's buffer holds this much of our audio.
pub const LEAD: Duration = Duration::from_millis(80);
/// Frames due within this of now go out with the one due now: one wake-up and one write for
/// three frames rather than one each, Twilio's buffer between [`LEAD`] and `LEAD + AHEAD`.
pub const AHEAD: Duration = Duration::from_millis(40);

pub enum Out {
    Audio {
        turn: u64,
        audio: Bytes,
    },
    /// A mark named `<turn>:<frames of this turn queued before it>`.
    Mark {
        turn: u64,
    },
    /// Stop sending at once and tell Twilio to drop what it buffered, keeping the audio that
    /// has not been heard so it can resume.
    Pause,
    /// Go on with `turn` from frame `from` (its last played mark).
    Resume {
        turn: u64,
        from: u64,
    },
    /// Frames of `turn` before `frames` have played (an echoed mark): no need to keep them.
    Played {
        turn: u64,
        frames: u64,
    },
    /// Drop everything queued and tell Twilio to drop what it buffered.
    Clear,
    Close,
}

/// What the writer reports to the session.
#[derive(Debug)]
pub enum Sent {
    FirstFrame {
        turn: u64,
        at: Instant,
    },
    /// Audio resumed after the queue had run dry.
    Playing {
        turn: u64,
    },
    /// Nothing left to send; Twilio has `frames` of the turn (its last mark is at `frames`).
    Drained {
        turn: u64,
        frames: u64,
        at: Instant,
    },
}

enum Item {
    /// Turn, index of the frame in its turn, audio.
    Frame(u64, u64, [u8; FRAME_BYTES]),
    Mark(u64, u64),
}

impl Item {
    fn turn(&self) -> u64 {
        match self {
            Item::Frame(t, _, _) | Item::Mark(t, _) => *t,
        }
    }
}

/// Buckets of a quarter millisecond of frame lateness, the last one "64 ms or more".
const BUCKETS: usize = 256;
const BUCKET_US: u64 = 250;

/// Frame lateness of every session of the instance (for the bench and metrics): a histogram
/// that sessions add their own to when they end.
pub struct Pacing {
    buckets: [AtomicU64; BUCKETS],
    pub frames: AtomicU64,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            frames: AtomicU64::new(0),
        }
    }
}

impl Pacing {
    fn add(&self, session: &Lateness) {
        for (total, n) in self.buckets.iter().zip(session.buckets.iter()) {
            if *n > 0 {
                total.fetch_add(u64::from(*n), Ordering::Relaxed);
            }
        }
        self.frames.fetch_add(session.frames, Ordering::Relaxed);
    }

    pub fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
        self.frames.store(0, Ordering::Relaxed);
    }

    /// Frames paced by the timer, and the lateness (ms, upper bucket bound) at quantile `q`.
    pub fn lateness_ms(&self, q: f64) -> (u64, f64) {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return (0, 0.0);
        }
        let rank = ((total as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return (total, ((i as u64 + 1) * BUCKET_US) as f64 / 1000.0);
            }
        }
        (total, (BUCKETS as u64 * BUCKET_US) as f64 / 1000.0)
    }
}

/// One session's frame lateness: no lock, no growth per frame.
struct Lateness {
    buckets: Box<[u32; BUCKETS]>,
    frames: u64,
}

impl Lateness {
    fn record(&mut self, late: Duration) {
        let i = ((late.as_micros() as u64) / BUCKET_US).min(BUCKETS as u64 - 1) as usize;
        self.buckets[i] = self.buckets[i].saturating_add(1);
    }
}

struct Writer {
    sink: SplitSink<WebSocket, Message>,
    stream_sid: String,
    media: MediaFrames,
    events: mpsc::Sender<Sent>,
    current_turn: Arc<AtomicU64>,
    seen_turn: u64,
    queue: VecDeque<Item>,
    /// Sent but not known to have played (no mark echoed after it yet): what a resume re-sends.
    unplayed: VecDeque<Item>,
    partial: Vec<u8>,
    frames_in_turn: u64,
    queued_turn: u64,
    playing: Option<u64>,
    started: Option<u64>,
    paused: bool,
    /// The schedule: frame `n` of it goes out at `origin + n × FRAME − LEAD`.
    origin: Instant,
    n: u64,
    lateness: Lateness,
}

pub async fn run(
    sink: SplitSink<WebSocket, Message>,
    stream_sid: String,
    mut rx: mpsc::Receiver<Out>,
    events: mpsc::Sender<Sent>,
    current_turn: Arc<AtomicU64>,
    pacing: Arc<Pacing>,
) {
    let mut w = Writer {
        sink,
        media: MediaFrames::new(&stream_sid),
        stream_sid,
        events,
        current_turn,
        seen_turn: 0,
        queue: VecDeque::new(),
        unplayed: VecDeque::new(),
        partial: Vec::with_capacity(FRAME_BYTES),
        frames_in_turn: 0,
        queued_turn: 0,
        playing: None,
        started: None,
        paused: false,
        origin: Instant::now(),
        n: 0,
        lateness: Lateness {
            buckets: Box::new([0; BUCKETS]),
            frames: 0,
        },
    };
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    // The deadline the timer is armed for, if any.
    let mut armed: Option<Instant> = None;
    loop {
        let next = w.next_due();
        if next != armed {
            if let Some(at) = next {
                timer.as_mut().reset(at);
            }
            armed = next;
        }
        let ok = tokio::select! {
            biased;
            cmd = rx.recv() => match cmd {
                None | Some(Out::Close) => break,
                Some(cmd) => w.on_command(cmd).await,
            },
            _ = &mut timer, if armed.is_some() => {
                let deadline = armed.take().expect("armed");
                w.send_due(Some(deadline)).await
            }
        };
        if !ok {
            break;
        }
    }
    pacing.add(&w.lateness);
    let _ = w.sink.close().await;
}

impl Writer {
    /// When the next frame is due, if one is waiting and we are not paused.
    fn next_due(&self) -> Option<Instant> {
        if self.paused || self.queue.is_empty() {
            return None;
        }
        Some(self.due(self.n))
    }

    fn due(&self, n: u64) -> Instant {
        (self.origin + FRAME * n as u32)
            .checked_sub(LEAD)
            .unwrap_or(self.origin)
    }

    async fn on_command(&mut self, cmd: Out) -> bool {
        match cmd {
            Out::Close => false,
            Out::Clear => {
                self.queue.clear();
                self.unplayed.clear();
                self.partial.clear();
                self.paused = false;
                self.stop_playing();
                self.write(StreamMessage::clear(&self.stream_sid).to_text())
                    .await
            }
            Out::Pause => {
                if self.paused {
                    return true;
                }
                self.paused = true;
                self.stop_playing();
                self.write(StreamMessage::clear(&self.stream_sid).to_text())
                    .await
            }
            Out::Resume { turn, from } => {
                if !self.paused {
                    return true;
                }
                self.paused = false;
                // What Twilio dropped goes out again, from the last played mark.
                while let Some(item) = self.unplayed.pop_back() {
                    let keep = item.turn() == turn
                        && match item {
                            Item::Frame(_, i, _) => i >= from,
                            Item::Mark(_, f) => f > from,
                        };
                    if keep {
                        self.queue.push_front(item);
                    }
                }
                self.send_due(None).await
            }
            Out::Played { turn, frames } => {
                while self.unplayed.front().is_some_and(|item| {
                    item.turn() < turn
                        || (item.turn() == turn
                            && match item {
                                Item::Frame(_, i, _) => *i < frames,
                                Item::Mark(_, f) => *f <= frames,
                            })
                }) {
                    self.unplayed.pop_front();
                }
                true
            }
            Out::Audio { turn, audio } => {
                if turn < self.current_turn.load(Ordering::Acquire) {
                    return true;
                }
                if turn != self.queued_turn {
                    self.queued_turn = turn;
                    self.frames_in_turn = 0;
                    self.partial.clear();
                }
                let mut audio: &[u8] = &audio;
                if !self.partial.is_empty() {
                    let take = (FRAME_BYTES - self.partial.len()).min(audio.len());
                    self.partial.extend_from_slice(&audio[..take]);
                    audio = &audio[take..];
                    if self.partial.len() == FRAME_BYTES {
                        let frame: [u8; FRAME_BYTES] =
                            self.partial[..].try_into().expect("a whole frame");
                        self.partial.clear();
                        self.push_frame(turn, frame);
                    }
                }
                let mut chunks = audio.chunks_exact(FRAME_BYTES);
                for chunk in &mut chunks {
                    self.push_frame(turn, chunk.try_into().expect("a whole frame"));
                }
                self.partial.extend_from_slice(chunks.remainder());
                // Nothing was playing: start now rather than at the next tick.
                self.send_due(None).await
            }
            Out::Mark { turn } => {
                if turn < self.current_turn.load(Ordering::Acquire) {
                    return true;
                }
                // Pad the chunk's tail to a whole frame with silence, so the mark follows it.
                if turn == self.queued_turn && !self.partial.is_empty() {
                    let mut frame = [0xFFu8; FRAME_BYTES];
                    frame[..self.partial.len()].copy_from_slice(&self.partial);
                    self.partial.clear();
                    self.push_frame(turn, frame);
                }
                let frames = if turn == self.queued_turn {
                    self.frames_in_turn
                } else {
                    0
                };
                self.queue.push_back(Item::Mark(turn, frames));
                self.send_due(None).await
            }
        }
    }

    fn push_frame(&mut self, turn: u64, frame: [u8; FRAME_BYTES]) {
        self.queue
            .push_back(Item::Frame(turn, self.frames_in_turn, frame));
        self.frames_in_turn += 1;
    }

    /// Playback stopped (a clear or a pause): the next audio starts a new schedule.
    fn stop_playing(&mut self) {
        self.playing = None;
        self.origin = Instant::now();
        self.n = 0;
    }

    /// Sends everything that is due now, in one write. `deadline` is the timer's, when it was
    /// the timer that woke us: how late we are against it is the pacing figure.
    async fn send_due(&mut self, deadline: Option<Instant>) -> bool {
        // Items of a cancelled turn go when the turn moves on, not on every frame.
        let current = self.current_turn.load(Ordering::Acquire);
        if current != self.seen_turn {
            self.seen_turn = current;
            self.queue.retain(|item| item.turn() >= current);
            self.unplayed.retain(|item| item.turn() >= current);
        }
        if self.paused {
            return true;
        }
        let now = Instant::now();
        if let Some(deadline) = deadline {
            self.lateness
                .record(now.saturating_duration_since(deadline));
            self.lateness.frames += 1;
        }
        let mut written = false;
        while let Some(item) = self.queue.front() {
            match *item {
                Item::Mark(turn, frames) => {
                    let name = format!("{turn}:{frames}");
                    let text = StreamMessage::mark(&self.stream_sid, &name).to_text();
                    if self.sink.feed(Message::Text(text.into())).await.is_err() {
                        return false;
                    }
                }
                Item::Frame(turn, _, ref frame) => {
                    if self.playing.is_none() {
                        // Twilio's buffer ran dry: a new schedule; else carry on with this one.
                        if now >= self.origin + FRAME * self.n as u32 {
                            self.origin = now;
                            self.n = 0;
                        }
                    }
                    if self.due(self.n) > now + AHEAD {
                        break;
                    }
                    let text = self.media.frame(frame);
                    if self.sink.feed(Message::Text(text.into())).await.is_err() {
                        return false;
                    }
                    self.n += 1;
                    if self.started != Some(turn) {
                        self.started = Some(turn);
                        let _ = self.events.try_send(Sent::FirstFrame { turn, at: now });
                    } else if self.playing.is_none() {
                        let _ = self.events.try_send(Sent::Playing { turn });
                    }
                    self.playing = Some(turn);
                }
            }
            written = true;
            let item = self.queue.pop_front().expect("the front item");
            self.unplayed.push_back(item);
        }
        if written && self.sink.flush().await.is_err() {
            return false;
        }
        if self.queue.is_empty() {
            if let Some(turn) = self.playing.take() {
                let frames = if turn == self.queued_turn {
                    self.frames_in_turn
                } else {
                    0
                };
                let _ = self.events.try_send(Sent::Drained {
                    turn,
                    frames,
                    at: now,
                });
            }
        }
        true
    }

    async fn write(&mut self, text: String) -> bool {
        self.sink.send(Message::Text(text.into())).await.is_ok()
    }
}
