//! The shedder: a shard's enforcement of its part of `limits.memory_budget`. It publishes
//! the shard's queued bytes and pressure for `/metrics`, `/healthz` and the other shards,
//! and when the queues pass the budget's `shed` mark, or the shard has refused new work for
//! [`PATIENCE`] without its queues draining, it cuts the connections holding the most
//! queued bytes (the slowest consumers) until the shard is below its `relief` mark, or
//! its outbound queues no longer hold much of what is left
//! ([`ShardBudget::shedding_helps`]).
//! A cut connection loses only what was queued to it, never an acked message: it recovers
//! with `join {since}`, as any slow consumer.

use std::future::{poll_fn, Future};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::Poll;
use std::time::{Duration, Instant};

use super::Shard;
use crate::metrics::ShardMetrics;
use crate::transport::budget::{Pressure, Queue, ShardBudget};
use crate::transport::conn::CloseReason;
use crate::transport::session::Session;

/// How often the shard's figures are published when nothing wakes the shedder.
const PUBLISH_EVERY: Duration = Duration::from_millis(10);

/// How long a shard refuses new work for memory before it cuts its largest queues even
/// below the `shed` mark: consumers that stopped reading would otherwise hold the shard
/// in pressure (and its senders refused) for as long as they stay connected.
const PATIENCE: Duration = Duration::from_secs(1);

impl Shard {
    /// Runs for the shard's life: publishes its figures, and sheds when woken past the
    /// `shed` mark (or finding the shard there at a tick).
    pub async fn run_shedder(self: Rc<Self>) {
        let budget = self.chat.budget.clone();
        let mut cuts_seen = 0;
        let mut pressured_since: Option<Instant> = None;
        loop {
            wait_or_tick(&budget).await;
            let now = Instant::now();
            let stuck = pressured_since.is_some_and(|at| now - at >= PATIENCE);
            if budget.must_shed() || stuck {
                self.shed(&budget);
                // What is left may be held by closing sessions still flushing: let them
                // (and everything else on the shard) run before looking again.
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
            let stats = self.stats();
            let cuts = budget.hard_cuts();
            stats.budget_closes.fetch_add(cuts - cuts_seen, Relaxed);
            cuts_seen = cuts;
            stats.queued_bytes.store(budget.used() as u64, Relaxed);
            for (i, queue) in Queue::ALL.into_iter().enumerate() {
                stats.queue_bytes[i].store(budget.queued(queue) as u64, Relaxed);
            }
            let pressured = budget.state() == Pressure::Pressured;
            stats.memory_pressure.store(u64::from(pressured), Relaxed);
            pressured_since = match (pressured, pressured_since) {
                (false, _) => None,
                (true, since) => Some(since.unwrap_or(now)),
            };
        }
    }

    /// Cuts the sessions with the most queued bytes while that helps (see
    /// [`ShardBudget::shedding_helps`]): slow consumers, as if their own queue had
    /// overflowed.
    fn shed(&self, budget: &ShardBudget) {
        let mut heavy: Vec<(usize, Rc<Session>)> = self
            .sessions
            .borrow()
            .values()
            .filter(|s| !s.is_closing())
            .map(|s| (s.queued_bytes(), s.clone()))
            .filter(|(bytes, _)| *bytes > 0)
            .collect();
        heavy.sort_unstable_by_key(|(bytes, _)| std::cmp::Reverse(*bytes));
        let stats = self.stats();
        for (bytes, session) in heavy {
            if !budget.shedding_helps() {
                break;
            }
            session
                .span
                .in_scope(|| tracing::debug!(bytes, "cut for the memory budget"));
            ShardMetrics::inc(&stats.budget_closes);
            ShardMetrics::inc(&stats.slow_consumer_closes);
            self.end_session(&session, CloseReason::SlowConsumer);
        }
    }
}

/// Resolves when the budget wakes the shedder (past the `shed` mark) or after
/// [`PUBLISH_EVERY`], whichever comes first.
async fn wait_or_tick(budget: &ShardBudget) {
    let tick = glommio::timer::Timer::new(PUBLISH_EVERY);
    futures::pin_mut!(tick);
    poll_fn(|cx| {
        if budget.must_shed() {
            return Poll::Ready(());
        }
        if tick.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        budget.wait_for_shedding(cx.waker());
        Poll::Pending
    })
    .await;
}
