//! A connection as the chat layer sees it: who it is once connected, the rooms it is in
//! or joining, its send rate, the packets held while its CONNECT is being admitted, and a
//! first join put off while the connection moves to the room's home shard. The transport's
//! [`Session`] underneath carries its queue, timers and socket.

use std::cell::{Cell, RefCell, RefMut};
use std::collections::{HashSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use super::follow::DeferredJoin;
use super::handler::ConnState;
use crate::auth::Identity;
use crate::config::LimitsConfig;
use crate::transport::budget::{Charge, Queue};
use crate::transport::session::Session;

/// Most packets held while a CONNECT is being admitted; one more closes the connection
/// (a client that floods before it is connected).
pub const MAX_HELD_PACKETS: usize = 64;
/// A connection's address across shards: its shard and its id there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    pub shard: usize,
    pub id: u64,
}

/// A user as rooms see it (shared cheaply across shards).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: Arc<str>,
    pub name: Option<Arc<str>>,
}

/// A token bucket: `rate` tokens per second, at most `burst`.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: burst,
            rate,
            burst,
            at: now,
        }
    }

    /// Takes a token if one is there.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A connected user and the identity it proved (its rooms, its name).
pub type Connected = (User, Rc<Identity>);

/// One connection's chat state on its shard.
pub struct Member {
    session: Rc<Session>,
    /// Socket.IO parser state that spans packets (binary attachments).
    parser: RefCell<ConnState>,
    /// Set once the Socket.IO CONNECT succeeded.
    user: RefCell<Option<Connected>>,
    /// An authenticated CONNECT waiting for its user's owner shard to count it
    /// (`limits.max_connections_per_user`).
    pending_user: RefCell<Option<Connected>>,
    /// Socket.IO packets that arrived while the CONNECT was being admitted, or while a
    /// hook that keeps the connection's order was pending: handled in order once it is
    /// answered, dropped if a CONNECT is refused. At most [`MAX_HELD_PACKETS`].
    held: RefCell<VecDeque<(Vec<u8>, Charge)>>,
    /// A connect, join or publish hook is pending: later packets wait behind it.
    waiting: Cell<bool>,
    /// Hook calls under way for this connection (it does not move to another shard then).
    hook_calls: Cell<u32>,
    /// The user's owner shard counted this connection: release it exactly once.
    counted: Cell<bool>,
    /// Rooms this connection is a member of (delivery reaches it).
    joined: RefCell<HashSet<Arc<str>>>,
    /// Rooms asked for and not yet confirmed by their home shard.
    joining: RefCell<HashSet<Arc<str>>>,
    bucket: Cell<TokenBucket>,
    /// Set by the connection's first join: only that one may move it (a client joining
    /// and leaving rooms in a loop must not bounce it between shards).
    joined_once: Cell<bool>,
    /// A first join deferred because the connection moves to the room's home shard; the
    /// reader stops and the connection is handed over with it.
    deferred_join: RefCell<Option<Box<DeferredJoin>>>,
}

impl Member {
    /// A member for a new session: not connected, in no room, a full send bucket.
    pub fn new(session: Rc<Session>, limits: &LimitsConfig, now: Instant) -> Member {
        Member::with_bucket(
            session,
            TokenBucket::new(limits.send_rate, limits.send_burst, now),
        )
    }

    /// A member whose send bucket came with it (a connection that moved here).
    pub fn with_bucket(session: Rc<Session>, bucket: TokenBucket) -> Member {
        Member {
            session,
            parser: RefCell::new(ConnState::default()),
            user: RefCell::new(None),
            pending_user: RefCell::new(None),
            held: RefCell::new(VecDeque::new()),
            waiting: Cell::new(false),
            hook_calls: Cell::new(0),
            counted: Cell::new(false),
            joined: RefCell::new(HashSet::new()),
            joining: RefCell::new(HashSet::new()),
            bucket: Cell::new(bucket),
            joined_once: Cell::new(false),
            deferred_join: RefCell::new(None),
        }
    }

    /// The transport session underneath.
    pub fn session(&self) -> &Rc<Session> {
        &self.session
    }

    /// This connection's address across shards.
    pub fn conn_ref(&self, shard: usize) -> ConnRef {
        ConnRef {
            shard,
            id: self.session.id,
        }
    }

    /// The Socket.IO parser state.
    pub fn parser(&self) -> RefMut<'_, ConnState> {
        self.parser.borrow_mut()
    }

    /// The user, once connected.
    pub fn user(&self) -> Option<User> {
        self.user.borrow().as_ref().map(|(u, _)| u.clone())
    }

    /// The user and the identity it proved, once connected.
    pub fn connected(&self) -> Option<Connected> {
        self.user.borrow().clone()
    }

    /// Whether the CONNECT succeeded.
    pub fn is_connected(&self) -> bool {
        self.user.borrow().is_some()
    }

    /// Takes the user and identity away (they travel with a moving connection).
    pub fn take_connected(&self) -> Option<Connected> {
        self.user.borrow_mut().take()
    }

    /// The CONNECT succeeded as `user` (`None`: the client disconnected).
    pub fn set_connected(&self, user: Option<Connected>) {
        *self.user.borrow_mut() = user;
    }

    /// A CONNECT waits for its user's owner shard to count it.
    pub fn set_pending(&self, pending: Connected) {
        *self.pending_user.borrow_mut() = Some(pending);
    }

    /// Whether a CONNECT waits for its user's count.
    pub fn is_pending(&self) -> bool {
        self.pending_user.borrow().is_some()
    }

    /// The CONNECT that waited for its user's count, if any.
    pub fn take_pending(&self) -> Option<Connected> {
        self.pending_user.borrow_mut().take()
    }

    /// Keeps a packet that came behind a CONNECT being admitted or a pending hook; the
    /// packet back when [`MAX_HELD_PACKETS`] are held already.
    /// Its bytes count in the shard's memory budget while held.
    pub fn hold(&self, packet: Vec<u8>) -> Result<(), Vec<u8>> {
        let mut held = self.held.borrow_mut();
        if held.len() >= MAX_HELD_PACKETS {
            return Err(packet);
        }
        let charge = self.session.budget().charge(Queue::Held, packet.len());
        held.push_back((packet, charge));
        Ok(())
    }

    /// The packets held while the CONNECT was admitted, oldest first.
    pub fn take_held(&self) -> Vec<Vec<u8>> {
        let held = std::mem::take(&mut *self.held.borrow_mut());
        held.into_iter().map(|(packet, _)| packet).collect()
    }

    /// The oldest held packet, if any.
    pub fn next_held(&self) -> Option<Vec<u8>> {
        self.held.borrow_mut().pop_front().map(|(packet, _)| packet)
    }

    /// Whether later packets wait behind a pending hook.
    pub fn is_waiting(&self) -> bool {
        self.waiting.get()
    }

    /// A hook call starts (`waits`: one that keeps the connection's order) or ends.
    pub fn hook_call(&self, started: bool, waits: bool) {
        let n = self.hook_calls.get();
        self.hook_calls
            .set(if started { n + 1 } else { n.saturating_sub(1) });
        if waits {
            self.waiting.set(started);
        }
    }

    /// How many hook calls for this connection are under way.
    pub fn hook_calls(&self) -> u32 {
        self.hook_calls.get()
    }

    /// Whether hook calls for this connection are under way.
    pub fn in_hook_call(&self) -> bool {
        self.hook_calls.get() > 0
    }

    /// Whether packets are held.
    pub fn has_held(&self) -> bool {
        !self.held.borrow().is_empty()
    }

    /// Records whether the user's owner shard counts this connection.
    pub fn set_counted(&self, counted: bool) {
        self.counted.set(counted);
    }

    /// Whether the owner shard counted this connection; the count is then handed to the
    /// caller (to release, or to carry along), so it is released exactly once.
    pub fn take_counted(&self) -> bool {
        self.counted.replace(false)
    }

    /// Whether the connection is a member of `room`.
    pub fn is_in(&self, room: &str) -> bool {
        self.joined.borrow().contains(room)
    }

    /// Whether a join of `room` is on its way to the room's home.
    pub fn is_joining(&self, room: &str) -> bool {
        self.joining.borrow().contains(room)
    }

    /// Rooms the connection is in or joining.
    pub fn room_count(&self) -> usize {
        self.joined.borrow().len() + self.joining.borrow().len()
    }

    /// A join of `room` is on its way to the room's home.
    pub fn start_joining(&self, room: Arc<str>) {
        self.joining.borrow_mut().insert(room);
    }

    /// The home answered a join: true if the connection was still joining `room`, which
    /// it is now in when `admitted`.
    pub fn finish_joining(&self, room: &Arc<str>, admitted: bool) -> bool {
        let was_joining = self.joining.borrow_mut().remove(room);
        if was_joining && admitted {
            self.joined.borrow_mut().insert(room.clone());
        }
        was_joining
    }

    /// Leaves `room`: whether the connection was in it, and whether it was joining it.
    pub fn leave(&self, room: &str) -> (bool, bool) {
        (
            self.joined.borrow_mut().remove(room),
            self.joining.borrow_mut().remove(room),
        )
    }

    /// Leaves every room: the rooms it was in, and those it was joining.
    pub fn leave_all(&self) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
        (
            self.joined.borrow_mut().drain().collect(),
            self.joining.borrow_mut().drain().collect(),
        )
    }

    /// Takes a send token if the connection's rate allows one now.
    pub fn take_token(&self, now: Instant) -> bool {
        let mut bucket = self.bucket.get();
        let ok = bucket.take(now);
        self.bucket.set(bucket);
        ok
    }

    /// The send bucket (it travels with a moving connection).
    pub fn bucket(&self) -> TokenBucket {
        self.bucket.get()
    }

    /// True for the connection's first join only (which alone may move it).
    pub fn first_join(&self) -> bool {
        !self.joined_once.replace(true)
    }

    /// Puts off a first join while the connection moves to the room's home shard.
    pub fn defer_join(&self, join: DeferredJoin) {
        *self.deferred_join.borrow_mut() = Some(Box::new(join));
    }

    /// The join put off for a move, if any.
    pub fn take_deferred_join(&self) -> Option<Box<DeferredJoin>> {
        self.deferred_join.borrow_mut().take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_at_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 2.0, t0);
        assert!(b.take(t0));
        assert!(b.take(t0));
        assert!(!b.take(t0));
        assert!(b.take(t0 + std::time::Duration::from_millis(100)));
        assert!(!b.take(t0 + std::time::Duration::from_millis(100)));
    }
}
