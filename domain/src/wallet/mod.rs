//! A user's credits: a balance with a ledger. One credit is worth 5 US cents, so every call
//! price (25¢ connection, 40¢ a started minute) is a whole number of credits.
//!
//! Grants carry a reference and are applied once per reference, so a retried grant (a seed
//! run twice, a redelivered purchase) changes nothing.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WalletEvent {
    CreditsGranted {
        credits: i64,
        reason: String,
        reference: String,
        balance_after: i64,
    },
}

impl DomainEvent for WalletEvent {
    fn event_type(&self) -> String {
        match self {
            WalletEvent::CreditsGranted { .. } => "CreditsGranted",
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
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Wallet {
    pub balance: i64,
    pub references: Vec<String>,
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
        }
    }
}
