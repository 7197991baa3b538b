//! Measurements: latency histograms, the per-(receiver, room) order tracker, and the
//! counters from which loss is computed.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Highest latency a histogram records (one hour, in µs); larger values saturate.
pub const MAX_LATENCY_US: u64 = 3_600_000_000;

/// A new latency histogram in microseconds, 3 significant figures.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("static histogram bounds are valid")
}

/// A histogram shared between connection tasks.
#[derive(Debug)]
pub struct SharedHist(Mutex<Histogram<u64>>);

impl Default for SharedHist {
    fn default() -> Self {
        SharedHist(Mutex::new(new_histogram()))
    }
}

impl SharedHist {
    /// Records one latency in µs (saturating at [`MAX_LATENCY_US`], 0 counted as 1).
    pub fn record(&self, us: u64) {
        if let Ok(mut h) = self.0.lock() {
            h.saturating_record(us.max(1));
        }
    }

    /// Records a batch of latencies in µs.
    pub fn record_all(&self, batch: &[u64]) {
        if let Ok(mut h) = self.0.lock() {
            for &us in batch {
                h.saturating_record(us.max(1));
            }
        }
    }

    /// A copy of the histogram.
    pub fn snapshot(&self) -> Histogram<u64> {
        match self.0.lock() {
            Ok(h) => h.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// p50 / p99 / p99.9 / max of a histogram, in milliseconds (`None` when empty).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// 99.9th percentile.
    pub p999: Option<f64>,
    /// Maximum.
    pub max: Option<f64>,
    /// Number of samples.
    pub count: u64,
}

impl Percentiles {
    /// Reads the percentiles of a µs histogram, converted to ms.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| Some(us as f64 / 1000.0);
        Percentiles {
            p50: ms(h.value_at_quantile(0.5)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            count: h.len(),
        }
    }
}

/// Checks that one receiver sees one room's offsets strictly increasing by one.
///
/// A receiver does not get its own messages, so offsets it sent itself (learned from its
/// acks, which may arrive before or after the next delivery) are allowed to be skipped.
/// Anything else skipped is a gap; an offset at or below the last one seen is a
/// reordering (when it fills an earlier gap) or a duplicate.
#[derive(Debug, Clone, Default)]
pub struct OrderTracker {
    last: u64,
    /// Offsets skipped by deliveries and not (yet) explained by our own acks.
    skipped: BTreeSet<u64>,
    /// Our own acked offsets above `last` (not yet passed by a delivery).
    own_ahead: BTreeSet<u64>,
    reorders: u64,
    duplicates: u64,
    jumps: u64,
}

/// A skip larger than this is counted as one violation rather than enumerated.
const MAX_SKIP: u64 = 1_000_000;

/// The outcome of order checking.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OrderReport {
    /// Offsets never delivered between the first and the last one seen (not our own).
    pub gaps: u64,
    /// Deliveries that arrived after a higher offset (filling a gap late).
    pub reorders: u64,
    /// Deliveries of an offset already seen.
    pub duplicates: u64,
}

impl OrderReport {
    /// All violations.
    pub fn total(&self) -> u64 {
        self.gaps + self.reorders + self.duplicates
    }

    /// Adds another report.
    pub fn add(&mut self, o: OrderReport) {
        self.gaps += o.gaps;
        self.reorders += o.reorders;
        self.duplicates += o.duplicates;
    }
}

impl OrderTracker {
    /// A tracker for a receiver whose join ack said the room's latest offset was `start`.
    pub fn new(start: u64) -> OrderTracker {
        OrderTracker {
            last: start,
            ..OrderTracker::default()
        }
    }

    /// A delivered message with `offset`.
    pub fn on_delivery(&mut self, offset: u64) {
        if offset <= self.last {
            if self.skipped.remove(&offset) {
                self.reorders += 1;
            } else {
                self.duplicates += 1;
            }
            return;
        }
        if offset - self.last > MAX_SKIP {
            self.jumps += 1;
        } else {
            for k in self.last + 1..offset {
                if !self.own_ahead.remove(&k) {
                    self.skipped.insert(k);
                }
            }
        }
        // Own offsets at or below the new high-water mark are now explained.
        self.own_ahead = self.own_ahead.split_off(&(offset + 1));
        self.last = offset;
    }

    /// Our own message to this room was acked with `offset`.
    pub fn on_own_ack(&mut self, offset: u64) {
        if offset > self.last {
            self.own_ahead.insert(offset);
        } else {
            self.skipped.remove(&offset);
        }
    }

    /// The violations seen so far.
    pub fn report(&self) -> OrderReport {
        OrderReport {
            gaps: self.skipped.len() as u64 + self.jumps,
            reorders: self.reorders,
            duplicates: self.duplicates,
        }
    }
}

/// Run-wide counters, updated by every connection task.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages sent (all phases).
    pub sent: AtomicU64,
    /// Messages sent during the measured window.
    pub sent_window: AtomicU64,
    /// Messages acked `ok` (all phases).
    pub acked: AtomicU64,
    /// Window messages acked `ok`.
    pub acked_window: AtomicU64,
    /// Window messages acked with an error.
    pub ack_errors_window: AtomicU64,
    /// Expected deliveries of window messages: room members − 1 per message, less those
    /// of messages acked with an error.
    pub expected: AtomicU64,
    /// Deliveries of window messages to measured receivers.
    pub received: AtomicU64,
    /// Every `message` delivery to any connection.
    pub deliveries_total: AtomicU64,
    /// Bytes of the WebSocket frames members read (all phases).
    pub bytes_in: AtomicU64,
    /// Sends the pacer could not hand to a sender (its queue was full).
    pub pacer_overflow: AtomicU64,
}

impl Counters {
    /// A message was sent into a room of `members` members (sender included).
    pub fn on_send(&self, in_window: bool, members: u64) {
        self.sent.fetch_add(1, Relaxed);
        if in_window {
            self.sent_window.fetch_add(1, Relaxed);
            self.expected.fetch_add(members.saturating_sub(1), Relaxed);
        }
    }

    /// Its ack came back: `ok`, or an error (then nothing was stored or delivered).
    pub fn on_ack(&self, in_window: bool, ok: bool, members: u64) {
        match (ok, in_window) {
            (true, true) => {
                self.acked.fetch_add(1, Relaxed);
                self.acked_window.fetch_add(1, Relaxed);
            }
            (true, false) => {
                self.acked.fetch_add(1, Relaxed);
            }
            (false, true) => {
                self.ack_errors_window.fetch_add(1, Relaxed);
                let _ = self.expected.fetch_update(Relaxed, Relaxed, |e| {
                    Some(e.saturating_sub(members.saturating_sub(1)))
                });
            }
            (false, false) => {}
        }
    }

    /// A measured receiver got a window message.
    pub fn on_window_delivery(&self) {
        self.received.fetch_add(1, Relaxed);
    }

    /// Expected, received, lost (expected − received, never negative) and excess
    /// (received − expected, never negative: duplicates or miscounted members).
    pub fn loss(&self) -> Loss {
        Loss::new(self.expected.load(Relaxed), self.received.load(Relaxed))
    }
}

/// Loss figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Loss {
    /// Deliveries expected.
    pub expected: u64,
    /// Deliveries received.
    pub received: u64,
    /// Expected but not received.
    pub lost: u64,
    /// Received beyond what was expected.
    pub excess: u64,
}

impl Loss {
    /// Loss from expected and received counts.
    pub fn new(expected: u64, received: u64) -> Loss {
        Loss {
            expected,
            received,
            lost: expected.saturating_sub(received),
            excess: received.saturating_sub(expected),
        }
    }

    /// Lost as a percentage of expected (0 when nothing was expected).
    pub fn pct(&self) -> f64 {
        if self.expected == 0 {
            0.0
        } else {
            100.0 * self.lost as f64 / self.expected as f64
        }
    }
}

/// Error counts by kind (`rate_limited`, `connect_timeout`, `disconnected`, ...).
#[derive(Debug, Default)]
pub struct Errors(Mutex<BTreeMap<String, u64>>);

impl Errors {
    /// Counts one error of `kind`.
    pub fn add(&self, kind: &str) {
        self.add_n(kind, 1);
    }

    /// Counts `n` errors of `kind`.
    pub fn add_n(&self, kind: &str, n: u64) {
        if n == 0 {
            return;
        }
        if let Ok(mut m) = self.0.lock() {
            *m.entry(kind.to_string()).or_insert(0) += n;
        }
    }

    /// The counts so far.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        match self.0.lock() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Total of all kinds.
    pub fn total(&self) -> u64 {
        self.snapshot().values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_is_clean() {
        let mut t = OrderTracker::new(10);
        for o in 11..=20 {
            t.on_delivery(o);
        }
        assert_eq!(t.report(), OrderReport::default());
    }

    #[test]
    fn own_offsets_are_not_gaps_whichever_comes_first() {
        let mut t = OrderTracker::new(0);
        t.on_delivery(1);
        t.on_own_ack(2); // ack before the next delivery
        t.on_delivery(3);
        t.on_delivery(5); // 4 is ours, its ack arrives late
        t.on_own_ack(4);
        t.on_delivery(6);
        assert_eq!(t.report().total(), 0, "{:?}", t.report());
    }

    #[test]
    fn gaps_reorders_duplicates() {
        let mut t = OrderTracker::new(0);
        t.on_delivery(1);
        t.on_delivery(4); // 2, 3 skipped
        t.on_delivery(2); // late: a reorder that fills a gap
        t.on_delivery(4); // duplicate
        let r = t.report();
        assert_eq!(r.gaps, 1, "3 never came");
        assert_eq!(r.reorders, 1);
        assert_eq!(r.duplicates, 1);
        assert_eq!(r.total(), 3);
    }

    #[test]
    fn huge_jump_is_one_gap() {
        let mut t = OrderTracker::new(0);
        t.on_delivery(u64::MAX / 2);
        assert_eq!(t.report().gaps, 1);
    }

    #[test]
    fn stale_own_offsets_are_dropped() {
        let mut t = OrderTracker::new(0);
        t.on_own_ack(1);
        t.on_own_ack(2);
        t.on_delivery(3);
        assert!(t.own_ahead.is_empty());
        assert_eq!(t.report().total(), 0);
    }

    #[test]
    fn loss_accounting() {
        let c = Counters::default();
        // Warm-up message: not expected.
        c.on_send(false, 10);
        c.on_ack(false, true, 10);
        // Three window messages to rooms of 10 (9 receivers each), one rate-limited.
        for _ in 0..3 {
            c.on_send(true, 10);
        }
        c.on_ack(true, true, 10);
        c.on_ack(true, true, 10);
        c.on_ack(true, false, 10);
        assert_eq!(c.expected.load(Relaxed), 18);
        for _ in 0..17 {
            c.on_window_delivery();
        }
        let l = c.loss();
        assert_eq!((l.expected, l.received, l.lost, l.excess), (18, 17, 1, 0));
        assert!((l.pct() - 100.0 / 18.0).abs() < 1e-9);
        assert_eq!(c.sent.load(Relaxed), 4);
        assert_eq!(c.sent_window.load(Relaxed), 3);
        assert_eq!(c.acked.load(Relaxed), 3);
        assert_eq!(c.acked_window.load(Relaxed), 2);
        assert_eq!(c.ack_errors_window.load(Relaxed), 1);
        assert_eq!(Loss::new(5, 7).excess, 2);
        assert_eq!(Loss::new(0, 0).pct(), 0.0);
    }

    #[test]
    fn percentiles_and_errors() {
        let h = SharedHist::default();
        h.record_all(&[1000, 2000, 3000]);
        h.record(0);
        let p = Percentiles::of(&h.snapshot());
        assert_eq!(p.count, 4);
        assert!((p.max.unwrap() - 3.0).abs() < 0.01);
        assert_eq!(Percentiles::of(&new_histogram()).p50, None);

        let e = Errors::default();
        e.add("rate_limited");
        e.add_n("rate_limited", 2);
        e.add_n("ignored", 0);
        assert_eq!(e.total(), 3);
        assert_eq!(e.snapshot().len(), 1);
    }
}
