//! What the transport knows of a connection, whatever the layer above makes of it: how it
//! reaches its client ([`Transport`]), its Engine.IO timers, why it closes, what handling a
//! packet means for it ([`Flow`]), and the bounded outbound queue ([`Outbound`]) that keeps a
//! slow client from slowing anyone else.

use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;

use super::budget::{Queue, ShardBudget};

/// Whether a connection goes on after a packet: what the layer above answers the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Close(CloseReason),
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

/// Frames waiting to be written, bounded by count and bytes, and counted against its
/// shard's part of the memory budget.
pub struct Outbound {
    frames: VecDeque<Bytes>,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
    /// Bytes the writer took out of the queue and is writing (its batch): still held, so
    /// still counted in the budget until [`Outbound::written`].
    in_flight: usize,
    budget: Rc<ShardBudget>,
    waker: Option<Waker>,
    closing: Option<CloseReason>,
    /// Set when the connection moves to another shard: the writer stops after the write
    /// in progress and leaves the rest of the queue to travel with the session.
    moving: bool,
}

impl Outbound {
    /// An empty queue that holds at most `max_frames` frames and `max_bytes` bytes, and
    /// counts what it holds in `budget`.
    pub fn new(max_frames: usize, max_bytes: usize, budget: Rc<ShardBudget>) -> Outbound {
        budget.queue_opened();
        Outbound {
            frames: VecDeque::new(),
            bytes: 0,
            max_frames,
            max_bytes,
            in_flight: 0,
            budget,
            waker: None,
            closing: None,
            moving: false,
        }
    }

    /// Offers a frame: a volatile one is dropped once the queue is half full, any other
    /// overflows the queue past its bounds, or past the shard's budget when this queue
    /// holds more than its fair part (the caller closes the connection).
    pub fn push(&mut self, frame: Bytes, volatile: bool) -> Queued {
        if self.closing.is_some() {
            return Queued::Closed;
        }
        let len = frame.len();
        if volatile
            && (self.frames.len() * 2 >= self.max_frames || (self.bytes + len) * 2 > self.max_bytes)
        {
            return Queued::Dropped;
        }
        if self.frames.len() >= self.max_frames
            || self.bytes + len > self.max_bytes
            || !self.budget.admits(self.bytes + self.in_flight, len)
        {
            return Queued::Overflow;
        }
        self.frames.push_back(frame);
        self.count(len);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
        Queued::Yes
    }

    /// Takes the oldest queued frame.
    pub fn pop(&mut self) -> Option<Bytes> {
        let f = self.frames.pop_front()?;
        self.uncount(f.len());
        Some(f)
    }

    /// Moves queued frames (up to about `max` bytes, at least one) into `out`. They stay
    /// counted in the budget, in flight, until the writer calls [`Outbound::written`].
    pub fn drain_into(&mut self, out: &mut Vec<u8>, max: usize) {
        while let Some(f) = self.frames.front() {
            if !out.is_empty() && out.len() + f.len() > max {
                break;
            }
            out.extend_from_slice(f);
            self.bytes -= f.len();
            self.in_flight += f.len();
            self.frames.pop_front();
        }
        if self.frames.capacity() > 64 && self.frames.is_empty() {
            self.frames.shrink_to(8);
        }
    }

    /// Queues the final close frame past the bounds (it must always fit).
    fn push_close(&mut self, code: u16) {
        let frame = super::websocket::close_frame(code);
        self.count(frame.len());
        self.frames.push_back(frame);
    }

    /// Starts closing for `reason`, once: a graceful reason queues a close frame behind
    /// what is queued, `Gone` and `SlowConsumer` drop the queue. Wakes the writer. False
    /// if the queue was already closing.
    pub fn start_closing(&mut self, reason: CloseReason) -> bool {
        if self.closing.is_some() {
            return false;
        }
        self.closing = Some(reason);
        match reason {
            CloseReason::SlowConsumer | CloseReason::Gone => {
                self.frames.clear();
                self.uncount(self.bytes);
            }
            CloseReason::Protocol(code) => self.push_close(code),
            CloseReason::Timeout => self.push_close(1000),
            CloseReason::Restart => self.push_close(1012),
        }
        self.wake();
        true
    }

    /// Marks the connection as moving to another shard: the writer stops after its write
    /// in progress.
    pub fn start_moving(&mut self) {
        self.moving = true;
        self.wake();
    }

    /// Wakes whoever waits on the queue (the WebSocket writer or a polling GET).
    pub fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Resolves when frames are queued or the connection is closing or moving (the
    /// writer's wait, and a polling GET's).
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.frames.is_empty() || self.closing.is_some() || self.moving {
            Poll::Ready(())
        } else {
            self.waker = Some(cx.waker().clone());
            Poll::Pending
        }
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

    /// The writer's batch is written (or failed): its bytes leave the budget.
    pub fn written(&mut self) {
        self.budget.sub(Queue::Outbound, self.in_flight);
        self.in_flight = 0;
    }

    /// The shard's budget this queue counts in.
    pub fn budget(&self) -> &Rc<ShardBudget> {
        &self.budget
    }

    /// Bytes queued, and in the writer's batch.
    pub fn bytes(&self) -> usize {
        self.bytes + self.in_flight
    }

    /// Takes every queued frame, oldest first (they travel with a moving connection; the
    /// shard they reach counts them).
    pub fn take_frames(&mut self) -> VecDeque<Bytes> {
        self.uncount(self.bytes);
        std::mem::take(&mut self.frames)
    }

    /// Queues frames that came with a moved connection, before anything else.
    pub fn restore_frames(&mut self, frames: VecDeque<Bytes>) {
        self.uncount(self.bytes);
        self.frames = frames;
        self.count(self.frames.iter().map(Bytes::len).sum());
    }

    /// Counts `len` more bytes queued, here and in the shard's budget.
    #[inline]
    fn count(&mut self, len: usize) {
        self.bytes += len;
        self.budget.add(Queue::Outbound, len);
    }

    /// Counts `len` bytes gone from the queue, here and in the shard's budget.
    #[inline]
    fn uncount(&mut self, len: usize) {
        self.bytes -= len;
        self.budget.sub(Queue::Outbound, len);
    }
}

/// A queue that goes away gives its bytes back to the shard's budget.
impl Drop for Outbound {
    fn drop(&mut self) {
        self.budget
            .sub(Queue::Outbound, self.bytes + self.in_flight);
        self.budget.queue_closed();
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

/// How a session currently reaches its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// HTTP long-polling: GETs take the queued packets, POSTs bring the client's.
    Polling,
    /// A WebSocket is being probed (`2probe` seen); polling is paused until `5`.
    Upgrading,
    WebSocket,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> Outbound {
        Outbound::new(8, 1 << 20, Rc::new(ShardBudget::new(0)))
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
        let mut q = Outbound::new(100, 10, Rc::new(ShardBudget::new(0)));
        assert_eq!(q.push(Bytes::from(vec![0; 8]), false), Queued::Yes);
        assert_eq!(q.push(Bytes::from(vec![0; 3]), false), Queued::Overflow);
    }

    #[test]
    fn closing_once_queues_one_close_frame_and_refuses_more() {
        let mut q = queue();
        assert_eq!(q.push(Bytes::from_static(b"m"), false), Queued::Yes);
        assert!(q.start_closing(CloseReason::Restart));
        assert!(!q.start_closing(CloseReason::Timeout));
        assert_eq!(q.closing(), Some(CloseReason::Restart));
        assert_eq!(q.push(Bytes::from_static(b"x"), false), Queued::Closed);
        let mut out = Vec::new();
        q.drain_into(&mut out, usize::MAX);
        assert_eq!(out[0], b'm');
        assert_eq!(&out[1..3], &[0x88, 2], "a close frame with a 2-byte code");
        assert_eq!(u16::from_be_bytes([out[3], out[4]]), 1012);
    }

    #[test]
    fn the_shard_budget_counts_what_queues_hold() {
        let budget = Rc::new(ShardBudget::new(1 << 20));
        let mut q = Outbound::new(8, 1 << 20, budget.clone());
        let mut r = Outbound::new(8, 1 << 20, budget.clone());
        q.push(Bytes::from(vec![0; 10]), false);
        r.push(Bytes::from(vec![0; 5]), false);
        assert_eq!(budget.used(), 15);
        q.pop();
        assert_eq!(budget.used(), 5);
        r.push(Bytes::from(vec![0; 7]), false);
        let mut out = Vec::new();
        r.drain_into(&mut out, 1);
        assert_eq!(
            (budget.used(), r.bytes()),
            (12, 12),
            "the writer's batch still counts"
        );
        r.written();
        assert_eq!(budget.used(), 7, "the second frame is still queued");
        let moving = r.take_frames();
        assert_eq!(budget.used(), 0);
        q.restore_frames(moving);
        assert_eq!(budget.used(), 7);
        drop(q);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_slow_consumer_loses_its_queue() {
        let mut q = queue();
        assert_eq!(q.push(Bytes::from_static(b"m"), false), Queued::Yes);
        assert!(q.start_closing(CloseReason::SlowConsumer));
        assert!(q.is_empty());
        assert_eq!(q.bytes, 0);
    }
}
