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
//! # Connections, per shard
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
//! This file holds the link's public face and the state its parts share; `commands` runs
//! the publish script on the command connection, `subscribe` sends a caller's
//! (un)subscribe commands and waits for Redis to confirm them, and `reader` is the
//! subscriber task (keeping the link up, reading what Redis pushes, probing).

use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::channel::{mpsc, oneshot};
use futures::lock::Mutex;

use super::redis::{RedisCluster, ShardAddr};
use super::resp::{Endpoint, RespConn, RespWriter};
use super::{ClusterError, ClusterEvent, NewMessage, Published};

mod commands;
mod reader;
mod subscribe;

/// One shard's way to Redis for subscribing rooms and publishing messages; see the module
/// docs. Lives on its shard (not `Send`); the rest of [`RedisCluster`] is reached through
/// [`ShardLink::redis`].
pub struct ShardLink {
    conns: Rc<Conns>,
}

impl ShardLink {
    /// The link of shard `shard`, and the stream of its [`ClusterEvent`]s. Call it on the
    /// shard's executor, before any room is subscribed. It connects the subscriber
    /// (bounded by `connect_timeout`) and starts its task; when Redis cannot be reached yet,
    /// the stream starts with [`ClusterEvent::Down`] and the task keeps trying, then
    /// announces [`ClusterEvent::Reconnected`] once connected, as after a lost link.
    pub async fn start(
        cluster: RedisCluster,
        shard: usize,
    ) -> (ShardLink, mpsc::UnboundedReceiver<ClusterEvent>) {
        let (tx, events) = mpsc::unbounded();
        let conns = Rc::new(Conns {
            cluster,
            shard,
            events: tx,
            commands: Mutex::new(Commands::default()),
            sub: Rc::new(RefCell::new(Subscriber::default())),
        });
        let first = match conns.connect("connect (pub/sub)", "pubsub").await {
            Ok(conn) => Some(conns.install(conn)),
            Err(e) => {
                tracing::warn!(shard, error = %e, "redis pub/sub link of a shard is down at start; retrying");
                conns.send(ClusterEvent::Down {
                    reason: e.to_string(),
                });
                None
            }
        };
        if first.is_some() {
            // The first publish need not wait for a connection (and a refused one shows at
            // start, in the log).
            glommio::spawn_local(conns.clone().warm_commands()).detach();
        }
        glommio::spawn_local(conns.clone().run_subscriber(first)).detach();
        (ShardLink { conns }, events)
    }

    /// The process's link to Redis, for everything but the hot path.
    pub fn redis(&self) -> &RedisCluster {
        &self.conns.cluster
    }

    /// Subscribes `room`'s channel: `Ok` once Redis confirmed it; on
    /// [`ClusterError::Unavailable`] / [`ClusterError::Timeout`] the room stays wanted and
    /// is subscribed when the link is back (announced by [`ClusterEvent::Reconnected`]);
    /// other errors leave nothing behind.
    pub async fn subscribe(&self, room: &str) -> Result<(), ClusterError> {
        self.conns.subscribe(room).await
    }

    /// Unsubscribes `room`'s channel. Events already on their way may still arrive.
    pub async fn unsubscribe(&self, room: &str) -> Result<(), ClusterError> {
        self.conns.unsubscribe(room).await
    }

    /// Publishes a batch with the publish script, one call per room, all in one write and
    /// one round trip; a result per message, in the order given. A home shard sends
    /// whatever queued while its previous batch was out.
    ///
    /// Per message, in one atomic script: when it carries a `cid` that this user sent to
    /// this room within the dedupe window, the first ack ([`Published::Duplicate`]) and
    /// nothing else; otherwise the room's next offset, the message appended to the room's
    /// stream (trimmed by count and age), the cid recorded, and the message published on
    /// the room's channel, so the channel's order is the offset order. A room's messages
    /// get consecutive offsets in the order given (a batch is the same as publishing them
    /// one after another).
    ///
    /// Each message comes with a floor: an offset of its room the caller knows was handed
    /// out already (a home shard's newest delivered one). The room's new offsets are above
    /// the highest floor given with its messages, even when Redis lost the room's counter
    /// and stream (restarted without persistence): offsets never go back for the members,
    /// and a durable store never gets an offset it holds already.
    ///
    /// On error nothing was stored, except after a [`ClusterError::Timeout`] whose reply
    /// was lost (see there): a retry with the same `cid` is safe.
    pub async fn publish_batch(
        &self,
        msgs: Vec<(NewMessage, u64)>,
    ) -> Vec<Result<Published, ClusterError>> {
        self.conns.publish_batch(msgs).await
    }
}

/// The shard's own connections and their state.
struct Conns {
    cluster: RedisCluster,
    shard: usize,
    /// The shard's event stream.
    events: mpsc::UnboundedSender<ClusterEvent>,
    /// The command connection; locked for the whole of a batch.
    commands: Mutex<Commands>,
    /// Shared with the stray-unsubscribe tasks.
    sub: Rc<RefCell<Subscriber>>,
}

/// The command connection and its reconnect state.
#[derive(Default)]
struct Commands {
    conn: Option<RespConn>,
    failures: u32,
    /// While in backoff after a failed connect: when to try again, and the error till then.
    retry: Option<(Instant, ClusterError)>,
}

/// The subscriber connection's shared state (its reader is owned by its task).
#[derive(Default)]
struct Subscriber {
    /// The rooms the shard wants, subscribed whenever the link is up.
    rooms: HashSet<String>,
    /// The live connection's writing half, while the link is up.
    writer: Option<Rc<Mutex<RespWriter>>>,
    /// (Un)subscribe commands sent and not confirmed yet, oldest first.
    waiting: VecDeque<Waiter>,
    /// Channels being unsubscribed because they delivered for no wanted room.
    strays: HashSet<String>,
    /// When the unanswered PING was sent.
    ping_sent: Option<Instant>,
}

/// A caller waiting for Redis to confirm its (un)subscribe command.
struct Waiter {
    subscribe: bool,
    channel: String,
    done: oneshot::Sender<Result<(), ClusterError>>,
}

impl Conns {
    fn opts(&self) -> &super::RedisOptions {
        self.cluster.options()
    }

    fn link_down(&self, room: &str) -> ClusterError {
        ClusterError::Unavailable(format!(
            "the pub/sub link to {} is down; {room:?} will be subscribed when it is back",
            self.cluster.target()
        ))
    }

    fn timed_out(&self, what: &str) -> ClusterError {
        ClusterError::Timeout(format!(
            "redis at {} did not answer {what} within {:?}",
            self.cluster.target(),
            self.opts().command_timeout
        ))
    }

    /// A new connection named `corelay:<host>:shard<N>:<role>`, within `connect_timeout`
    /// (AUTH and SELECT included).
    async fn connect(&self, what: &str, role: &str) -> Result<RespConn, ClusterError> {
        let name = format!(
            "corelay:{}:shard{}:{role}",
            self.cluster
                .host_id()
                .replace(|c: char| !c.is_ascii_graphic(), "_"),
            self.shard
        );
        let target = self.cluster.shard_target();
        let attempt = async {
            let (addrs, tls) = match &target.addr {
                ShardAddr::Unix(path) => {
                    return RespConn::connect(Endpoint::Unix(path), &target.info, &name)
                        .await
                        .map_err(|e| self.cluster.classify(&e, what));
                }
                ShardAddr::Tcp { host, port, tls } => match host.parse::<IpAddr>() {
                    Ok(ip) => (vec![SocketAddr::new(ip, *port)], tls.as_ref()),
                    Err(_) => (
                        self.cluster.resolve(host.clone(), *port).await?,
                        tls.as_ref(),
                    ),
                },
            };
            let mut last = None;
            for addr in addrs {
                let to = Endpoint::Tcp { addr, tls };
                match RespConn::connect(to, &target.info, &name).await {
                    Ok(conn) => return Ok(conn),
                    Err(e) => last = Some(self.cluster.classify(&e, what)),
                }
            }
            Err(last.unwrap_or_else(|| {
                ClusterError::Unavailable(format!(
                    "redis at {} resolves to no address",
                    self.cluster.target()
                ))
            }))
        };
        let limit = self.opts().connect_timeout;
        within(limit, attempt).await.unwrap_or_else(|| {
            Err(ClusterError::Timeout(format!(
                "connecting to redis at {} took longer than {limit:?}",
                self.cluster.target()
            )))
        })
    }

    fn send(&self, event: ClusterEvent) {
        let _ = self.events.unbounded_send(event);
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
