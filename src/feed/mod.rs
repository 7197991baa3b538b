//! The feed: every acked message reaches the application's backend at least once, per room
//! in offset order (PROTOCOL.md, "Feed").
//!
//! # How nothing acked is missed
//!
//! With the feed on, the history store keeps a **ledger** beside the messages (see
//! [`Store::enable_feed`]): an append marks its room as owed, in the same atomic write as
//! the messages, and each room has a cursor, the highest offset the backend acknowledged.
//! A message is acked to its sender only once its append is durable, so an acked message's
//! room is always marked. After a restart or a SIGKILL, [`Feed::run`] starts from the rooms
//! the ledger says are owed and reads their messages from the store, from their cursors.
//!
//! # Who delivers what
//!
//! On one host each room's home shard owns its feed: the home tells its shard's [`Feed`]
//! of each message once it is durable ([`Feed::note`]), and the feed reads what it owes from
//! the store. One batch is in flight per shard at a time, and a room's messages go in
//! offset order within and across batches, so a room's order holds. A batch is retried,
//! the same, with backoff until the backend answers 2xx; only then do the cursors move (the
//! ledger's too, in the store's writer, so clearing a room's mark never races an append).
//! A message may therefore come twice (after a crash between the backend's 2xx and the
//! cursor's write); `(room, offset)` identifies it.
//!
//! # Files
//!
//! - this one: [`Feed`], the per-shard state and its delivery task;
//! - `event`: the batch's JSON.

mod cluster;
mod event;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::LocalBoxFuture;

pub use cluster::ClusterLedger;
pub use event::Batch;

use crate::history::{HistoryQuery, StoreError};
use crate::metrics::Metrics;
use crate::store::{HistoryStore, Store};

/// Most events in one batch.
pub const MAX_BATCH_EVENTS: usize = 500;
/// A batch stops taking rooms once its body is this large.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// The first wait after a failed batch; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between two tries of a batch.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A failed batch is logged at most once per this interval (the count of the others with it).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Where the batches go: the backend's feed endpoint. Implemented by the backend client
/// (`hooks`), so the feed knows nothing of HTTP.
pub trait Deliver {
    /// Posts one batch body; `Ok` once the backend answered 2xx.
    fn deliver<'a>(&'a self, body: &'a [u8]) -> LocalBoxFuture<'a, Result<(), String>>;
}

/// What the feed owes one room.
#[derive(Debug, Clone, Copy)]
struct Owed {
    /// The highest offset the backend acknowledged.
    delivered: u64,
    /// The highest offset stored.
    latest: u64,
    /// When the oldest undelivered message was sent (ms since the epoch), once known.
    oldest_ts: Option<u64>,
}

/// Where a feed keeps what it owes and how far it got.
pub enum Ledger {
    /// One host: the history store's ledger (see [`Store::enable_feed`]); the home tells
    /// the feed of each durable message ([`Feed::note`]).
    Local,
    /// A cluster: marks, cursors and leases in Redis (see [`ClusterLedger`]).
    Cluster(ClusterLedger),
}

/// One shard's feed: the rooms it owes, in the order they became owed, and its task.
pub struct Feed {
    shard: usize,
    /// Whether this shard is the home of a room (the feed of a room is its home's).
    owns: Box<dyn Fn(&str) -> bool>,
    /// Where the marks and cursors are kept.
    ledger: Ledger,
    /// Batches settled so far (a read of the Redis ledger that a settle overtook is
    /// dropped: it may list rooms as owed that were just delivered).
    settled: Cell<u64>,
    store: Store,
    deliver: Rc<dyn Deliver>,
    metrics: Arc<Metrics>,
    owed: RefCell<HashMap<Arc<str>, Owed>>,
    /// Each owed room once, oldest first; a room not finished goes to the back.
    order: RefCell<VecDeque<Arc<str>>>,
    waker: RefCell<Option<Waker>>,
}

impl Feed {
    /// The feed of shard `shard`, home of the rooms `owns` says (one host), or of the
    /// partitions it leases (`ledger` in Redis), posting through `deliver`. It does
    /// nothing until [`Feed::run`].
    pub fn new(
        shard: usize,
        owns: Box<dyn Fn(&str) -> bool>,
        ledger: Ledger,
        store: Store,
        deliver: Rc<dyn Deliver>,
        metrics: Arc<Metrics>,
    ) -> Rc<Feed> {
        Rc::new(Feed {
            shard,
            owns,
            ledger,
            settled: Cell::new(0),
            store,
            deliver,
            metrics,
            owed: RefCell::new(HashMap::new()),
            order: RefCell::new(VecDeque::new()),
            waker: RefCell::new(None),
        })
    }

    /// A message of `room` at `offset` (sent at `ts`, ms) is durable: the feed owes it.
    /// Called by the room's home shard, in offset order.
    pub fn note(&self, room: &Arc<str>, offset: u64, ts: u64) {
        let mut owed = self.owed.borrow_mut();
        match owed.get_mut(room) {
            Some(o) => {
                o.latest = o.latest.max(offset);
                o.oldest_ts.get_or_insert(ts);
            }
            None => {
                // Not owed until now: everything before it was delivered (or is listed in
                // the ledger, which `load` reads and which then wins).
                owed.insert(
                    room.clone(),
                    Owed {
                        delivered: offset.saturating_sub(1),
                        latest: offset,
                        oldest_ts: Some(ts),
                    },
                );
                self.order.borrow_mut().push_back(room.clone());
            }
        }
        drop(owed);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Rooms this shard's feed owes.
    pub fn owed_rooms(&self) -> usize {
        self.owed.borrow().len()
    }

    /// The delivery task: loads what was owed before this process started, then posts
    /// batches for as long as the shard runs.
    pub async fn run(self: Rc<Self>) {
        match &self.ledger {
            Ledger::Local => self.load().await,
            Ledger::Cluster(_) => cluster::spawn_tasks(&self),
        }
        let mut backoff = FIRST_BACKOFF;
        let mut last_log: Option<std::time::Instant> = None;
        let mut unlogged = 0u64;
        loop {
            self.publish_state();
            poll_fn(|cx| {
                if self.order.borrow().is_empty() {
                    *self.waker.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            let (batch, covered) = match self.next_batch().await {
                Ok(b) => b,
                Err(e) => {
                    self.stats().store_errors.fetch_add(1, Relaxed);
                    tracing::warn!(shard = self.shard, error = %e, "feed: cannot read the history store; retrying");
                    glommio::timer::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            if batch.is_empty() {
                // Owed messages the store no longer has: nothing to send for them.
                self.settle(&covered).await;
                continue;
            }
            let events = batch.len() as u64;
            let body = batch.finish();
            // The same batch until the backend takes it: later messages wait behind it.
            loop {
                match self.deliver.deliver(&body).await {
                    Ok(()) => break,
                    Err(e) => {
                        self.stats().retries.fetch_add(1, Relaxed);
                        self.publish_state();
                        let now = std::time::Instant::now();
                        if last_log.is_none_or(|at| now.duration_since(at) >= LOG_EVERY) {
                            tracing::warn!(shard = self.shard, error = %e, events, retry_in = ?backoff, suppressed = unlogged, "feed: the backend did not take a batch; retrying");
                            last_log = Some(now);
                            unlogged = 0;
                        } else {
                            unlogged += 1;
                        }
                        glommio::timer::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            backoff = FIRST_BACKOFF;
            let stats = self.stats();
            stats.batches.fetch_add(1, Relaxed);
            stats.events.fetch_add(events, Relaxed);
            self.settle(&covered).await;
        }
    }

    /// Reads the rooms the ledger says are owed and that this shard is home of.
    async fn load(&self) {
        let mut backoff = FIRST_BACKOFF;
        let pending = loop {
            match self.store.feed_pending().await {
                Ok(p) => break p,
                Err(e) => {
                    tracing::warn!(shard = self.shard, error = %e, "feed: cannot read what is owed from the history store; retrying");
                    glommio::timer::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        let mut owed = self.owed.borrow_mut();
        let mut order = self.order.borrow_mut();
        let mut recovered = 0usize;
        for p in pending {
            if !(self.owns)(&p.room) {
                continue;
            }
            let room: Arc<str> = Arc::from(p.room);
            recovered += 1;
            match owed.get_mut(&room) {
                // Noted since start: the ledger's cursor is the truth.
                Some(o) => {
                    o.delivered = p.delivered;
                    o.latest = o.latest.max(p.latest);
                    o.oldest_ts = None;
                }
                None => {
                    owed.insert(
                        room.clone(),
                        Owed {
                            delivered: p.delivered,
                            latest: p.latest,
                            oldest_ts: None,
                        },
                    );
                    order.push_back(room);
                }
            }
        }
        if recovered > 0 {
            tracing::info!(
                shard = self.shard,
                rooms = recovered,
                "feed: resuming rooms owed from before the restart"
            );
        }
    }

    /// The next batch: the owed rooms' messages from their cursors, oldest room first, up
    /// to the batch's bounds; and how far it covers each room.
    async fn next_batch(&self) -> Result<(Batch, Vec<(Arc<str>, u64)>), StoreError> {
        let rooms: Vec<(Arc<str>, Owed)> = {
            let owed = self.owed.borrow();
            self.order
                .borrow()
                .iter()
                .filter_map(|r| owed.get(r).map(|o| (r.clone(), *o)))
                .collect()
        };
        let mut batch = Batch::new();
        let mut covered = Vec::new();
        for (room, o) in rooms {
            let room_left = MAX_BATCH_EVENTS - batch.len();
            let want = usize::try_from(o.latest.saturating_sub(o.delivered))
                .unwrap_or(usize::MAX)
                .min(room_left);
            let msgs = self
                .store
                .read(&room, HistoryQuery::After(o.delivered), want)
                .await?;
            let mut upto = o.delivered;
            for m in msgs.iter().filter(|m| m.offset <= o.latest) {
                batch.push(m);
                upto = m.offset;
            }
            if let Some(first) = msgs.first() {
                if let Some(owed) = self.owed.borrow_mut().get_mut(&room) {
                    owed.oldest_ts = Some(first.ts);
                }
            }
            if msgs.len() < want {
                // The store holds nothing more up to `latest`: trimmed away before the
                // feed got to them (history.max_len / max_age while the backend was down
                // too long). Said once per room and batch; the room is covered up to it.
                tracing::warn!(
                    shard = self.shard,
                    room = %room,
                    missing = want - msgs.len(),
                    "feed: the history store no longer has messages the feed owes; they are skipped"
                );
                upto = o.latest;
            }
            covered.push((room, upto));
            if batch.len() >= MAX_BATCH_EVENTS || batch.bytes() >= MAX_BATCH_BYTES {
                break;
            }
        }
        Ok((batch, covered))
    }

    /// The backend took a batch covering `covered`: moves the cursors, here and in the
    /// ledger, and lets finished rooms go (the others go to the back of the line).
    async fn settle(&self, covered: &[(Arc<str>, u64)]) {
        {
            let mut owed = self.owed.borrow_mut();
            let mut order = self.order.borrow_mut();
            for (room, upto) in covered {
                let Some(o) = owed.get_mut(room) else {
                    continue;
                };
                o.delivered = o.delivered.max(*upto);
                if let Some(pos) = order.iter().position(|r| r == room) {
                    order.remove(pos);
                }
                if o.delivered >= o.latest {
                    owed.remove(room);
                } else {
                    o.oldest_ts = None;
                    order.push_back(room.clone());
                }
            }
        }
        self.settled.set(self.settled.get() + 1);
        let cursors: Vec<(String, u64)> = covered
            .iter()
            .map(|(room, upto)| (room.to_string(), *upto))
            .collect();
        let saved = match &self.ledger {
            Ledger::Local => self
                .store
                .feed_delivered(cursors)
                .await
                .map_err(|e| e.to_string()),
            Ledger::Cluster(c) => c.done(self, cursors).await,
        };
        if let Err(e) = saved {
            // The backend has them; after a restart it may get them again (at least once).
            self.stats().store_errors.fetch_add(1, Relaxed);
            tracing::warn!(shard = self.shard, error = %e, "feed: cannot save the cursors");
        }
    }

    /// Adds what a ledger read says is owed (cluster): rooms new to this feed join the
    /// line; for the others the ledger's cursor and mark only move them forward.
    fn merge(&self, rooms: impl IntoIterator<Item = (String, u64, u64)>) {
        let mut owed = self.owed.borrow_mut();
        let mut order = self.order.borrow_mut();
        for (room, delivered, latest) in rooms {
            if latest <= delivered {
                continue;
            }
            let room: Arc<str> = Arc::from(room);
            match owed.get_mut(&room) {
                Some(o) => {
                    o.delivered = o.delivered.max(delivered);
                    o.latest = o.latest.max(latest);
                }
                None => {
                    owed.insert(
                        room.clone(),
                        Owed {
                            delivered,
                            latest,
                            oldest_ts: None,
                        },
                    );
                    order.push_back(room);
                }
            }
        }
        drop((owed, order));
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Forgets the rooms `lost` says (cluster: their partition's lease went to another
    /// host, which resumes them from the ledger).
    fn forget(&self, lost: impl Fn(&str) -> bool) {
        self.owed.borrow_mut().retain(|room, _| !lost(room));
        self.order.borrow_mut().retain(|room| !lost(room));
    }

    /// Marks rooms as owed up to these offsets before their senders are acked (cluster:
    /// the Redis ledger; one host's store marks them with the append itself).
    pub async fn mark(&self, marks: Vec<(String, u64)>) -> Result<(), String> {
        match &self.ledger {
            Ledger::Local => Ok(()),
            Ledger::Cluster(c) => c.mark(marks).await,
        }
    }

    /// Publishes the owed rooms and the lag to `/metrics`.
    fn publish_state(&self) {
        let owed = self.owed.borrow();
        let oldest = owed.values().filter_map(|o| o.oldest_ts).min();
        let stats = self.stats();
        stats.owed_rooms.store(owed.len() as u64, Relaxed);
        let lag = match oldest {
            Some(ts) => now_ms().saturating_sub(ts),
            // Owed rooms whose first message was not read yet: at least a moment.
            None if !owed.is_empty() => 1,
            None => 0,
        };
        stats.lag_ms.store(lag, Relaxed);
    }

    fn stats(&self) -> &crate::metrics::FeedStats {
        &self.metrics.shards[self.shard].feed
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
