//! Failure logging that a dead backend cannot turn into a flood: one line per hook per
//! interval on each shard, with the count of failures not logged since the last one.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Shortest time between two failure lines of one hook on one shard.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// When a hook last logged a failure, and how many it has not logged since.
#[derive(Debug, Default)]
pub struct FailureLog {
    last: Cell<Option<Instant>>,
    suppressed: Cell<u64>,
}

impl FailureLog {
    /// Whether a failure at `now` is to be logged; if so, how many were suppressed before
    /// it (the count starts again).
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let due = self
            .last
            .get()
            .is_none_or(|at| now.saturating_duration_since(at) >= LOG_EVERY);
        if due {
            self.last.set(Some(now));
            Some(self.suppressed.replace(0))
        } else {
            self.suppressed.set(self.suppressed.get() + 1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_interval_with_a_count() {
        let log = FailureLog::default();
        let t0 = Instant::now();
        assert_eq!(log.admit(t0), Some(0));
        assert_eq!(log.admit(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.admit(t0 + Duration::from_secs(2)), None);
        assert_eq!(log.admit(t0 + LOG_EVERY), Some(2));
    }
}
