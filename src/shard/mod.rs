//! A shard: one glommio executor pinned to one core, owning the connections it
//! accepted and the rooms whose home it is. Shards share nothing mutable; they talk
//! through the mesh (bounded SPSC channels) with the plain messages of `chat::mesh`.

mod console;
mod pages;
mod routes;
pub mod runtime;
mod shedder;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::LocalBoxFuture;
use glommio::channels::local_channel::LocalSender;
use glommio::net::TcpStream;

use crate::chat::home::{Home, Mesh};
use crate::chat::layer::{Chat, ChatHost};
use crate::chat::mesh::{MemberMsg, ShardMsg};
use crate::context::Context;
use crate::hooks::Hooks;
use crate::metrics::ShardMetrics;
use crate::store::Store;
use crate::transport::conn::{CloseReason, Timers, Transport};
use crate::transport::connection::Handoff;
use crate::transport::engine::EngineHandler;
use crate::transport::host::{Host, Routed};
use crate::transport::http::Request;
use crate::transport::session::Session;
use crate::transport::websocket::text_frame;

/// What the runtime builds for a shard before the shard exists.
pub struct ShardParts {
    pub id: usize,
    pub count: usize,
    pub ctx: Arc<Context>,
    pub store: Store,
    /// The rooms whose home this shard is (its service and writer tasks run on the shard).
    pub home: Rc<Home>,
    pub handler: Rc<dyn EngineHandler<Shard>>,
    /// Per peer shard, the queue its outbox task drains into the mesh (`None` for self).
    pub outboxes: Vec<Option<LocalSender<ShardMsg>>>,
    /// This shard's client of the application's backend, when a hook is on.
    pub hooks: Option<Rc<Hooks>>,
}

/// One shard's state. Lives in an `Rc` on its own thread.
pub struct Shard {
    pub id: usize,
    pub count: usize,
    pub ctx: Arc<Context>,
    pub store: Store,
    /// The chat layer's state on this shard (members, local rooms, users, home rooms).
    pub chat: Rc<Chat>,
    /// What sessions' Engine.IO messages mean (chat, or the conformance echo server).
    pub handler: Rc<dyn EngineHandler<Shard>>,
    sessions: RefCell<HashMap<u64, Rc<Session>>>,
    /// Engine.IO sid → session id, for polling requests and upgrades.
    by_sid: RefCell<HashMap<String, u64>>,
    /// Per peer shard: the queue its outbox task drains into the mesh (`None` for self).
    outboxes: Vec<Option<LocalSender<ShardMsg>>>,
    next_conn: Cell<u64>,
    /// This shard's own `Rc`, for tasks it spawns while handling a message.
    me: Weak<Shard>,
}

/// The transport reaches the shard's sessions, its handler, the mesh (for a socket whose
/// session another shard owns) and the routes outside Engine.IO through it.
impl Host for Shard {
    fn ctx(&self) -> &Context {
        &self.ctx
    }

    fn shard_id(&self) -> usize {
        self.id
    }

    fn shard_count(&self) -> usize {
        self.count
    }

    fn handler(&self) -> &dyn EngineHandler<Shard> {
        &*self.handler
    }

    fn open_session(&self, transport: Transport) -> Rc<Session> {
        Shard::open_session(self, transport)
    }

    fn session_by_sid(&self, sid: &str) -> Option<Rc<Session>> {
        Shard::session_by_sid(self, sid)
    }

    fn close_session(&self, session: &Rc<Session>) {
        Shard::close_session(self, session);
    }

    fn end_session(&self, session: &Rc<Session>, reason: CloseReason) {
        Shard::end_session(self, session, reason);
    }

    fn end_if_overdue(&self, session: &Rc<Session>, now: Instant) -> bool {
        Shard::end_if_overdue(self, session, now)
    }

    fn hand_over(&self, owner: usize, fd: OwnedFd, handoff: Handoff) {
        let handoff = Box::new(handoff);
        self.send(owner, ShardMsg::Member(MemberMsg::Adopt { fd, handoff }));
    }

    fn route<'a>(
        &'a self,
        req: &'a Request,
        io: &'a mut TcpStream,
        buf: &'a mut Vec<u8>,
    ) -> LocalBoxFuture<'a, Routed> {
        self.serve_route(req, io, buf)
    }
}

/// Chat's handler and a connection that follows its room reach the chat state and the
/// session registry through the shard.
impl ChatHost for Shard {
    fn chat(&self) -> &Rc<Chat> {
        &self.chat
    }

    fn detach_session(&self, session: &Session) -> bool {
        Shard::detach_session(self, session)
    }

    fn open_moved_session(&self, sid: String, timers: Timers) -> Rc<Session> {
        Shard::open_moved_session(self, sid, timers)
    }
}

/// Chat (its homes and members) reaches the other shards, and this one in place, through
/// its shard.
impl Mesh for Shard {
    fn send(&self, to: usize, msg: ShardMsg) {
        Shard::send(self, to, msg);
    }

    fn congested(&self, to: usize) -> bool {
        self.outboxes
            .get(to)
            .and_then(Option::as_ref)
            .is_some_and(|outbox| outbox.len() >= self.ctx.config.limits.mesh_outbox)
    }
}

impl Shard {
    /// A shard with no connections yet, made of what the runtime built for it.
    pub fn new(parts: ShardParts, me: Weak<Shard>) -> Shard {
        let ShardParts {
            id,
            count,
            ctx,
            store,
            home,
            handler,
            outboxes,
            hooks,
        } = parts;
        let mesh: Weak<dyn Mesh> = me.clone();
        let chat = Chat::new((id, count), ctx.clone(), store.clone(), home, mesh, hooks);
        Shard {
            id,
            count,
            ctx,
            store,
            chat,
            handler,
            sessions: RefCell::new(HashMap::new()),
            by_sid: RefCell::new(HashMap::new()),
            outboxes,
            next_conn: Cell::new(1),
            me,
        }
    }

    /// This shard's counters.
    pub fn stats(&self) -> &ShardMetrics {
        &self.ctx.metrics.shards[self.id]
    }

    /// Sends a message to a shard; to itself it is handled in place (in order).
    pub fn send(&self, to: usize, msg: ShardMsg) {
        if to == self.id {
            self.handle(msg);
        } else if let Some(Some(outbox)) = self.outboxes.get(to) {
            // The outbox lives as long as the shard. It takes every message: new work is
            // refused before it gets here once the outbox is full (`mesh_congested`) or the
            // shard is past half its memory budget, and what follows from work already
            // accepted must not be dropped. Its bytes count in this shard's budget until
            // the receiving shard takes it.
            self.chat.budget.mesh_sent(msg.weight());
            let _ = outbox.try_send(msg);
        }
    }

    /// Handles a message from the mesh (or from this shard itself): sockets handed over
    /// are the transport's, the rest is chat's.
    pub fn handle(&self, msg: ShardMsg) {
        match msg {
            ShardMsg::Home(cmd) => self.chat.home.enqueue(cmd),
            ShardMsg::Users(cmd) => self.chat.handle_users(cmd),
            ShardMsg::Member(msg) => match msg {
                MemberMsg::Adopt { fd, handoff } => {
                    // Without the shard (going away) the descriptor closes with the message.
                    if let Some(shard) = self.me.upgrade() {
                        glommio::spawn_local(crate::transport::connection::adopt(
                            shard, fd, *handoff,
                        ))
                        .detach();
                    }
                }
                MemberMsg::Moved(moved) => match self.me.upgrade() {
                    Some(shard) => {
                        glommio::spawn_local(crate::chat::follow::adopt(shard, moved)).detach();
                    }
                    // The shard is going away; dropping the connection closes its descriptor.
                    None => drop(moved),
                },
                msg => self.chat.handle_member(msg),
            },
        }
    }

    /// Registers a new session.
    pub fn open_session(&self, transport: Transport) -> Rc<Session> {
        let now = Instant::now();
        let eio = &self.ctx.config.engineio;
        let timers = Timers {
            next_ping: now + Duration::from_millis(eio.ping_interval),
            pong_deadline: None,
            connect_deadline: Some(now + eio.connect_timeout.0),
            close_deadline: None,
        };
        let session = self.register(crate::ids::new_sid(self.id), transport, timers);
        ShardMetrics::inc(&self.stats().connections_total);
        session
            .span
            .in_scope(|| tracing::debug!(?transport, "session opened"));
        session
    }

    /// A session for a WebSocket that moved here from another shard, keeping its sid
    /// and timers (`transport::follow`); the caller restores the rest.
    pub fn open_moved_session(&self, sid: String, timers: Timers) -> Rc<Session> {
        self.register(sid, Transport::WebSocket, timers)
    }

    /// Adds a session to this shard's maps and counts it open.
    fn register(&self, sid: String, transport: Transport, timers: Timers) -> Rc<Session> {
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        let span = tracing::info_span!(
            parent: None,
            "conn",
            shard = self.id,
            sid = %sid,
            user = tracing::field::Empty,
        );
        let session = Rc::new(Session::new(
            id,
            sid,
            transport,
            (&self.ctx.config.limits, self.chat.budget.clone()),
            timers,
            span,
        ));
        self.sessions.borrow_mut().insert(id, session.clone());
        self.by_sid.borrow_mut().insert(session.sid.clone(), id);
        ShardMetrics::inc(&self.stats().connections);
        session
    }

    /// Takes a session out of this shard's maps and its open count; true if it was still
    /// there. On its own, it forgets a session that moved to another shard: no room to
    /// leave, no count to release (its user's count moves with it).
    pub fn detach_session(&self, session: &Session) -> bool {
        self.by_sid.borrow_mut().remove(&session.sid);
        let known = self.sessions.borrow_mut().remove(&session.id).is_some();
        if known {
            self.stats()
                .connections
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        known
    }

    /// The session with this Engine.IO sid, if this shard has it.
    pub fn session_by_sid(&self, sid: &str) -> Option<Rc<Session>> {
        let id = *self.by_sid.borrow().get(sid)?;
        self.sessions.borrow().get(&id).cloned()
    }

    /// Forgets a connection that has ended (every way a session ends comes here).
    pub fn close_session(&self, session: &Rc<Session>) {
        if session.take_end_notice() {
            self.handler.on_close(self, session);
        }
        if self.detach_session(session) {
            let reason = session.closing();
            session
                .span
                .in_scope(|| tracing::debug!(?reason, "session closed"));
        }
    }

    /// Closes a session for `reason`. A polling session, which has no socket task to
    /// notice, is forgotten at once (later requests for its sid get "Session ID unknown").
    pub fn end_session(&self, session: &Rc<Session>, reason: CloseReason) {
        session.close(reason);
        if session.transport() != Transport::WebSocket {
            self.close_session(session);
        }
    }

    /// Ends a session whose Socket.IO CONNECT or pong is overdue at `now` (with
    /// `CloseReason::Timeout`); true if it did. The sweeper checks every session each
    /// tick; a polling request checks its session first, so that it never finds alive a
    /// session whose deadline passed since the last tick.
    pub fn end_if_overdue(&self, session: &Rc<Session>, now: Instant) -> bool {
        let t = session.timers();
        if t.close_deadline.is_some() {
            return false;
        }
        let connect_late = t.connect_deadline.is_some_and(|d| now >= d);
        let pong_late = t.pong_deadline.is_some_and(|d| now >= d);
        if !connect_late && !pong_late {
            return false;
        }
        session.span.in_scope(|| {
            tracing::debug!(
                timer = if connect_late { "connect" } else { "ping" },
                "timed out"
            )
        });
        self.end_session(session, CloseReason::Timeout);
        true
    }

    /// Open connections on this shard.
    pub fn session_count(&self) -> usize {
        self.sessions.borrow().len()
    }

    /// Waits for the drain signal, then drains this shard: stop accepting, let every
    /// home shard finish the publishes in flight (acks go out), close every connection
    /// with 1012 so clients reconnect elsewhere, and return once they are gone (or the
    /// shutdown timeout passed).
    pub async fn run_drain(self: Rc<Self>, listener_fd: std::os::fd::RawFd) {
        use std::sync::atomic::Ordering::Relaxed;
        while !self.ctx.draining.load(Relaxed) {
            glommio::timer::sleep(Duration::from_millis(25)).await;
        }
        let deadline = Instant::now() + self.ctx.config.server.shutdown_timeout.0;
        // SAFETY: shutting down our own listening socket wakes the pending accept.
        unsafe { libc::shutdown(listener_fd, libc::SHUT_RDWR) };
        tracing::info!(shard = self.id, "draining");
        let metrics = &self.ctx.metrics;
        loop {
            self.stats()
                .home_busy
                .store(u64::from(!self.chat.home.is_idle()), Relaxed);
            let busy: u64 = metrics
                .shards
                .iter()
                .map(|s| s.home_busy.load(Relaxed))
                .sum();
            if busy == 0 || Instant::now() >= deadline {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        // Acks from other shards' homes may still be in the mesh: give them a moment.
        glommio::timer::sleep(Duration::from_millis(50)).await;
        let sessions: Vec<Rc<Session>> = self.sessions.borrow().values().cloned().collect();
        for s in sessions {
            self.end_session(&s, CloseReason::Restart);
        }
        while self.session_count() > 0 && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The sweeper: sends Engine.IO pings, and closes sessions whose pong, Socket.IO
    /// CONNECT or close handshake is overdue. One timer for the whole shard.
    pub async fn run_sweeper(self: Rc<Self>) {
        let eio = &self.ctx.config.engineio;
        // A ping goes out at most one tick late: 1 s with the default timings (25 s / 20 s),
        // 10 ms with 300 ms / 200 ms. Conformance mode ticks every 2 ms: the suites expect
        // three ping rounds (300 ms each plus two HTTP round trips over polling) to fit in
        // the reference server's 1 s connect timeout, whose timers fire on time; up to 10 ms
        // late per round left too thin a margin on a busy machine.
        let tick = if self.ctx.config.server.conformance {
            Duration::from_millis(2)
        } else {
            Duration::from_millis(eio.ping_interval.min(eio.ping_timeout) / 20)
                .clamp(Duration::from_millis(10), Duration::from_secs(1))
        };
        let ping = text_frame(b"2");
        loop {
            glommio::timer::sleep(tick).await;
            let now = Instant::now();
            let sessions: Vec<Rc<Session>> = self.sessions.borrow().values().cloned().collect();
            for s in sessions {
                let mut t = s.timers();
                if let Some(deadline) = t.close_deadline {
                    if now >= deadline {
                        s.cut();
                        if s.transport() != Transport::WebSocket {
                            // No socket task will end a polling session: end it here.
                            self.close_session(&s);
                        }
                    }
                    continue;
                }
                if self.end_if_overdue(&s, now) {
                    continue;
                }
                if t.pong_deadline.is_none() && now >= t.next_ping {
                    // The pong is due `ping_timeout` after the ping was due, as with the
                    // reference server's timers, however late this tick is (but never
                    // less than half of it after the ping goes out).
                    let timeout = Duration::from_millis(eio.ping_timeout);
                    t.pong_deadline = Some((t.next_ping + timeout).max(now + timeout / 2));
                    s.set_timers(t);
                    s.push(ping.clone(), false);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
