//! The pub/sub link of a [`RedisCluster`](super::RedisCluster): a RESP3 connection subscribed
//! to this host's probe channel (and, with `emitter.enabled`, PSUBSCRIBEd to the
//! `@socket.io/redis-emitter` channels: [`crate::cluster::emitter`]), and the supervisor
//! task that probes it, reconnects it with backoff, and starts the periodic chores (clock,
//! command connection, presence; on a Redis Cluster, the topology watch).
//!
//! On a Redis Cluster the connection goes to the master that owns the probe channel's slot
//! (SSUBSCRIBE is refused elsewhere with MOVED, which is followed once if the map was out
//! of date). That master's death drops the connection; a slot migration unsubscribes the
//! channel (a `sunsubscribe` push) and the probe's SPUBLISH then answers MOVED: each ends
//! the link, and the reconnect reads the slot map again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::FutureExt as _;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushKind, Value};

use super::nodes::{watch_topology, Mode};
use super::{backoff, build_client_at, lock, Shared, NO_RTT};
use crate::cluster::topology::{slot_of, NodeAddr, Redirect};
use crate::cluster::wire::bytes;
use crate::cluster::{emitter, keys, ClusterError, RedisOptions};

/// How often the offset between Redis's clock and this host's is measured again.
const CLOCK_EVERY: Duration = Duration::from_secs(60);

impl Shared {
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
pub(super) struct Link {
    conn: MultiplexedConnection,
    pushes: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
    /// Where it is connected, for messages: the URL, or on a cluster the master's address.
    at: String,
}

/// Why [`open_link`] failed.
enum OpenError {
    /// The probe channel's slot is served by that node (a cluster whose map was stale).
    Moved(NodeAddr),
    Failed(ClusterError),
}

/// Why [`run_link`] returned.
enum LinkEnd {
    Stop,
    Lost(String),
}

/// Opens the pub/sub connection and subscribes this host's probe channel: on the URL's
/// server, or on a Redis Cluster on the master that owns the channel's slot.
pub(super) async fn connect_link(shared: &Shared) -> Result<Link, ClusterError> {
    let channel = keys::ping(&shared.opts.host_id);
    let mut node = match shared.mode().await? {
        Mode::Standalone => None,
        Mode::Cluster { .. } => {
            let map = shared.read_slot_map().await?;
            let slot = slot_of(channel.as_bytes());
            let master = map.master_of(slot).cloned().ok_or_else(|| {
                ClusterError::Unavailable(format!(
                    "no master serves slot {slot} (this host's probe channel) in the redis \
                     cluster at {}",
                    shared.target
                ))
            })?;
            Some(master)
        }
    };
    // A stale map sends us to a node that answers MOVED: follow it, a couple of times.
    for _ in 0..3 {
        match open_link(shared, node.as_ref(), &channel).await {
            Ok(link) => return Ok(link),
            Err(OpenError::Moved(to)) => node = Some(to),
            Err(OpenError::Failed(e)) => return Err(e),
        }
    }
    Err(ClusterError::Unavailable(format!(
        "the slot of this host's probe channel keeps moving in the redis cluster at {}",
        shared.target
    )))
}

/// Opens a RESP3 connection to `node` (else the URL's server) and subscribes `channel`.
async fn open_link(
    shared: &Shared,
    node: Option<&NodeAddr>,
    channel: &str,
) -> Result<Link, OpenError> {
    let (client, at) = match node {
        Some(n) => (
            build_client_at(&shared.opts, true, Some(n)).map_err(OpenError::Failed)?,
            format!("{} (node {n})", shared.target),
        ),
        None => (shared.sub_client.clone(), shared.target.clone()),
    };
    let (tx, pushes) = tokio::sync::mpsc::unbounded_channel();
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(shared.opts.connect_timeout))
        .set_response_timeout(Some(shared.opts.command_timeout))
        .set_push_sender(tx);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| OpenError::Failed(shared.classify(&e, "connect (pub/sub)")))?;
    let what = "subscribe (probe channel)";
    let limit = shared.opts.command_timeout;
    let subscribe = subscribe_one(&mut conn, shared.options(), channel.to_owned());
    match tokio::time::timeout(limit, subscribe).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(match (node, Redirect::of_error(&e)) {
                (Some(_), Some(Redirect::Moved(_, to))) => OpenError::Moved(to),
                _ => OpenError::Failed(shared.classify(&e, what)),
            })
        }
        Err(_) => {
            return Err(OpenError::Failed(ClusterError::Timeout(format!(
                "redis at {at} did not confirm {what} within {limit:?}"
            ))))
        }
    }
    if let Some(prefix) = &shared.opts.emitter_prefix {
        let pattern = emitter::pattern(prefix);
        let what = &format!(
            "PSUBSCRIBE {pattern} (emitter.enabled; an ACL user needs the channel pattern \
             `&{pattern}`)"
        );
        match tokio::time::timeout(limit, conn.psubscribe(&pattern)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(OpenError::Failed(shared.classify(&e, what))),
            Err(_) => {
                return Err(OpenError::Failed(ClusterError::Timeout(format!(
                    "redis at {at} did not confirm {what} within {limit:?}"
                ))))
            }
        }
    }
    *lock(&shared.pubsub) = Some(conn.clone());
    Ok(Link { conn, pushes, at })
}

/// Aborts the task on drop (the supervisor's topology watch stops with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The supervisor: keeps the pub/sub link up, probes it, reconnects. Without a `first`
/// link (Redis unreachable at start) it starts by reconnecting; once connected it writes
/// this host's presence again, as after a lost link.
pub(super) async fn supervise(
    shared: Arc<Shared>,
    first: Option<Link>,
    mut stop: oneshot::Receiver<()>,
) {
    let _topology = AbortOnDrop(tokio::spawn(watch_topology(shared.clone())));
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
                        lock(&shared.cmd).conn = None;
                        lock(&shared.topology).close();
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
                lock(&shared.topology).close();
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
                return LinkEnd::Lost(format!("the pub/sub connection to {} closed", link.at))
            }
            Tick::Push(Some(push)) => match push.kind {
                PushKind::Disconnection => {
                    return LinkEnd::Lost(format!("lost the pub/sub connection to {}", link.at))
                }
                PushKind::Message | PushKind::SMessage => {
                    on_echo(shared, push.data, &ping_channel, &mut pending)
                }
                PushKind::PMessage => on_emit(shared, push.data),
                // Not asked for: Redis dropped the subscription (on a cluster, the channel's
                // slot moved to another master).
                PushKind::Unsubscribe | PushKind::SUnsubscribe
                    if is_channel(&push.data, &ping_channel) =>
                {
                    return LinkEnd::Lost(format!(
                        "redis at {} unsubscribed this host's probe channel (its slot moved?)",
                        link.at
                    ))
                }
                _ => {}
            },
            Tick::Probe => {
                if let Some((_, sent)) = pending {
                    if sent.elapsed() > shared.opts.command_timeout {
                        return LinkEnd::Lost(format!(
                            "no pub/sub echo from redis at {} within {:?}",
                            link.at, shared.opts.command_timeout
                        ));
                    }
                } else {
                    nonce += 1;
                    pending = Some((nonce, Instant::now()));
                    let sent = shared
                        .bounded(
                            "the pub/sub probe",
                            redis::cmd(shared.options().publish_command())
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

/// Whether a push's first element is `channel`.
fn is_channel(data: &[Value], channel: &str) -> bool {
    data.first()
        .and_then(|c| bytes(c.clone()))
        .is_some_and(|c| c == channel.as_bytes())
}

/// A pattern message push: `[pattern, channel, payload]` from the emitter's channels (the
/// only pattern this connection subscribes), decoded and handed to the emit sink.
fn on_emit(shared: &Shared, data: Vec<Value>) {
    let Some(sink) = shared.emit_sink.get() else {
        return;
    };
    match data.into_iter().nth(2).and_then(bytes) {
        Some(payload) => sink(emitter::decode(&payload)),
        None => sink(Err(emitter::EmitError::NotMsgpack(
            "a pattern message push without a payload".into(),
        ))),
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
