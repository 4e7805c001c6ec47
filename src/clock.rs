//! The one clock of the service, injected so tests can move time without sleeping.

use std::sync::{Arc, Mutex};

use chrono::{DurationRound, TimeDelta, Utc};

use crate::domain::Timestamp;

pub trait Clock: Send + Sync + 'static {
    /// The current instant, truncated to the microsecond.
    fn now(&self) -> Timestamp;

    /// This is the real time: decisions may use the database's clock instead (one clock for every replica).
    /// False for clocks that tests drive.
    fn is_wall_clock(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        truncate(Utc::now())
    }

    fn is_wall_clock(&self) -> bool {
        true
    }
}

/// A clock that moves only when told to. For tests.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<Timestamp>>);

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        Self(Arc::new(Mutex::new(truncate(start))))
    }

    pub fn advance(&self, by: TimeDelta) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *now = truncate(*now + by);
    }

    pub fn set(&self, to: Timestamp) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = truncate(to);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn truncate(t: Timestamp) -> Timestamp {
    t.duration_trunc(TimeDelta::microseconds(1)).unwrap_or(t)
}
