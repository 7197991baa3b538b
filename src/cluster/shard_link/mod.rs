//! [`ShardLink`]: a shard's hot path to Redis (publishing its rooms' messages, receiving
//! their channels) on the shard's own executor, over two connections of its own.
//!
//! # Why
//!
//! Through the [bridge](crate::bridge), every publish batch crosses threads twice (shard to
//! bridge, answer back) and so does every message received (the bridge's pub/sub reader,
//! then the shard). Measured with two hosts through Redis, the bridge threads took as much
//! CPU as Redis itself, mostly in wake-ups, and each crossing is one more wait in a run
//! queue on a busy host. Here a shard writes the publish script call and reads the
//! channel's messages itself.
//!
//! What stays on the bridge ([`RedisCluster`]): presence, typing notices, history reads,
//! the process's link probe and clock measurement. Every kind of Redis URL is spoken by
//! the shard itself: TCP, a Unix socket, and `rediss://` (rustls, with the same CA and
//! client certificate files as the bridge's client).
//!
//! # Redis Cluster
//!
//! At start the link asks the server for its slot map (`CLUSTER SLOTS`); a standalone
//! server refuses, and then it is the only node. On a cluster each room's keys and channel
//! live on the master of the room's slot ([`super::topology`]), and the shard keeps the
//! connections below to each master it needs: a batch is one script call per master, sent
//! to all of them at once, and each master's subscriber carries the rooms of its slots. A
//! topology task reads the map again when a node answers `MOVED`, drops a room's sharded
//! subscription (its slot moved: Redis 7 does that), or cannot be reached (a failover), and
//! every few seconds besides; rooms whose master changed are subscribed on the new one,
//! and [`ClusterEvent::Reconnected`] tells the home to catch up what they may have missed.
//!
//! # Connections, per shard and Redis node
//!
//! - **Commands** (the publish script): connected at start (again on first use after it
//!   was lost), one batch at a time (the
//!   shard's writer sends a batch and waits for it). After a failed connect, calls fail at
//!   once with that error until the backoff (exponential, with jitter) has passed. Every
//!   call is bounded by `command_timeout`, connecting included; a call that timed out
//!   drops its connection (a late reply would answer the next call).
//! - **Subscriber** (RESP2 pub/sub): its task connects, subscribes every room the shard
//!   wants, and reads. It sends PING every `ping_interval`; an answer later than
//!   `command_timeout` counts as a lost link. A lost link gives [`ClusterEvent::Down`], then
//!   reconnect attempts with backoff and jitter; once every room is subscribed again,
//!   [`ClusterEvent::Reconnected`].
//!
//! # Layout
//!
//! This file holds the link's public face; `router` finds each room's node and keeps the
//! slot map (the topology task), `publish` splits a batch over the nodes and follows
//! redirects, `node` is one node's connections: `commands` runs the publish script on its
//! command connection, `subscribe` sends a caller's (un)subscribe commands and waits for
//! Redis to confirm them, and `reader` is the subscriber task (keeping the link up,
//! reading what Redis pushes, probing).

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use futures::channel::mpsc;

use super::redis::RedisCluster;
use super::{ClusterError, ClusterEvent, NewMessage, Published};

mod commands;
mod node;
mod publish;
mod reader;
mod router;
mod subscribe;

use router::Router;

/// One shard's way to Redis for subscribing rooms and publishing messages; see the module
/// docs. Lives on its shard (not `Send`); the rest of [`RedisCluster`] is reached through
/// [`ShardLink::redis`].
pub struct ShardLink {
    router: Rc<Router>,
}

impl ShardLink {
    /// The link of shard `shard`, and the stream of its [`ClusterEvent`]s. Call it on the
    /// shard's executor, before any room is subscribed. It finds out whether Redis is a
    /// cluster (and reads its slot map), connects the subscriber (bounded by
    /// `connect_timeout`) and starts its tasks; when Redis cannot be reached yet, the
    /// stream starts with [`ClusterEvent::Down`] and the tasks keep trying, then announce
    /// [`ClusterEvent::Reconnected`] once connected, as after a lost link.
    pub async fn start(
        cluster: RedisCluster,
        shard: usize,
    ) -> (ShardLink, mpsc::UnboundedReceiver<ClusterEvent>) {
        let (tx, events) = mpsc::unbounded();
        let router = Router::start(cluster, shard, tx).await;
        (ShardLink { router }, events)
    }

    /// The process's link to Redis, for everything but the hot path.
    pub fn redis(&self) -> &RedisCluster {
        &self.router.cluster
    }

    /// Whether Redis is a Redis Cluster (known once it was reached).
    pub fn is_cluster(&self) -> bool {
        self.router.is_cluster()
    }

    /// Whether a link to Redis (to any node, on a cluster) is down now: some rooms miss
    /// their messages until [`ClusterEvent::Reconnected`].
    pub fn is_down(&self) -> bool {
        self.router.is_down()
    }

    /// Subscribes `room`'s channel (on the node serving its slot): `Ok` once Redis confirmed
    /// it; on [`ClusterError::Unavailable`] / [`ClusterError::Timeout`] the room stays wanted
    /// and is subscribed when the link is back (announced by [`ClusterEvent::Reconnected`]);
    /// other errors leave nothing behind.
    pub async fn subscribe(&self, room: &str) -> Result<(), ClusterError> {
        Box::pin(self.router.subscribe(room)).await
    }

    /// Unsubscribes `room`'s channel. Events already on their way may still arrive.
    pub async fn unsubscribe(&self, room: &str) -> Result<(), ClusterError> {
        self.router.unsubscribe(room).await
    }

    /// Publishes a batch with the publish script: one call per Redis node carrying all its
    /// rooms' messages, the calls to several nodes at once; a result per message, in the
    /// order given. A home shard sends whatever queued while its previous batch was out.
    ///
    /// Per message, atomically: when it carries a `cid` that this user sent to this room
    /// within the dedupe window, the first ack ([`Published::Duplicate`]) and nothing else;
    /// otherwise the room's next offset, the message appended to the room's stream (trimmed
    /// by count and age), the cid recorded, and the message published on the room's
    /// channel, so the channel's order is the offset order. A room's messages get
    /// consecutive offsets in the order given (a batch is the same as publishing them one
    /// after another).
    ///
    /// Each message comes with a floor: an offset of its room the caller knows was handed
    /// out already (a home shard's newest delivered one). The room's new offsets are above
    /// the highest floor given with its messages, even when Redis lost the room's counter
    /// and stream (restarted without persistence, or a failover lost the last writes):
    /// offsets never go back for the members, and a durable store never gets an offset it
    /// holds already.
    ///
    /// On a Redis Cluster, calls follow `MOVED` (reading the slot map again) and `ASK`, wait
    /// out `TRYAGAIN` during a slot's migration, and on a master with replicas wait until
    /// one has the writes (`WAIT`), so that an acked message survives a failover.
    ///
    /// On error nothing was stored, except after a [`ClusterError::Timeout`] whose reply
    /// was lost (see there): a retry with the same `cid` is safe.
    pub async fn publish_batch(
        &self,
        msgs: Vec<(NewMessage, u64)>,
    ) -> Vec<Result<Published, ClusterError>> {
        // Boxed: the future is large (a call per node, redirects, a map refresh), and a
        // shard's stack should not carry it in every caller's state.
        Box::pin(self.router.publish_batch(msgs)).await
    }
}

/// What a node asks of its shard's topology task: read the cluster's map again, and the
/// rooms it stopped serving (Redis dropped their sharded subscriptions when their slot
/// moved), to subscribe again wherever they are now.
pub(super) struct Requests {
    /// A refresh was asked for.
    pending: Cell<bool>,
    /// Rooms to subscribe again after the refresh.
    orphans: RefCell<HashSet<String>>,
    /// Wakes the topology task (one wake-up pending at most: a bounded queue of one).
    wake: mpsc::Sender<()>,
}

impl Requests {
    fn new(wake: mpsc::Sender<()>) -> Requests {
        Requests {
            pending: Cell::new(false),
            orphans: RefCell::new(HashSet::new()),
            wake,
        }
    }

    /// Asks for a refresh; `orphan`, a room to subscribe again after it.
    pub(super) fn ask(&self, orphan: Option<&str>) {
        if let Some(room) = orphan {
            self.orphans.borrow_mut().insert(room.to_owned());
        }
        self.pending.set(true);
        // Full: a wake-up is pending already.
        let _ = self.wake.clone().try_send(());
    }

    /// Takes the pending request: whether there was one, and its orphans.
    fn take(&self) -> (bool, Vec<String>) {
        let orphans = self.orphans.borrow_mut().drain().collect();
        (self.pending.replace(false), orphans)
    }
}

/// `fut`'s output, or `None` when `limit` passed first.
async fn within<T>(limit: Duration, fut: impl Future<Output = T>) -> Option<T> {
    glommio::timer::timeout(limit, async { Ok(fut.await) })
        .await
        .ok()
}

/// The output of whichever of `a` and `b` finishes first (the other is dropped).
async fn first_of<T>(a: impl Future<Output = T>, b: impl Future<Output = T>) -> T {
    futures::pin_mut!(a, b);
    futures::future::select(a, b).await.factor_first().0
}
