//! Emits from existing Node services (`@socket.io/redis-emitter`, read from Redis by the
//! process's link: [`crate::cluster::emitter`]), delivered as they are: not sequenced,
//! not stored. Each emit is encoded once per process into the WebSocket frame every
//! recipient gets, then handed to every shard through a bounded queue; each shard queues
//! it to its own members of the target rooms
//! ([`Chat::deliver_emit`](super::layer::Chat::deliver_emit)).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc::{self, error::TrySendError};

use crate::cluster::emitter::{Emit, EmitError, EmitSink};
use crate::metrics::Metrics;
use crate::transport::websocket::text_frame;

/// Emits one shard may have waiting; past it, or past its part of the bytes (see
/// [`EmitFanout::new`]), that shard misses the emit (counted in
/// `corelay_emitter_dropped_total`), as a slow Node server's clients would.
pub const EMIT_QUEUE: usize = 1024;

/// At most one warning about undecodable emitter messages per this long.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// An emit ready for delivery: the one frame every recipient gets, and whom it is for.
#[derive(Debug)]
pub struct EmitFrame {
    /// The WebSocket frame of `42[event, …args]`.
    pub frame: Bytes,
    /// Target rooms; empty: every connected socket.
    pub rooms: Vec<String>,
    /// Members of these rooms are left out.
    pub except: Vec<String>,
    /// May be dropped for a connection whose queue is half full.
    pub volatile: bool,
}

impl EmitFrame {
    /// Encodes `emit` as the Socket.IO EVENT packet of namespace `/`.
    pub fn new(emit: Emit) -> EmitFrame {
        let mut payload = Vec::with_capacity(emit.data.len() + 2);
        payload.extend_from_slice(b"42");
        payload.extend_from_slice(&emit.data);
        EmitFrame {
            frame: text_frame(&payload),
            rooms: emit.rooms,
            except: emit.except,
            volatile: emit.volatile,
        }
    }
}

/// The receiving end of one shard's queue of emits.
pub type EmitReceiver = mpsc::Receiver<Arc<EmitFrame>>;

/// What the process's Redis link calls with each emitter message (on the bridge's
/// thread): counts it, encodes it once, and offers it to every shard's queue.
pub struct EmitFanout {
    shards: Vec<mpsc::Sender<Arc<EmitFrame>>>,
    /// The most bytes of emits one shard may have waiting (0: no bound); what waits is
    /// counted in `metrics.emit_bytes` (the shard's budget reads it).
    max_bytes: usize,
    metrics: Arc<Metrics>,
    /// When undecodable messages were last logged, and how many were not since.
    warned: Mutex<(Option<Instant>, u64)>,
}

impl EmitFanout {
    /// A fan-out to `shards` shards, each of which may have at most [`EMIT_QUEUE`] emits
    /// and `max_bytes` bytes of them waiting (0: no bound on bytes), and each shard's
    /// receiving end (in shard order; it uncounts what it takes from `metrics.emit_bytes`).
    pub fn new(
        shards: usize,
        metrics: Arc<Metrics>,
        max_bytes: usize,
    ) -> (EmitFanout, Vec<EmitReceiver>) {
        let (senders, receivers) = (0..shards).map(|_| mpsc::channel(EMIT_QUEUE)).unzip();
        let fanout = EmitFanout {
            shards: senders,
            max_bytes,
            metrics,
            warned: Mutex::new((None, 0)),
        };
        (fanout, receivers)
    }

    /// This fan-out as the sink the Redis link takes.
    pub fn into_sink(self) -> EmitSink {
        let me = Arc::new(self);
        Arc::new(move |emit| me.on_emit(emit))
    }

    /// One message read from the emitter's channels.
    fn on_emit(&self, emit: Result<Emit, EmitError>) {
        let m = &self.metrics.emitter;
        m.received.fetch_add(1, Relaxed);
        let emit = match emit {
            Ok(emit) => Arc::new(EmitFrame::new(emit)),
            Err(e) => {
                m.undecodable.fetch_add(1, Relaxed);
                self.warn(&e);
                return;
            }
        };
        let len = emit.frame.len();
        for (shard, queued) in self.shards.iter().zip(&self.metrics.emit_bytes) {
            if self.max_bytes > 0 && queued.get() + len > self.max_bytes {
                m.dropped.fetch_add(1, Relaxed);
                continue;
            }
            queued.sent(len);
            match shard.try_send(emit.clone()) {
                Ok(()) => {}
                Err(TrySendError::Closed(_)) => queued.taken(len),
                Err(TrySendError::Full(_)) => {
                    queued.taken(len);
                    m.dropped.fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// Logs an undecodable message, at most once per [`WARN_EVERY`] (with how many
    /// others were not logged).
    fn warn(&self, e: &EmitError) {
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if warned
            .0
            .is_some_and(|at| now.duration_since(at) < WARN_EVERY)
        {
            warned.1 += 1;
            return;
        }
        let unlogged = std::mem::take(&mut warned.1);
        warned.0 = Some(now);
        tracing::warn!(
            error = %e,
            unlogged,
            "a message on the @socket.io/redis-emitter channels was not delivered"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emit(event: &str) -> Emit {
        Emit {
            data: format!("[\"{event}\",1]").into_bytes(),
            rooms: vec!["r".into()],
            except: vec![],
            volatile: false,
        }
    }

    #[test]
    fn one_frame_for_every_shard_and_a_full_queue_drops_and_counts() {
        let metrics = Arc::new(Metrics::new(2));
        let (fanout, mut queues) = EmitFanout::new(2, metrics.clone(), 0);
        let sink = fanout.into_sink();
        for _ in 0..EMIT_QUEUE {
            sink(Ok(emit("e")));
        }
        // Shard 1 keeps up, shard 0 does not: only shard 0 misses the next one.
        let first = queues[1].try_recv().unwrap();
        sink(Ok(emit("late")));
        sink(Err(EmitError::Binary));
        let e = &metrics.emitter;
        assert_eq!(e.received.load(Relaxed), EMIT_QUEUE as u64 + 2);
        assert_eq!(e.undecodable.load(Relaxed), 1);
        assert_eq!(e.dropped.load(Relaxed), 1);
        let a = queues[0].try_recv().unwrap();
        assert!(Arc::ptr_eq(&a, &first), "one encoding shared by the shards");
        assert_eq!(a.rooms, ["r"]);
        assert!(a.frame.ends_with(b"42[\"e\",1]"), "{:?}", a.frame);
        assert_eq!(a.frame[0], 0x81, "a final text frame");
    }

    #[test]
    fn a_shard_past_its_bytes_misses_emits_until_it_takes_some() {
        let metrics = Arc::new(Metrics::new(2));
        let len = EmitFrame::new(emit("e")).frame.len();
        let (fanout, mut queues) = EmitFanout::new(2, metrics.clone(), 3 * len);
        let sink = fanout.into_sink();
        for _ in 0..5 {
            sink(Ok(emit("e")));
        }
        assert_eq!(metrics.emitter.dropped.load(Relaxed), 4, "two per shard");
        assert_eq!(metrics.emit_bytes[0].get(), 3 * len);
        // Shard 0 takes one (as its receiving task does): one more fits there.
        let taken = queues[0].try_recv().unwrap();
        metrics.emit_bytes[0].taken(taken.frame.len());
        sink(Ok(emit("e")));
        assert_eq!(
            metrics.emitter.dropped.load(Relaxed),
            5,
            "shard 1 is still full"
        );
        assert_eq!(metrics.emit_bytes[0].get(), 3 * len);
        assert_eq!(metrics.emit_bytes[1].get(), 3 * len);
    }
}
