//! The pub/sub link of a [`RedisCluster`](super::RedisCluster): a RESP3 connection subscribed
//! to this host's probe channel only, and the supervisor task that probes it, reconnects it
//! with backoff, and starts the periodic chores (clock, command connection, presence).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::FutureExt as _;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushKind, Value};

use super::{backoff, lock, Shared, NO_RTT};
use crate::cluster::wire::bytes;
use crate::cluster::{keys, ClusterError, RedisOptions};

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
}

/// Why [`run_link`] returned.
enum LinkEnd {
    Stop,
    Lost(String),
}

/// Opens the pub/sub connection and subscribes this host's probe channel.
pub(super) async fn connect_link(shared: &Shared) -> Result<Link, ClusterError> {
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
pub(super) async fn supervise(
    shared: Arc<Shared>,
    first: Option<Link>,
    mut stop: oneshot::Receiver<()>,
) {
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
