//! One shard's part of the process-wide memory budget (`limits.memory_budget`): the bytes
//! held in every queue the shard owns, counted as they are queued and uncounted once they
//! leave. The queues ([`Queue`]):
//! - **outbound**: its connections' outbound queues, WebSocket and polling (a writer's
//!   batch, copied out of the queue, counts until its write returns);
//! - **home**: what its home holds: commands and Redis events waiting for the service
//!   task, and every publish until it is answered (waiting for the writer, then in the
//!   store's or Redis's batch);
//! - **mesh**: messages it sent toward other shards that they have not taken yet (its
//!   outboxes and the mesh channels);
//! - **held**: packets its connections hold while their CONNECT is admitted or a hook call
//!   of their own is out;
//! - **polling**: polling request bodies being read and handed up;
//! - **emits**: `@socket.io/redis-emitter` emits queued to the shard (the process's Redis
//!   link drops an emit for a shard whose queue holds a quarter of its share already).
//!
//! A frame is shared (`Bytes`) by every queue it sits in, but it is counted once per
//! queue: that is what a connection would lose if it were cut, and what the kernel gets
//! copied when it is written. It overstates the unique bytes for a room's fan-out by at
//! most the fan-out factor, which errs on the safe side and costs two `Cell` updates per
//! frame and recipient (no hashing, no allocation). Only the mesh and emit parts are
//! changed by other threads: one atomic each per shard ([`SharedBytes`]), added to by the
//! sender and taken from by the receiver, once per message (a room's batch or an emit, not
//! a recipient).
//!
//! Each shard gets `budget / shards` and counts only its own queues, so the hot path never
//! touches another core's memory. Past its marks the shard (see [`ShardBudget::state`]):
//! - at `pressure` (half its share) refuses new work that would queue more (sends, joins,
//!   presence: `unavailable`) until it drains below `relief` (three eighths);
//! - at `shed` (three quarters), or when the pressure lasts (the queues do not drain),
//!   its shedder cuts the connections holding the most queued bytes (slow consumers
//!   first) while the outbound queues hold a good part of the shard's bytes (the other
//!   queues drain by themselves once new work is refused);
//! - at the share itself a frame offered to a queue holding more than its fair part
//!   (share / queues) overflows that queue at once, without waiting for the shedder: the
//!   shard never holds much more than its share (at most twice, in the worst case).

use std::cell::Cell;
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;

pub use crate::metrics::SharedBytes;

/// The queues a shard's budget counts, for its figures (`/metrics`, `/healthz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    /// Connections' outbound queues and their writers' batches.
    Outbound,
    /// The home's commands, Redis events and unanswered publishes.
    Home,
    /// Sent toward other shards, not yet taken by them.
    Mesh,
    /// Packets a connection holds while its CONNECT is admitted or its own hook call is
    /// out.
    Held,
    /// Polling request bodies being read and handled.
    Polling,
    /// Emits from `@socket.io/redis-emitter` queued to the shard, not taken yet.
    Emits,
}

impl Queue {
    /// Every queue, in the order of [`Queue::index`].
    pub const ALL: [Queue; 6] = [
        Queue::Outbound,
        Queue::Home,
        Queue::Mesh,
        Queue::Held,
        Queue::Polling,
        Queue::Emits,
    ];

    /// Its position in [`Queue::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Its name in `/metrics` and `/healthz`.
    pub const fn name(self) -> &'static str {
        crate::metrics::QUEUES[self.index()]
    }
}

/// One shard's queued bytes against its share of the process's memory budget.
pub struct ShardBudget {
    share: usize,
    /// Bytes in this shard's own queues (every queue but the mesh and emits).
    local: Cell<usize>,
    /// The same, per queue (the mesh and emits entries are unused: see `mesh`, `emits`).
    by_queue: [Cell<usize>; 6],
    /// Bytes this shard sent through the mesh and the receivers have not taken yet.
    mesh: Arc<SharedBytes>,
    /// Bytes of the emits queued to this shard and not taken yet.
    emits: Arc<SharedBytes>,
    /// `mesh` + `emits` as last read: the per-frame bound reads this, not the atomics.
    shared_seen: Cell<usize>,
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
    /// A shard's budget of `share` bytes (0: unbounded), with a mesh count of its own
    /// (for a shard alone, and tests).
    pub fn new(share: usize) -> ShardBudget {
        ShardBudget::with_shared(share, Arc::default(), Arc::default())
    }

    /// Shard `id`'s budget of `share` bytes (0: unbounded), with the counters of its mesh
    /// and emit bytes that other threads change, from `metrics`.
    pub fn for_shard(share: usize, metrics: &crate::metrics::Metrics, id: usize) -> ShardBudget {
        ShardBudget::with_shared(
            share,
            metrics.mesh_bytes[id].clone(),
            metrics.emit_bytes[id].clone(),
        )
    }

    /// A shard's budget of `share` bytes (0: unbounded), whose mesh bytes are `mesh` (the
    /// shards it sends to uncount what they take) and emit bytes `emits`.
    pub fn with_shared(
        share: usize,
        mesh: Arc<SharedBytes>,
        emits: Arc<SharedBytes>,
    ) -> ShardBudget {
        ShardBudget {
            share: if share == 0 { usize::MAX } else { share },
            local: Cell::new(0),
            by_queue: Default::default(),
            mesh,
            emits,
            shared_seen: Cell::new(0),
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

    /// Bytes queued on this shard now, the mesh's included.
    pub fn used(&self) -> usize {
        let shared = self.mesh.get() + self.emits.get();
        self.shared_seen.set(shared);
        self.local.get() + shared
    }

    /// Bytes queued in `queue` now.
    pub fn queued(&self, queue: Queue) -> usize {
        match queue {
            Queue::Mesh => self.mesh.get(),
            Queue::Emits => self.emits.get(),
            q => self.by_queue[q.index()].get(),
        }
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
        let used = self.local.get() + self.shared_seen.get();
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

    /// Counts `len` bytes queued in `queue` (not the mesh, see [`ShardBudget::mesh_sent`],
    /// nor emits);
    /// wakes the shedder past the `shed` mark.
    #[inline]
    pub fn add(&self, queue: Queue, len: usize) {
        let cell = &self.by_queue[queue.index()];
        cell.set(cell.get() + len);
        let local = self.local.get() + len;
        self.local.set(local);
        if local + self.shared_seen.get() >= self.shed_mark() {
            if let Some(w) = self.shedder.take() {
                w.wake();
            }
        }
    }

    /// Uncounts `len` bytes of `queue` (written, dropped, answered, or gone with a moving
    /// connection).
    #[inline]
    pub fn sub(&self, queue: Queue, len: usize) {
        let cell = &self.by_queue[queue.index()];
        cell.set(cell.get().saturating_sub(len));
        self.local.set(self.local.get().saturating_sub(len));
    }

    /// Counts `len` bytes of `queue` until the returned charge is dropped: for something
    /// queued as a whole (a publish, a held packet, a request body).
    pub fn charge(self: &Rc<Self>, queue: Queue, len: usize) -> Charge {
        self.add(queue, len);
        Charge {
            budget: self.clone(),
            queue,
            bytes: len,
        }
    }

    /// Counts a message of `len` bytes sent through the mesh; the shard that takes it
    /// uncounts it ([`SharedBytes::taken`]).
    #[inline]
    pub fn mesh_sent(&self, len: usize) {
        self.shared_seen.set(self.mesh.sent(len) + self.emits.get());
    }

    /// An outbound queue was created on this shard.
    pub fn queue_opened(&self) {
        self.queues.set(self.queues.get() + 1);
    }

    /// An outbound queue was dropped.
    pub fn queue_closed(&self) {
        self.queues.set(self.queues.get().saturating_sub(1));
    }

    /// Whether the shard refuses new work for memory now: past the `pressure` mark, and
    /// until back below `relief`.
    pub fn state(&self) -> Pressure {
        let used = self.used();
        if self.pressured.get() {
            if used < self.relief_mark() {
                self.pressured.set(false);
            }
        } else if used >= self.pressure_mark() {
            self.pressured.set(true);
        }
        if self.pressured.get() {
            Pressure::Pressured
        } else {
            Pressure::Normal
        }
    }

    /// Whether the shedder has work: the shard is past its `shed` mark.
    pub fn must_shed(&self) -> bool {
        self.used() >= self.shed_mark()
    }

    /// Whether cutting connections would still help: the shard is not below `relief`, and
    /// its outbound queues hold more than half of that (cutting connections frees only
    /// those; the other queues drain by themselves while new work is refused).
    pub fn shedding_helps(&self) -> bool {
        self.used() >= self.relief_mark() && self.queued(Queue::Outbound) > self.relief_mark() / 2
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

/// Bytes held in one of a shard's queues, counted in its budget until this is dropped.
pub struct Charge {
    budget: Rc<ShardBudget>,
    queue: Queue,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.sub(self.queue, self.bytes);
    }
}

impl fmt::Debug for Charge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Charge({} bytes of {})", self.bytes, self.queue.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_has_hysteresis() {
        let b = ShardBudget::new(800);
        b.add(Queue::Outbound, 399);
        assert_eq!(b.state(), Pressure::Normal);
        b.add(Queue::Outbound, 1);
        assert_eq!(b.state(), Pressure::Pressured);
        b.sub(Queue::Outbound, 100);
        assert_eq!(
            b.state(),
            Pressure::Pressured,
            "300 is not below relief (300)"
        );
        b.sub(Queue::Outbound, 1);
        assert_eq!(b.state(), Pressure::Normal);
    }

    #[test]
    fn past_the_share_only_queues_above_their_fair_part_are_refused() {
        let b = ShardBudget::new(1000);
        for _ in 0..4 {
            b.queue_opened();
        }
        b.add(Queue::Outbound, 990);
        assert!(b.admits(0, 200), "a near-empty queue (fair part 250)");
        assert!(!b.admits(200, 100), "a queue above its fair part");
        assert!(b.admits(900, 10), "under the share, anything");
        assert_eq!(b.hard_cuts(), 1);
    }

    #[test]
    fn zero_is_unbounded() {
        let b = ShardBudget::new(0);
        b.add(Queue::Outbound, 1 << 40);
        assert_eq!(b.state(), Pressure::Normal);
        assert!(b.admits(1 << 40, 1));
    }

    #[test]
    fn every_queue_counts_and_a_charge_gives_back_its_bytes() {
        let b = Rc::new(ShardBudget::new(1000));
        b.add(Queue::Outbound, 100);
        let held = b.charge(Queue::Held, 50);
        let body = b.charge(Queue::Polling, 20);
        {
            let _publish = b.charge(Queue::Home, 400);
            assert_eq!(b.used(), 570);
            assert_eq!(b.queued(Queue::Home), 400);
            assert_eq!(b.state(), Pressure::Pressured, "570 is past 500");
        }
        assert_eq!(b.queued(Queue::Home), 0);
        drop((held, body));
        assert_eq!(b.used(), 100);
        assert_eq!(b.state(), Pressure::Normal);
        assert_eq!(b.queued(Queue::Outbound), 100);
    }

    #[test]
    fn mesh_bytes_count_until_the_receiver_takes_them() {
        let mesh = Arc::new(SharedBytes::default());
        let b = ShardBudget::with_shared(1000, mesh.clone(), Arc::default());
        b.mesh_sent(600);
        assert_eq!(b.queued(Queue::Mesh), 600);
        assert_eq!(b.state(), Pressure::Pressured);
        // The receiving shard takes it (on its own thread, in the server).
        std::thread::spawn(move || mesh.taken(600)).join().unwrap();
        assert_eq!(b.used(), 0);
        assert_eq!(b.state(), Pressure::Normal);
    }

    #[test]
    fn shedding_helps_only_while_outbound_queues_hold_much() {
        let b = ShardBudget::new(800);
        b.add(Queue::Home, 700);
        assert!(b.must_shed());
        assert!(
            !b.shedding_helps(),
            "cutting connections frees nothing of the home's"
        );
        b.add(Queue::Outbound, 200);
        assert!(b.shedding_helps());
        b.sub(Queue::Home, 700);
        assert!(!b.shedding_helps(), "200 is below relief (300)");
    }
}
