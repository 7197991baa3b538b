//! What a fault run gave, the checks every fault test makes, and its times: recovery
//! after a heal and p99 of the send-to-ack time in a window.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use super::chat::ChatClient;
use super::run::{SenderLog, Try};

/// Senders' logs, receivers' clients (with what they got) and the room's history.
pub struct Outcome {
    /// One log per sender, in the order they were given.
    pub senders: Vec<SenderLog>,
    /// One client per receiver, in the order they were given.
    pub receivers: Vec<ChatClient>,
    /// The room's history after the run: `(offset, text)`.
    pub history: Vec<(u64, String)>,
}

/// What went wrong in a run, counted rather than asserted (for a stack that does not
/// promise it all, such as the seed's peer-2).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Audit {
    /// Messages acked.
    pub acked: usize,
    /// Acked messages some receiver never got (counted once per receiver).
    pub lost: usize,
    /// Messages a receiver got more than once (each extra copy).
    pub duplicates: usize,
    /// Times a receiver got an offset lower than the one before.
    pub reorders: usize,
    /// Acked messages not in the history.
    pub missing_from_history: usize,
}

impl Outcome {
    /// Counts loss, duplicates, reorders and history gaps over the acked messages.
    pub fn audit(&self) -> Audit {
        let acked: HashSet<u64> = self
            .senders
            .iter()
            .flat_map(|s| s.sent.iter().map(|m| m.offset))
            .collect();
        let mut a = Audit {
            acked: acked.len(),
            ..Audit::default()
        };
        for r in &self.receivers {
            let mut seen = HashSet::new();
            for w in r.got.windows(2) {
                a.reorders += usize::from(w[1].0 < w[0].0);
            }
            for m in &r.got {
                a.duplicates += usize::from(!seen.insert(m.0));
            }
            a.lost += acked.iter().filter(|o| !seen.contains(o)).count();
        }
        let history: HashSet<u64> = self.history.iter().map(|m| m.0).collect();
        a.missing_from_history = acked.iter().filter(|o| !history.contains(o)).count();
        a
    }

    /// Asserts: each acked offset and text acked once, offsets contiguous from 1, each
    /// sender's offsets rising; every receiver got each acked message exactly once, in
    /// offset order, with its text; the history is exactly the acked messages. Returns
    /// how many messages were acked.
    pub fn check(&self) -> usize {
        let mut acked = BTreeMap::new();
        let mut texts = HashSet::new();
        for (i, s) in self.senders.iter().enumerate() {
            assert!(
                s.sent.windows(2).all(|w| w[0].offset < w[1].offset),
                "sender {i}'s offsets are not rising"
            );
            for m in &s.sent {
                assert!(texts.insert(m.text.clone()), "{} acked twice", m.text);
                let dup = acked.insert(m.offset, m.text.clone());
                assert!(dup.is_none(), "offset {} acked twice", m.offset);
            }
        }
        let n = acked.len() as u64;
        assert!(n > 0, "nothing was acked");
        assert_eq!(
            acked.keys().next_back(),
            Some(&n),
            "acked offsets have gaps"
        );
        let want: Vec<(u64, String)> = acked.into_iter().collect();
        for (i, r) in self.receivers.iter().enumerate() {
            let got: Vec<(u64, String)> = r.got.iter().map(|m| (m.0, m.1.clone())).collect();
            if got != want {
                let first_bad = got.iter().zip(&want).position(|(g, w)| g != w);
                panic!(
                    "receiver {i} got {} messages for {} acked; first difference at {first_bad:?} \
                     (got {:?}, want {:?})",
                    got.len(),
                    want.len(),
                    first_bad.and_then(|k| got.get(k)),
                    first_bad.and_then(|k| want.get(k)),
                );
            }
        }
        assert_eq!(self.history, want, "history differs from what was acked");
        want.len()
    }

    /// Tries that ended as `kind`, over all senders.
    pub fn tries(&self, kind: Try) -> usize {
        self.senders
            .iter()
            .map(|s| s.tries.iter().filter(|t| t.1 == kind).count())
            .sum()
    }

    /// The longest first-try-to-ack over sends first tried in `[from, to)`.
    pub fn worst(&self, from: Instant, to: Instant) -> Option<Duration> {
        self.senders
            .iter()
            .flat_map(|s| s.sent.iter())
            .filter(|m| m.first_try >= from && m.first_try < to)
            .map(|m| m.acked - m.first_try)
            .max()
    }

    /// From `heal` to sender `i`'s first ack after it.
    pub fn recovery(&self, i: usize, heal: Instant) -> Option<Duration> {
        self.senders[i]
            .sent
            .iter()
            .find(|m| m.acked >= heal)
            .map(|m| m.acked - heal)
    }

    /// From `heal` until receiver `i` had every message acked before `heal`.
    pub fn caught_up(&self, i: usize, heal: Instant) -> Duration {
        let before: HashSet<u64> = self
            .senders
            .iter()
            .flat_map(|s| s.sent.iter().filter(|m| m.acked < heal).map(|m| m.offset))
            .collect();
        self.receivers[i]
            .got
            .iter()
            .filter(|m| before.contains(&m.0))
            .map(|m| m.2.saturating_duration_since(heal))
            .max()
            .unwrap_or_default()
    }

    /// The 99th percentile of first-try-to-ack over sends first tried in `[from, to)`.
    pub fn p99(&self, from: Instant, to: Instant) -> Option<Duration> {
        let mut lat: Vec<Duration> = self
            .senders
            .iter()
            .flat_map(|s| s.sent.iter())
            .filter(|m| m.first_try >= from && m.first_try < to)
            .map(|m| m.acked - m.first_try)
            .collect();
        lat.sort();
        let k = (lat.len() * 99).div_ceil(100);
        lat.get(k.saturating_sub(1)).copied()
    }

    /// The 99th percentile of ack-to-arrival at the receivers, for messages acked in
    /// `[from, to)` (a replayed message counts from its ack too).
    pub fn delivery_p99(&self, from: Instant, to: Instant) -> Option<Duration> {
        let acked: BTreeMap<u64, Instant> = self
            .senders
            .iter()
            .flat_map(|s| s.sent.iter())
            .filter(|m| m.acked >= from && m.acked < to)
            .map(|m| (m.offset, m.acked))
            .collect();
        let mut lat: Vec<Duration> = self
            .receivers
            .iter()
            .flat_map(|r| r.got.iter())
            .filter_map(|m| Some(m.2.saturating_duration_since(*acked.get(&m.0)?)))
            .collect();
        lat.sort();
        let k = (lat.len() * 99).div_ceil(100);
        lat.get(k.saturating_sub(1)).copied()
    }
}
