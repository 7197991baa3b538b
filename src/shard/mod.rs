//! A shard: one glommio executor pinned to one core, owning the connections it
//! accepted and the rooms whose home it is. Shards share nothing mutable; they talk
//! through the mesh (bounded SPSC channels) with the plain messages of `chat::mesh`.

pub mod runtime;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::channels::local_channel::LocalSender;

use crate::chat::home::{Home, Mesh};
use crate::chat::member::{ConnRef, Member};
use crate::chat::mesh::{home_of, HomeCmd, MemberMsg, ShardMsg, UserCmd};
use crate::chat::users::UserCounts;
use crate::context::Context;
use crate::metrics::ShardMetrics;
use crate::store::Store;
use crate::transport::conn::{CloseReason, Queued, Timers, Transport};
use crate::transport::engine::EngineHandler;
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
    pub handler: Rc<dyn EngineHandler>,
    /// Per peer shard, the queue its outbox task drains into the mesh (`None` for self).
    pub outboxes: Vec<Option<LocalSender<ShardMsg>>>,
}

/// One shard's state. Lives in an `Rc` on its own thread.
pub struct Shard {
    pub id: usize,
    pub count: usize,
    pub ctx: Arc<Context>,
    pub store: Store,
    pub home: Rc<Home>,
    /// What sessions' Engine.IO messages mean (chat, or the conformance echo server).
    pub handler: Rc<dyn EngineHandler>,
    /// Connection counts of the users whose owner this shard is.
    pub users: UserCounts,
    sessions: RefCell<HashMap<u64, Rc<Session>>>,
    /// The chat layer's state of each session that has one (not conformance sessions).
    members: RefCell<HashMap<u64, Rc<Member>>>,
    /// Engine.IO sid → session id, for polling requests and upgrades.
    by_sid: RefCell<HashMap<String, u64>>,
    /// This shard's members of each room (the delivery lists).
    local_rooms: RefCell<HashMap<Arc<str>, Vec<Rc<Member>>>>,
    /// Per peer shard: the queue its outbox task drains into the mesh (`None` for self).
    outboxes: Vec<Option<LocalSender<ShardMsg>>>,
    next_conn: Cell<u64>,
    /// This shard's own `Rc`, for tasks it spawns while handling a message.
    me: Weak<Shard>,
}

/// A home reaches the other shards (and this one, in place) through its shard.
impl Mesh for Shard {
    fn send(&self, to: usize, msg: ShardMsg) {
        Shard::send(self, to, msg);
    }

    fn congested(&self, to: usize) -> bool {
        self.mesh_congested(to)
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
        } = parts;
        Shard {
            id,
            count,
            ctx,
            store,
            home,
            handler,
            users: UserCounts::default(),
            sessions: RefCell::new(HashMap::new()),
            members: RefCell::new(HashMap::new()),
            by_sid: RefCell::new(HashMap::new()),
            local_rooms: RefCell::new(HashMap::new()),
            outboxes,
            next_conn: Cell::new(1),
            me,
        }
    }

    /// This shard's own `Rc`, for a task that must outlive the current call.
    pub fn this(&self) -> Option<Rc<Shard>> {
        self.me.upgrade()
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
            // refused before it gets here once the outbox is full (`mesh_congested`), and
            // what follows from work already accepted must not be dropped.
            let _ = outbox.try_send(msg);
        }
    }

    /// Whether the queue toward shard `to` is full for new work (`limits.mesh_outbox`):
    /// a request a client starts is then refused rather than queued. The home's own
    /// queue counts when `to` is this shard.
    pub fn mesh_congested(&self, to: usize) -> bool {
        let queued = match self.outboxes.get(to) {
            Some(Some(outbox)) => outbox.len(),
            _ if to == self.id => self.home.queued(),
            _ => 0,
        };
        let congested = queued >= self.ctx.config.limits.mesh_outbox;
        if congested {
            ShardMetrics::inc(&self.stats().mesh_refusals);
        }
        congested
    }

    /// Sends a request to a room's home shard.
    pub fn to_home(&self, room: &str, cmd: HomeCmd) {
        self.send(home_of(room, self.count), ShardMsg::Home(cmd));
    }

    /// Handles a message from the mesh (or from this shard itself).
    pub fn handle(&self, msg: ShardMsg) {
        match msg {
            ShardMsg::Home(cmd) => self.home.enqueue(cmd),
            ShardMsg::Member(m) => self.handle_member(m),
            ShardMsg::Users(cmd) => self.handle_users(cmd),
        }
    }

    /// Sends a request to the shard that owns its user's connection count.
    pub fn to_user_owner(&self, cmd: UserCmd) {
        let (UserCmd::Acquire { user, .. } | UserCmd::Release { user }) = &cmd;
        let owner = home_of(user, self.count);
        self.send(owner, ShardMsg::Users(cmd));
    }

    fn handle_users(&self, cmd: UserCmd) {
        match cmd {
            UserCmd::Acquire { user, conn } => {
                let limit = self.ctx.config.limits.max_connections_per_user;
                let admitted = self.users.acquire(user.clone(), limit);
                self.send(
                    conn.shard,
                    ShardMsg::Member(MemberMsg::Admitted {
                        conn: conn.id,
                        user,
                        admitted,
                    }),
                );
            }
            UserCmd::Release { user } => self.users.release(&user),
        }
    }

    /// Tells the owner shard that this connection's user no longer counts it (once).
    pub fn release_user(&self, member: &Member) {
        if !member.take_counted() {
            return;
        }
        if let Some(user) = member.user() {
            self.to_user_owner(UserCmd::Release { user: user.id });
        }
    }

    fn handle_member(&self, msg: MemberMsg) {
        match msg {
            MemberMsg::Deliver {
                room,
                frame,
                except,
                volatile,
                sent_at,
            } => {
                let rooms = self.local_rooms.borrow();
                let Some(members) = rooms.get(&room) else {
                    return;
                };
                let stats = self.stats();
                let mut delivered = 0u64;
                for m in members {
                    if except == Some(m.conn_ref(self.id)) {
                        continue;
                    }
                    match m.session().push(frame.clone(), volatile) {
                        Queued::Yes => delivered += 1,
                        Queued::Dropped => ShardMetrics::inc(&stats.typing_dropped),
                        Queued::Overflow => ShardMetrics::inc(&stats.slow_consumer_closes),
                        Queued::Closed => {}
                    }
                }
                stats
                    .messages_out
                    .fetch_add(delivered, std::sync::atomic::Ordering::Relaxed);
                stats.observe_fanout(sent_at.elapsed());
            }
            MemberMsg::Reply { conn, frame } => {
                if let Some(s) = self.sessions.borrow().get(&conn) {
                    if s.push(frame, false) == Queued::Overflow {
                        ShardMetrics::inc(&self.stats().slow_consumer_closes);
                    }
                }
            }
            MemberMsg::Admitted {
                conn,
                user,
                admitted,
            } => {
                let member = self.member(conn);
                let pending = member.as_ref().and_then(|m| m.take_pending());
                match (member, pending) {
                    (Some(member), Some(pending)) if pending.0.id == user => {
                        crate::chat::handler::on_admitted(self, &member, pending, admitted);
                    }
                    _ => {
                        // The connection ended (or gave up) while the count was on the way.
                        if admitted {
                            self.to_user_owner(UserCmd::Release { user });
                        }
                    }
                }
            }
            MemberMsg::Adopt { fd, handoff } => {
                // Without the shard (going away) the descriptor closes with the message.
                if let Some(shard) = self.me.upgrade() {
                    glommio::spawn_local(crate::transport::connection::adopt(shard, fd, *handoff))
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
            MemberMsg::Joined {
                room,
                conn,
                frame,
                admitted,
            } => {
                let Some(member) = self.member(conn) else {
                    if admitted {
                        // The connection ended while its join was on the way.
                        let conn = ConnRef {
                            shard: self.id,
                            id: conn,
                        };
                        self.to_home(
                            &room,
                            HomeCmd::Leave {
                                room: room.clone(),
                                conn,
                                ack_id: None,
                            },
                        );
                    }
                    return;
                };
                let was_joining = member.finish_joining(&room, admitted);
                if admitted && was_joining {
                    self.local_rooms
                        .borrow_mut()
                        .entry(room)
                        .or_default()
                        .push(member.clone());
                }
                if !frame.is_empty() {
                    member.session().push(frame, false);
                }
            }
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
            &self.ctx.config.limits,
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

    /// Takes a connection out of every room it is in or joining (Socket.IO disconnect,
    /// or the connection ended).
    pub fn leave_all(&self, member: &Rc<Member>) {
        let conn = member.conn_ref(self.id);
        let (joined, joining) = member.leave_all();
        for room in &joined {
            self.remove_local_member(room, member);
        }
        for room in joined.into_iter().chain(joining) {
            self.to_home(
                &room,
                HomeCmd::Leave {
                    room: room.clone(),
                    conn,
                    ack_id: None,
                },
            );
        }
    }

    /// Stops delivering a room's events to this connection.
    pub fn remove_local_member(&self, room: &Arc<str>, member: &Rc<Member>) {
        let mut rooms = self.local_rooms.borrow_mut();
        if let Some(members) = rooms.get_mut(room) {
            if let Some(i) = members.iter().position(|m| Rc::ptr_eq(m, member)) {
                members.swap_remove(i);
            }
            if members.is_empty() {
                rooms.remove(room);
            }
        }
    }

    /// The chat state of session `id`, if it has one here.
    pub fn member(&self, id: u64) -> Option<Rc<Member>> {
        self.members.borrow().get(&id).cloned()
    }

    /// Keeps a session's chat state (the chat handler opened it, or it moved here).
    pub fn add_member(&self, member: Rc<Member>) {
        self.members
            .borrow_mut()
            .insert(member.session().id, member);
    }

    /// Forgets a session's chat state (it ended, or it moves to another shard).
    pub fn remove_member(&self, id: u64) -> Option<Rc<Member>> {
        self.members.borrow_mut().remove(&id)
    }

    /// The session with this Engine.IO sid, if this shard has it.
    pub fn session_by_sid(&self, sid: &str) -> Option<Rc<Session>> {
        let id = *self.by_sid.borrow().get(sid)?;
        self.sessions.borrow().get(&id).cloned()
    }

    /// Forgets a connection that has ended (every way a session ends comes here).
    pub fn close_session(&self, session: &Rc<Session>) {
        self.handler.on_close(self, session);
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
                .store(u64::from(!self.home.is_idle()), Relaxed);
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
        // 10 ms with the reference server's (300 ms / 200 ms), whose test suites expect three
        // ping rounds to fit in the 1 s connect timeout.
        let tick = Duration::from_millis(eio.ping_interval.min(eio.ping_timeout) / 20)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
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
                let connect_late = t.connect_deadline.is_some_and(|d| now >= d);
                if connect_late || t.pong_deadline.is_some_and(|d| now >= d) {
                    s.span.in_scope(|| {
                        tracing::debug!(
                            timer = if connect_late { "connect" } else { "ping" },
                            "timed out"
                        )
                    });
                    self.end_session(&s, CloseReason::Timeout);
                    continue;
                }
                if t.pong_deadline.is_none() && now >= t.next_ping {
                    t.pong_deadline = Some(now + Duration::from_millis(eio.ping_timeout));
                    s.set_timers(t);
                    s.push(ping.clone(), false);
                }
            }
        }
    }
}
