//! The feed on a cluster of hosts: partitions leased in Redis (see
//! `crate::cluster::redis::feed` for the keys).
//!
//! - The host that sequenced a message marks its room in the Redis ledger before it acks
//!   the sender ([`Feed::mark`]), so every acked message is marked whichever host dies.
//! - Each host takes about its share of the partitions' leases (of [`FEED_PARTITIONS`],
//!   split by the hosts running a feed), and a shard delivers the partitions of its leases
//!   that fall to it (`partition % shards`). A lease lives [`LEASE_TTL`] and is renewed
//!   every [`RENEW_EVERY`]: a host that dies loses its leases within the ttl, and the hosts
//!   left take them and resume every owed room from its cursor.
//! - A shard reads what its partitions owe every [`POLL_EVERY`]. A cursor moves only while
//!   the lease is held (the script checks), so a host that lost its lease mid-batch cannot
//!   move the new holder's cursors; the backend may get that batch twice.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::time::Duration;

use super::Feed;
use crate::cluster::redis::{by_partition, feed_partition, RedisCluster, FEED_PARTITIONS};

/// How long a lease lives without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(6);
/// How often a holder renews its leases (and tries for free ones).
const RENEW_EVERY: Duration = Duration::from_secs(2);
/// How often a shard reads what its partitions owe.
const POLL_EVERY: Duration = Duration::from_millis(200);

/// A shard's side of the Redis ledger: the partitions it may deliver and the ones it holds.
pub struct ClusterLedger {
    redis: RedisCluster,
    shard: usize,
    shards: usize,
    held: RefCell<BTreeSet<u16>>,
    /// Marks that failed (their senders got `unavailable`), made again by the poll task.
    unmarked: RefCell<std::collections::HashMap<String, u64>>,
}

impl ClusterLedger {
    /// The ledger of shard `shard` of `shards`, through `redis`.
    pub fn new(redis: RedisCluster, shard: usize, shards: usize) -> ClusterLedger {
        ClusterLedger {
            redis,
            shard,
            shards,
            held: RefCell::new(BTreeSet::new()),
            unmarked: RefCell::new(std::collections::HashMap::new()),
        }
    }

    /// The partitions this shard may deliver.
    fn candidates(&self) -> impl Iterator<Item = u16> + '_ {
        (0..FEED_PARTITIONS).filter(|p| usize::from(*p) % self.shards == self.shard)
    }

    /// Whether this shard holds the lease of `room`'s partition.
    fn holds(&self, room: &str) -> bool {
        self.held.borrow().contains(&feed_partition(room))
    }

    /// See [`Feed::mark`]. Marks that fail are kept and made again by the poll task: the
    /// messages are stored (their senders get `unavailable` and may retry), and the feed
    /// still owes them.
    pub(super) async fn mark(&self, marks: Vec<(String, u64)>) -> Result<(), String> {
        match self.redis.feed_mark(marks.clone()).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let mut unmarked = self.unmarked.borrow_mut();
                for (room, offset) in marks {
                    let o = unmarked.entry(room).or_default();
                    *o = (*o).max(offset);
                }
                Err(e.to_string())
            }
        }
    }

    /// Makes the failed marks again.
    async fn remark(&self) -> Result<(), String> {
        let marks: Vec<(String, u64)> = self.unmarked.borrow_mut().drain().collect();
        if marks.is_empty() {
            return Ok(());
        }
        self.mark(marks).await
    }

    /// The backend took these rooms up to these offsets: moves their cursors, partition
    /// by partition, and lets go of a partition whose lease turned out lost.
    pub(super) async fn done(&self, feed: &Feed, rooms: Vec<(String, u64)>) -> Result<(), String> {
        for (p, rooms) in by_partition(rooms) {
            match self.redis.feed_done(p, rooms).await {
                Ok(true) => {}
                Ok(false) => self.lost(feed, p),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }

    /// Partition `p`'s lease is no longer this shard's: forget its rooms.
    fn lost(&self, feed: &Feed, p: u16) {
        if self.held.borrow_mut().remove(&p) {
            tracing::info!(
                shard = self.shard,
                partition = p,
                "feed: lease lost; another host delivers it"
            );
            feed.forget(|room| feed_partition(room) == p);
        }
    }

    /// Renews the held leases, takes free ones up to this shard's share, gives back
    /// those above it.
    async fn renew(&self, feed: &Feed) -> Result<(), String> {
        let hosts = self
            .redis
            .feed_hosts(LEASE_TTL)
            .await
            .map_err(|e| e.to_string())?
            .max(1);
        let per_host = usize::from(FEED_PARTITIONS).div_ceil(hosts as usize);
        let share = per_host.div_ceil(self.shards).max(1);
        let candidates: Vec<u16> = self.candidates().collect();
        for p in candidates {
            let held = self.held.borrow().contains(&p);
            let count = self.held.borrow().len();
            if held && count > share {
                // Above the share (more hosts now): give it back for another to take.
                let _ = self.redis.feed_lease(p, false, LEASE_TTL).await;
                self.lost(feed, p);
            } else if held || count < share {
                match self.redis.feed_lease(p, true, LEASE_TTL).await {
                    Ok(true) => {
                        if self.held.borrow_mut().insert(p) {
                            tracing::debug!(shard = self.shard, partition = p, "feed: lease taken");
                        }
                    }
                    Ok(false) => self.lost(feed, p),
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        Ok(())
    }

    /// Reads what the held partitions owe into the feed, unless a batch settled meanwhile
    /// (then the next poll reads again).
    async fn poll(&self, feed: &Feed) -> Result<(), String> {
        let held: Vec<u16> = self.held.borrow().iter().copied().collect();
        let settled = feed.settled.get();
        let mut owed = Vec::new();
        for p in held {
            for r in self.redis.feed_owed(p).await.map_err(|e| e.to_string())? {
                owed.push((r.room, r.delivered, r.latest));
            }
        }
        if feed.settled.get() == settled {
            feed.merge(owed.into_iter().filter(|(room, _, _)| self.holds(room)));
        }
        Ok(())
    }
}

/// Starts a cluster feed's lease and poll tasks.
pub(super) fn spawn_tasks(feed: &Rc<Feed>) {
    let leases = feed.clone();
    glommio::spawn_local(async move {
        let super::Ledger::Cluster(c) = &leases.ledger else {
            return;
        };
        loop {
            if let Err(e) = c.renew(&leases).await {
                tracing::warn!(shard = c.shard, error = %e, "feed: cannot renew the leases");
            }
            glommio::timer::sleep(RENEW_EVERY).await;
        }
    })
    .detach();
    let polls = feed.clone();
    glommio::spawn_local(async move {
        let super::Ledger::Cluster(c) = &polls.ledger else {
            return;
        };
        loop {
            glommio::timer::sleep(POLL_EVERY).await;
            if let Err(e) = c.remark().await {
                tracing::debug!(shard = c.shard, error = %e, "feed: cannot mark rooms yet");
            }
            if let Err(e) = c.poll(&polls).await {
                tracing::debug!(shard = c.shard, error = %e, "feed: cannot read the owed rooms");
            }
        }
    })
    .detach();
}
