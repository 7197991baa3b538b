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

use std::cell::{Cell, RefCell};
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::channel::{mpsc, oneshot};
use futures::lock::Mutex;
use redis::{ErrorKind, ServerErrorKind, Value};

use super::publish::{group_by_room, scatter, PublishCall};
use super::redis::{backoff, RedisCluster, ShardAddr};
use super::resp::{Endpoint, RespConn, RespReader, RespWriter};
use super::wire::{bytes, decode_event};
use super::{keys, ClusterError, ClusterEvent, NewMessage, Published};

/// PING as sent on the subscriber connection.
const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

/// One shard's way to Redis for subscribing rooms and publishing messages; see the module
/// docs. Lives on its shard (not `Send`); the rest of [`RedisCluster`] is reached through
/// [`ShardLink::redis`].
pub struct ShardLink {
    conns: Rc<Conns>,
}

/// Result of one publish script call: per message, or one error for the call.
type CallOutcome = Result<Vec<Result<Published, ClusterError>>, ClusterError>;

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

    // ---- publishing ----

    async fn publish_batch(
        &self,
        msgs: Vec<(NewMessage, u64)>,
    ) -> Vec<Result<Published, ClusterError>> {
        let groups = group_by_room(&msgs);
        let calls: Vec<PublishCall<'_>> = groups
            .iter()
            .map(|(idx, floor)| {
                let group: Vec<&NewMessage> = idx.iter().map(|&i| &msgs[i].0).collect();
                self.cluster.publish_call(&group, *floor)
            })
            .collect();
        let outcomes = self.run_calls(calls).await;
        scatter(msgs.len(), &groups, outcomes)
    }

    /// Sends the calls in one write and reads their replies, within `command_timeout`.
    async fn run_calls(&self, calls: Vec<PublishCall<'_>>) -> Vec<CallOutcome> {
        let (target, timeout) = (self.cluster.target(), self.opts().command_timeout);
        let mut commands = self.commands.lock().await;
        let sendable: Vec<&redis::Cmd> = calls
            .iter()
            .filter(|c| !c.is_empty())
            .map(|c| &c.cmd)
            .collect();
        let replies = match within(timeout, self.exchange(&mut commands, &sendable)).await {
            Some(replies) => replies,
            None => {
                // The replies may still come: this connection cannot be trusted any more.
                commands.conn = None;
                Err(self.timed_out("the publish script"))
            }
        };
        drop(commands);
        let mut replies = match replies {
            Ok(each) => each,
            Err(e) => vec![Err(e); sendable.len()],
        }
        .into_iter();
        calls
            .into_iter()
            .map(|call| {
                if call.is_empty() {
                    return call.settle(Value::Nil, target, timeout);
                }
                match replies.next() {
                    Some(Ok(reply)) => call.settle(reply, target, timeout),
                    Some(Err(e)) => Err(e),
                    None => Err(ClusterError::Protocol("publish: no reply".into())),
                }
            })
            .collect()
    }

    /// Writes `cmds` (pipelined) on the command connection and reads one reply each: the
    /// error of the connection, or one result per command (a command Redis refused fails
    /// alone). Loads the script and sends again the calls Redis answered `NOSCRIPT`.
    async fn exchange(
        &self,
        commands: &mut Commands,
        cmds: &[&redis::Cmd],
    ) -> Result<Vec<Result<Value, ClusterError>>, ClusterError> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.command_conn(commands).await?;
        let mut replies = match pipeline(conn, cmds).await {
            Ok(r) => r,
            Err(e) => {
                commands.conn = None;
                return Err(self.cluster.classify(&e, "the publish script"));
            }
        };
        let unknown: Vec<usize> = (0..replies.len())
            .filter(|&i| matches!(&replies[i], Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)))
            .collect();
        if !unknown.is_empty() {
            let again: Vec<&redis::Cmd> = unknown.iter().map(|&i| cmds[i]).collect();
            let loaded = async {
                conn.call(&self.cluster.load_publish_script()).await?;
                pipeline(conn, &again).await
            };
            match loaded.await {
                Ok(second) => {
                    for (i, r) in unknown.into_iter().zip(second) {
                        replies[i] = r;
                    }
                }
                Err(e) => {
                    commands.conn = None;
                    return Err(self.cluster.classify(&e, "loading the publish script"));
                }
            }
        }
        Ok(replies
            .into_iter()
            .map(|r| r.map_err(|e| self.cluster.classify(&e, "the publish script")))
            .collect())
    }

    /// The command connection: the current one, or a new one (while in backoff after a
    /// failed connect, that error at once).
    async fn command_conn<'c>(
        &self,
        commands: &'c mut Commands,
    ) -> Result<&'c mut RespConn, ClusterError> {
        let conn = match commands.conn.take() {
            Some(conn) => conn,
            None => {
                if let Some((at, e)) = &commands.retry {
                    if Instant::now() < *at {
                        return Err(e.clone());
                    }
                }
                match self.connect("connect", "commands").await {
                    Ok(conn) => {
                        commands.failures = 0;
                        commands.retry = None;
                        conn
                    }
                    Err(e) => {
                        commands.failures = commands.failures.saturating_add(1);
                        let at = Instant::now() + backoff(self.opts(), commands.failures);
                        commands.retry = Some((at, e.clone()));
                        return Err(e);
                    }
                }
            }
        };
        Ok(commands.conn.insert(conn))
    }

    /// Opens the command connection ahead of the first publish, unless one is open (or
    /// being opened) already. A failure is the first call's error, as if it had tried.
    async fn warm_commands(self: Rc<Self>) {
        let mut commands = self.commands.lock().await;
        if let Err(e) = self.command_conn(&mut commands).await {
            tracing::warn!(shard = self.shard, error = %e, "redis command connection of a shard failed at start; publishes retry it after backoff");
        }
    }

    // ---- subscribing ----

    async fn subscribe(&self, room: &str) -> Result<(), ClusterError> {
        if !self.sub.borrow_mut().rooms.insert(room.to_owned()) {
            // Wanted already: subscribed, or pending until the link is back.
            return match self.sub.borrow().writer {
                Some(_) => Ok(()),
                None => Err(self.link_down(room)),
            };
        }
        let result = self.sub_commands(true, vec![keys::channel(room)]).await;
        match result {
            Err(ClusterError::Unavailable(_)) => Err(self.link_down(room)),
            Err(e) if !e.is_transient() => {
                self.sub.borrow_mut().rooms.remove(room);
                Err(e)
            }
            other => other,
        }
    }

    async fn unsubscribe(&self, room: &str) -> Result<(), ClusterError> {
        if !self.sub.borrow_mut().rooms.remove(room) {
            return Ok(());
        }
        if self.sub.borrow().writer.is_none() {
            return Ok(()); // Down: the next connect will not subscribe it.
        }
        self.sub_commands(false, vec![keys::channel(room)]).await
    }

    /// Sends one (un)subscribe command per channel (pipelined) and waits for every
    /// confirmation, within `command_timeout`.
    async fn sub_commands(
        &self,
        subscribe: bool,
        channels: Vec<String>,
    ) -> Result<(), ClusterError> {
        let what = if subscribe {
            "subscribe"
        } else {
            "unsubscribe"
        };
        if channels.is_empty() {
            return Ok(());
        }
        let writer = self.sub.borrow().writer.clone();
        let Some(writer) = writer else {
            return Err(ClusterError::Unavailable(format!(
                "the pub/sub link to {} is down",
                self.cluster.target()
            )));
        };
        let name = self.opts().subscribe_command(subscribe);
        let limit = self.opts().command_timeout;
        let mut packed = Vec::new();
        let mut confirmations = Vec::with_capacity(channels.len());
        let mut w = writer.lock().await;
        {
            // Queued under the writer's lock: the waiters are in the order Redis answers.
            let mut sub = self.sub.borrow_mut();
            for channel in channels {
                redis::cmd(name)
                    .arg(&channel)
                    .write_packed_command(&mut packed);
                let (done, confirmed) = oneshot::channel();
                sub.waiting.push_back(Waiter {
                    subscribe,
                    channel,
                    done,
                });
                confirmations.push(confirmed);
            }
        }
        let sent = within(limit, w.send(&packed)).await;
        if sent.is_none() {
            // Part of a command may have gone out: nothing more can follow it. Closing our
            // side ends the link (or the probe does, when the server stalls), and it is set
            // up again. The close is bounded too: with TLS it writes a close_notify that a
            // stalled server may never make room for.
            let _ = within(limit, w.close()).await;
        }
        drop(w);
        match sent {
            None => return Err(self.timed_out(what)),
            Some(Err(e)) => {
                return Err(ClusterError::Unavailable(format!(
                    "redis at {}, {what}: {e}",
                    self.cluster.target()
                )))
            }
            Some(Ok(())) => {}
        }
        let Some(answers) = within(limit, futures::future::join_all(confirmations)).await else {
            return Err(self.timed_out(what));
        };
        for answer in answers {
            match answer {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(oneshot::Canceled) => {
                    return Err(ClusterError::Unavailable(format!(
                        "lost the pub/sub connection to {} before it confirmed {what}",
                        self.cluster.target()
                    )))
                }
            }
        }
        Ok(())
    }

    /// Makes `conn` the live subscriber connection: its writer is shared with callers,
    /// its reader goes to the subscriber task.
    fn install(&self, conn: RespConn) -> (RespReader, Rc<Mutex<RespWriter>>) {
        let RespConn { reader, writer } = conn;
        let writer = Rc::new(Mutex::new(writer));
        let mut sub = self.sub.borrow_mut();
        sub.writer = Some(writer.clone());
        sub.ping_sent = None;
        (reader, writer)
    }

    /// The subscriber task: keeps the link up (starting with `first`, when connected
    /// already), resubscribes, announces `Down` and `Reconnected`. Ends when the cluster
    /// client is closed.
    async fn run_subscriber(
        self: Rc<Self>,
        mut first: Option<(RespReader, Rc<Mutex<RespWriter>>)>,
    ) {
        // Without a first connection, the link starts as down (`start` said so).
        let announced_down = Cell::new(first.is_none());
        let mut failures: u32 = 0;
        while !self.cluster.is_closed() {
            let (reader, writer) = match first.take() {
                Some(live) => live,
                None => match self.connect("connect (pub/sub)", "pubsub").await {
                    Ok(conn) => self.install(conn),
                    Err(e) => {
                        if !announced_down.replace(true) {
                            self.send(ClusterEvent::Down {
                                reason: e.to_string(),
                            });
                        }
                        failures = failures.saturating_add(1);
                        let delay = backoff(self.opts(), failures);
                        tracing::debug!(error = %e, ?delay, "redis pub/sub reconnect of a shard failed");
                        glommio::timer::sleep(delay).await;
                        continue;
                    }
                },
            };
            failures = 0;
            let resubscribe = async {
                let channels: Vec<String> = self
                    .sub
                    .borrow()
                    .rooms
                    .iter()
                    .map(|r| keys::channel(r))
                    .collect();
                match self.sub_commands(true, channels).await {
                    Ok(()) => {
                        if announced_down.replace(false) {
                            tracing::info!(target = %self.cluster.target(), "redis pub/sub link of a shard is back; rooms resubscribed");
                            self.reset_command_backoff();
                            self.send(ClusterEvent::Reconnected);
                        }
                        futures::future::pending::<String>().await
                    }
                    Err(e) => format!("resubscribing failed: {e}"),
                }
            };
            let reason = first_of(
                self.read_pushes(reader),
                first_of(self.probe(writer.clone()), resubscribe),
            )
            .await;
            {
                let mut sub = self.sub.borrow_mut();
                sub.writer = None;
                // Dropping the waiters tells each caller the link was lost.
                sub.waiting.clear();
                sub.strays.clear();
            }
            let limit = self.opts().command_timeout;
            let _ = within(limit, async { writer.lock().await.close().await }).await;
            // A stalled or vanished server will not answer the command connection either.
            if let Some(mut commands) = self.commands.try_lock() {
                commands.conn = None;
            }
            if self.cluster.is_closed() {
                return;
            }
            tracing::warn!(%reason, "redis pub/sub link of a shard is down; reconnecting");
            if !announced_down.replace(true) {
                self.send(ClusterEvent::Down { reason });
            }
        }
    }

    fn send(&self, event: ClusterEvent) {
        let _ = self.events.unbounded_send(event);
    }

    /// The link is back: Redis answers again, so the command connection is tried at once.
    fn reset_command_backoff(&self) {
        if let Some(mut commands) = self.commands.try_lock() {
            commands.retry = None;
        }
    }

    /// Reads the subscriber connection until it fails; returns why.
    async fn read_pushes(&self, mut reader: RespReader) -> String {
        loop {
            match reader.read().await {
                Ok(value) => self.on_push(value),
                Err(e) => {
                    return format!(
                        "lost the pub/sub connection to {}: {e}",
                        self.cluster.target()
                    )
                }
            }
        }
    }

    /// PINGs every `ping_interval`; returns why the link counts as lost (an answer later
    /// than `command_timeout`, a failed write, or the client closed).
    async fn probe(&self, writer: Rc<Mutex<RespWriter>>) -> String {
        let (every, limit) = (self.opts().ping_interval, self.opts().command_timeout);
        loop {
            glommio::timer::sleep(every).await;
            if self.cluster.is_closed() {
                return "the redis client was closed".into();
            }
            let sent = self.sub.borrow().ping_sent;
            match sent {
                Some(at) if at.elapsed() > limit => {
                    return format!(
                        "no answer to PING from redis at {} within {limit:?}",
                        self.cluster.target()
                    )
                }
                Some(_) => continue,
                None => {}
            }
            self.sub.borrow_mut().ping_sent = Some(Instant::now());
            match within(limit, async { writer.lock().await.send(PING).await }).await {
                Some(Ok(())) => {}
                Some(Err(e)) => return format!("writing PING to redis failed: {e}"),
                None => return self.timed_out("PING").to_string(),
            }
        }
    }

    /// One value read on the subscriber connection.
    fn on_push(&self, value: Value) {
        let parts = match value {
            Value::Array(parts) => parts,
            Value::SimpleString(s) if s.eq_ignore_ascii_case("pong") => {
                self.sub.borrow_mut().ping_sent = None;
                return;
            }
            Value::ServerError(e) => {
                // Errors answer in order: this one is the oldest command's (a refused
                // subscribe, e.g. an ACL without the channel).
                let e = self.cluster.classify(&e.into(), "subscribe");
                match self.sub.borrow_mut().waiting.pop_front() {
                    Some(w) => {
                        let _ = w.done.send(Err(e));
                    }
                    None => tracing::warn!(error = %e, "redis refused a pub/sub command"),
                }
                return;
            }
            other => {
                tracing::debug!(?other, "unexpected value on the pub/sub connection");
                return;
            }
        };
        let mut parts = parts.into_iter().map(bytes);
        let (Some(Some(kind)), Some(Some(channel))) = (parts.next(), parts.next()) else {
            tracing::debug!("malformed pub/sub push");
            return;
        };
        match kind.to_ascii_lowercase().as_slice() {
            b"message" | b"smessage" => match parts.next() {
                Some(Some(payload)) => self.dispatch(&channel, &payload),
                _ => tracing::debug!("pub/sub message without payload"),
            },
            kind @ (b"subscribe" | b"ssubscribe" | b"unsubscribe" | b"sunsubscribe") => {
                let subscribe = !kind.ends_with(b"unsubscribe");
                let mut sub = self.sub.borrow_mut();
                let at = sub
                    .waiting
                    .iter()
                    .position(|w| w.subscribe == subscribe && w.channel.as_bytes() == channel);
                if let Some(w) = at.and_then(|i| sub.waiting.remove(i)) {
                    let _ = w.done.send(Ok(()));
                }
            }
            b"pong" => self.sub.borrow_mut().ping_sent = None,
            _ => {}
        }
    }

    /// A room channel's payload, to the shard's stream (or unsubscribed, if no longer
    /// wanted).
    fn dispatch(&self, channel: &[u8], payload: &[u8]) {
        let Some(room) = keys::room_of_channel(channel) else {
            tracing::debug!(channel = %String::from_utf8_lossy(channel), "message on an unknown channel");
            return;
        };
        if !self.sub.borrow().rooms.contains(room) {
            self.drop_stray(room);
            return;
        }
        match decode_event(room, payload) {
            Ok(event) => self.send(event),
            Err(e) => {
                tracing::warn!(room, error = %e, "undecodable message on a room channel; dropped")
            }
        }
    }

    /// Unsubscribes the channel of a room no longer wanted (a subscription left by a race
    /// with a reconnect), once, unless the room is wanted again by the time it is written.
    fn drop_stray(&self, room: &str) {
        let channel = keys::channel(room);
        let writer = {
            let mut sub = self.sub.borrow_mut();
            if !sub.strays.insert(channel.clone()) {
                return;
            }
            sub.writer.clone()
        };
        let Some(writer) = writer else { return };
        let name = self.opts().subscribe_command(false);
        let limit = self.opts().command_timeout;
        let room = room.to_owned();
        let me = self.sub.clone();
        glommio::spawn_local(async move {
            let mut w = writer.lock().await;
            // Checked under the writer's lock: a subscribe queued since goes after this.
            if !me.borrow().rooms.contains(&room) {
                let packed = redis::cmd(name).arg(&channel).get_packed_command();
                let _ = within(limit, w.send(&packed)).await;
            }
            drop(w);
            me.borrow_mut().strays.remove(&channel);
        })
        .detach();
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

/// Writes `cmds` in one go and reads one reply each, in order: an I/O or protocol error
/// for the connection, else a result per command.
async fn pipeline(
    conn: &mut RespConn,
    cmds: &[&redis::Cmd],
) -> redis::RedisResult<Vec<redis::RedisResult<Value>>> {
    let mut packed = Vec::new();
    for cmd in cmds {
        cmd.write_packed_command(&mut packed);
    }
    conn.writer.send(&packed).await?;
    let mut replies = Vec::with_capacity(cmds.len());
    for _ in cmds {
        replies.push(conn.reader.read().await?.extract_error());
    }
    Ok(replies)
}
