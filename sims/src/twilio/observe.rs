//! What a caller on a simulated call would notice of our server, timed where Twilio sits (so a
//! benchmark can measure the product from outside its process): how long after the caller
//! stopped talking the persona's audio came, how long after the caller started talking over
//! the persona its audio was cleared, and how late outbound frames arrived against the pace
//! our server promises (one 20 ms frame per 20 ms, the first [`LEAD`] of audio at once).
//!
//! Each stream keeps its own [`Observer`] (no lock per frame); it is filed with the call's
//! counters when the stream ends, and read with `TwilioSim::observations` — or, by a benchmark
//! in another process (`callmeback sim twilio`), over HTTP: `GET /_sim/calls` (each call's
//! state) and `GET /_sim/observations` (every ended stream's figures as one).

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// How far ahead of playback our server sends audio: the first frames of a run arrive at once.
pub const LEAD: Duration = Duration::from_millis(80);
const FRAME: Duration = Duration::from_millis(20);

/// One stream's figures, in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Observations {
    /// Caller's last speech frame (when it was due) → the persona's first frame received, for
    /// turns that ended while the persona was silent (else the first frame could be the old
    /// reply's), less how late this simulator sent the frame that ended the turn.
    pub reply_us: Vec<u64>,
    /// Turns that ended while the persona was still audible (not measured above).
    pub replies_unmeasured: u64,
    /// The caller's first speech frame sent while the persona's audio was playing → `clear`.
    pub barge_in_us: Vec<u64>,
    /// Caller speech over the persona that got no `clear` before the caller spoke again.
    pub barge_ins_missed: u64,
    /// Per `clear`: how much of the audio sent since the previous one (or the start) had
    /// played when it came, in ms — what a caller heard of what was cut.
    pub played_before_clear_ms: Vec<u64>,
    /// How late each persona frame arrived against its run's schedule (0 when on time).
    pub frame_lateness_us: Vec<u32>,
    /// How late this simulator's own 20 ms ticker woke (the measurement's own noise floor).
    pub tick_lateness_us: Vec<u32>,
    /// Per measured reply: how late this simulator sent the silence frame that ended the
    /// caller's turn for the listener (already taken off `reply_us`).
    pub endpoint_late_us: Vec<u32>,
}

impl Observations {
    /// Every stream's figures as one.
    pub fn merge(all: impl IntoIterator<Item = Observations>) -> Observations {
        let mut m = Observations::default();
        for o in all {
            m.reply_us.extend(o.reply_us);
            m.replies_unmeasured += o.replies_unmeasured;
            m.barge_in_us.extend(o.barge_in_us);
            m.barge_ins_missed += o.barge_ins_missed;
            m.played_before_clear_ms.extend(o.played_before_clear_ms);
            m.frame_lateness_us.extend(o.frame_lateness_us);
            m.tick_lateness_us.extend(o.tick_lateness_us);
            m.endpoint_late_us.extend(o.endpoint_late_us);
        }
        m
    }
}

/// A call as `GET /_sim/calls` shows it to a benchmark in another process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallState {
    pub sid: String,
    pub status: String,
    pub stream_opened: bool,
    pub stream_closed: bool,
    pub ended: bool,
    /// `media` frames our server sent.
    pub frames_received: u64,
}

impl From<super::SimCall> for CallState {
    fn from(c: super::SimCall) -> CallState {
        CallState {
            ended: c.ended_at.is_some(),
            sid: c.sid,
            status: c.status,
            stream_opened: c.stream_opened,
            stream_closed: c.stream_closed,
            frames_received: c.frames_received,
        }
    }
}

/// `GET /_sim/calls`: every call created so far, oldest first.
pub(super) async fn calls(State(sim): State<super::TwilioSim>) -> Json<Vec<CallState>> {
    Json(sim.calls().into_iter().map(CallState::from).collect())
}

/// `GET /_sim/observations`: what the callers measured on every stream that has ended.
pub(super) async fn observations(State(sim): State<super::TwilioSim>) -> Json<Observations> {
    Json(Observations::merge(sim.observations()))
}

/// The running state of one stream's measurements.
#[derive(Debug, Default)]
pub struct Observer {
    pub figures: Observations,
    /// The silence frame after a turn whose arrival lets the listener end the turn (its
    /// endpointing, in frames; 0 when unknown): how late this process sent it is its own
    /// delay, not the server's, and is taken off the reply latency.
    endpoint_frame: u32,
    caller_speaking: bool,
    last_voiced_at: Option<Instant>,
    awaiting_reply: Option<Instant>,
    /// Silence frames sent since the turn ended, and how late the endpointing one was sent.
    silence_frames: u32,
    endpoint_late: Duration,
    barge_in_from: Option<Instant>,
    /// The current run of persona frames: when its first frame arrived, frames so far.
    run: Option<(Instant, u32)>,
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

impl Observer {
    /// An observer for a caller whose turns a listener ends after `endpointing_ms` of silence
    /// (0: unknown, nothing is taken off the reply latency).
    pub fn new(endpointing_ms: u32) -> Self {
        Observer {
            endpoint_frame: endpointing_ms.div_ceil(20),
            ..Observer::default()
        }
    }

    /// The simulator's ticker was due at `due` and sent a caller frame at `now`; `playing`
    /// says whether persona audio was audible then.
    pub fn caller_frame(&mut self, due: Instant, now: Instant, voiced: bool, playing: bool) {
        let late = micros(now.saturating_duration_since(due)).min(u64::from(u32::MAX));
        self.figures.tick_lateness_us.push(late as u32);
        if voiced {
            if !self.caller_speaking {
                self.caller_speaking = true;
                if playing {
                    if self.barge_in_from.is_some() {
                        self.figures.barge_ins_missed += 1;
                    }
                    self.barge_in_from = Some(now);
                }
                self.awaiting_reply = None;
            }
            // When the caller's word was said: the frame's place on the wall clock (a late
            // send by this simulator must not shorten the reply latency measured from it).
            self.last_voiced_at = Some(due);
        } else {
            if self.caller_speaking {
                self.caller_speaking = false;
                self.silence_frames = 0;
                self.endpoint_late = Duration::ZERO;
                if playing {
                    self.figures.replies_unmeasured += 1;
                } else {
                    self.awaiting_reply = self.last_voiced_at;
                }
            }
            self.silence_frames = self.silence_frames.saturating_add(1);
            if self.silence_frames == self.endpoint_frame {
                self.endpoint_late = now.saturating_duration_since(due);
            }
        }
    }

    /// A persona frame arrived at `now`; `dry` says Twilio's buffer had run out before it.
    pub fn persona_frame(&mut self, now: Instant, dry: bool) {
        if let Some(from) = self.awaiting_reply.take() {
            let taken = now.saturating_duration_since(from);
            self.figures
                .reply_us
                .push(micros(taken.saturating_sub(self.endpoint_late)));
            self.figures
                .endpoint_late_us
                .push(micros(self.endpoint_late).min(u64::from(u32::MAX)) as u32);
        }
        let (start, n) = match self.run {
            Some(run) if !dry => run,
            _ => (now, 0),
        };
        let expected = start + (FRAME * n).saturating_sub(LEAD);
        let late = micros(now.saturating_duration_since(expected)).min(u64::from(u32::MAX));
        self.figures.frame_lateness_us.push(late as u32);
        self.run = Some((start, n + 1));
    }

    /// Our server sent `clear` at `now`, when `played` of the audio since the last had played.
    pub fn clear(&mut self, now: Instant, played: Duration) {
        self.figures
            .played_before_clear_ms
            .push(played.as_millis() as u64);
        if let Some(from) = self.barge_in_from.take() {
            self.figures.barge_in_us.push(micros(now - from));
        }
        self.run = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_barge_in_and_lateness_are_timed_from_the_caller_side() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut o = Observer::default();
        // The caller speaks 0–40 ms over silence; the reply's first frame comes at 740 ms.
        o.caller_frame(ms(0), ms(0), true, false);
        o.caller_frame(ms(20), ms(21), true, false);
        o.caller_frame(ms(40), ms(40), false, false);
        o.persona_frame(ms(740), true);
        assert_eq!(o.figures.reply_us, vec![720_000]);
        // Five frames at once (the lead), then one per 20 ms; the seventh 3 ms late.
        for _ in 0..4 {
            o.persona_frame(ms(740), false);
        }
        o.persona_frame(ms(760), false);
        o.persona_frame(ms(783), false);
        let late = &o.figures.frame_lateness_us;
        assert_eq!(late.len(), 7);
        assert!(late[..6].iter().all(|l| *l == 0), "{late:?}");
        assert_eq!(late[6], 3_000);
        // The caller talks over the persona: cleared 60 ms later.
        o.caller_frame(ms(800), ms(800), true, true);
        o.clear(ms(860), Duration::from_millis(120));
        assert_eq!(o.figures.barge_in_us, vec![60_000]);
        assert_eq!(o.figures.played_before_clear_ms, vec![120]);
        assert_eq!(o.figures.tick_lateness_us[1], 1_000);
        // A turn that ends while the persona is audible is not a reply latency.
        o.caller_frame(ms(820), ms(820), false, true);
        assert_eq!(o.figures.replies_unmeasured, 1);
        o.persona_frame(ms(900), true);
        assert_eq!(o.figures.reply_us.len(), 1);
    }

    #[test]
    fn the_simulator_s_own_lateness_at_the_turn_s_end_is_not_the_server_s() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // The listener ends a turn after 40 ms of silence: the second silence frame.
        let mut o = Observer::new(40);
        o.caller_frame(ms(0), ms(0), true, false);
        o.caller_frame(ms(20), ms(20), false, false);
        // This process was 30 ms late sending the frame that ended the turn.
        o.caller_frame(ms(40), ms(70), false, false);
        o.caller_frame(ms(60), ms(70), false, false);
        o.persona_frame(ms(600), true);
        assert_eq!(o.figures.reply_us, vec![570_000]);
        assert_eq!(o.figures.endpoint_late_us, vec![30_000]);
    }
}
