//! One client connection as its shard sees it: identity, rooms, rate limit, timers and
//! the bounded outbound queue that keeps a slow client from slowing anyone else.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;

use crate::auth::Identity;
use crate::transport::conn::{CloseReason, Outbound, Queued, Timers, Transport};

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

/// One connection's state on its shard.
pub struct Session {
    pub id: u64,
    /// The Engine.IO session id.
    pub sid: String,
    /// The WebSocket's descriptor (for `cut`), while the session has one.
    pub fd: Cell<Option<RawFd>>,
    pub transport: Cell<Transport>,
    /// A polling GET is waiting for packets (a second one at once is refused).
    pub poll_get: Cell<bool>,
    /// A polling POST is being handled (a second one at once is refused).
    pub poll_post: Cell<bool>,
    /// Socket.IO parser state that spans packets (binary attachments).
    pub parser: RefCell<crate::chat::handler::ConnState>,
    pub out: RefCell<Outbound>,
    /// Set once the Socket.IO CONNECT succeeded.
    pub user: RefCell<Option<(User, Rc<Identity>)>>,
    /// An authenticated CONNECT waiting for its user's owner shard to count it
    /// (`limits.max_connections_per_user`).
    pub pending_user: RefCell<Option<(User, Rc<Identity>)>>,
    /// Socket.IO packets that arrived while the CONNECT was being admitted (a client may
    /// send its first events right behind the CONNECT): handled in order once it is, dropped
    /// if it is refused. At most [`MAX_HELD_PACKETS`].
    pub held: RefCell<Vec<Vec<u8>>>,
    /// The user's owner shard counted this connection: release it exactly once.
    pub counted: Cell<bool>,
    /// This connection's tracing span (`conn{shard, sid, user}`): every log line about the
    /// connection is emitted inside it, by its own tasks or with `in_scope`.
    pub span: tracing::Span,
    /// Rooms this connection is a member of (delivery reaches it).
    pub joined: RefCell<HashSet<Arc<str>>>,
    /// Rooms asked for and not yet confirmed by their home shard.
    pub joining: RefCell<HashSet<Arc<str>>>,
    pub bucket: Cell<TokenBucket>,
    pub timers: Cell<Timers>,
    /// True only while the WebSocket reader handles a client frame: the one moment a
    /// connection may move to another shard (see `transport::follow`).
    pub movable: Cell<bool>,
    /// Set by the connection's first join: only that one may move it (a client joining
    /// and leaving rooms in a loop must not bounce it between shards).
    pub joined_once: Cell<bool>,
    /// A first join deferred because the connection moves to the room's home shard; the
    /// reader takes it and hands the connection over.
    pub deferred_join: RefCell<Option<Box<crate::transport::follow::DeferredJoin>>>,
}

impl Session {
    /// A new session with an empty queue (and no span: see [`Session::with_span`]).
    pub fn new(
        id: u64,
        sid: String,
        transport: Transport,
        limits: &crate::config::LimitsConfig,
        timers: Timers,
        now: Instant,
    ) -> Session {
        Session {
            id,
            sid,
            fd: Cell::new(None),
            transport: Cell::new(transport),
            poll_get: Cell::new(false),
            poll_post: Cell::new(false),
            parser: RefCell::new(Default::default()),
            out: RefCell::new(Outbound::new(
                limits.outbound_queue,
                limits.outbound_queue_bytes,
            )),
            user: RefCell::new(None),
            pending_user: RefCell::new(None),
            held: RefCell::new(Vec::new()),
            counted: Cell::new(false),
            span: tracing::Span::none(),
            joined: RefCell::new(HashSet::new()),
            joining: RefCell::new(HashSet::new()),
            bucket: Cell::new(TokenBucket::new(limits.send_rate, limits.send_burst, now)),
            timers: Cell::new(timers),
            movable: Cell::new(false),
            joined_once: Cell::new(false),
            deferred_join: RefCell::new(None),
        }
    }

    /// Sets the session's tracing span.
    pub fn with_span(mut self, span: tracing::Span) -> Session {
        self.span = span;
        self
    }

    /// Queues a frame; on overflow the connection is closed as a slow consumer.
    pub fn push(&self, frame: Bytes, volatile: bool) -> Queued {
        let result = self.out.borrow_mut().push(frame, volatile);
        if result == Queued::Overflow {
            self.close(CloseReason::SlowConsumer);
        }
        result
    }

    /// Starts closing: a graceful reason lets the writer flush what is queued plus a close
    /// frame; a slow consumer is cut at once.
    pub fn close(&self, reason: CloseReason) {
        if !self.out.borrow_mut().start_closing(reason) {
            return;
        }
        let mut t = self.timers.get();
        t.close_deadline = Some(Instant::now() + std::time::Duration::from_secs(5));
        self.timers.set(t);
        if matches!(reason, CloseReason::SlowConsumer | CloseReason::Gone) {
            self.cut();
        }
    }

    /// Shuts the WebSocket down both ways: a blocked read or write returns at once.
    /// (A polling session has no socket of its own; its next GET ends it.)
    pub fn cut(&self) {
        if let Some(fd) = self.fd.get() {
            // SAFETY: shutdown on a descriptor we own; it stays open until the stream is dropped.
            unsafe {
                libc::shutdown(fd, libc::SHUT_RDWR);
            }
        }
    }

    /// Wakes whoever waits on the queue (the WebSocket writer or a polling GET).
    pub fn wake(&self) {
        self.out.borrow_mut().wake();
    }

    /// Whether the connection is closing.
    pub fn is_closing(&self) -> bool {
        self.out.borrow().closing().is_some()
    }

    /// Stops the writer after its write in progress: the connection is moving.
    pub fn stop_writer(&self) {
        self.out.borrow_mut().start_moving();
    }

    /// Resolves when frames are queued or the connection is closing or moving (the
    /// writer's wait).
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.out.borrow_mut().poll_ready(cx)
    }

    /// The user, once connected.
    pub fn user(&self) -> Option<User> {
        self.user.borrow().as_ref().map(|(u, _)| u.clone())
    }

    /// This connection's address.
    pub fn conn_ref(&self, shard: usize) -> ConnRef {
        ConnRef { shard, id: self.id }
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
