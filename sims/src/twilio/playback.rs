//! Twilio's playback of our audio as the simulator keeps it: the audio queued and not yet
//! played (at 8000 bytes a second), and the marks waiting for it — a mark is echoed only once
//! the audio before it played, or at once on a `clear`.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// The audio our server queued and has not "played" yet, at 8000 bytes a second, and the marks
/// waiting for it to finish — the way Twilio echoes a mark only once the audio before it played.
#[derive(Default)]
pub(super) struct Playback {
    until: Option<Instant>,
    pub(super) pending: VecDeque<(String, Instant)>,
    /// Audio queued since the last `clear`.
    queued: Duration,
}

impl Playback {
    pub(super) fn queue_audio(&mut self, bytes: usize) {
        let now = Instant::now();
        let from = self.until.filter(|u| *u > now).unwrap_or(now);
        let length = Duration::from_micros(bytes as u64 * 125);
        self.until = Some(from + length);
        self.queued += length;
    }

    /// How much of the audio queued since the last `clear` has played by `now`.
    pub(super) fn played(&self, now: Instant) -> Duration {
        let left = self
            .until
            .map_or(Duration::ZERO, |u| u.saturating_duration_since(now));
        self.queued.saturating_sub(left)
    }

    pub(super) fn queue_mark(&mut self, name: String) {
        let now = Instant::now();
        let due = self.until.filter(|u| *u > now).unwrap_or(now);
        self.pending.push_back((name, due));
    }

    /// `clear`: the queued audio is dropped, so every pending mark is due now.
    pub(super) fn clear(&mut self) -> Vec<String> {
        self.until = None;
        self.queued = Duration::ZERO;
        self.pending.drain(..).map(|(name, _)| name).collect()
    }

    /// Whether queued audio is still playing at `now`.
    pub(super) fn playing(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| u > now)
    }

    pub(super) fn due(&mut self, now: Instant) -> Vec<String> {
        let mut due = Vec::new();
        while self.pending.front().is_some_and(|(_, at)| *at <= now) {
            if let Some((name, _)) = self.pending.pop_front() {
                due.push(name);
            }
        }
        due
    }
}
