//! One client connection as its shard sees it: identity, rooms, rate limit, timers and
//! the bounded outbound queue that keeps a slow client from slowing anyone else.

use std::cell::{Cell, RefCell};
use std::collections::{HashSet, VecDeque};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;

use crate::auth::Identity;

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

/// Why the server is closing a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed, or the socket failed: nothing more to send.
    Gone,
    /// The outbound queue overflowed: drop everything and cut the socket.
    SlowConsumer,
    /// The client broke the protocol; send a close frame with this code.
    Protocol(u16),
    /// A timer ran out (ping, connect).
    Timeout,
    /// The server is shutting down; clients should reconnect elsewhere.
    Restart,
}

/// What happened to a frame offered to the outbound queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    Yes,
    /// A volatile frame (typing) dropped because the queue is half full.
    Dropped,
    /// The queue overflowed: the connection is being closed.
    Overflow,
    /// The connection is already closing.
    Closed,
}

/// Frames waiting to be written, bounded by count and bytes.
pub struct Outbound {
    frames: VecDeque<Bytes>,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
    waker: Option<Waker>,
    closing: Option<CloseReason>,
    /// Set when the connection moves to another shard: the writer stops after the write
    /// in progress and leaves the rest of the queue to travel with the session.
    moving: bool,
}

impl Outbound {
    fn new(max_frames: usize, max_bytes: usize) -> Outbound {
        Outbound {
            frames: VecDeque::new(),
            bytes: 0,
            max_frames,
            max_bytes,
            waker: None,
            closing: None,
            moving: false,
        }
    }

    fn push(&mut self, frame: Bytes, volatile: bool) -> Queued {
        if self.closing.is_some() {
            return Queued::Closed;
        }
        let len = frame.len();
        if volatile
            && (self.frames.len() * 2 >= self.max_frames || (self.bytes + len) * 2 > self.max_bytes)
        {
            return Queued::Dropped;
        }
        if self.frames.len() >= self.max_frames || self.bytes + len > self.max_bytes {
            return Queued::Overflow;
        }
        self.frames.push_back(frame);
        self.bytes += len;
        if let Some(w) = self.waker.take() {
            w.wake();
        }
        Queued::Yes
    }

    /// Takes the oldest queued frame.
    pub fn pop(&mut self) -> Option<Bytes> {
        let f = self.frames.pop_front()?;
        self.bytes -= f.len();
        Some(f)
    }

    /// Moves queued frames (up to about `max` bytes, at least one) into `out`.
    pub fn drain_into(&mut self, out: &mut Vec<u8>, max: usize) {
        while let Some(f) = self.frames.front() {
            if !out.is_empty() && out.len() + f.len() > max {
                break;
            }
            out.extend_from_slice(f);
            self.bytes -= f.len();
            self.frames.pop_front();
        }
        if self.frames.capacity() > 64 && self.frames.is_empty() {
            self.frames.shrink_to(8);
        }
    }

    /// Queues the final close frame past the bounds (it must always fit).
    fn push_close(&mut self, code: u16) {
        let frame = crate::transport::websocket::close_frame(code);
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    /// Whether frames are waiting.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The close reason, once closing.
    pub fn closing(&self) -> Option<CloseReason> {
        self.closing
    }

    /// Whether the connection is moving to another shard (the writer must stop).
    pub fn is_moving(&self) -> bool {
        self.moving
    }

    /// Takes every queued frame, oldest first (they travel with a moving connection).
    pub fn take_frames(&mut self) -> VecDeque<Bytes> {
        self.bytes = 0;
        std::mem::take(&mut self.frames)
    }

    /// Queues frames that came with a moved connection, before anything else.
    pub fn restore_frames(&mut self, frames: VecDeque<Bytes>) {
        self.bytes = frames.iter().map(Bytes::len).sum();
        self.frames = frames;
    }
}

/// Engine.IO / Socket.IO timers, checked by the shard's sweeper.
#[derive(Debug, Clone, Copy)]
pub struct Timers {
    pub next_ping: Instant,
    pub pong_deadline: Option<Instant>,
    /// Set until the Socket.IO CONNECT succeeds.
    pub connect_deadline: Option<Instant>,
    /// Set once closing: past it the socket is cut even if the writer is stuck.
    pub close_deadline: Option<Instant>,
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

/// How a session currently reaches its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// HTTP long-polling: GETs take the queued packets, POSTs bring the client's.
    Polling,
    /// A WebSocket is being probed (`2probe` seen); polling is paused until `5`.
    Upgrading,
    WebSocket,
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
    /// Conformance mode only: a raw Engine.IO echo session (`/engine.io/`).
    pub raw_echo: Cell<bool>,
    /// Conformance mode only: the echo server's per-connection state.
    pub echo: RefCell<crate::conformance::EchoState>,
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
            raw_echo: Cell::new(false),
            echo: RefCell::new(Default::default()),
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
        let mut out = self.out.borrow_mut();
        if out.closing.is_some() {
            return;
        }
        out.closing = Some(reason);
        let mut t = self.timers.get();
        t.close_deadline = Some(Instant::now() + std::time::Duration::from_secs(5));
        self.timers.set(t);
        match reason {
            CloseReason::SlowConsumer | CloseReason::Gone => {
                out.frames.clear();
                out.bytes = 0;
                self.cut();
            }
            CloseReason::Protocol(code) => out.push_close(code),
            CloseReason::Timeout => out.push_close(1000),
            CloseReason::Restart => out.push_close(1012),
        }
        if let Some(w) = out.waker.take() {
            w.wake();
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
        if let Some(w) = self.out.borrow_mut().waker.take() {
            w.wake();
        }
    }

    /// Whether the connection is closing.
    pub fn is_closing(&self) -> bool {
        self.out.borrow().closing.is_some()
    }

    /// Stops the writer after its write in progress: the connection is moving.
    pub fn stop_writer(&self) {
        let mut out = self.out.borrow_mut();
        out.moving = true;
        if let Some(w) = out.waker.take() {
            w.wake();
        }
    }

    /// Resolves when frames are queued or the connection is closing or moving (the
    /// writer's wait).
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut out = self.out.borrow_mut();
        if !out.frames.is_empty() || out.closing.is_some() || out.moving {
            Poll::Ready(())
        } else {
            out.waker = Some(cx.waker().clone());
            Poll::Pending
        }
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

    fn queue() -> Outbound {
        Outbound::new(8, 1 << 20)
    }

    #[test]
    fn typing_is_dropped_before_messages_overflow() {
        let mut q = queue();
        for _ in 0..4 {
            assert_eq!(q.push(Bytes::from_static(b"m"), false), Queued::Yes);
        }
        assert_eq!(q.push(Bytes::from_static(b"t"), true), Queued::Dropped);
        for _ in 0..4 {
            assert_eq!(q.push(Bytes::from_static(b"m"), false), Queued::Yes);
        }
        assert_eq!(q.push(Bytes::from_static(b"m"), false), Queued::Overflow);
        let mut out = Vec::new();
        q.drain_into(&mut out, 3);
        assert_eq!(out, b"mmm");
        assert_eq!(q.bytes, 5);
    }

    #[test]
    fn byte_bound_counts_too() {
        let mut q = Outbound::new(100, 10);
        assert_eq!(q.push(Bytes::from(vec![0; 8]), false), Queued::Yes);
        assert_eq!(q.push(Bytes::from(vec![0; 3]), false), Queued::Overflow);
    }

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
