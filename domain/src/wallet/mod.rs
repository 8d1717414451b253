//! A user's credits: a balance with a ledger. One credit is worth 5 US cents, so every call
//! price (25¢ connection, 40¢ a started minute) is a whole number of credits.
//!
//! Grants carry a reference and are applied once per reference, so a retried grant (a seed
//! run twice, a redelivered purchase) changes nothing. A call paid with credits reserves its
//! maximum price (a hold, named by the call id), then settles what it cost and releases the
//! rest; holds count against the balance, so the balance never goes negative, however many
//! calls run at once. Every hold command is idempotent per hold id.
//!
//! A purchase refunded or disputed at Stripe takes its credits back (`Revoke`), never more
//! than the grant gave and never below zero: what the wallet cannot cover (credits already
//! spent or held for a call) becomes debt. While there is debt no hold is reserved (no new
//! call); credits that come in later (a new pack, a hold settled or released) pay it first.
//! Each reversal is named (`refund:<charge>`, `dispute:<dispute>`) and takes at most what it
//! claims in total, so a redelivered webhook takes nothing twice.

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
    /// Takes back the credits of grant `grant` (a purchase's reference) that reversal
    /// `reversal` claims in total (`credits`: a refund's cumulative amount, or a dispute's).
    Revoke {
        grant: String,
        reversal: String,
        credits: i64,
        cause: String,
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
    /// Credits of grant `grant` taken back: `from_balance` from the balance, `to_debt` owed.
    CreditsRevoked {
        grant: String,
        reversal: String,
        cause: String,
        credits: i64,
        from_balance: i64,
        to_debt: i64,
        balance_after: i64,
        debt_after: i64,
    },
    /// Credits that came in paid (part of) the debt.
    DebtPaid {
        credits: i64,
        balance_after: i64,
        debt_after: i64,
    },
}

impl DomainEvent for WalletEvent {
    fn event_type(&self) -> String {
        match self {
            WalletEvent::CreditsGranted { .. } => "CreditsGranted",
            WalletEvent::CreditsReserved { .. } => "CreditsReserved",
            WalletEvent::CreditsSettled { .. } => "CreditsSettled",
            WalletEvent::CreditsReleased { .. } => "CreditsReleased",
            WalletEvent::CreditsRevoked { .. } => "CreditsRevoked",
            WalletEvent::DebtPaid { .. } => "DebtPaid",
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
    #[error("no credits were granted under {0}")]
    UnknownGrant(String),
    /// A refunded or disputed purchase left the wallet owing credits: no new call until paid.
    #[error("you owe {debt} credits (a refunded or disputed credit purchase); buy credits to settle it before a new call")]
    InDebt { debt: i64 },
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
    /// Credits owed: taken back by a reversal when the wallet could not cover them.
    #[serde(default)]
    pub debt: i64,
    /// Credits granted under each reference.
    #[serde(default)]
    pub grants: BTreeMap<String, i64>,
    /// Credits taken back from each grant, and under each reversal.
    #[serde(default)]
    pub revoked_from_grant: BTreeMap<String, i64>,
    #[serde(default)]
    pub revoked_by_reversal: BTreeMap<String, i64>,
}

impl Wallet {
    pub fn reserved(&self) -> i64 {
        self.holds.values().sum()
    }
    pub fn available(&self) -> i64 {
        self.balance - self.reserved()
    }

    /// After `events`, credits that are free while there is debt pay it.
    fn pay_debt(&self, events: &[WalletEvent]) -> Option<WalletEvent> {
        let mut after = self.clone();
        for e in events {
            after.apply(e.clone());
        }
        let credits = after.debt.min(after.available());
        (credits > 0).then(|| WalletEvent::DebtPaid {
            credits,
            balance_after: after.balance - credits,
            debt_after: after.debt - credits,
        })
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
        let mut events = vec![];
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
                events.push(WalletEvent::CreditsGranted {
                    credits,
                    reason,
                    reference,
                    balance_after,
                });
            }
            WalletCommand::Reserve { hold_id, credits } => {
                if credits <= 0 {
                    return Err(WalletError::NotPositive);
                }
                if self.holds.contains_key(&hold_id) || self.closed_holds.contains(&hold_id) {
                    return Ok(());
                }
                if self.debt > 0 {
                    return Err(WalletError::InDebt { debt: self.debt });
                }
                let available = self.available();
                if credits > available {
                    return Err(WalletError::Insufficient {
                        needed: credits,
                        available,
                    });
                }
                events.push(WalletEvent::CreditsReserved {
                    hold_id,
                    credits,
                    available_after: available - credits,
                });
            }
            WalletCommand::Settle { hold_id, credits } => {
                if self.closed_holds.contains(&hold_id) {
                    return Err(WalletError::HoldClosed(hold_id));
                }
                let Some(&held) = self.holds.get(&hold_id) else {
                    return Err(WalletError::UnknownHold(hold_id));
                };
                let used = credits.clamp(0, held);
                events.push(WalletEvent::CreditsSettled {
                    hold_id,
                    used,
                    released: held - used,
                    balance_after: self.balance - used,
                });
            }
            WalletCommand::Release { hold_id } => {
                if let Some(&credits) = self.holds.get(&hold_id) {
                    events.push(WalletEvent::CreditsReleased { hold_id, credits });
                }
            }
            WalletCommand::Revoke {
                grant,
                reversal,
                credits,
                cause,
            } => {
                let Some(&granted) = self.grants.get(&grant) else {
                    return Err(WalletError::UnknownGrant(grant));
                };
                let claimed = credits - self.revoked_by_reversal.get(&reversal).unwrap_or(&0);
                let left = granted - self.revoked_from_grant.get(&grant).unwrap_or(&0);
                let take = claimed.min(left);
                if take > 0 {
                    let from_balance = take.min(self.available().max(0));
                    let to_debt = take - from_balance;
                    events.push(WalletEvent::CreditsRevoked {
                        grant,
                        reversal,
                        cause,
                        credits: take,
                        from_balance,
                        to_debt,
                        balance_after: self.balance - from_balance,
                        debt_after: self.debt + to_debt,
                    });
                }
            }
        }
        if !events.is_empty() {
            events.extend(self.pay_debt(&events));
        }
        for event in events {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: WalletEvent) {
        match event {
            WalletEvent::CreditsGranted {
                credits,
                reference,
                balance_after,
                ..
            } => {
                self.balance = balance_after;
                self.grants.insert(reference.clone(), credits);
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
            WalletEvent::CreditsRevoked {
                grant,
                reversal,
                credits,
                balance_after,
                debt_after,
                ..
            } => {
                *self.revoked_from_grant.entry(grant).or_default() += credits;
                *self.revoked_by_reversal.entry(reversal).or_default() += credits;
                self.balance = balance_after;
                self.debt = debt_after;
            }
            WalletEvent::DebtPaid {
                balance_after,
                debt_after,
                ..
            } => {
                self.balance = balance_after;
                self.debt = debt_after;
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

    fn revoke(reversal: &str, credits: i64) -> WalletCommand {
        WalletCommand::Revoke {
            grant: "r1".into(),
            reversal: reversal.into(),
            credits,
            cause: "refund".into(),
        }
    }

    #[test]
    fn a_reversal_takes_back_what_is_left_and_the_rest_becomes_debt() {
        // 100 granted, 45 held for a call: 55 can be taken, 45 is owed.
        let given = vec![
            granted(100),
            WalletEvent::CreditsReserved {
                hold_id: "c1".into(),
                credits: 45,
                available_after: 55,
            },
        ];
        let revoked = WalletEvent::CreditsRevoked {
            grant: "r1".into(),
            reversal: "refund:ch_1".into(),
            cause: "refund".into(),
            credits: 100,
            from_balance: 55,
            to_debt: 45,
            balance_after: 45,
            debt_after: 45,
        };
        TestFramework::<Wallet>::with(())
            .given(given.clone())
            .when(revoke("refund:ch_1", 100))
            .then_expect_events(vec![revoked.clone()]);
        let mut owing = given;
        owing.push(revoked);
        // The same reversal again (a redelivered webhook) takes nothing.
        TestFramework::<Wallet>::with(())
            .given(owing.clone())
            .when(revoke("refund:ch_1", 100))
            .then_expect_events(vec![]);
        // Another reversal of the same purchase cannot take more than it granted.
        TestFramework::<Wallet>::with(())
            .given(owing.clone())
            .when(revoke("dispute:dp_1", 100))
            .then_expect_events(vec![]);
        // No new hold while in debt.
        TestFramework::<Wallet>::with(())
            .given(owing.clone())
            .when(WalletCommand::Reserve {
                hold_id: "c2".into(),
                credits: 5,
            })
            .then_expect_error(WalletError::InDebt { debt: 45 });
        // The call settles 13 credits: the 32 released pay the debt down to 13.
        TestFramework::<Wallet>::with(())
            .given(owing.clone())
            .when(WalletCommand::Settle {
                hold_id: "c1".into(),
                credits: 13,
            })
            .then_expect_events(vec![
                WalletEvent::CreditsSettled {
                    hold_id: "c1".into(),
                    used: 13,
                    released: 32,
                    balance_after: 32,
                },
                WalletEvent::DebtPaid {
                    credits: 32,
                    balance_after: 0,
                    debt_after: 13,
                },
            ]);
        // A new pack pays what is owed first.
        TestFramework::<Wallet>::with(())
            .given(owing)
            .when(WalletCommand::Grant {
                credits: 100,
                reason: "credit pack".into(),
                reference: "r2".into(),
            })
            .then_expect_events(vec![
                WalletEvent::CreditsGranted {
                    credits: 100,
                    reason: "credit pack".into(),
                    reference: "r2".into(),
                    balance_after: 145,
                },
                WalletEvent::DebtPaid {
                    credits: 45,
                    balance_after: 100,
                    debt_after: 0,
                },
            ]);
    }

    #[test]
    fn a_partial_refund_then_the_rest_takes_each_part_once() {
        TestFramework::<Wallet>::with(())
            .given(vec![
                granted(100),
                WalletEvent::CreditsRevoked {
                    grant: "r1".into(),
                    reversal: "refund:ch_1".into(),
                    cause: "refund".into(),
                    credits: 40,
                    from_balance: 40,
                    to_debt: 0,
                    balance_after: 60,
                    debt_after: 0,
                },
            ])
            .when(revoke("refund:ch_1", 100))
            .then_expect_events(vec![WalletEvent::CreditsRevoked {
                grant: "r1".into(),
                reversal: "refund:ch_1".into(),
                cause: "refund".into(),
                credits: 60,
                from_balance: 60,
                to_debt: 0,
                balance_after: 0,
                debt_after: 0,
            }]);
        TestFramework::<Wallet>::with(())
            .given_no_previous_events()
            .when(revoke("refund:ch_1", 100))
            .then_expect_error(WalletError::UnknownGrant("r1".into()));
    }
}
