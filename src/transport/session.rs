//! One Engine.IO session as the transport keeps it: its ids, how it reaches its client,
//! its socket while it has one, its timers and its bounded outbound queue. What the layer
//! above makes of the session (a chat member, an echo) it keeps itself, keyed by `id`.

use std::cell::{Cell, RefCell, RefMut};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::budget::ShardBudget;
use super::conn::{CloseReason, Outbound, Queued, Timers, Transport};
use super::handshake::Handshake;
use crate::config::LimitsConfig;

/// How long a closing session's writer may take to flush before its socket is cut.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// One Engine.IO session on its shard.
pub struct Session {
    /// The session's number on its shard (the upper layer's key for it).
    pub id: u64,
    /// The Engine.IO session id.
    pub sid: String,
    /// This session's tracing span (`conn{shard, sid, user}`): every log line about the
    /// session is emitted inside it, by its own tasks or with `in_scope`.
    pub span: tracing::Span,
    /// The WebSocket's descriptor (for `cut`), while the session has one.
    fd: Cell<Option<RawFd>>,
    transport: Cell<Transport>,
    /// A polling GET is waiting for packets (a second one at once is refused).
    poll_get: Cell<bool>,
    /// A polling POST is being handled (a second one at once is refused).
    poll_post: Cell<bool>,
    out: RefCell<Outbound>,
    timers: Cell<Timers>,
    /// True only while the WebSocket reader handles a client frame: the one moment a
    /// connection may move to another shard.
    movable: Cell<bool>,
    /// The layer above was told that the session ended (`EngineHandler::on_close`).
    end_noticed: Cell<bool>,
    /// The opening request's headers for the connect hook (only when it is on).
    handshake: RefCell<Option<Box<Handshake>>>,
}

impl Session {
    /// A new session with an empty queue bounded by `limits.outbound_queue(_bytes)`,
    /// counted in its shard's `budget`.
    pub fn new(
        id: u64,
        sid: String,
        transport: Transport,
        (limits, budget): (&LimitsConfig, Rc<ShardBudget>),
        timers: Timers,
        span: tracing::Span,
    ) -> Session {
        Session {
            id,
            sid,
            span,
            fd: Cell::new(None),
            transport: Cell::new(transport),
            poll_get: Cell::new(false),
            poll_post: Cell::new(false),
            out: RefCell::new(Outbound::new(
                limits.outbound_queue,
                limits.outbound_queue_bytes,
                budget,
            )),
            timers: Cell::new(timers),
            movable: Cell::new(false),
            end_noticed: Cell::new(false),
            handshake: RefCell::new(None),
        }
    }

    /// Keeps what the connect hook may see of the request that opened the session.
    pub fn set_handshake(&self, handshake: Option<Box<Handshake>>) {
        *self.handshake.borrow_mut() = handshake;
    }

    /// What the connect hook may see of the opening request, if it was kept.
    pub fn handshake(&self) -> Option<Handshake> {
        self.handshake.borrow().as_deref().cloned()
    }

    /// Queues a frame; on overflow the session is closed as a slow consumer.
    pub fn push(&self, frame: Bytes, volatile: bool) -> Queued {
        let result = self.out.borrow_mut().push(frame, volatile);
        if result == Queued::Overflow {
            self.close(CloseReason::SlowConsumer);
        }
        result
    }

    /// Starts closing: a graceful reason lets the writer flush what is queued plus a close
    /// frame; a slow consumer, or a client that is gone, is cut at once.
    pub fn close(&self, reason: CloseReason) {
        if !self.out.borrow_mut().start_closing(reason) {
            return;
        }
        let mut t = self.timers.get();
        t.close_deadline = Some(Instant::now() + CLOSE_GRACE);
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

    /// Bytes waiting in the outbound queue (the shedder cuts the largest first).
    pub fn queued_bytes(&self) -> usize {
        self.out.borrow().bytes()
    }

    /// The shard's part of the memory budget, which this session's queue counts in (and
    /// what it holds besides: packets behind a hook, polling request bodies).
    pub fn budget(&self) -> Rc<ShardBudget> {
        self.out.borrow().budget().clone()
    }

    /// Whether the session is closing.
    pub fn is_closing(&self) -> bool {
        self.out.borrow().closing().is_some()
    }

    /// Why the session is closing, once it is.
    pub fn closing(&self) -> Option<CloseReason> {
        self.out.borrow().closing()
    }

    /// Stops the writer after its write in progress: the connection is moving.
    pub fn stop_writer(&self) {
        self.out.borrow_mut().start_moving();
    }

    /// Resolves when frames are queued or the session is closing or moving (the
    /// writer's wait).
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.out.borrow_mut().poll_ready(cx)
    }

    /// The outbound queue itself, for the writer, a polling GET and a moving connection.
    pub fn queue(&self) -> RefMut<'_, Outbound> {
        self.out.borrow_mut()
    }

    /// How the session reaches its client now.
    pub fn transport(&self) -> Transport {
        self.transport.get()
    }

    /// Records a change of transport (a probe, an upgrade, a failed probe).
    pub fn set_transport(&self, transport: Transport) {
        self.transport.set(transport);
    }

    /// Marks a polling GET as waiting; false if one already was.
    pub fn start_get(&self) -> bool {
        !self.poll_get.replace(true)
    }

    /// Whether a polling GET is waiting for packets.
    pub fn get_waiting(&self) -> bool {
        self.poll_get.get()
    }

    /// The polling GET has its answer.
    pub fn end_get(&self) {
        self.poll_get.set(false);
    }

    /// Marks a polling POST as being handled; false if one already was.
    pub fn start_post(&self) -> bool {
        !self.poll_post.replace(true)
    }

    /// The polling POST is handled.
    pub fn end_post(&self) {
        self.poll_post.set(false);
    }

    /// The session's timers.
    pub fn timers(&self) -> Timers {
        self.timers.get()
    }

    /// Replaces the session's timers.
    pub fn set_timers(&self, timers: Timers) {
        self.timers.set(timers);
    }

    /// The upper layer accepted the session (a Socket.IO CONNECT): no connect deadline.
    pub fn connected(&self) {
        let mut t = self.timers.get();
        t.connect_deadline = None;
        self.timers.set(t);
    }

    /// The WebSocket's descriptor, while the session has one.
    pub fn socket(&self) -> Option<RawFd> {
        self.fd.get()
    }

    /// The session now reaches its client through this WebSocket.
    pub fn attach_socket(&self, fd: RawFd) {
        self.fd.set(Some(fd));
    }

    /// The socket left with the session (it moved to another shard).
    pub fn detach_socket(&self) {
        self.fd.set(None);
    }

    /// Whether the reader is between reading a frame and handling the next: the one
    /// moment the connection may move to another shard.
    pub fn is_movable(&self) -> bool {
        self.movable.get()
    }

    /// True the first time only: whoever gets it tells the layer above that the session
    /// ended, so that `EngineHandler::on_close` runs once per session (a polling session
    /// the client closed is told at its close POST and forgotten later).
    pub fn take_end_notice(&self) -> bool {
        !self.end_noticed.replace(true)
    }

    /// Set by the reader around the handling of each frame.
    pub fn set_movable(&self, movable: bool) {
        self.movable.set(movable);
    }
}
