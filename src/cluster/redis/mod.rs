//! [`RedisCluster`]: the process's link to Redis, living on the [tokio bridge](crate::bridge).
//!
//! # Connections
//!
//! - **Commands** (presence, typing notices, history reads): one multiplexed RESP2
//!   connection shared by every shard. When it breaks, the next call reconnects; while
//!   reconnecting fails, calls fail at once with the last error (no pile-up) and attempts
//!   are spaced by exponential backoff with jitter (`reconnect_min` … `reconnect_max`).
//!   Every call is bounded by `command_timeout`: a stalled Redis gives
//!   [`ClusterError::Timeout`], never a hang.
//! - **Pub/sub**: a dedicated RESP3 connection subscribed to this host's private probe
//!   channel only, driven by a supervisor task. Every `ping_interval` the supervisor
//!   publishes to that channel and times the echo ([`RedisCluster::last_roundtrip_ms`]); the
//!   link is down when the connection drops or an echo is later than `command_timeout`.
//!   Then it drops the command connection too (a stalled or vanished server will not
//!   answer it either) and reconnects with backoff and jitter. The same task refreshes this
//!   host's presence, measures Redis's clock, and brings a lost command connection back.
//!   With `emitter.enabled` the same connection PSUBSCRIBEs the `@socket.io/redis-emitter`
//!   channels and hands what it reads to [`RedisCluster::on_emit`]'s sink.
//!
//! # Redis Cluster
//!
//! The first command connection asks the server what it is (`HELLO`'s `mode`,
//! [`RedisCluster::is_cluster`]). On a Redis Cluster, reached through any one node:
//!
//! - pub/sub is sharded (SSUBSCRIBE / SPUBLISH; [`RedisOptions::sharded`] is set);
//! - the command connection is a Redis Cluster connection (redis-rs's `cluster-async`):
//!   each command goes to the master of its key's slot (a room's keys and channel share
//!   one slot, see [`crate::cluster`]), MOVED and ASK are followed, TRYAGAIN and
//!   CLUSTERDOWN are waited out a few times (about half a second in all), the slot map is
//!   read again when the cluster says it changed, and lost nodes are reconnected in the
//!   background. It is never dropped for a failed call: while a slot has no reachable
//!   master (a master died and no replica took over yet) the calls for that slot's rooms
//!   fail with [`ClusterError::Unavailable`] (or [`ClusterError::Timeout`]), and the other
//!   rooms are served as usual;
//! - the probe channel is SSUBSCRIBEd on the master that owns its slot, read from
//!   `CLUSTER SLOTS`; the link is down while that master is (its connection drops, its
//!   echo is late, or Redis unsubscribes the channel because its slot moved) and reconnects
//!   to the slot's master of the moment, which after a failover is the promoted replica;
//! - every second the supervisor reads the slot map and the node list and PINGs each node
//!   ([`RedisCluster::nodes`], for `/healthz`).
//!
//! # The hot path is not here
//!
//! Each shard publishes its rooms' messages and receives their channels over connections
//! of its own ([`super::shard_link`]), with their own `Down` / `Reconnected` events. The
//! shards reach this link for presence, typing notices and history reads; it also tells
//! them where Redis is (`RedisCluster::shard_target`).
//!
//! # Threads
//!
//! The connections and the supervisor run on the bridge; callers use the async methods,
//! which hand the work to the bridge and await the answer (any executor can await them,
//! glommio included).
//!
//! Dropping every clone of a `RedisCluster` (or calling [`RedisCluster::close`]) stops the
//! supervisor and closes the connections.
//!
//! # Files
//!
//! - this one: [`RedisCluster`], the state its clones share, connecting, and the calls the
//!   shard link and the Redis history store make;
//! - `command`: the command connection (reconnect with backoff, bounded calls, Redis's
//!   clock);
//! - `link`: the pub/sub connection and its supervisor (probe, reconnect, chores);
//! - `presence`: this host's presence in Redis (join, leave, list, periodic refresh);
//! - `nodes`: standalone or cluster, and a cluster's slot map and nodes;
//! - `client`: Redis clients from the options (TLS files) and the shards' [`ShardTarget`];
//! - `failure`: what a Redis error means for the operator ([`classify`]) and when to try
//!   again ([`backoff`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use futures::channel::oneshot;
use redis::aio::MultiplexedConnection;
use redis::{Client, Value};

use super::emitter::EmitSink;
use super::scripts::{ScriptSource, Scripts};
use super::wire::typing_payload;
use super::{keys, redact_url, ClusterError, RedisOptions};
use crate::bridge::Bridge;

mod client;
mod command;
mod failure;
mod feed;
mod link;
mod nodes;
mod presence;

pub use feed::{by_partition, feed_partition, OwedRoom, FEED_PARTITIONS};

pub(crate) use client::{
    build_client, build_client_at, build_cluster_client, ShardAddr, ShardTarget,
};
use command::CmdConn;
pub(crate) use failure::{backoff, classify};
use link::{connect_link, supervise};
pub(crate) use nodes::is_cluster_node;
use nodes::{Mode, Topology};
pub use nodes::{NodeRole, NodeStatus};

/// No round trip measured yet (or the link is down).
const NO_RTT: u64 = u64::MAX;

/// Most typing notices on their way to Redis at once; more are dropped (they are volatile).
const TYPING_INFLIGHT_MAX: usize = 1024;

/// The process's link to Redis: presence, typing notices, the connection the [Redis
/// history store](crate::store::redis::RedisStore) reads through, and the link's health.
/// Each shard wraps a clone in its [`ShardLink`](super::shard_link::ShardLink), which
/// sends the publish script's calls built here over the shard's own connections.
///
/// One per process: connect it once on the main thread ([`RedisCluster::connect_blocking`],
/// or [`RedisCluster::connect_or_retry_blocking`] to start while Redis is still down) and
/// move a clone into each shard. Cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct RedisCluster {
    inner: Arc<Handle>,
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCluster")
            .field("target", &self.inner.shared.target)
            .field("host_id", &self.inner.shared.opts.host_id)
            .field("connected", &self.is_connected())
            .field("cluster", &self.is_cluster())
            .finish()
    }
}

/// What the clones share; stops the supervisor when the last clone goes.
struct Handle {
    shared: Arc<Shared>,
    bridge: Bridge,
    /// Dropping (or firing) it stops the supervisor.
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Some(stop) = lock(&self.stop).take() {
            let _ = stop.send(());
        }
    }
}

/// State shared by the callers' tasks and the supervisor, all on the bridge thread. The
/// std mutexes are held only briefly and never across an await.
struct Shared {
    /// The options as configured; [`Shared::options`] has the ones in force.
    opts: RedisOptions,
    /// Standalone or cluster, once the server was first reached.
    mode: OnceLock<Mode>,
    /// On a cluster: the slot map and the nodes, as the supervisor last saw them.
    topology: Mutex<Topology>,
    /// The URL without password, for messages.
    target: String,
    /// RESP2 client for the command connection.
    cmd_client: Client,
    /// RESP3 client for the pub/sub connection.
    sub_client: Client,
    /// How the shards reach Redis themselves.
    shard_target: ShardTarget,
    scripts: Scripts,
    /// The command connection and its reconnect state.
    cmd: Mutex<CmdState>,
    /// One command-connection attempt at a time.
    cmd_connecting: tokio::sync::Mutex<()>,
    /// A background command reconnect is running.
    cmd_reviving: AtomicBool,
    /// The live pub/sub connection, when the link is up.
    pubsub: Mutex<Option<MultiplexedConnection>>,
    /// This host's presence: room → user → name, rewritten into Redis on every refresh.
    presence: Mutex<HashMap<String, HashMap<String, Option<String>>>>,
    /// A presence refresh is running.
    refreshing: AtomicBool,
    /// Typing notices handed to the bridge and not yet sent.
    typing_inflight: AtomicUsize,
    /// The pub/sub link is up (subscribed, and the last probe answered in time).
    connected: AtomicBool,
    /// Last probe round trip in µs, or [`NO_RTT`].
    rtt_us: AtomicU64,
    /// Redis's clock minus this host's, in ms (measured with TIME on every command
    /// connection and every [`CLOCK_EVERY`]), so that the publish deadline is checked in
    /// Redis's clock whatever this host's clock says.
    skew_ms: AtomicI64,
    /// A clock measurement is running.
    measuring: AtomicBool,
    closed: AtomicBool,
    /// Where the emits read from the emitter's channels go, once the shards are wired
    /// ([`RedisCluster::on_emit`]); until then they are dropped (no client is connected).
    emit_sink: OnceLock<EmitSink>,
}

/// The command connection: current one (with a generation, so that a failure on an old one
/// does not drop a new one) and reconnect backoff.
#[derive(Default)]
struct CmdState {
    conn: Option<(u64, CmdConn)>,
    generation: u64,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<ClusterError>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here can leave the guarded data half-updated on a panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RedisCluster {
    /// Connects to Redis as `options` say, on `bridge`: the command connection and the
    /// pub/sub connection (subscribed to this host's probe channel), then starts the
    /// supervisor. Fails with a clear [`ClusterError`] when Redis cannot be reached, refuses
    /// the credentials, fails the TLS handshake, or lacks what is needed (RESP3: Redis ≥ 6;
    /// sharded pub/sub: Redis ≥ 7).
    pub async fn connect(
        options: RedisOptions,
        bridge: Bridge,
    ) -> Result<RedisCluster, ClusterError> {
        let shared = Arc::new(Shared::new(options)?);
        let (stop_tx, stop_rx) = oneshot::channel();
        let s = shared.clone();
        bridge
            .spawn(async move {
                let link = connect_link(&s).await?;
                s.cmd_conn().await?;
                s.connected.store(true, Ordering::Release);
                tokio::spawn(supervise(s, Some(link), stop_rx));
                Ok(())
            })
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))??;
        Ok(RedisCluster {
            inner: Arc::new(Handle {
                shared,
                bridge,
                stop: Mutex::new(Some(stop_tx)),
            }),
        })
    }

    /// [`RedisCluster::connect`] on the process-wide bridge, blocking the calling thread:
    /// for the main thread before the shards start (never on a shard, nor on the bridge
    /// thread itself).
    pub fn connect_blocking(options: RedisOptions) -> Result<RedisCluster, ClusterError> {
        let bridge = Bridge::global().map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        futures::executor::block_on(RedisCluster::connect(options, bridge))
    }

    /// Like [`RedisCluster::connect`], but a Redis that cannot be reached *yet* (connection
    /// refused, timed out: [`ClusterError::is_transient`]) is not an error: the cluster is
    /// returned down, with the reason, and its supervisor keeps reconnecting with backoff.
    /// Once the link is up it writes this host's presence again. For `corelay serve`, which
    /// serves degraded rather than refusing to start (each shard's own link announces its
    /// `Down` and `Reconnected`, see [`super::shard_link::ShardLink::start`]).
    ///
    /// Errors that no retry can fix (bad URL or TLS files, refused credentials, a failed
    /// TLS handshake, a Redis without RESP3) are still returned.
    pub async fn connect_or_retry(
        options: RedisOptions,
        bridge: Bridge,
    ) -> Result<(RedisCluster, Option<ClusterError>), ClusterError> {
        let shared = Arc::new(Shared::new(options)?);
        let (stop_tx, stop_rx) = oneshot::channel();
        let s = shared.clone();
        let down = bridge
            .spawn(async move {
                let (link, down) = match connect_link(&s).await {
                    Ok(link) => match s.cmd_conn().await {
                        Ok(_) => (Some(link), None),
                        // The supervisor's chores bring the command connection back.
                        Err(e) if e.is_transient() => (Some(link), Some(e)),
                        Err(e) => return Err(e),
                    },
                    Err(e) if e.is_transient() => {
                        lock(&s.cmd).last_error = Some(e.clone());
                        (None, Some(e))
                    }
                    Err(e) => return Err(e),
                };
                s.connected.store(link.is_some(), Ordering::Release);
                tokio::spawn(supervise(s, link, stop_rx));
                Ok(down)
            })
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))??;
        let cluster = RedisCluster {
            inner: Arc::new(Handle {
                shared,
                bridge,
                stop: Mutex::new(Some(stop_tx)),
            }),
        };
        Ok((cluster, down))
    }

    /// [`RedisCluster::connect_or_retry`] on the process-wide bridge, blocking the calling
    /// thread (the main thread before the shards start).
    pub fn connect_or_retry_blocking(
        options: RedisOptions,
    ) -> Result<(RedisCluster, Option<ClusterError>), ClusterError> {
        let bridge = Bridge::global().map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        futures::executor::block_on(RedisCluster::connect_or_retry(options, bridge))
    }

    /// The options in force: the ones it was connected with, with
    /// [`sharded`](RedisOptions::sharded) set on a Redis Cluster ([`RedisCluster::is_cluster`]).
    pub fn options(&self) -> &RedisOptions {
        self.inner.shared.options()
    }

    /// Hands every message read from the `@socket.io/redis-emitter` channels to `sink`
    /// (the pub/sub link PSUBSCRIBEs them when [`RedisOptions::emitter_prefix`] is set).
    /// Set once; a second sink is ignored.
    pub fn on_emit(&self, sink: EmitSink) {
        let _ = self.inner.shared.emit_sink.set(sink);
    }

    /// This host's id (presence keys and events).
    pub fn host_id(&self) -> &str {
        &self.inner.shared.opts.host_id
    }

    /// Whether the pub/sub link is up: connected, subscribed, and the last probe answered
    /// within `command_timeout`. For `/healthz`.
    pub fn is_connected(&self) -> bool {
        self.inner.shared.connected.load(Ordering::Acquire)
    }

    /// The last pub/sub round trip (publish to this host's probe channel, receive the echo),
    /// in milliseconds; `None` before the first one and while the link is down. For
    /// `/healthz` (`pubsub_roundtrip_ms`).
    pub fn last_roundtrip_ms(&self) -> Option<f64> {
        match self.inner.shared.rtt_us.load(Ordering::Acquire) {
            NO_RTT => None,
            us => Some(us as f64 / 1000.0),
        }
    }

    /// Sends a typing notice for `user` in `room` to the other hosts, on the room's channel
    /// (`t` + JSON: the subscribers tell it from a message by its first byte; no offset,
    /// nothing stored). Fire and forget: returns at once, `false` when the notice was
    /// dropped because the link to Redis is down, the client is closed, or too many
    /// notices are on their way already. A failed send is dropped silently too (logged at
    /// debug level): typing is volatile.
    pub fn publish_typing(&self, room: &str, user: &str) -> bool {
        let shared = &self.inner.shared;
        if shared.closed.load(Ordering::Acquire) || !shared.connected.load(Ordering::Acquire) {
            return false;
        }
        if shared.typing_inflight.fetch_add(1, Ordering::AcqRel) >= TYPING_INFLIGHT_MAX {
            shared.typing_inflight.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        let Some(payload) = typing_payload(room, user, &shared.opts.host_id) else {
            shared.typing_inflight.fetch_sub(1, Ordering::AcqRel);
            return false;
        };
        let channel = keys::channel(room);
        let s = shared.clone();
        // Handed over at once; runs to completion without anyone awaiting it.
        drop(self.inner.bridge.spawn(async move {
            let cmd = s.options().publish_command();
            let sent = s
                .with_conn("typing", |mut c| async move {
                    redis::cmd(cmd)
                        .arg(channel)
                        .arg(payload)
                        .query_async::<Value>(&mut c)
                        .await
                })
                .await;
            s.typing_inflight.fetch_sub(1, Ordering::AcqRel);
            if let Err(e) = sent {
                tracing::debug!(error = %e, "typing notice dropped");
            }
        }));
        true
    }

    /// Stops the supervisor and closes the connections; later calls on any clone fail with
    /// [`ClusterError::Closed`]. Harmless to call twice.
    pub fn close(&self) {
        self.inner.shared.closed.store(true, Ordering::Release);
        if let Some(stop) = lock(&self.inner.stop).take() {
            let _ = stop.send(());
        }
    }

    /// Where and how a shard reaches Redis by itself (see [`super::shard_link`]).
    pub(crate) fn shard_target(&self) -> &ShardTarget {
        &self.inner.shared.shard_target
    }

    /// Resolves `host` on the bridge (a DNS wait never blocks a shard).
    pub(crate) async fn resolve(
        &self,
        host: String,
        port: u16,
    ) -> Result<Vec<std::net::SocketAddr>, ClusterError> {
        let target = self.inner.shared.target.clone();
        self.on_bridge(async move {
            tokio::net::lookup_host((host.as_str(), port))
                .await
                .map(|addrs| addrs.collect())
                .map_err(|e| {
                    ClusterError::Unavailable(format!("cannot resolve redis at {target}: {e}"))
                })
        })
        .await
    }

    /// The URL without its password, for messages.
    pub(crate) fn target(&self) -> &str {
        &self.inner.shared.target
    }

    /// Whether [`RedisCluster::close`] was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.inner.shared.closed.load(Ordering::Acquire)
    }

    /// The publish script as a shard sends it: with the `allow-cross-slot-keys` flag for
    /// a Redis Cluster (`cross_slot`), without for a standalone server.
    pub(crate) fn publish_script(&self, cross_slot: bool) -> &ScriptSource {
        let scripts = &self.inner.shared.scripts;
        if cross_slot {
            &scripts.publish_cross_slot
        } else {
            &scripts.publish
        }
    }

    /// The deadline of a publish starting now, in Redis's clock (ms): half the command
    /// timeout ahead (see [`ClusterError::Timeout`]).
    pub(crate) fn publish_deadline(&self) -> u64 {
        let shared = &self.inner.shared;
        let half = shared.options().command_timeout / 2;
        shared
            .redis_now_ms()
            .saturating_add(half.as_millis() as u64)
    }

    /// `Ok` unless closed or the command connection is known to be down (then the last
    /// connection error). No I/O: cheap enough for `/healthz`.
    pub(crate) fn health(&self) -> Result<(), ClusterError> {
        let shared = &self.inner.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(ClusterError::Closed);
        }
        let st = lock(&shared.cmd);
        match (&st.conn, &st.last_error) {
            (None, Some(e)) => Err(e.clone()),
            _ => Ok(()),
        }
    }

    /// Runs one command on the command connection (for the history store).
    pub(crate) async fn query(
        &self,
        what: &'static str,
        cmd: redis::Cmd,
    ) -> Result<Value, ClusterError> {
        let shared = self.inner.shared.clone();
        self.on_bridge(async move {
            shared
                .with_conn(what, |mut c| async move {
                    cmd.query_async::<Value>(&mut c).await
                })
                .await
        })
        .await
    }

    /// Runs the store's append script for one room (`write`: check and write; else check).
    pub(crate) async fn append_script(
        &self,
        keys: Vec<String>,
        args: Vec<Vec<u8>>,
    ) -> Result<Value, ClusterError> {
        let shared = self.inner.shared.clone();
        self.on_bridge(async move {
            let mut inv = shared.scripts.append.prepare_invoke();
            for k in &keys {
                inv.key(k);
            }
            for a in &args {
                inv.arg(a.as_slice());
            }
            let inv = &inv;
            shared
                .with_conn("append", |mut c| async move {
                    inv.invoke_async::<Value>(&mut c).await
                })
                .await
        })
        .await
    }

    /// Runs `fut` on the bridge and awaits its result from any executor.
    async fn on_bridge<T, F>(&self, fut: F) -> Result<T, ClusterError>
    where
        F: Future<Output = Result<T, ClusterError>> + Send + 'static,
        T: Send + 'static,
    {
        if self.inner.shared.closed.load(Ordering::Acquire) {
            return Err(ClusterError::Closed);
        }
        self.inner
            .bridge
            .spawn(fut)
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?
    }
}

impl Shared {
    /// The options in force: on a Redis Cluster, with `sharded` set.
    fn options(&self) -> &RedisOptions {
        match self.mode.get() {
            Some(Mode::Cluster { opts }) => opts,
            _ => &self.opts,
        }
    }

    fn new(opts: RedisOptions) -> Result<Shared, ClusterError> {
        let target = redact_url(&opts.url);
        let cmd_client = build_client(&opts, false)?;
        let sub_client = build_client(&opts, true)?;
        let shard_target = ShardTarget::new(&cmd_client, &opts)?;
        Ok(Shared {
            mode: OnceLock::new(),
            topology: Mutex::new(Topology::default()),
            target,
            shard_target,
            cmd_client,
            sub_client,
            scripts: Scripts::new(),
            cmd: Mutex::new(CmdState::default()),
            cmd_connecting: tokio::sync::Mutex::new(()),
            cmd_reviving: AtomicBool::new(false),
            pubsub: Mutex::new(None),
            presence: Mutex::new(HashMap::new()),
            refreshing: AtomicBool::new(false),
            typing_inflight: AtomicUsize::new(0),
            connected: AtomicBool::new(false),
            rtt_us: AtomicU64::new(NO_RTT),
            skew_ms: AtomicI64::new(0),
            measuring: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            emit_sink: OnceLock::new(),
            opts,
        })
    }
}
