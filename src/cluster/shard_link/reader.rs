//! The subscriber task: keeps the pub/sub link up, resubscribes after a reconnect,
//! probes the link with PING, and reads what Redis pushes (room messages to the shard's
//! stream, confirmations to their waiters).

use std::rc::Rc;
use std::time::Instant;

use futures::lock::Mutex;
use redis::Value;

use super::node::NodeLink;
use super::{first_of, within};
use crate::cluster::redis::backoff;
use crate::cluster::resp::{RespConn, RespReader, RespWriter};
use crate::cluster::topology::Redirect;
use crate::cluster::wire::{bytes, decode_event};
use crate::cluster::{keys, ClusterError, ClusterEvent};

/// PING as sent on the subscriber connection.
const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

impl NodeLink {
    /// Makes `conn` the live subscriber connection: its writer is shared with callers,
    /// its reader goes to the subscriber task.
    pub(super) fn install(&self, conn: RespConn) -> (RespReader, Rc<Mutex<RespWriter>>) {
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
    pub(super) async fn run_subscriber(
        self: Rc<Self>,
        mut first: Option<(RespReader, Rc<Mutex<RespWriter>>)>,
    ) {
        let mut failures: u32 = 0;
        while !self.is_stopped() {
            let (reader, writer) = match first.take() {
                Some(live) => live,
                None => match self.connect("connect (pub/sub)", "pubsub").await {
                    Ok(conn) => self.install(conn),
                    Err(e) => {
                        if !self.down.replace(true) {
                            self.send(ClusterEvent::Down {
                                reason: e.to_string(),
                            });
                        }
                        // A failover may have moved the node's slots to another.
                        self.ask_refresh(None);
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
                        let was_down = self.down.replace(false);
                        if was_down {
                            tracing::info!(target = %self.name, "redis pub/sub link of a shard is back; rooms resubscribed");
                            self.reset_command_backoff();
                        }
                        if self.owed_reconnect.replace(false) || was_down {
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
            if self.is_stopped() {
                return;
            }
            tracing::warn!(%reason, node = %self.name, "redis pub/sub link of a shard is down; reconnecting");
            if !self.down.replace(true) {
                self.send(ClusterEvent::Down { reason });
            }
            self.ask_refresh(None);
        }
    }

    /// Reads the subscriber connection until it fails; returns why.
    async fn read_pushes(&self, mut reader: RespReader) -> String {
        loop {
            match reader.read().await {
                Ok(value) => self.on_push(value),
                Err(e) => return format!("lost the pub/sub connection to {}: {e}", self.name),
            }
        }
    }

    /// PINGs every `ping_interval`; returns why the link counts as lost (an answer later
    /// than `command_timeout`, a failed write, or the client closed).
    async fn probe(&self, writer: Rc<Mutex<RespWriter>>) -> String {
        let (every, limit) = (self.opts().ping_interval, self.opts().command_timeout);
        loop {
            glommio::timer::sleep(every).await;
            if self.is_stopped() {
                return "the redis client was closed".into();
            }
            let sent = self.sub.borrow().ping_sent;
            match sent {
                Some(at) if at.elapsed() > limit => {
                    return format!(
                        "no answer to PING from redis at {} within {limit:?}",
                        self.name
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
                // subscribe, e.g. an ACL without the channel, or MOVED: the room's slot is
                // served elsewhere now).
                let e: redis::RedisError = e.into();
                let waiter = self.sub.borrow_mut().waiting.pop_front();
                let moved = Redirect::of_error(&e).is_some();
                let e = if moved {
                    ClusterError::Unavailable(format!(
                        "redis at {} no longer serves the channel's slot ({e}); it is \
                         subscribed again on its master",
                        self.name
                    ))
                } else {
                    self.classify(&e, "subscribe")
                };
                match waiter {
                    Some(w) => {
                        if moved {
                            self.ask_refresh(keys::room_of_channel(w.channel.as_bytes()));
                        }
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
                match at.and_then(|i| sub.waiting.remove(i)) {
                    Some(w) => {
                        let _ = w.done.send(Ok(()));
                    }
                    None if !subscribe => {
                        // Nobody asked: Redis dropped a sharded subscription because the
                        // slot moved to another node.
                        let room = keys::room_of_channel(&channel);
                        if let Some(room) = room.filter(|r| sub.rooms.contains(*r)) {
                            drop(sub);
                            tracing::debug!(node = %self.name, room, "redis dropped a room's subscription: its slot moved");
                            self.ask_refresh(Some(room));
                        }
                    }
                    None => {}
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
    pub(super) fn drop_stray(&self, room: &str) {
        let channel = keys::channel(room);
        let writer = {
            let mut sub = self.sub.borrow_mut();
            if !sub.strays.insert(channel.clone()) {
                return;
            }
            sub.writer.clone()
        };
        let Some(writer) = writer else { return };
        let name = self.subscribe_command(false);
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
