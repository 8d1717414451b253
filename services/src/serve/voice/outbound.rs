//! The outbound half of a Twilio media stream: audio paced at one 20 ms frame per tick, marks
//! after each chunk, `clear` at once on a barge-in. Every chunk carries its turn id; a chunk of
//! an older turn than the current one is dropped, so audio of a cancelled reply that is still
//! in flight never reaches the caller.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use futures::stream::SplitSink;
use futures::SinkExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

pub const FRAME_BYTES: usize = 160;
pub const FRAME: Duration = Duration::from_millis(20);

pub enum Out {
    Audio {
        turn: u64,
        audio: Bytes,
    },
    /// A mark named `<turn>:<frames of this turn queued before it>`.
    Mark {
        turn: u64,
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
    /// Nothing left to play.
    Drained {
        turn: u64,
        at: Instant,
    },
}

enum Item {
    Frame(u64, [u8; FRAME_BYTES]),
    Mark(u64, u64),
}

/// Frame timing, for the jitter figure: gaps between consecutive frames of continuous audio.
#[derive(Default)]
pub struct Pacing {
    pub gaps_us: Mutex<Vec<u32>>,
    pub frames: AtomicU64,
}

pub async fn run(
    mut sink: SplitSink<WebSocket, Message>,
    stream_sid: String,
    mut rx: mpsc::Receiver<Out>,
    events: mpsc::Sender<Sent>,
    current_turn: Arc<AtomicU64>,
    pacing: Arc<Pacing>,
) {
    let mut queue: VecDeque<Item> = VecDeque::new();
    let mut partial: Vec<u8> = Vec::with_capacity(FRAME_BYTES);
    let mut frames_in_turn: u64 = 0;
    let mut queued_turn: u64 = 0;
    let mut playing: Option<u64> = None;
    let mut started: Option<u64> = None;
    let mut last_frame: Option<Instant> = None;
    let mut seen_turn: u64 = 0;
    let mut tick = tokio::time::interval(FRAME);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let send = |msg: serde_json::Value| Message::Text(msg.to_string().into());
    loop {
        tokio::select! {
            biased;
            cmd = rx.recv() => match cmd {
                None | Some(Out::Close) => break,
                Some(Out::Clear) => {
                    queue.clear();
                    partial.clear();
                    playing = None;
                    last_frame = None;
                    if sink.send(send(json!({"event": "clear", "streamSid": stream_sid}))).await.is_err() {
                        break;
                    }
                }
                Some(Out::Audio { turn, audio }) => {
                    if turn < current_turn.load(Ordering::Acquire) {
                        continue;
                    }
                    if turn != queued_turn {
                        queued_turn = turn;
                        frames_in_turn = 0;
                        partial.clear();
                    }
                    partial.extend_from_slice(&audio);
                    let idle = queue.is_empty() && playing.is_none();
                    while partial.len() >= FRAME_BYTES {
                        let mut frame = [0u8; FRAME_BYTES];
                        frame.copy_from_slice(&partial[..FRAME_BYTES]);
                        partial.drain(..FRAME_BYTES);
                        queue.push_back(Item::Frame(turn, frame));
                        frames_in_turn += 1;
                    }
                    // Nothing was playing: start now rather than at the next tick.
                    if idle && !queue.is_empty() {
                        tick.reset_immediately();
                    }
                }
                Some(Out::Mark { turn }) => {
                    if turn < current_turn.load(Ordering::Acquire) {
                        continue;
                    }
                    // Pad the chunk's tail to a whole frame with silence, so the mark follows it.
                    if turn == queued_turn && !partial.is_empty() {
                        let mut frame = [0xFFu8; FRAME_BYTES];
                        frame[..partial.len()].copy_from_slice(&partial);
                        partial.clear();
                        queue.push_back(Item::Frame(turn, frame));
                        frames_in_turn += 1;
                    }
                    let frames = if turn == queued_turn { frames_in_turn } else { 0 };
                    queue.push_back(Item::Mark(turn, frames));
                }
            },
            _ = tick.tick() => {
                // Items of a cancelled turn go when the turn moves on, not on every tick.
                let current = current_turn.load(Ordering::Acquire);
                if current != seen_turn {
                    seen_turn = current;
                    queue.retain(|item| match item {
                        Item::Frame(t, _) | Item::Mark(t, _) => *t >= current,
                    });
                }
                let mut sent_frame = false;
                while let Some(item) = queue.pop_front() {
                    match item {
                        Item::Mark(turn, frames) => {
                            let msg = json!({"event": "mark", "streamSid": stream_sid, "mark": {"name": format!("{turn}:{frames}")}});
                            if sink.send(send(msg)).await.is_err() {
                                return;
                            }
                        }
                        Item::Frame(turn, frame) => {
                            let msg = json!({"event": "media", "streamSid": stream_sid, "media": {"payload": BASE64.encode(frame)}});
                            if sink.send(send(msg)).await.is_err() {
                                return;
                            }
                            let now = Instant::now();
                            if let Some(prev) = last_frame {
                                let gap = now.duration_since(prev).as_micros().min(u32::MAX as u128) as u32;
                                pacing.gaps_us.lock().expect("pacing").push(gap);
                            }
                            last_frame = Some(now);
                            pacing.frames.fetch_add(1, Ordering::Relaxed);
                            if started != Some(turn) {
                                started = Some(turn);
                                let _ = events.try_send(Sent::FirstFrame { turn, at: now });
                            } else if playing.is_none() {
                                let _ = events.try_send(Sent::Playing { turn });
                            }
                            playing = Some(turn);
                            sent_frame = true;
                            break;
                        }
                    }
                }
                if !sent_frame {
                    last_frame = None;
                    if let Some(turn) = playing.take() {
                        let _ = events.try_send(Sent::Drained { turn, at: Instant::now() });
                    }
                }
            }
        }
    }
    let _ = sink.close().await;
}
