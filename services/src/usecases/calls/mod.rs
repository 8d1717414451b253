//! A call's life as the user and the workers drive it: requested (now or scheduled) behind a
//! hold, cancelled, settled when it ends. The active-call claim keeps one call at a time per
//! user.

pub mod active;
pub mod cancel;
pub mod journal;
pub mod ledger;
pub mod request;
pub mod schedule;
pub mod settle;
pub mod sids;
