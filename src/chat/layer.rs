//! The chat layer of one shard: its members (each session's chat state), the rooms they
//! are in here (the delivery lists), the connection counts of the users this shard owns,
//! and the rooms whose home it is. It reaches the other shards only through [`Mesh`].

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::emits::EmitFrame;
use super::home::{Home, Mesh};
use super::member::{ConnRef, Member};
use super::mesh::{home_of, HomeCmd, MemberMsg, ShardMsg, UserCmd};
use super::users::UserCounts;
use crate::context::Context;
use crate::hooks::Hooks;
use crate::metrics::ShardMetrics;
use crate::store::Store;
use crate::transport::budget::{Pressure, ShardBudget};
use crate::transport::conn::{Queued, Timers};
use crate::transport::host::Host;
use crate::transport::session::Session;

/// The shard as chat's handler and a moving connection see it: the transport's host, plus
/// this shard's chat state and the session registry operations a move needs.
pub trait ChatHost: Host {
    /// This shard's chat state.
    fn chat(&self) -> &Rc<Chat>;

    /// Takes a session out of the shard's registry without ending it (it moves away);
    /// true if it was there.
    fn detach_session(&self, session: &Session) -> bool;

    /// A session for a WebSocket that moved here, keeping its sid and timers.
    fn open_moved_session(&self, sid: String, timers: Timers) -> Rc<Session>;
}

/// One shard's chat state. Lives in an `Rc` on its shard's thread.
pub struct Chat {
    pub id: usize,
    pub count: usize,
    pub ctx: Arc<Context>,
    pub store: Store,
    /// The rooms whose home this shard is.
    pub home: Rc<Home>,
    /// Connection counts of the users whose owner this shard is.
    pub users: UserCounts,
    /// The chat state of each session that has one.
    members: RefCell<HashMap<u64, Rc<Member>>>,
    /// This shard's members of each room (the delivery lists).
    local_rooms: RefCell<HashMap<Arc<str>, Vec<Rc<Member>>>>,
    /// The way to the other shards (the shard that owns this chat state).
    mesh: Weak<dyn Mesh>,
    /// This shard's client of the application's backend, when a hook is on.
    pub hooks: Option<Rc<Hooks>>,
    /// This shard's part of `limits.memory_budget` (its home's too): what its queues hold.
    pub budget: Rc<ShardBudget>,
    /// This chat state itself, for the tasks that finish a hook call.
    me: Weak<Chat>,
}

impl Chat {
    /// The chat state of shard `id` of `count`, with no members yet.
    pub fn new(
        (id, count): (usize, usize),
        ctx: Arc<Context>,
        store: Store,
        home: Rc<Home>,
        mesh: Weak<dyn Mesh>,
        hooks: Option<Rc<Hooks>>,
    ) -> Rc<Chat> {
        let total = ctx.config.limits.memory_budget;
        ctx.metrics
            .memory_budget
            .store(total as u64, std::sync::atomic::Ordering::Relaxed);
        let budget = home.budget().clone();
        Rc::new_cyclic(|me| Chat {
            id,
            count,
            ctx,
            store,
            home,
            users: UserCounts::default(),
            members: RefCell::new(HashMap::new()),
            local_rooms: RefCell::new(HashMap::new()),
            mesh,
            hooks,
            budget,
            me: me.clone(),
        })
    }

    /// This chat state, shared (for a task that outlives the caller's borrow).
    pub fn shared(&self) -> Option<Rc<Chat>> {
        self.me.upgrade()
    }

    /// This shard's counters.
    pub fn stats(&self) -> &ShardMetrics {
        &self.ctx.metrics.shards[self.id]
    }

    /// Sends a message to a shard (to this one, handled in place, in order).
    pub fn send(&self, to: usize, msg: ShardMsg) {
        if let Some(mesh) = self.mesh.upgrade() {
            mesh.send(to, msg);
        }
    }

    /// Whether the queue toward shard `to` is full for new work (`limits.mesh_outbox`):
    /// a request a client starts is then refused rather than queued. The home's own
    /// queue counts when `to` is this shard.
    pub fn mesh_congested(&self, to: usize) -> bool {
        let congested = if to == self.id {
            self.home.queued() >= self.ctx.config.limits.mesh_outbox
        } else {
            self.mesh.upgrade().is_some_and(|mesh| mesh.congested(to))
        };
        if congested {
            ShardMetrics::inc(&self.stats().mesh_refusals);
        }
        congested
    }

    /// Whether new work toward the room whose home is `home` is refused for memory: this
    /// shard's queues, or the home's (where its members mostly are: they follow their
    /// room), are past their part of `limits.memory_budget`. Counted when refused.
    pub fn memory_pressured(&self, home: usize) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let pressured = self.budget.state() == Pressure::Pressured
            || (home != self.id
                && self.ctx.metrics.shards[home].memory_pressure.load(Relaxed) != 0);
        if pressured {
            ShardMetrics::inc(&self.stats().budget_refusals);
        }
        pressured
    }

    /// Sends a request to a room's home shard.
    pub fn to_home(&self, room: &str, cmd: HomeCmd) {
        self.send(home_of(room, self.count), ShardMsg::Home(cmd));
    }

    /// Sends a request to the shard that owns its user's connection count.
    pub fn to_user_owner(&self, cmd: UserCmd) {
        let (UserCmd::Acquire { user, .. } | UserCmd::Release { user }) = &cmd;
        let owner = home_of(user, self.count);
        self.send(owner, ShardMsg::Users(cmd));
    }

    /// A room event for this shard's members of `room`, encoded once (a full WebSocket
    /// frame): each member's queue gets the same bytes, but the sender's.
    fn deliver(
        &self,
        room: &Arc<str>,
        frame: &Bytes,
        except: Option<ConnRef>,
        volatile: bool,
        sent_at: Instant,
    ) {
        let rooms = self.local_rooms.borrow();
        let Some(members) = rooms.get(room) else {
            return;
        };
        let stats = self.stats();
        let mut delivered = 0u64;
        for m in members {
            if except != Some(m.conn_ref(self.id)) && self.queue_event(m, frame, volatile) {
                delivered += 1;
            }
        }
        stats
            .messages_out
            .fetch_add(delivered, std::sync::atomic::Ordering::Relaxed);
        stats.observe_fanout(sent_at.elapsed());
    }

    /// An emit from `@socket.io/redis-emitter`, queued once to each of this shard's
    /// connected members it is for: those in any of its rooms (every connected one when it
    /// names none), but those in any of its `except` rooms.
    pub fn deliver_emit(&self, emit: &EmitFrame) {
        let mut delivered = 0u64;
        let mut offer = |m: &Member| {
            if m.is_connected()
                && !emit.except.iter().any(|r| m.is_in(r))
                && self.queue_event(m, &emit.frame, emit.volatile)
            {
                delivered += 1;
            }
        };
        if emit.rooms.is_empty() {
            self.members.borrow().values().for_each(|m| offer(m));
        } else {
            let rooms = self.local_rooms.borrow();
            // A member of several target rooms gets the emit once.
            let mut seen = HashSet::new();
            for members in emit.rooms.iter().filter_map(|r| rooms.get(r.as_str())) {
                for m in members {
                    if emit.rooms.len() == 1 || seen.insert(m.session().id) {
                        offer(m);
                    }
                }
            }
        }
        self.stats()
            .emitter_frames
            .fetch_add(delivered, std::sync::atomic::Ordering::Relaxed);
    }

    /// Queues a room event's frame for `m`; true if it was queued. A volatile frame dropped
    /// from a half-full queue and a slow consumer's overflow are counted.
    #[inline]
    fn queue_event(&self, m: &Member, frame: &Bytes, volatile: bool) -> bool {
        let stats = self.stats();
        match m.session().push(frame.clone(), volatile) {
            Queued::Yes => return true,
            Queued::Dropped => ShardMetrics::inc(&stats.typing_dropped),
            Queued::Overflow => ShardMetrics::inc(&stats.slow_consumer_closes),
            Queued::Closed => {}
        }
        false
    }

    /// The home answered a join: if admitted, the member joins the delivery list; the ack
    /// goes out either way (none when the client asked for none).
    fn joined(&self, room: Arc<str>, conn: u64, frame: Bytes, admitted: bool) {
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
        if !frame.is_empty() && member.session().push(frame, false) == Queued::Overflow {
            ShardMetrics::inc(&self.stats().slow_consumer_closes);
        }
    }

    /// Handles a request about a user's connection count (this shard owns the user).
    pub fn handle_users(&self, cmd: UserCmd) {
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

    /// Handles a message for this shard's members (the transport's own, a socket handed
    /// over, are the shard's).
    pub fn handle_member(&self, msg: MemberMsg) {
        match msg {
            MemberMsg::Deliver {
                room,
                frame,
                except,
                volatile,
                sent_at,
            } => self.deliver(&room, &frame, except, volatile, sent_at),
            MemberMsg::Reply { conn, frame } => {
                if let Some(m) = self.member(conn) {
                    if m.session().push(frame, false) == Queued::Overflow {
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
                        super::handler::on_admitted(self, &member, pending, admitted);
                    }
                    _ => {
                        // The connection ended (or gave up) while the count was on the way.
                        if admitted {
                            self.to_user_owner(UserCmd::Release { user });
                        }
                    }
                }
            }
            // Sockets are the shard's: `Shard::handle` never passes them here.
            MemberMsg::Adopt { .. } | MemberMsg::Moved(_) => {}
            MemberMsg::Joined {
                room,
                conn,
                frame,
                admitted,
            } => self.joined(room, conn, frame, admitted),
        }
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
}
