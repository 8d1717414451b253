//! The call's limits: the paid duration (a warning a minute before, then goodbye), the user's
//! budget, and silence (a reminder, then goodbye and a hang-up).

use std::time::Duration;

use tokio::time::Instant;

use super::error::SessionError;
use super::session::Session;

impl Session {
    /// Whether the call may go on for another minute within the user's daily and monthly
    /// limits (the hold was checked against them; the limits may have changed since).
    pub(super) async fn budget_allows(&self, elapsed: Duration) -> Result<bool, SessionError> {
        let price = self
            .ctx
            .prices
            .call_price((elapsed.as_secs() + 60) as u32)
            .0;
        let call_id = uuid::Uuid::parse_str(&self.ctx.call_id)?;
        Ok(crate::usecases::budget::allows(
            &self.voice.store,
            self.ctx.user_id,
            call_id,
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
        let turn = self.speak_phrase(text).await;
        self.goodbye_turn = Some(turn);
    }

    pub(super) async fn on_tick(&mut self) {
        let now = Instant::now();
        if self.hung_up {
            return;
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
