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

use crate::auth::Authenticator;
use crate::chat::home::Home;
use crate::chat::mesh::{home_of, HomeCmd, MemberMsg, ShardMsg, UserCmd};
use crate::chat::session::{CloseReason, ConnRef, Queued, Session, Timers, Transport};
use crate::chat::users::UserCounts;
use crate::config::Config;
use crate::metrics::{Metrics, ShardMetrics};
use crate::store::Store;
use crate::transport::websocket::text_frame;

/// What every shard shares read-only (behind one `Arc`).
pub struct Context {
    pub config: Config,
    pub auth: Authenticator,
    pub metrics: Metrics,
    /// Random per process: keeps message ids unique across hosts.
    pub id_prefix: u32,
    /// Set by the first SIGTERM/SIGINT: shards stop accepting, finish what is in
    /// flight, close connections with 1012 and stop.
    pub draining: std::sync::atomic::AtomicBool,
    /// New sessions per source address (`limits.connect_rate_per_ip`), for every shard.
    pub connect_limiter: crate::transport::connect_limit::ConnectLimiter,
}

/// One shard's state. Lives in an `Rc` on its own thread.
pub struct Shard {
    pub id: usize,
    pub count: usize,
    pub ctx: Arc<Context>,
    pub store: Store,
    pub home: Home,
    /// Connection counts of the users whose owner this shard is.
    pub users: UserCounts,
    sessions: RefCell<HashMap<u64, Rc<Session>>>,
    /// Engine.IO sid → session id, for polling requests and upgrades.
    by_sid: RefCell<HashMap<String, u64>>,
    /// This shard's members of each room (the delivery lists).
    local_rooms: RefCell<HashMap<Arc<str>, Vec<Rc<Session>>>>,
    /// Per peer shard: the queue its outbox task drains into the mesh (`None` for self).
    outboxes: Vec<Option<LocalSender<ShardMsg>>>,
    next_conn: Cell<u64>,
    /// This shard's own `Rc`, for tasks it spawns while handling a message.
    me: Weak<Shard>,
}

impl Shard {
    /// A shard with no connections yet.
    pub fn new(
        id: usize,
        count: usize,
        ctx: Arc<Context>,
        store: Store,
        home: Home,
        outboxes: Vec<Option<LocalSender<ShardMsg>>>,
        me: Weak<Shard>,
    ) -> Shard {
        Shard {
            id,
            count,
            ctx,
            store,
            home,
            users: UserCounts::default(),
            sessions: RefCell::new(HashMap::new()),
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
            // The outbox is unbounded and lives as long as the shard.
            let _ = outbox.try_send(msg);
        }
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
    pub fn release_user(&self, session: &Session) {
        if !session.counted.replace(false) {
            return;
        }
        let user = session.user.borrow().as_ref().map(|(u, _)| u.id.clone());
        if let Some(user) = user {
            self.to_user_owner(UserCmd::Release { user });
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
                for s in members {
                    if except == Some(s.conn_ref(self.id)) {
                        continue;
                    }
                    match s.push(frame.clone(), volatile) {
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
                let session = self.sessions.borrow().get(&conn).cloned();
                let pending = session
                    .as_ref()
                    .and_then(|s| s.pending_user.borrow_mut().take());
                match (session, pending) {
                    (Some(session), Some(pending)) if pending.0.id == user => {
                        crate::chat::handler::on_admitted(self, &session, pending, admitted);
                    }
                    _ => {
                        // The connection ended (or gave up) while the count was on the way.
                        if admitted {
                            self.to_user_owner(UserCmd::Release { user });
                        }
                    }
                }
            }
            MemberMsg::Adopt { fd, handoff } => match self.me.upgrade() {
                Some(shard) => {
                    glommio::spawn_local(crate::transport::connection::adopt(shard, fd, *handoff))
                        .detach();
                }
                None => {
                    // SAFETY: the descriptor was handed to us; nobody else closes it.
                    unsafe { libc::close(fd) };
                }
            },
            MemberMsg::Moved(moved) => match self.me.upgrade() {
                Some(shard) => {
                    glommio::spawn_local(crate::transport::follow::adopt(shard, moved)).detach();
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
                let session = self.sessions.borrow().get(&conn).cloned();
                let Some(session) = session else {
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
                let was_joining = session.joining.borrow_mut().remove(&room);
                if admitted && was_joining {
                    session.joined.borrow_mut().insert(room.clone());
                    self.local_rooms
                        .borrow_mut()
                        .entry(room)
                        .or_default()
                        .push(session.clone());
                }
                if !frame.is_empty() {
                    session.push(frame, false);
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
        let session = self.register(crate::ids::new_sid(self.id), transport, timers, now);
        ShardMetrics::inc(&self.stats().connections_total);
        session
            .span
            .in_scope(|| tracing::debug!(?transport, "session opened"));
        session
    }

    /// A session for a WebSocket that moved here from another shard, keeping its sid
    /// and timers (`transport::follow`); the caller restores the rest.
    pub fn open_moved_session(&self, sid: String, timers: Timers) -> Rc<Session> {
        self.register(sid, Transport::WebSocket, timers, Instant::now())
    }

    /// Adds a session to this shard's maps and counts it open.
    fn register(
        &self,
        sid: String,
        transport: Transport,
        timers: Timers,
        now: Instant,
    ) -> Rc<Session> {
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        let span = tracing::info_span!(
            parent: None,
            "conn",
            shard = self.id,
            sid = %sid,
            user = tracing::field::Empty,
        );
        let session = Rc::new(
            Session::new(id, sid, transport, &self.ctx.config.limits, timers, now).with_span(span),
        );
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
    pub fn leave_all(&self, session: &Rc<Session>) {
        let conn = session.conn_ref(self.id);
        let joined: Vec<Arc<str>> = session.joined.borrow_mut().drain().collect();
        let joining: Vec<Arc<str>> = session.joining.borrow_mut().drain().collect();
        for room in &joined {
            self.remove_local_member(room, session);
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
    pub fn remove_local_member(&self, room: &Arc<str>, session: &Rc<Session>) {
        let mut rooms = self.local_rooms.borrow_mut();
        if let Some(members) = rooms.get_mut(room) {
            if let Some(i) = members.iter().position(|s| Rc::ptr_eq(s, session)) {
                members.swap_remove(i);
            }
            if members.is_empty() {
                rooms.remove(room);
            }
        }
    }

    /// The session with this Engine.IO sid, if this shard has it.
    pub fn session_by_sid(&self, sid: &str) -> Option<Rc<Session>> {
        let id = *self.by_sid.borrow().get(sid)?;
        self.sessions.borrow().get(&id).cloned()
    }

    /// Forgets a connection that has ended (every way a session ends comes here).
    pub fn close_session(&self, session: &Rc<Session>) {
        self.leave_all(session);
        self.release_user(session);
        if self.detach_session(session) {
            let reason = session.out.borrow().closing();
            session
                .span
                .in_scope(|| tracing::debug!(?reason, "session closed"));
        }
    }

    /// Closes a session for `reason`. A polling session, which has no socket task to
    /// notice, is forgotten at once (later requests for its sid get "Session ID unknown").
    pub fn end_session(&self, session: &Rc<Session>, reason: CloseReason) {
        session.close(reason);
        if session.transport.get() != Transport::WebSocket {
            self.close_session(session);
        }
    }

    /// Ends a session whose Socket.IO CONNECT or pong is overdue at `now` (with
    /// `CloseReason::Timeout`); true if it did. The sweeper checks every session each
    /// tick; a polling request checks its session first, so that it never finds alive a
    /// session whose deadline passed since the last tick.
    pub fn end_if_overdue(&self, session: &Rc<Session>, now: Instant) -> bool {
        let t = session.timers.get();
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
                let mut t = s.timers.get();
                if let Some(deadline) = t.close_deadline {
                    if now >= deadline {
                        s.cut();
                        if s.transport.get() != Transport::WebSocket {
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
                    s.timers.set(t);
                    s.push(ping.clone(), false);
                }
            }
        }
    }
}
