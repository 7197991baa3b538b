//! Counters each shard keeps for `/healthz` and `/metrics`.
//!
//! Every shard writes only its own `ShardMetrics` (relaxed atomics on its own cache
//! lines); any shard may read them all to answer an HTTP request. No locks.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

mod feed;
mod hooks;
mod memory;
pub use feed::FeedStats;
pub use hooks::{HookStats, HOOKS, HOOK_FAILURES};
pub use memory::{SharedBytes, QUEUES};

/// Upper bounds (seconds) of the fan-out latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0,
];

/// One shard's counters.
#[derive(Default)]
#[repr(align(128))]
pub struct ShardMetrics {
    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    /// WebSocket connections that moved here, the home of the first room they joined.
    pub connections_moved_in: AtomicU64,
    /// Rooms whose home is this shard and that are loaded.
    pub home_rooms: AtomicU64,
    pub messages_in: AtomicU64,
    /// Frames handed to connections' outbound queues for room events (deliveries).
    pub messages_out: AtomicU64,
    pub typing_dropped: AtomicU64,
    pub slow_consumer_closes: AtomicU64,
    /// Requests refused because this shard's outbox toward their room's home was full
    /// (`limits.mesh_outbox`).
    pub mesh_refusals: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub store_errors: AtomicU64,
    /// Bytes this shard's queues hold (its part of `limits.memory_budget`), published by
    /// its shedder every few milliseconds.
    pub queued_bytes: AtomicU64,
    /// The same per queue, in the order of `transport::budget::Queue::ALL`.
    pub queue_bytes: [AtomicU64; 6],
    /// 1 while this shard refuses new work for memory (past half its part of the budget).
    pub memory_pressure: AtomicU64,
    /// Connections cut because the shard was past its part of the budget (the largest
    /// queues first); they are counted in `slow_consumer_closes` too.
    pub budget_closes: AtomicU64,
    /// Sends, joins and presence requests refused with `unavailable` for memory.
    pub budget_refusals: AtomicU64,
    /// New sessions refused with HTTP 429 for their source address's connect rate.
    pub connect_rate_limited: AtomicU64,
    /// Socket.IO CONNECTs refused for `limits.max_connections_per_user`.
    pub user_limit_refusals: AtomicU64,
    /// 1 while this shard's home has publishes not yet acked (read during a drain).
    pub home_busy: AtomicU64,
    /// Frames of `@socket.io/redis-emitter` emits queued to this shard's connections.
    pub emitter_frames: AtomicU64,
    /// Cluster mode: 1 while this shard's link to Redis is down (between the `Down` and
    /// `Reconnected` of its event stream).
    pub redis_link_down: AtomicU64,
    /// The backend's hooks called from this shard.
    pub hooks: HookStats,
    /// The backend's feed, when on.
    pub feed: FeedStats,
    fanout_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    fanout_count: AtomicU64,
    fanout_sum_ns: AtomicU64,
}

impl ShardMetrics {
    /// Records how long a message took from its home shard to a member shard's queues.
    pub fn observe_fanout(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.fanout_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.fanout_count.fetch_add(1, Relaxed);
        self.fanout_sum_ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    /// The fan-out histogram as it stands: cumulative counts per bucket of
    /// [`LATENCY_BUCKETS`], and all observations (the console's quantiles come from the
    /// difference of two such snapshots).
    pub fn fanout_snapshot(&self) -> ([u64; LATENCY_BUCKETS.len()], u64) {
        (
            std::array::from_fn(|i| self.fanout_buckets[i].load(Relaxed)),
            self.fanout_count.load(Relaxed),
        )
    }

    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }
}

/// Picks one counter out of a shard's set (for rendering).
type CounterOf = fn(&ShardMetrics) -> &AtomicU64;

/// The process's counters of emits read from `@socket.io/redis-emitter`'s channels
/// (`emitter.enabled`), written on the bridge's thread.
#[derive(Default)]
pub struct EmitterMetrics {
    /// Messages read from the emitter's channels.
    pub received: AtomicU64,
    /// Messages that could not be delivered as they are (not the emitter's format,
    /// another namespace, binary arguments).
    pub undecodable: AtomicU64,
    /// Emits a shard did not get because its queue of emits was full.
    pub dropped: AtomicU64,
}

/// All shards' counters, shared by `Arc` across shards.
pub struct Metrics {
    pub shards: Vec<ShardMetrics>,
    /// Emits from `@socket.io/redis-emitter`, process-wide.
    pub emitter: EmitterMetrics,
    /// The Redis link in cluster mode (unset on a single host), for `/healthz` and `/metrics`.
    pub redis: std::sync::OnceLock<crate::cluster::redis::RedisCluster>,
    /// `limits.memory_budget` (0: no bound), for `/healthz` and `/metrics`.
    pub memory_budget: AtomicU64,
    /// Per shard, the bytes it sent through the mesh that the receivers have not taken
    /// yet (its budget counts them; the receivers uncount them).
    pub mesh_bytes: Vec<std::sync::Arc<SharedBytes>>,
    /// Per shard, the bytes of the emits (`@socket.io/redis-emitter`) queued to it and not
    /// taken yet (its budget counts them; the process's Redis link adds, the shard takes).
    pub emit_bytes: Vec<std::sync::Arc<SharedBytes>>,
}

impl Metrics {
    /// Zeroed counters for `n` shards.
    pub fn new(n: usize) -> Metrics {
        Metrics {
            shards: (0..n).map(|_| ShardMetrics::default()).collect(),
            emitter: EmitterMetrics::default(),
            redis: std::sync::OnceLock::new(),
            memory_budget: AtomicU64::new(0),
            mesh_bytes: (0..n).map(|_| std::sync::Arc::default()).collect(),
            emit_bytes: (0..n).map(|_| std::sync::Arc::default()).collect(),
        }
    }

    /// `/healthz`'s `redis`: `null` on a single host, else `{connected,
    /// pubsub_roundtrip_ms, shard_links_down, cluster}` (the process's probe link, how many
    /// shards' own links are down, and whether Redis is a Redis Cluster), and on a Redis
    /// Cluster `nodes`: every node as the process's supervisor last saw it (every second;
    /// no I/O here), masters first, each sorted by address:
    ///
    /// ```json
    /// {"addr": "10.0.0.2:7001", "role": "master", "master": null, "slots": 5462, "up": true}
    /// {"addr": "10.0.0.5:7004", "role": "replica", "master": "10.0.0.2:7001", "slots": 0, "up": true}
    /// ```
    ///
    /// `role` is `master` or `replica` as the cluster announces it (a failed master stays a
    /// master, with its slots, until a replica takes over); `master` is a replica's master;
    /// `up` means it answered this host's PING within `redis.command_timeout` and the
    /// cluster does not flag it failing. Empty until the first look.
    pub fn redis_json(&self) -> serde_json::Value {
        match self.redis.get() {
            None => serde_json::Value::Null,
            Some(c) => {
                let mut redis = serde_json::json!({
                    "connected": c.is_connected(),
                    "pubsub_roundtrip_ms": c.last_roundtrip_ms(),
                    "shard_links_down": self.shard_links_down(),
                    "cluster": c.is_cluster(),
                });
                if c.is_cluster() {
                    let nodes: Vec<serde_json::Value> = c
                        .nodes()
                        .iter()
                        .map(|n| {
                            serde_json::json!({
                                "addr": n.addr.to_string(),
                                "role": n.role.as_str(),
                                "master": n.master.as_ref().map(ToString::to_string),
                                "slots": n.slots,
                                "up": n.up,
                            })
                        })
                        .collect();
                    redis["nodes"] = serde_json::Value::Array(nodes);
                }
                redis
            }
        }
    }

    /// Shards whose link to Redis is down.
    fn shard_links_down(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.redis_link_down.load(Relaxed))
            .sum()
    }

    /// Whether cluster mode runs with a link to Redis down, the process's or a shard's
    /// (serving, degraded).
    pub fn redis_down(&self) -> bool {
        self.redis
            .get()
            .is_some_and(|c| !c.is_connected() || self.shard_links_down() > 0)
    }

    /// The hooks' figures for the console (see `hooks::json`).
    pub fn hooks_json(&self) -> serde_json::Value {
        hooks::json(self.shards.iter().map(|s| &s.hooks))
    }

    /// The feed's figures for the console (see `feed::json`).
    pub fn feed_json(&self) -> serde_json::Value {
        feed::json(&self.shards)
    }

    /// The feed's lag in ms: the oldest undelivered message's age over shards.
    pub fn feed_lag_ms(&self) -> u64 {
        feed::lag_ms(&self.shards)
    }

    /// Open connections summed over shards.
    pub fn connections(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.connections.load(Relaxed))
            .sum()
    }

    /// Loaded rooms summed over shards.
    pub fn rooms(&self) -> u64 {
        self.shards.iter().map(|s| s.home_rooms.load(Relaxed)).sum()
    }

    /// The Prometheus text exposition (version 0.0.4).
    pub fn render_prometheus(&self, store_ok: bool) -> String {
        let mut out = String::with_capacity(4096);
        self.render_per_shard(&mut out);
        self.render_protocol_errors(&mut out);
        self.render_fanout(&mut out);
        hooks::render(&mut out, self.shards.iter().map(|s| &s.hooks));
        feed::render(&mut out, &self.shards);
        self.render_emitter(&mut out);
        self.render_memory(&mut out);
        let _ = writeln!(out, "# HELP corelay_store_up Whether the history store answered its last operation.\n# TYPE corelay_store_up gauge\ncorelay_store_up {}", u8::from(store_ok));
        let _ = writeln!(out, "# HELP corelay_redis_connected Whether Redis is connected (0 on a single host).\n# TYPE corelay_redis_connected gauge\ncorelay_redis_connected {}", u8::from(self.redis.get().is_some_and(|c| c.is_connected())));
        out
    }

    /// The counters kept per shard, one sample per shard each.
    fn render_per_shard(&self, out: &mut String) {
        for (name, kind, help, get) in PER_SHARD {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (i, s) in self.shards.iter().enumerate() {
                let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", get(s).load(Relaxed));
            }
        }
    }

    /// Protocol errors, summed over shards.
    fn render_protocol_errors(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP corelay_protocol_errors_total Connections closed for invalid packets.\n# TYPE corelay_protocol_errors_total counter");
        let errors: u64 = self
            .shards
            .iter()
            .map(|s| s.protocol_errors.load(Relaxed))
            .sum();
        let _ = writeln!(out, "corelay_protocol_errors_total {errors}");
    }

    /// The `@socket.io/redis-emitter` counters: read, refused, dropped, and the frames
    /// queued summed over shards.
    fn render_emitter(&self, out: &mut String) {
        let e = &self.emitter;
        let frames: u64 = self
            .shards
            .iter()
            .map(|s| s.emitter_frames.load(Relaxed))
            .sum();
        for (name, help, n) in [
            ("corelay_emitter_received_total", "Messages read from the @socket.io/redis-emitter channels (emitter.enabled).", e.received.load(Relaxed)),
            ("corelay_emitter_undecodable_total", "Emitter messages not delivered: not the emitter's format, another namespace than /, or binary arguments.", e.undecodable.load(Relaxed)),
            ("corelay_emitter_dropped_total", "Emits a shard missed because its queue of emits was full.", e.dropped.load(Relaxed)),
            ("corelay_emitter_frames_total", "Frames of emitter emits queued to connections.", frames),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {n}");
        }
    }

    /// The fan-out latency histogram, summed over shards.
    fn render_fanout(&self, out: &mut String) {
        let name = "corelay_fanout_latency_seconds";
        let _ = writeln!(out, "# HELP {name} Time from a message's home shard to its recipients' queues.\n# TYPE {name} histogram");
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            let n: u64 = self
                .shards
                .iter()
                .map(|s| s.fanout_buckets[i].load(Relaxed))
                .sum();
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {n}");
        }
        let count: u64 = self
            .shards
            .iter()
            .map(|s| s.fanout_count.load(Relaxed))
            .sum();
        let sum_ns: u64 = self
            .shards
            .iter()
            .map(|s| s.fanout_sum_ns.load(Relaxed))
            .sum();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", sum_ns as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// The counters rendered per shard: name, type, help, and where a shard keeps it.
const PER_SHARD: [(&str, &str, &str, CounterOf); 17] = [
        ("corelay_connections", "gauge", "Open connections.", |s| {
            &s.connections
        }),
        (
            "corelay_connections_total",
            "counter",
            "Connections accepted.",
            |s| &s.connections_total,
        ),
        (
            "corelay_connections_moved_total",
            "counter",
            "WebSocket connections moved here, the home shard of the first room they joined.",
            |s| &s.connections_moved_in,
        ),
        (
            "corelay_rooms",
            "gauge",
            "Rooms loaded on their home shard.",
            |s| &s.home_rooms,
        ),
        (
            "corelay_messages_in_total",
            "counter",
            "Chat messages accepted.",
            |s| &s.messages_in,
        ),
        (
            "corelay_messages_out_total",
            "counter",
            "Room events queued to recipients.",
            |s| &s.messages_out,
        ),
        (
            "corelay_queue_drops_total",
            "counter",
            "Volatile events (typing, volatile emits) dropped from full outbound queues.",
            |s| &s.typing_dropped,
        ),
        (
            "corelay_slow_consumer_closes_total",
            "counter",
            "Connections closed for overflowing their outbound queue.",
            |s| &s.slow_consumer_closes,
        ),
        (
            "corelay_mesh_refusals_total",
            "counter",
            "Sends, joins, typing and presence requests refused because the queue toward their room's home shard was full (limits.mesh_outbox).",
            |s| &s.mesh_refusals,
        ),
        (
            "corelay_queued_bytes",
            "gauge",
            "Bytes held in the shard's queues (outbound, home, mesh, held, polling, emits; see corelay_queue_bytes), counted against its part of limits.memory_budget.",
            |s| &s.queued_bytes,
        ),
        (
            "corelay_memory_pressure",
            "gauge",
            "1 while the shard refuses sends, joins and presence with unavailable: its queues hold more than half its part of limits.memory_budget.",
            |s| &s.memory_pressure,
        ),
        (
            "corelay_budget_closes_total",
            "counter",
            "Connections cut (largest queues first) because the shard was past its part of limits.memory_budget.",
            |s| &s.budget_closes,
        ),
        (
            "corelay_budget_refusals_total",
            "counter",
            "Sends, joins and presence requests refused with unavailable for limits.memory_budget.",
            |s| &s.budget_refusals,
        ),
        (
            "corelay_store_errors_total",
            "counter",
            "History store operations that failed.",
            |s| &s.store_errors,
        ),
        (
            "corelay_connect_rate_limited_total",
            "counter",
            "New sessions refused with HTTP 429: their source address opened sessions faster than limits.connect_rate_per_ip.",
            |s| &s.connect_rate_limited,
        ),
        (
            "corelay_redis_link_down",
            "gauge",
            "1 while the shard's link to Redis is down (cluster mode).",
            |s| &s.redis_link_down,
        ),
        (
            "corelay_user_limit_refusals_total",
            "counter",
            "Socket.IO CONNECTs refused with too_many_connections: the user already held limits.max_connections_per_user.",
            |s| &s.user_limit_refusals,
        ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::new(2);
        m.shards[0].observe_fanout(Duration::from_micros(70));
        m.shards[1].observe_fanout(Duration::from_millis(3));
        let text = m.render_prometheus(true);
        assert!(
            text.contains("corelay_fanout_latency_seconds_bucket{le=\"0.0001\"} 1"),
            "{text}"
        );
        assert!(text.contains("corelay_fanout_latency_seconds_bucket{le=\"0.005\"} 2"));
        assert!(text.contains("corelay_fanout_latency_seconds_count 2"));
        assert!(text.contains("corelay_connections{shard=\"1\"} 0"));
        m.shards[1].hooks.observe(2, Duration::from_millis(3));
        m.shards[0].hooks.failed(2, 0);
        let text = m.render_prometheus(true);
        assert!(
            text.contains("corelay_hook_calls_total{hook=\"publish\"} 1"),
            "{text}"
        );
        assert!(text.contains("corelay_hook_failures_total{hook=\"publish\",reason=\"timeout\"} 1"));
        assert!(
            text.contains("corelay_hook_latency_seconds_bucket{hook=\"publish\",le=\"0.005\"} 1")
        );
    }
}
