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

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::FutureExt as _;
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ErrorKind, IntoConnectionInfo, ProtocolVersion,
    PushKind, RedisConnectionInfo, RedisError, ServerErrorKind, Value,
};
use rustls::pki_types::ServerName;

use super::publish::PublishCall;
use super::resp::Tls;
use super::scripts::Scripts;
use super::wire::{bytes, presence_payload, strings, typing_payload, utf8};
use super::{keys, redact_url, ClusterError, NewMessage, PresenceEntry, RedisOptions};
use crate::bridge::Bridge;

/// No round trip measured yet (or the link is down).
const NO_RTT: u64 = u64::MAX;
/// How often the offset between Redis's clock and this host's is measured again.
const CLOCK_EVERY: Duration = Duration::from_secs(60);
/// How long Redis remembers the users of a reaped host that were announced offline (so
/// that the host, if it was only cut off, announces them online again when it is back).
const REAPED_KEEP: Duration = Duration::from_secs(3600);
/// Most typing notices on their way to Redis at once; more are dropped (they are volatile).
const TYPING_INFLIGHT_MAX: usize = 1024;

/// Where and how a shard connects to Redis by itself (see [`super::shard_link`]), worked
/// out once from the URL and the TLS options when the cluster is connected.
#[derive(Clone)]
pub(crate) struct ShardTarget {
    pub addr: ShardAddr,
    /// AUTH and SELECT settings.
    pub info: RedisConnectionInfo,
}

/// The address part of a [`ShardTarget`].
#[derive(Clone)]
pub(crate) enum ShardAddr {
    /// A host name or IP address and a port; TLS settings for `rediss://`.
    Tcp {
        host: String,
        port: u16,
        tls: Option<Tls>,
    },
    /// A Unix socket's path.
    Unix(PathBuf),
}

impl ShardTarget {
    /// The target of `client`'s URL, with TLS settings from `opts` for `rediss://` (the same
    /// CA and client certificate files). Fails on TLS settings that cannot be used.
    fn new(client: &Client, opts: &RedisOptions) -> Result<ShardTarget, ClusterError> {
        let info = client.get_connection_info();
        let addr = match info.addr() {
            ConnectionAddr::Tcp(host, port) => ShardAddr::Tcp {
                host: host.clone(),
                port: *port,
                tls: None,
            },
            ConnectionAddr::TcpTls { host, port, .. } => {
                let server_name = ServerName::try_from(host.clone()).map_err(|e| {
                    ClusterError::Config(format!("redis host {host:?} for TLS: {e}"))
                })?;
                ShardAddr::Tcp {
                    host: host.clone(),
                    port: *port,
                    tls: Some(Tls {
                        config: super::tls::client_config(opts)?,
                        server_name,
                    }),
                }
            }
            ConnectionAddr::Unix(path) => ShardAddr::Unix(path.clone()),
            other => {
                return Err(ClusterError::Config(format!(
                    "unsupported redis address {other}"
                )))
            }
        };
        Ok(ShardTarget {
            addr,
            info: info.redis_settings().clone(),
        })
    }
}

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
    opts: RedisOptions,
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
}

/// The command connection: current one (with a generation, so that a failure on an old one
/// does not drop a new one) and reconnect backoff.
#[derive(Default)]
struct CmdState {
    conn: Option<(u64, MultiplexedConnection)>,
    generation: u64,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<ClusterError>,
}

/// A user present through this host, and their display name.
type PresenceUser = (String, Option<String>);

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

    /// The options it was connected with.
    pub fn options(&self) -> &RedisOptions {
        &self.inner.shared.opts
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

    /// Marks `user` present in `room` through this host (call it when the user's first
    /// connection on this host joins the room), with an optional display name (an empty
    /// name counts as none). Returns
    /// `true` when the user was present through no live host before, in which case the
    /// online event was published on the room's channel (every host, this one included,
    /// receives it as [`ClusterEvent::Presence`](super::ClusterEvent::Presence)).
    ///
    /// The local record is kept even when Redis fails, and written again by the periodic
    /// refresh (every `presence_ttl / 3`).
    pub async fn presence_join(
        &self,
        room: &str,
        user: &str,
        name: Option<&str>,
    ) -> Result<bool, ClusterError> {
        let shared = self.inner.shared.clone();
        let (room, user, name) = (room.to_owned(), user.to_owned(), name.map(str::to_owned));
        self.on_bridge(async move { shared.presence_join(room, user, name).await })
            .await
    }

    /// The user's last connection on this host left `room`. Returns `true` when the user is
    /// now present through no live host, in which case the offline event was published.
    ///
    /// When Redis cannot be reached the local record is dropped anyway: the user disappears
    /// from Redis at the next refresh, or within `presence_ttl` (without an offline event).
    pub async fn presence_leave(&self, room: &str, user: &str) -> Result<bool, ClusterError> {
        let shared = self.inner.shared.clone();
        let (room, user) = (room.to_owned(), user.to_owned());
        self.on_bridge(async move { shared.presence_leave(room, user).await })
            .await
    }

    /// The users present in `room` through any live host, one entry per user, sorted by
    /// user id. A host that stopped refreshing (dead, or cut off from Redis) stops counting
    /// within `presence_ttl`.
    pub async fn presence_list(&self, room: &str) -> Result<Vec<PresenceEntry>, ClusterError> {
        let shared = self.inner.shared.clone();
        let room = room.to_owned();
        self.on_bridge(async move { shared.presence_list(room).await })
            .await
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
            let cmd = s.opts.publish_command();
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

    /// The publish script call for one room's messages (see [`PublishCall`]).
    pub(crate) fn publish_call<'a>(&self, msgs: &[&'a NewMessage], floor: u64) -> PublishCall<'a> {
        let shared = &self.inner.shared;
        let sha = shared.scripts.publish.get_hash();
        PublishCall::new(&shared.opts, sha, shared.redis_now_ms(), msgs, floor)
    }

    /// `SCRIPT LOAD` of the publish script.
    pub(crate) fn load_publish_script(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("LOAD")
            .arg(&self.inner.shared.scripts.publish_source);
        cmd
    }

    /// A [`ClusterError`] for `e` that says what went wrong with `what`.
    pub(crate) fn classify(&self, e: &RedisError, what: &str) -> ClusterError {
        self.inner.shared.classify(e, what)
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
    fn new(opts: RedisOptions) -> Result<Shared, ClusterError> {
        let target = redact_url(&opts.url);
        let cmd_client = build_client(&opts, false)?;
        let sub_client = build_client(&opts, true)?;
        let shard_target = ShardTarget::new(&cmd_client, &opts)?;
        Ok(Shared {
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
            opts,
        })
    }

    /// The command connection: the current one, or a new one (one attempt at a time; while
    /// in backoff after a failure, the last error at once).
    async fn cmd_conn(&self) -> Result<(u64, MultiplexedConnection), ClusterError> {
        if let Some(c) = lock(&self.cmd).conn.clone() {
            return Ok(c);
        }
        let _one = self.cmd_connecting.lock().await;
        {
            let st = lock(&self.cmd);
            if let Some(c) = st.conn.clone() {
                return Ok(c);
            }
            if let (Some(at), Some(e)) = (st.retry_at, &st.last_error) {
                if Instant::now() < at {
                    return Err(e.clone());
                }
            }
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.opts.connect_timeout))
            .set_response_timeout(Some(self.opts.command_timeout));
        let mut attempt = self
            .cmd_client
            .get_multiplexed_async_connection_with_config(&config)
            .await;
        if let Ok(conn) = &mut attempt {
            self.measure_clock(conn).await;
        }
        let mut st = lock(&self.cmd);
        match attempt {
            Ok(conn) => {
                st.generation += 1;
                let current = (st.generation, conn);
                st.conn = Some(current.clone());
                st.failures = 0;
                st.retry_at = None;
                st.last_error = None;
                Ok(current)
            }
            Err(e) => {
                let err = self.classify(&e, "connect");
                st.failures = st.failures.saturating_add(1);
                st.retry_at = Some(Instant::now() + backoff(&self.opts, st.failures));
                st.last_error = Some(err.clone());
                Err(err)
            }
        }
    }

    /// Measures Redis's clock against this host's with TIME (keeps the last value when
    /// TIME fails, e.g. an ACL without it).
    async fn measure_clock(&self, conn: &mut MultiplexedConnection) {
        let before = crate::ids::now_ms();
        let time = tokio::time::timeout(
            self.opts.command_timeout,
            redis::cmd("TIME").query_async::<(u64, u64)>(conn),
        )
        .await;
        let after = crate::ids::now_ms();
        if let Ok(Ok((secs, micros))) = time {
            let redis_ms = secs.saturating_mul(1000).saturating_add(micros / 1000);
            let local_ms = before / 2 + after / 2;
            let skew = redis_ms as i64 - local_ms as i64;
            if skew.abs() > 1000 {
                tracing::warn!(
                    skew_ms = skew,
                    "redis's clock and this host's differ by more than a second"
                );
            }
            self.skew_ms.store(skew, Ordering::Release);
        }
    }

    /// Now in Redis's clock (ms), as far as the last measurement knows.
    fn redis_now_ms(&self) -> u64 {
        let local = crate::ids::now_ms() as i64;
        local
            .saturating_add(self.skew_ms.load(Ordering::Acquire))
            .max(0) as u64
    }

    /// Forgets the command connection of generation `generation` after `err`, if `err`
    /// means the connection is gone.
    fn cmd_failed(&self, generation: u64, err: &RedisError) {
        if !err.is_unrecoverable_error() && !err.is_connection_dropped() {
            return;
        }
        let mut st = lock(&self.cmd);
        if st.conn.as_ref().is_some_and(|(g, _)| *g == generation) {
            st.conn = None;
        }
    }

    /// The pub/sub link is back after being down: Redis answers again, so the command
    /// connection is tried at once (not after the rest of its backoff), and this host's
    /// presence is written right away (it was kept locally meanwhile, or never written when
    /// Redis was down at start) rather than at the next periodic refresh.
    fn relink(self: &Arc<Self>) {
        lock(&self.cmd).retry_at = None;
        if !self.refreshing.swap(true, Ordering::AcqRel) {
            let s = self.clone();
            tokio::spawn(async move {
                s.presence_refresh().await;
                s.refreshing.store(false, Ordering::Release);
            });
        }
    }

    /// Drops the command connection (the pub/sub link went down: a stalled or vanished
    /// server will not answer this one either).
    fn cmd_reset(&self, why: &str) {
        let mut st = lock(&self.cmd);
        st.conn = None;
        st.last_error = Some(ClusterError::Unavailable(why.to_owned()));
    }

    /// Runs `f` on the command connection, within `command_timeout` (connecting included).
    async fn with_conn<T, F, Fut>(&self, what: &str, f: F) -> Result<T, ClusterError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if self.closed.load(Ordering::Acquire) {
            return Err(ClusterError::Closed);
        }
        let limit = self.opts.command_timeout;
        let run = async {
            let (generation, conn) = self.cmd_conn().await?;
            f(conn).await.map_err(|e| {
                self.cmd_failed(generation, &e);
                self.classify(&e, what)
            })
        };
        match tokio::time::timeout(limit, run).await {
            Ok(result) => result,
            Err(_) => Err(ClusterError::Timeout(format!(
                "redis at {} did not answer {what} within {limit:?}",
                self.target
            ))),
        }
    }

    /// A [`ClusterError`] that says what went wrong with `what` and, where it can, what to do.
    fn classify(&self, e: &RedisError, what: &str) -> ClusterError {
        classify(e, &self.target, what, self.opts.command_timeout)
    }

    /// `fut` (a pub/sub command) within `command_timeout`, its error classified.
    async fn bounded<T>(
        &self,
        what: &str,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, ClusterError> {
        let limit = self.opts.command_timeout;
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r.map_err(|e| self.classify(&e, what)),
            Err(_) => Err(ClusterError::Timeout(format!(
                "redis at {} did not confirm {what} within {limit:?}",
                self.target
            ))),
        }
    }

    /// The `presence_set` script call for this host's users in `room`: `mode` is "join" or
    /// "refresh", `payload` the presence event to publish ("" for none). Callers append the
    /// (user, name) pairs.
    fn presence_set_call(
        &self,
        room: &str,
        mode: &str,
        payload: impl redis::ToRedisArgs,
    ) -> redis::ScriptInvocation<'_> {
        let mut inv = self
            .scripts
            .presence_set
            .key(keys::presence(room, &self.opts.host_id));
        inv.key(keys::presence_hosts(room))
            .key(keys::reaped(room, &self.opts.host_id))
            .arg(&self.opts.host_id)
            .arg(self.opts.presence_ttl.as_millis() as u64)
            .arg(keys::presence_prefix(room))
            .arg(mode)
            .arg(self.opts.publish_command())
            .arg(keys::channel(room))
            .arg(payload)
            .arg(room)
            .arg(keys::reaped_prefix(room))
            .arg(REAPED_KEEP.as_millis() as u64);
        inv
    }

    async fn presence_join(
        &self,
        room: String,
        user: String,
        name: Option<String>,
    ) -> Result<bool, ClusterError> {
        lock(&self.presence)
            .entry(room.clone())
            .or_default()
            .insert(user.clone(), name.clone());
        let payload = presence_payload(&room, &user, name.as_deref(), true, &self.opts.host_id)?;
        let mut inv = self.presence_set_call(&room, "join", payload);
        inv.arg(&user).arg(name.as_deref().unwrap_or(""));
        let inv = &inv;
        let reply = self
            .with_conn("presence join", |mut c| async move {
                inv.invoke_async::<i64>(&mut c).await
            })
            .await?;
        Ok(reply == 1)
    }

    async fn presence_leave(&self, room: String, user: String) -> Result<bool, ClusterError> {
        {
            let mut presence = lock(&self.presence);
            if let Some(users) = presence.get_mut(&room) {
                users.remove(&user);
                if users.is_empty() {
                    presence.remove(&room);
                }
            }
        }
        let payload = presence_payload(&room, &user, None, false, &self.opts.host_id)?;
        let mut inv = self
            .scripts
            .presence_leave
            .key(keys::presence(&room, &self.opts.host_id));
        inv.key(keys::presence_hosts(&room))
            .key(keys::reaped(&room, &self.opts.host_id))
            .arg(&self.opts.host_id)
            .arg(keys::presence_prefix(&room))
            .arg(&user)
            .arg(self.opts.publish_command())
            .arg(keys::channel(&room))
            .arg(payload)
            .arg(&room)
            .arg(keys::reaped_prefix(&room))
            .arg(REAPED_KEEP.as_millis() as u64);
        let inv = &inv;
        let reply = self
            .with_conn("presence leave", |mut c| async move {
                inv.invoke_async::<i64>(&mut c).await
            })
            .await?;
        Ok(reply == 1)
    }

    async fn presence_list(&self, room: String) -> Result<Vec<PresenceEntry>, ClusterError> {
        let mut inv = self.scripts.presence_list.key(keys::presence_hosts(&room));
        inv.arg(keys::presence_prefix(&room));
        let inv = &inv;
        let reply = self
            .with_conn("presence list", |mut c| async move {
                inv.invoke_async::<Value>(&mut c).await
            })
            .await?;
        let flat = strings(reply)?;
        let mut users: HashMap<String, Option<String>> = HashMap::new();
        for pair in flat.chunks(2) {
            let [user, name] = pair else {
                return Err(ClusterError::Protocol("presence list: odd reply".into()));
            };
            let user = utf8(user.clone(), "presence user")?;
            let name = utf8(name.clone(), "presence name")?;
            let name = (!name.is_empty()).then_some(name);
            let slot = users.entry(user).or_default();
            if slot.is_none() {
                *slot = name;
            }
        }
        let mut out: Vec<PresenceEntry> = users
            .into_iter()
            .map(|(user, name)| PresenceEntry { user, name })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Rewrites this host's presence hash of every room it has users in, and refreshes the
    /// expiries (also puts it back after Redis lost it).
    async fn presence_refresh(&self) {
        let rooms: Vec<(String, Vec<PresenceUser>)> = lock(&self.presence)
            .iter()
            .map(|(room, users)| {
                (
                    room.clone(),
                    users.iter().map(|(u, n)| (u.clone(), n.clone())).collect(),
                )
            })
            .collect();
        for (room, users) in rooms {
            let mut inv = self.presence_set_call(&room, "refresh", "");
            for (user, name) in &users {
                inv.arg(user).arg(name.as_deref().unwrap_or(""));
            }
            let inv = &inv;
            let refreshed = self
                .with_conn("presence refresh", |mut c| async move {
                    inv.invoke_async::<i64>(&mut c).await
                })
                .await;
            if let Err(e) = refreshed {
                tracing::debug!(room = %room, error = %e, "presence refresh failed");
                return;
            }
        }
    }
}

/// Builds a client for `opts` (RESP3 when `resp3`), with the TLS files when `rediss://`.
pub(crate) fn build_client(opts: &RedisOptions, resp3: bool) -> Result<Client, ClusterError> {
    let target = redact_url(&opts.url);
    let info = opts
        .url
        .as_str()
        .into_connection_info()
        .map_err(|e| ClusterError::Config(format!("bad redis.url {target}: {e}")))?;
    let settings = info.redis_settings().clone();
    let settings = if resp3 {
        settings.set_protocol(ProtocolVersion::RESP3)
    } else {
        settings.set_protocol(ProtocolVersion::RESP2)
    };
    let info = info.set_redis_settings(settings);
    let tls = match info.addr() {
        ConnectionAddr::TcpTls { insecure: true, .. } => {
            return Err(ClusterError::Config(format!(
                "redis.url {target} asks for #insecure (no certificate check), which corelay \
                 does not do: give the CA that signed the server's certificate in \
                 redis.tls_ca_file instead"
            )))
        }
        ConnectionAddr::TcpTls { .. } => true,
        _ => false,
    };
    let files = [&opts.tls_ca_file, &opts.tls_cert_file, &opts.tls_key_file];
    if !tls {
        if files.iter().any(|f| f.is_some()) {
            return Err(ClusterError::Config(format!(
                "TLS files are set but redis.url {target} is not rediss://"
            )));
        }
        return Client::open(info).map_err(|e| ClusterError::Config(format!("{target}: {e}")));
    }
    // rustls needs a process-wide crypto provider; only `ring` is compiled in. Installing it
    // again (another client, another test) is refused harmlessly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if files.iter().all(|f| f.is_none()) {
        return Client::open(info).map_err(|e| ClusterError::Config(format!("{target}: {e}")));
    }
    let read = |path: &std::path::PathBuf, what: &str| {
        std::fs::read(path).map_err(|e| {
            ClusterError::Config(format!("cannot read {what} {}: {e}", path.display()))
        })
    };
    let root_cert = opts
        .tls_ca_file
        .as_ref()
        .map(|p| read(p, "redis.tls_ca_file"))
        .transpose()?;
    let client_tls = match (&opts.tls_cert_file, &opts.tls_key_file) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert, "redis.tls_cert_file")?,
            client_key: read(key, "redis.tls_key_file")?,
        }),
        _ => {
            return Err(ClusterError::Config(
                "redis.tls_cert_file and redis.tls_key_file go together".into(),
            ))
        }
    };
    Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map_err(|e| ClusterError::Config(format!("TLS settings for {target}: {e}")))
}

/// See [`Shared::classify`].
pub(crate) fn classify(
    e: &RedisError,
    target: &str,
    what: &str,
    timeout: Duration,
) -> ClusterError {
    let code = e.code().unwrap_or("");
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    if e.kind() == ErrorKind::AuthenticationFailed
        || matches!(code, "WRONGPASS" | "NOAUTH")
        || lower.contains("wrongpass")
        || lower.contains("noauth")
    {
        return ClusterError::Auth(format!(
            "redis at {target} refused the credentials ({text}); check the user and password in \
             redis.url (or REDIS_PASSWORD)"
        ));
    }
    if e.kind() == ErrorKind::Server(ServerErrorKind::NoPerm) || code == "NOPERM" {
        return ClusterError::Auth(format!(
            "the redis user lacks a permission for {what} ({text}); it needs keys and channels \
             `corelay:*` and the read, write, pubsub and scripting commands"
        ));
    }
    if lower.contains("certificate")
        || lower.contains("tls")
        || lower.contains("handshake")
        || lower.contains("peer sent no certificates")
    {
        return ClusterError::Tls(format!("TLS with redis at {target} failed: {text}"));
    }
    if e.is_timeout() {
        return ClusterError::Timeout(format!(
            "redis at {target} did not answer {what} within {timeout:?}"
        ));
    }
    if e.is_connection_refusal() {
        return ClusterError::Unavailable(format!(
            "cannot reach redis at {target}: connection refused (is redis-server running there?)"
        ));
    }
    match e.kind() {
        ErrorKind::Io => ClusterError::Unavailable(format!("redis at {target}, {what}: {text}")),
        ErrorKind::InvalidClientConfig => {
            ClusterError::Config(format!("redis.url {target}: {text}"))
        }
        ErrorKind::RESP3NotSupported => ClusterError::Config(format!(
            "redis at {target} does not speak RESP3 (Redis 6 or newer is needed): {text}"
        )),
        ErrorKind::Server(_) | ErrorKind::Extension => {
            ClusterError::Server(format!("redis at {target} refused {what}: {text}"))
        }
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => {
            ClusterError::Protocol(format!("redis at {target}, {what}: {text}"))
        }
        _ => ClusterError::Unavailable(format!("redis at {target}, {what}: {text}")),
    }
}

/// The delay before reconnect attempt `failures` (≥ 1): `reconnect_min · 2^(failures-1)`,
/// capped at `reconnect_max`, then a random part of it (between half and all) as jitter.
pub(crate) fn backoff(opts: &RedisOptions, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let base = opts
        .reconnect_min
        .saturating_mul(1u32 << exp)
        .min(opts.reconnect_max);
    let mut r = [0u8; 4];
    crate::ids::random_bytes(&mut r);
    let fraction = 0.5 + 0.5 * (u32::from_le_bytes(r) as f64 / u32::MAX as f64);
    base.mul_f64(fraction)
}

/// SUBSCRIBE (SSUBSCRIBE with sharded pub/sub) of one channel on the pub/sub connection.
async fn subscribe_one(
    conn: &mut MultiplexedConnection,
    opts: &RedisOptions,
    channel: String,
) -> redis::RedisResult<()> {
    if !opts.sharded {
        return conn.subscribe(channel).await;
    }
    // The client has no SSUBSCRIBE of its own; as a plain command it gets its one
    // confirmation, which is what the connection expects.
    redis::cmd(opts.subscribe_command(true))
        .arg(channel)
        .query_async::<Value>(conn)
        .await
        .map(|_| ())
}

/// A live pub/sub connection and its push stream.
struct Link {
    conn: MultiplexedConnection,
    pushes: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
}

/// Why [`run_link`] returned.
enum LinkEnd {
    Stop,
    Lost(String),
}

/// Opens the pub/sub connection and subscribes this host's probe channel.
async fn connect_link(shared: &Shared) -> Result<Link, ClusterError> {
    let (tx, pushes) = tokio::sync::mpsc::unbounded_channel();
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(shared.opts.connect_timeout))
        .set_response_timeout(Some(shared.opts.command_timeout))
        .set_push_sender(tx);
    let mut conn = shared
        .sub_client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| shared.classify(&e, "connect (pub/sub)"))?;
    shared
        .bounded(
            "subscribe (probe channel)",
            subscribe_one(&mut conn, &shared.opts, keys::ping(&shared.opts.host_id)),
        )
        .await?;
    *lock(&shared.pubsub) = Some(conn.clone());
    Ok(Link { conn, pushes })
}

/// The supervisor: keeps the pub/sub link up, probes it, reconnects. Without a `first`
/// link (Redis unreachable at start) it starts by reconnecting; once connected it writes
/// this host's presence again, as after a lost link.
async fn supervise(shared: Arc<Shared>, first: Option<Link>, mut stop: oneshot::Receiver<()>) {
    let mut was_down = first.is_none();
    let mut link = first;
    let mut failures: u32 = 0;
    loop {
        let current = match link.take() {
            Some(l) => l,
            None => match connect_link(&shared).await {
                Ok(l) => l,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let delay = backoff(&shared.opts, failures);
                    tracing::debug!(error = %e, ?delay, "redis pub/sub reconnect failed");
                    let sleep = tokio::time::sleep(delay).fuse();
                    futures::pin_mut!(sleep);
                    let stopped = futures::select_biased! {
                        _ = stop => true,
                        _ = sleep => false,
                    };
                    if stopped || shared.closed.load(Ordering::Acquire) {
                        return;
                    }
                    continue;
                }
            },
        };
        failures = 0;
        shared.connected.store(true, Ordering::Release);
        if was_down {
            tracing::info!(target = %shared.target, "redis pub/sub link is back");
            shared.relink();
        }
        match run_link(&shared, current, &mut stop).await {
            LinkEnd::Stop => {
                shared.connected.store(false, Ordering::Release);
                *lock(&shared.pubsub) = None;
                lock(&shared.cmd).conn = None;
                return;
            }
            LinkEnd::Lost(reason) => {
                shared.connected.store(false, Ordering::Release);
                shared.rtt_us.store(NO_RTT, Ordering::Release);
                *lock(&shared.pubsub) = None;
                shared.cmd_reset(&reason);
                tracing::warn!(%reason, "redis pub/sub link down; reconnecting");
                was_down = true;
            }
        }
    }
}

/// One event of the connected loop.
enum Tick {
    Stop,
    Push(Option<redis::PushInfo>),
    Probe,
}

/// Serves one live pub/sub connection until it is lost or the supervisor is stopped.
async fn run_link(
    shared: &Arc<Shared>,
    mut link: Link,
    mut stop: &mut oneshot::Receiver<()>,
) -> LinkEnd {
    let mut probe = tokio::time::interval(shared.opts.ping_interval);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ping_channel = keys::ping(&shared.opts.host_id);
    let mut pending: Option<(u64, Instant)> = None;
    let mut nonce: u64 = 0;
    let refresh_every = (shared.opts.presence_ttl / 3).max(Duration::from_millis(50));
    let mut last_refresh = Instant::now();
    let mut last_clock = Instant::now();
    loop {
        let next = {
            let push = link.pushes.recv().fuse();
            let tick = probe.tick().fuse();
            futures::pin_mut!(push, tick);
            futures::select_biased! {
                _ = stop => Tick::Stop,
                p = push => Tick::Push(p),
                _ = tick => Tick::Probe,
            }
        };
        match next {
            Tick::Stop => return LinkEnd::Stop,
            Tick::Push(None) => {
                return LinkEnd::Lost(format!(
                    "the pub/sub connection to {} closed",
                    shared.target
                ))
            }
            Tick::Push(Some(push)) => match push.kind {
                PushKind::Disconnection => {
                    return LinkEnd::Lost(format!(
                        "lost the pub/sub connection to {}",
                        shared.target
                    ))
                }
                PushKind::Message | PushKind::SMessage => {
                    on_echo(shared, push.data, &ping_channel, &mut pending)
                }
                _ => {}
            },
            Tick::Probe => {
                if let Some((_, sent)) = pending {
                    if sent.elapsed() > shared.opts.command_timeout {
                        return LinkEnd::Lost(format!(
                            "no pub/sub echo from redis at {} within {:?}",
                            shared.target, shared.opts.command_timeout
                        ));
                    }
                } else {
                    nonce += 1;
                    pending = Some((nonce, Instant::now()));
                    let sent = shared
                        .bounded(
                            "the pub/sub probe",
                            redis::cmd(shared.opts.publish_command())
                                .arg(&ping_channel)
                                .arg(format!("q{nonce}"))
                                .query_async::<Value>(&mut link.conn),
                        )
                        .await;
                    if let Err(e) = sent {
                        return LinkEnd::Lost(e.to_string());
                    }
                }
                chores(shared, &mut last_refresh, refresh_every, &mut last_clock);
            }
        }
    }
}

/// Background work started from the probe tick: bring the command connection back when it
/// is down, refresh presence when due. Each runs as its own task, one at a time.
fn chores(
    shared: &Arc<Shared>,
    last_refresh: &mut Instant,
    refresh_every: Duration,
    last_clock: &mut Instant,
) {
    if last_clock.elapsed() >= CLOCK_EVERY && !shared.measuring.swap(true, Ordering::AcqRel) {
        *last_clock = Instant::now();
        let s = shared.clone();
        tokio::spawn(async move {
            if let Ok((_, mut conn)) = s.cmd_conn().await {
                s.measure_clock(&mut conn).await;
            }
            s.measuring.store(false, Ordering::Release);
        });
    }
    let cmd_down = lock(&shared.cmd).conn.is_none();
    if cmd_down && !shared.cmd_reviving.swap(true, Ordering::AcqRel) {
        let s = shared.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(s.opts.command_timeout, s.cmd_conn()).await;
            s.cmd_reviving.store(false, Ordering::Release);
        });
    }
    if last_refresh.elapsed() >= refresh_every && !shared.refreshing.swap(true, Ordering::AcqRel) {
        *last_refresh = Instant::now();
        let s = shared.clone();
        tokio::spawn(async move {
            s.presence_refresh().await;
            s.refreshing.store(false, Ordering::Release);
        });
    }
}

/// A message push: only the probe's echo comes here (this connection subscribes nothing
/// else), which records the round trip.
fn on_echo(
    shared: &Arc<Shared>,
    data: Vec<Value>,
    ping_channel: &str,
    pending: &mut Option<(u64, Instant)>,
) {
    let mut it = data.into_iter();
    let (Some(channel), Some(payload)) = (it.next().and_then(bytes), it.next().and_then(bytes))
    else {
        tracing::debug!("malformed pub/sub message push");
        return;
    };
    if channel != ping_channel.as_bytes() {
        return;
    }
    let nonce = payload
        .strip_prefix(b"q")
        .and_then(|n| std::str::from_utf8(n).ok())
        .and_then(|n| n.parse::<u64>().ok());
    if let (Some(n), Some((want, sent))) = (nonce, *pending) {
        if n == want {
            let us = sent.elapsed().as_micros().min(u128::from(NO_RTT - 1)) as u64;
            shared.rtt_us.store(us, Ordering::Release);
            *pending = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_insecure_tls_url_is_refused_with_the_way_out() {
        let mut opts = RedisOptions::new("rediss://localhost:6380/#insecure");
        let err = build_client(&opts, false).expect_err("refused");
        let text = err.to_string();
        assert!(matches!(err, ClusterError::Config(_)), "{err:?}");
        assert!(
            text.contains("#insecure") && text.contains("redis.tls_ca_file"),
            "{text}"
        );
        opts.url = "rediss://localhost:6380/".into();
        assert!(build_client(&opts, false).is_ok());
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let opts = RedisOptions::new("redis://h");
        for failures in 1..40 {
            let d = backoff(&opts, failures);
            let base = opts
                .reconnect_min
                .saturating_mul(1 << (failures - 1).min(20))
                .min(opts.reconnect_max);
            assert!(d >= base / 2 && d <= base, "{failures}: {d:?} vs {base:?}");
        }
    }

    #[test]
    fn a_tls_file_without_rediss_is_refused() {
        let mut opts = RedisOptions::new("redis://127.0.0.1:1");
        opts.tls_ca_file = Some("/nonexistent".into());
        assert!(matches!(
            build_client(&opts, false),
            Err(ClusterError::Config(_))
        ));
        let mut opts = RedisOptions::new("rediss://127.0.0.1:1");
        opts.tls_ca_file = Some("/nonexistent/ca.pem".into());
        let err = build_client(&opts, false)
            .map(|_| ())
            .expect_err("unreadable");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        assert!(matches!(
            build_client(&RedisOptions::new("http://x"), false),
            Err(ClusterError::Config(_))
        ));
    }
}
