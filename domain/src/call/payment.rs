//! How a call is paid, and what settling its hold comes to.

use serde::{Deserialize, Serialize};

/// How a call is paid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "method")]
pub enum Payment {
    /// Credits reserved on the user's wallet under the call's id.
    Credits { credits: i64 },
    /// A Stripe PaymentIntent with manual capture, authorised for the maximum price.
    Card { payment_intent_id: String },
}

/// How money captured for a call came back to the payer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reversal {
    /// We (or Stripe's dashboard) refunded it.
    Refund,
    /// The cardholder disputed it with their bank (a chargeback).
    Dispute,
}

impl Reversal {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reversal::Refund => "refund",
            Reversal::Dispute => "dispute",
        }
    }
}

/// What settling a call's hold comes to: what the user is charged and what goes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    /// Credits taken from a credits hold (0: release it all); 0 for a card.
    pub credits_used: i64,
    pub charged_cents: i64,
    pub released_cents: i64,
}

impl Payment {
    /// Settles a hold of `max_price_cents` for a call priced `price_cents`: exactly the price
    /// (in whole credits, rounded up, for a credits hold), never more than the hold.
    pub fn settle(&self, price_cents: i64, max_price_cents: i64) -> Settlement {
        match self {
            Payment::Credits { credits } => {
                let used =
                    crate::pricing::credits_for(crate::values::Cents(price_cents)).min(*credits);
                Settlement {
                    credits_used: used,
                    charged_cents: used * crate::wallet::CENTS_PER_CREDIT,
                    released_cents: (credits - used) * crate::wallet::CENTS_PER_CREDIT,
                }
            }
            Payment::Card { .. } => {
                let charged = price_cents.clamp(0, max_price_cents.max(0));
                Settlement {
                    credits_used: 0,
                    charged_cents: charged,
                    released_cents: max_price_cents - charged,
                }
            }
        }
    }
}
