//! A user's credits: a balance with a ledger. One credit is worth 5 US cents, so every call
//! price (25¢ connection, 40¢ a started minute) is a whole number of credits.
//!
//! Grants carry a reference and are applied once per reference, so a retried grant (a seed
//! run twice, a redelivered purchase) changes nothing. A call paid with credits reserves its
//! maximum price (a hold, named by the call id), then settles what it cost and releases the
//! rest; holds count against the balance, so the balance never goes negative, however many
//! calls run at once. Every hold command is idempotent per hold id.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What one credit is worth.
pub const CENTS_PER_CREDIT: i64 = 5;

#[derive(Debug, Clone, PartialEq)]
pub enum WalletCommand {
    Grant {
        credits: i64,
        reason: String,
        reference: String,
    },
    Reserve {
        hold_id: String,
        credits: i64,
    },
    /// Takes `credits` (at most the hold) and releases the rest of the hold.
    Settle {
        hold_id: String,
        credits: i64,
    },
    Release {
        hold_id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WalletEvent {
    CreditsGranted {
        credits: i64,
        reason: String,
        reference: String,
        balance_after: i64,
    },
    CreditsReserved {
        hold_id: String,
        credits: i64,
        available_after: i64,
    },
    CreditsSettled {
        hold_id: String,
        used: i64,
        released: i64,
        balance_after: i64,
    },
    CreditsReleased {
        hold_id: String,
        credits: i64,
    },
}

impl DomainEvent for WalletEvent {
    fn event_type(&self) -> String {
        match self {
            WalletEvent::CreditsGranted { .. } => "CreditsGranted",
            WalletEvent::CreditsReserved { .. } => "CreditsReserved",
            WalletEvent::CreditsSettled { .. } => "CreditsSettled",
            WalletEvent::CreditsReleased { .. } => "CreditsReleased",
        }
        .to_string()
    }
    fn event_version(&self) -> String {
        "1".to_string()
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WalletError {
    #[error("credits must be positive")]
    NotPositive,
    #[error("not enough credits: {needed} needed, {available} available")]
    Insufficient { needed: i64, available: i64 },
    #[error("no hold {0}")]
    UnknownHold(String),
    /// Settling a hold that was already settled or released: an error, never a silent
    /// success (a caller repeating its own settlement can tell it is its own by `settled`).
    #[error("hold {0} is already closed")]
    HoldClosed(String),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Wallet {
    pub balance: i64,
    pub references: Vec<String>,
    /// Open holds: hold id → credits.
    #[serde(default)]
    pub holds: BTreeMap<String, i64>,
    /// Credits each closed hold used (0 when released).
    #[serde(default)]
    pub settled: BTreeMap<String, i64>,
    /// Holds already settled or released (so a repeat does nothing).
    #[serde(default)]
    pub closed_holds: Vec<String>,
}

impl Wallet {
    pub fn reserved(&self) -> i64 {
        self.holds.values().sum()
    }
    pub fn available(&self) -> i64 {
        self.balance - self.reserved()
    }
}

impl Aggregate for Wallet {
    const TYPE: &'static str = "wallet";
    type Command = WalletCommand;
    type Event = WalletEvent;
    type Error = WalletError;
    type Services = ();

    async fn handle(
        &mut self,
        command: WalletCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), WalletError> {
        match command {
            WalletCommand::Grant {
                credits,
                reason,
                reference,
            } => {
                if credits <= 0 {
                    return Err(WalletError::NotPositive);
                }
                if self.references.contains(&reference) {
                    return Ok(());
                }
                let balance_after = self.balance + credits;
                let event = WalletEvent::CreditsGranted {
                    credits,
                    reason,
                    reference,
                    balance_after,
                };
                sink.write(event, self).await;
            }
            WalletCommand::Reserve { hold_id, credits } => {
                if credits <= 0 {
                    return Err(WalletError::NotPositive);
                }
                if self.holds.contains_key(&hold_id) || self.closed_holds.contains(&hold_id) {
                    return Ok(());
                }
                let available = self.available();
                if credits > available {
                    return Err(WalletError::Insufficient {
                        needed: credits,
                        available,
                    });
                }
                let event = WalletEvent::CreditsReserved {
                    hold_id,
                    credits,
                    available_after: available - credits,
                };
                sink.write(event, self).await;
            }
            WalletCommand::Settle { hold_id, credits } => {
                if self.closed_holds.contains(&hold_id) {
                    return Err(WalletError::HoldClosed(hold_id));
                }
                let Some(&held) = self.holds.get(&hold_id) else {
                    return Err(WalletError::UnknownHold(hold_id));
                };
                let used = credits.clamp(0, held);
                let event = WalletEvent::CreditsSettled {
                    hold_id,
                    used,
                    released: held - used,
                    balance_after: self.balance - used,
                };
                sink.write(event, self).await;
            }
            WalletCommand::Release { hold_id } => {
                if let Some(&credits) = self.holds.get(&hold_id) {
                    sink.write(WalletEvent::CreditsReleased { hold_id, credits }, self)
                        .await;
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: WalletEvent) {
        match event {
            WalletEvent::CreditsGranted {
                reference,
                balance_after,
                ..
            } => {
                self.balance = balance_after;
                self.references.push(reference);
            }
            WalletEvent::CreditsReserved {
                hold_id, credits, ..
            } => {
                self.holds.insert(hold_id, credits);
            }
            WalletEvent::CreditsSettled {
                hold_id,
                used,
                balance_after,
                ..
            } => {
                self.holds.remove(&hold_id);
                self.settled.insert(hold_id.clone(), used);
                self.closed_holds.push(hold_id);
                self.balance = balance_after;
            }
            WalletEvent::CreditsReleased { hold_id, .. } => {
                self.holds.remove(&hold_id);
                self.settled.insert(hold_id.clone(), 0);
                self.closed_holds.push(hold_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    fn granted(credits: i64) -> WalletEvent {
        WalletEvent::CreditsGranted {
            credits,
            reason: "test".into(),
            reference: "r1".into(),
            balance_after: credits,
        }
    }

    #[test]
    fn holds_count_against_the_balance() {
        TestFramework::<Wallet>::with(())
            .given(vec![
                granted(100),
                WalletEvent::CreditsReserved {
                    hold_id: "c1".into(),
                    credits: 60,
                    available_after: 40,
                },
            ])
            .when(WalletCommand::Reserve {
                hold_id: "c2".into(),
                credits: 45,
            })
            .then_expect_error(WalletError::Insufficient {
                needed: 45,
                available: 40,
            });
    }

    #[test]
    fn settling_takes_at_most_the_hold_and_only_once() {
        let given = vec![
            granted(100),
            WalletEvent::CreditsReserved {
                hold_id: "c1".into(),
                credits: 45,
                available_after: 55,
            },
        ];
        TestFramework::<Wallet>::with(())
            .given(given.clone())
            .when(WalletCommand::Settle {
                hold_id: "c1".into(),
                credits: 13,
            })
            .then_expect_events(vec![WalletEvent::CreditsSettled {
                hold_id: "c1".into(),
                used: 13,
                released: 32,
                balance_after: 87,
            }]);
        let mut settled = given.clone();
        settled.push(WalletEvent::CreditsSettled {
            hold_id: "c1".into(),
            used: 13,
            released: 32,
            balance_after: 87,
        });
        // Settling it again is an error, not a silent success.
        TestFramework::<Wallet>::with(())
            .given(settled.clone())
            .when(WalletCommand::Settle {
                hold_id: "c1".into(),
                credits: 13,
            })
            .then_expect_error(WalletError::HoldClosed("c1".into()));
        TestFramework::<Wallet>::with(())
            .given(settled)
            .when(WalletCommand::Reserve {
                hold_id: "c1".into(),
                credits: 45,
            })
            .then_expect_events(vec![]);
        TestFramework::<Wallet>::with(())
            .given(given)
            .when(WalletCommand::Settle {
                hold_id: "c1".into(),
                credits: 500,
            })
            .then_expect_events(vec![WalletEvent::CreditsSettled {
                hold_id: "c1".into(),
                used: 45,
                released: 0,
                balance_after: 55,
            }]);
    }
}
