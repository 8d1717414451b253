//! A call's status, which only moves forward, and how it ended.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Completed,
    Busy,
    NoAnswer,
    Failed,
    Canceled,
    /// A scheduled call whose time passed while the service was down, past the grace period.
    Expired,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Busy => "busy",
            Outcome::NoAnswer => "no-answer",
            Outcome::Failed => "failed",
            Outcome::Canceled => "canceled",
            Outcome::Expired => "expired",
        }
    }
}

/// A call's status as the API shows it, in the order a call goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Scheduled,
    Initiated,
    Ringing,
    InProgress,
    Ended(Outcome),
}

impl Status {
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Scheduled => "scheduled",
            Status::Initiated => "initiated",
            Status::Ringing => "ringing",
            Status::InProgress => "in-progress",
            Status::Ended(o) => o.as_str(),
        }
    }

    /// Twilio's `CallStatus` values.
    pub fn from_twilio(s: &str) -> Option<Status> {
        Some(match s {
            "queued" | "initiated" => Status::Initiated,
            "ringing" => Status::Ringing,
            "in-progress" | "answered" => Status::InProgress,
            "completed" => Status::Ended(Outcome::Completed),
            "busy" => Status::Ended(Outcome::Busy),
            "no-answer" => Status::Ended(Outcome::NoAnswer),
            "failed" => Status::Ended(Outcome::Failed),
            "canceled" => Status::Ended(Outcome::Canceled),
            "expired" => Status::Ended(Outcome::Expired),
            _ => return None,
        })
    }

    pub fn is_final(&self) -> bool {
        matches!(self, Status::Ended(_))
    }
}
