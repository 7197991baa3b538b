//! The backend feed's counters (see `crate::feed`), kept per shard like the rest.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::ShardMetrics;

/// One shard's counters of the backend's feed.
#[derive(Default)]
pub struct FeedStats {
    /// Message events the backend took.
    pub events: AtomicU64,
    /// Batches the backend took.
    pub batches: AtomicU64,
    /// Batches tried again after the backend failed them.
    pub retries: AtomicU64,
    /// Reads or cursor writes of the history store that failed.
    pub store_errors: AtomicU64,
    /// Rooms with messages not delivered yet.
    pub owed_rooms: AtomicU64,
    /// Age of the oldest message not delivered yet, in ms (0: none owed).
    pub lag_ms: AtomicU64,
}

/// A feed counter: name, type, help, and where a shard keeps it.
type FeedCounter = (
    &'static str,
    &'static str,
    &'static str,
    fn(&FeedStats) -> &AtomicU64,
);

/// The feed's counters, rendered per shard.
const FEED: [FeedCounter; 5] = [
    (
        "corelay_feed_events_total",
        "counter",
        "Message events the feed's backend took.",
        |f| &f.events,
    ),
    (
        "corelay_feed_batches_total",
        "counter",
        "Batches the feed's backend took.",
        |f| &f.batches,
    ),
    (
        "corelay_feed_retries_total",
        "counter",
        "Feed batches tried again after the backend failed them.",
        |f| &f.retries,
    ),
    (
        "corelay_feed_store_errors_total",
        "counter",
        "History store reads or cursor writes of the feed that failed.",
        |f| &f.store_errors,
    ),
    (
        "corelay_feed_owed_rooms",
        "gauge",
        "Rooms with messages the feed has not delivered yet.",
        |f| &f.owed_rooms,
    ),
];

/// The feed's counters per shard, and its lag (the oldest undelivered message's age, the
/// highest over shards).
pub(super) fn render(out: &mut String, shards: &[ShardMetrics]) {
    for (name, kind, help, get) in FEED {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (i, s) in shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{shard=\"{i}\"}} {}",
                get(&s.feed).load(Relaxed)
            );
        }
    }
    let lag = lag_ms(shards) as f64 / 1000.0;
    let _ = writeln!(out, "# HELP corelay_feed_lag_seconds Age of the oldest message the feed has not delivered yet (0 when none).\n# TYPE corelay_feed_lag_seconds gauge\ncorelay_feed_lag_seconds {lag}");
}

/// The oldest undelivered message's age in ms, over shards.
pub(super) fn lag_ms(shards: &[ShardMetrics]) -> u64 {
    shards
        .iter()
        .map(|s| s.feed.lag_ms.load(Relaxed))
        .max()
        .unwrap_or(0)
}

/// The feed's figures for the console, summed over shards (the lag: the highest).
pub(super) fn json(shards: &[ShardMetrics]) -> serde_json::Value {
    let sum = |f: fn(&FeedStats) -> &AtomicU64| -> u64 {
        shards.iter().map(|s| f(&s.feed).load(Relaxed)).sum()
    };
    serde_json::json!({
        "events": sum(|f| &f.events),
        "batches": sum(|f| &f.batches),
        "retries": sum(|f| &f.retries),
        "owed_rooms": sum(|f| &f.owed_rooms),
        "store_errors": sum(|f| &f.store_errors),
        "lag_ms": lag_ms(shards),
    })
}
