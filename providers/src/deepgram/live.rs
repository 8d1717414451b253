//! A transcription stream that outlives its sockets: when Deepgram drops one mid-call (or it
//! breaks), a new one is opened with backoff while the caller's audio is kept, and the audio
//! Deepgram had not finished transcribing (the last [`REPLAY`] at most) is sent again, so the
//! caller's words are not lost. The seconds billed add up across sockets. After
//! [`MAX_ATTEMPTS`] failed attempts in a row it gives up: an `Error`, then `Closed`.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{run, Deepgram, Ended, Socket, SttEvent, SttOptions, BYTES_PER_SECOND};

/// The most audio sent again on a new socket.
pub(super) const REPLAY: Duration = Duration::from_millis(1500);
/// Attempts to reopen a dropped stream before giving up.
pub(super) const MAX_ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The last [`REPLAY`] of audio sent, and how far Deepgram has finalised its transcription, on
/// one clock: bytes since the stream began.
#[derive(Default)]
pub(super) struct Recent {
    frames: VecDeque<Bytes>,
    held: u64,
    /// Bytes of audio received from the caller so far.
    total: u64,
    /// Where the current socket's audio (and its timestamps) begin.
    connection_start: u64,
    /// Audio before this is in a final transcript.
    transcribed: u64,
}

impl Recent {
    fn limit() -> u64 {
        (REPLAY.as_secs_f64() * BYTES_PER_SECOND) as u64
    }

    pub(super) fn push(&mut self, frame: Bytes) {
        self.total += frame.len() as u64;
        self.held += frame.len() as u64;
        self.frames.push_back(frame);
        while self.held > Self::limit() {
            match self.frames.pop_front() {
                Some(f) => self.held -= f.len() as u64,
                None => break,
            }
        }
    }

    /// A new socket starts with `replayed` bytes of audio that ends where `total` is.
    pub(super) fn connection_starts(&mut self, replayed: u64) {
        self.connection_start = self.total - replayed.min(self.total);
    }

    /// A final transcript ended `secs` into the current socket's audio.
    pub(super) fn transcribed_until(&mut self, secs: f64) {
        let at = self.connection_start + (secs.max(0.0) * BYTES_PER_SECOND) as u64;
        self.transcribed = self.transcribed.max(at.min(self.total));
    }

    /// The held audio Deepgram has not transcribed yet, to send again.
    fn replay(&self) -> Vec<Bytes> {
        let mut start = self.total - self.held;
        let mut out = Vec::new();
        for frame in &self.frames {
            let end = start + frame.len() as u64;
            if end > self.transcribed {
                let skip = self.transcribed.saturating_sub(start) as usize;
                out.push(frame.slice(skip.min(frame.len())..));
            }
            start = end;
        }
        out
    }
}

/// Owns the stream until our side closes it or Deepgram cannot be reached again; always ends
/// with one `Closed` carrying the seconds billed on every socket.
pub(super) async fn supervise(
    client: Deepgram,
    opts: SttOptions,
    first: Socket,
    mut audio: mpsc::Receiver<Bytes>,
    events: mpsc::Sender<SttEvent>,
) {
    let mut recent = Recent::default();
    let mut billed = 0.0;
    let mut socket = Some(first);
    let mut replay = Vec::new();
    while let Some(open) = socket.take() {
        let Ended {
            outcome,
            sent_secs,
            input_closed,
        } = run(
            open,
            &mut audio,
            &events,
            &mut recent,
            std::mem::take(&mut replay),
        )
        .await;
        let error = match outcome {
            Ok(Some(duration)) => {
                billed += duration;
                None
            }
            Ok(None) => {
                billed += sent_secs;
                None
            }
            Err(message) => {
                billed += sent_secs;
                Some(message)
            }
        };
        let Some(message) = error else { break };
        tracing::warn!(error = %message, "Deepgram stream failed");
        if input_closed {
            let _ = events.send(SttEvent::Error(message)).await;
            break;
        }
        socket = reopen(&client, &opts, &mut audio, &mut recent).await;
        match &socket {
            Some(_) => replay = recent.replay(),
            None => {
                let _ = events
                    .send(SttEvent::Error(format!(
                        "{message}; Deepgram could not be reached again after {MAX_ATTEMPTS} attempts"
                    )))
                    .await;
            }
        }
    }
    let _ = events
        .send(SttEvent::Closed {
            billed_secs: billed,
        })
        .await;
}

/// A new socket, with backoff, keeping the caller's audio meanwhile; `None` after
/// [`MAX_ATTEMPTS`] failures or when our side closed the stream meanwhile.
async fn reopen(
    client: &Deepgram,
    opts: &SttOptions,
    audio: &mut mpsc::Receiver<Bytes>,
    recent: &mut Recent,
) -> Option<Socket> {
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=MAX_ATTEMPTS {
        let open = client.open(opts);
        tokio::pin!(open);
        let opened = loop {
            tokio::select! {
                opened = &mut open => break opened,
                frame = audio.recv() => match frame {
                    Some(frame) => recent.push(frame),
                    None => return None,
                },
            }
        };
        match opened {
            Ok(socket) => {
                tracing::info!(attempt, "Deepgram stream reopened");
                return Some(socket);
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt, "reopening the Deepgram stream failed");
                if !e.retryable() {
                    return None;
                }
            }
        }
        let wait = tokio::time::sleep(backoff);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                frame = audio.recv() => match frame {
                    Some(frame) => recent.push(frame),
                    None => return None,
                },
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_what_was_not_transcribed_within_the_last_seconds() {
        let mut r = Recent::default();
        r.connection_starts(0);
        for _ in 0..100 {
            r.push(Bytes::from(vec![1u8; 160]));
        }
        // 2 s received; 1.5 s held.
        assert_eq!(r.replay().iter().map(Bytes::len).sum::<usize>(), 12_000);
        // A final transcript up to 1.8 s: only the last 0.2 s goes again.
        r.transcribed_until(1.8);
        assert_eq!(r.replay().iter().map(Bytes::len).sum::<usize>(), 1_600);
        // A new socket that got that 0.2 s first: its clock starts 1.8 s into the stream.
        r.connection_starts(1_600);
        r.transcribed_until(0.1);
        assert_eq!(r.replay().iter().map(Bytes::len).sum::<usize>(), 800);
    }
}
