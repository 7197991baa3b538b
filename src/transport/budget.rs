//! One shard's part of the process-wide memory budget (`limits.memory_budget`): the bytes
//! its connections' outbound queues hold, counted as frames are queued and uncounted once
//! written (a writer's batch, copied out of the queue, counts until its write returns),
//! dropped, or carried away by a moving connection (the shard it reaches counts them).
//!
//! A frame is shared (`Bytes`) by every queue it sits in, but it is counted once per
//! queue: that is what a connection would lose if it were cut, and what the kernel gets
//! copied when it is written. It overstates the unique bytes for a room's fan-out by at
//! most the fan-out factor, which errs on the safe side and costs two `Cell` updates per
//! frame and recipient (no hashing, no allocation, no atomics).
//!
//! Each shard gets `budget / shards` and counts only its own queues, so the hot path never
//! touches another core's memory. Past its marks the shard (see [`ShardBudget::state`]):
//! - at `pressure` (half its share) refuses new work that would queue more (sends, joins,
//!   presence: `unavailable`) until it drains below `relief` (three eighths);
//! - at `shed` (three quarters), or when the pressure lasts (the queues do not drain),
//!   its shedder cuts the connections holding the most queued bytes (slow consumers
//!   first) until the shard is below `relief` and serves again;
//! - at the share itself a frame offered to a queue holding more than its fair part
//!   (share / queues) overflows that queue at once, without waiting for the shedder: the
//!   shard never holds much more than its share (at most twice, in the worst case).

use std::cell::Cell;
use std::task::Waker;

/// One shard's queued bytes against its share of the process's memory budget.
pub struct ShardBudget {
    share: usize,
    used: Cell<usize>,
    /// Outbound queues alive on this shard (for each queue's fair part of the share).
    queues: Cell<usize>,
    pressured: Cell<bool>,
    /// The shedder's waker, taken when `used` crosses the `shed` mark.
    shedder: Cell<Option<Waker>>,
    /// Frames refused by the hard bound (their connection was cut at once).
    hard_cuts: Cell<u64>,
}

/// Where a shard stands against its share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pressure {
    /// Below the pressure mark (or draining back to relief): serving as usual.
    Normal,
    /// Past half the share: new work is refused until the queues drain.
    Pressured,
}

impl ShardBudget {
    /// A shard's budget of `share` bytes (0: unbounded).
    pub fn new(share: usize) -> ShardBudget {
        ShardBudget {
            share: if share == 0 { usize::MAX } else { share },
            used: Cell::new(0),
            queues: Cell::new(0),
            pressured: Cell::new(false),
            shedder: Cell::new(None),
            hard_cuts: Cell::new(0),
        }
    }

    /// The shard's share of the budget, in bytes.
    pub fn share(&self) -> usize {
        self.share
    }

    /// Bytes queued on this shard now.
    pub fn used(&self) -> usize {
        self.used.get()
    }

    /// The mark past which new work is refused.
    pub fn pressure_mark(&self) -> usize {
        self.share / 2
    }

    /// The mark past which the shedder cuts the largest queues.
    pub fn shed_mark(&self) -> usize {
        self.share / 4 * 3
    }

    /// The mark below which a pressured shard serves again.
    pub fn relief_mark(&self) -> usize {
        self.share / 8 * 3
    }

    /// Whether a frame of `len` bytes for a queue already holding `queued` may be queued:
    /// false only past the share and for a queue above its fair part of it.
    #[inline]
    pub fn admits(&self, queued: usize, len: usize) -> bool {
        let used = self.used.get();
        if used.saturating_add(len) <= self.share {
            return true;
        }
        let fair = self.share / self.queues.get().max(1);
        if queued + len <= fair {
            return true;
        }
        self.hard_cuts.set(self.hard_cuts.get() + 1);
        false
    }

    /// Counts `len` bytes queued; wakes the shedder past the `shed` mark.
    #[inline]
    pub fn add(&self, len: usize) {
        let used = self.used.get() + len;
        self.used.set(used);
        if used >= self.pressure_mark() {
            self.pressured.set(true);
            if used >= self.shed_mark() {
                if let Some(w) = self.shedder.take() {
                    w.wake();
                }
            }
        }
    }

    /// Uncounts `len` bytes (written, dropped, or gone with a moving connection).
    #[inline]
    pub fn sub(&self, len: usize) {
        let used = self.used.get().saturating_sub(len);
        self.used.set(used);
        if used < self.relief_mark() {
            self.pressured.set(false);
        }
    }

    /// A queue was created on this shard.
    pub fn queue_opened(&self) {
        self.queues.set(self.queues.get() + 1);
    }

    /// A queue was dropped.
    pub fn queue_closed(&self) {
        self.queues.set(self.queues.get().saturating_sub(1));
    }

    /// Whether the shard refuses new work for memory now.
    pub fn state(&self) -> Pressure {
        if self.pressured.get() {
            Pressure::Pressured
        } else {
            Pressure::Normal
        }
    }

    /// Whether the shedder has work: the shard is past its `shed` mark.
    pub fn must_shed(&self) -> bool {
        self.used.get() >= self.shed_mark()
    }

    /// Registers the shedder's waker (woken when `used` crosses the `shed` mark).
    pub fn wait_for_shedding(&self, waker: &Waker) {
        self.shedder.set(Some(waker.clone()));
    }

    /// Frames the hard bound refused so far.
    pub fn hard_cuts(&self) -> u64 {
        self.hard_cuts.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_has_hysteresis() {
        let b = ShardBudget::new(800);
        b.add(399);
        assert_eq!(b.state(), Pressure::Normal);
        b.add(1);
        assert_eq!(b.state(), Pressure::Pressured);
        b.sub(100);
        assert_eq!(
            b.state(),
            Pressure::Pressured,
            "300 is not below relief (300)"
        );
        b.sub(1);
        assert_eq!(b.state(), Pressure::Normal);
    }

    #[test]
    fn past_the_share_only_queues_above_their_fair_part_are_refused() {
        let b = ShardBudget::new(1000);
        for _ in 0..4 {
            b.queue_opened();
        }
        b.add(990);
        assert!(b.admits(0, 200), "a near-empty queue (fair part 250)");
        assert!(!b.admits(200, 100), "a queue above its fair part");
        assert!(b.admits(900, 10), "under the share, anything");
        assert_eq!(b.hard_cuts(), 1);
    }

    #[test]
    fn zero_is_unbounded() {
        let b = ShardBudget::new(0);
        b.add(1 << 40);
        assert_eq!(b.state(), Pressure::Normal);
        assert!(b.admits(1 << 40, 1));
    }
}
