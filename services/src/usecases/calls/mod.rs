//! A call's life as the user and the workers drive it: requested (now or scheduled) behind a
//! hold, cancelled, settled when it ends. The active-call claim keeps one call at a time per
//! user (a scheduled call claims it when it fires); `dials` keeps the service from ringing
//! premium-rate numbers, or anyone more than a few times a day.

pub mod active;
pub mod cancel;
pub mod dials;
pub mod journal;
pub mod ledger;
pub mod request;
pub mod schedule;
pub mod settle;
pub mod sids;
