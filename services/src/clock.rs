//! The time, from one place: the system clock in production, a clock the tests move (to fire
//! scheduled calls or cross a daylight-saving change without waiting).

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

#[derive(Clone, Default)]
pub struct Clock {
    /// When set, the time is this instead of the system's.
    manual: Option<Arc<Mutex<DateTime<Utc>>>>,
}

impl Clock {
    pub fn system() -> Self {
        Clock { manual: None }
    }

    /// A clock that only moves when told to.
    pub fn manual(start: DateTime<Utc>) -> Self {
        Clock {
            manual: Some(Arc::new(Mutex::new(start))),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match &self.manual {
            Some(t) => *t.lock().expect("clock"),
            None => Utc::now(),
        }
    }

    /// Moves a manual clock (a system clock ignores this).
    pub fn set(&self, to: DateTime<Utc>) {
        if let Some(t) = &self.manual {
            *t.lock().expect("clock") = to;
        }
    }

    pub fn advance(&self, by: chrono::Duration) {
        if let Some(t) = &self.manual {
            let mut t = t.lock().expect("clock");
            *t += by;
        }
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.manual {
            Some(_) => write!(f, "Clock(manual {})", self.now()),
            None => f.write_str("Clock(system)"),
        }
    }
}
