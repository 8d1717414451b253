//! A call: requested now or scheduled, paid by a hold before dialling, placed through Twilio,
//! followed through Twilio's status callbacks, priced when it ends, then settled.
//!
//! Status only moves forward (scheduled → initiated → ringing → in-progress → an end), so a
//! duplicated or late callback changes nothing. The price is fixed by the price table that was
//! in force when the call was requested, carried in `CallRequested`.

mod aggregate;
mod command;
mod event;
mod payment;
mod status;
#[cfg(test)]
mod tests;

pub use crate::cost::Cost;
pub use aggregate::{Call, CallError};
pub use command::{CallCommand, CallRequest};
pub use event::{CallEvent, TurnTimings};
pub use payment::{Payment, Reversal, Settlement};
pub use status::{Outcome, Status};

/// Paid duration bounds, in minutes.
pub const MIN_MINUTES: u32 = 1;
pub const MAX_MINUTES: u32 = 30;
pub const DEFAULT_MINUTES: u32 = 5;
/// How many times the dialer tries Twilio before the call fails.
pub const MAX_DIAL_ATTEMPTS: u32 = 5;
