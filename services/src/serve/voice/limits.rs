//! The call's limits: the paid duration (a warning a minute before, then goodbye), the user's
//! budget, and silence (a reminder, then goodbye and a hang-up).

use std::time::Duration;

use tokio::time::Instant;

use super::error::SessionError;
use super::session::Session;

/// Once the goodbye starts, the call is hung up this long after at the latest, whatever the
/// caller says over it or however long the goodbye takes to play.
const GOODBYE_WATCHDOG: Duration = Duration::from_secs(12);

impl Session {
    /// Whether the call may go on for another minute within the user's daily and monthly
    /// limits (the hold was checked against them; the limits may have changed since).
    pub(super) async fn budget_allows(&self, elapsed: Duration) -> Result<bool, SessionError> {
        let price = self.ctx.prices.call_price((elapsed.as_secs() + 60) as u32);
        Ok(crate::usecases::budget::allows(
            &self.voice.store,
            self.ctx.user_id,
            self.ctx.call_id,
            self.voice.clock.now(),
            price,
        )
        .await?)
    }

    pub(super) async fn hang_up(&mut self) {
        if self.hung_up {
            return;
        }
        self.hung_up = true;
        if let Err(e) = self.voice.twilio.hang_up(&self.ctx.call_sid).await {
            tracing::warn!(call = %self.ctx.call_id, error = %e, "hang-up failed");
        }
    }

    pub(super) async fn say_goodbye(&mut self, reason: &str, text: &str) {
        if self.ending.is_some() {
            return;
        }
        tracing::info!(call = %self.ctx.call_id, reason, "ending the call");
        self.ending = Some(reason.to_string());
        self.ending_at = Some(Instant::now());
        let turn = self.speak_phrase(text).await;
        self.goodbye_turn = Some(turn);
    }

    /// The next moment `on_tick` could have something to do: the cap, the budget check, the
    /// warning, silence, a reply whose final mark never came back, a pause that found no words.
    /// Each is left out while it cannot act, so the timer does not fire for nothing.
    pub(super) fn next_check(&self) -> Instant {
        let far = self.started + Duration::from_secs(366 * 86_400);
        if self.hung_up {
            return far;
        }
        let cap = Duration::from_secs(self.ctx.max_minutes as u64 * 60);
        let mut next = self.next_budget_check;
        if self.ending.is_none() {
            next = next.min(
                (self.started + cap)
                    .checked_sub(Duration::from_secs(4))
                    .unwrap_or(self.started),
            );
        }
        if let Some(at) = self.ending_at {
            next = next.min(at + GOODBYE_WATCHDOG);
        }
        if let Some(at) = self.paused_at {
            next = next.min(at + super::turns::PAUSE_WITHOUT_WORDS);
        }
        if let Some(reply) = self
            .reply
            .as_ref()
            .filter(|r| r.done && r.idle && self.paused.is_none())
        {
            if let Some(at) = reply.drained_at {
                next = next.min(at + super::session::MARK_WAIT);
            }
        }
        if !self.speaking() && self.ending.is_none() {
            if !self.warned {
                let warn_at = (self.started + cap)
                    .checked_sub(self.voice.settings.warning_before_end)
                    .unwrap_or(self.started);
                next = next.min(warn_at);
            }
            if self.pending.is_empty() {
                let wait = if self.reminded {
                    self.ctx.silence_hangup
                } else {
                    self.ctx.silence_reminder.min(self.ctx.silence_hangup)
                };
                next = next.min(self.last_activity + wait);
            }
        }
        next
    }

    pub(super) async fn on_tick(&mut self) {
        let now = Instant::now();
        if self.hung_up {
            return;
        }
        // Talking over the goodbye does not keep the call open.
        if self
            .ending_at
            .is_some_and(|at| now >= at + GOODBYE_WATCHDOG)
        {
            tracing::info!(call = %self.ctx.call_id, "goodbye watchdog: hanging up");
            self.hang_up().await;
            return;
        }
        if self
            .paused_at
            .is_some_and(|at| now >= at + super::turns::PAUSE_WITHOUT_WORDS)
        {
            // Speech onset with no words after it (a cough, noise): go on where we stopped.
            self.resume().await;
        }
        if self.played_out() {
            self.reply_over().await;
        }
        // The paid duration is a hard cap: a warning a minute before, then goodbye.
        let cap = Duration::from_secs(self.ctx.max_minutes as u64 * 60);
        let elapsed = now.duration_since(self.started);
        if elapsed + Duration::from_secs(4) >= cap {
            self.say_goodbye(
                "paid duration reached",
                "That's our time for today. Talk soon, bye!",
            )
            .await;
            return;
        }
        if now >= self.next_budget_check {
            self.next_budget_check = now + Duration::from_secs(15);
            match self.budget_allows(elapsed).await {
                Ok(true) => {}
                Ok(false) => {
                    self.say_goodbye(
                        "budget reached",
                        "We've reached the spending limit you set, so I'll say goodbye for now. Bye!",
                    )
                    .await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(call = %self.ctx.call_id, error = %e, "budget check failed")
                }
            }
        }
        // The warning waits for the persona to finish what it is saying.
        if !self.warned
            && !self.speaking()
            && self.ending.is_none()
            && elapsed + self.voice.settings.warning_before_end >= cap
        {
            self.warned = true;
            self.speak_phrase("Just so you know, we have about a minute left.")
                .await;
        }
        if self.speaking() || !self.pending.is_empty() || self.ending.is_some() {
            return;
        }
        let silent = now.duration_since(self.last_activity);
        if silent >= self.ctx.silence_hangup {
            self.say_goodbye(
                "silence",
                "It sounds like you've stepped away. I'll let you go. Bye for now!",
            )
            .await;
        } else if silent >= self.ctx.silence_reminder && !self.reminded {
            self.reminded = true;
            self.speak_phrase("Are you still there?").await;
        }
    }
}
