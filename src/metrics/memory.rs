//! The memory budget's figures (`limits.memory_budget`) over shards, for `/healthz` and
//! `/metrics`: each shard publishes its own queued bytes and pressure in its counters.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::Metrics;

/// The names of the queues a shard's budget counts, in the order of its per-queue
/// figures (`transport::budget::Queue::ALL`).
pub const QUEUES: [&str; 6] = ["outbound", "home", "mesh", "held", "polling", "emits"];

/// Bytes counted in one shard's memory budget that another thread changes: what the
/// shard sent through the mesh and the receiving shards have not taken yet (the shard adds,
/// the receivers take), or the emits queued to it (the process's Redis link adds, the
/// shard takes). It sits on a cache line of its own, away from the counters its shard
/// writes all the time.
#[repr(align(128))]
#[derive(Debug, Default)]
pub struct SharedBytes(AtomicUsize);

impl SharedBytes {
    /// The sender counts a message of `len` bytes; returns the new total.
    pub fn sent(&self, len: usize) -> usize {
        self.0.fetch_add(len, Relaxed) + len
    }

    /// The receiver took a message of `len` bytes.
    pub fn taken(&self, len: usize) {
        self.0.fetch_sub(len, Relaxed);
    }

    /// Bytes sent and not taken yet.
    pub fn get(&self) -> usize {
        self.0.load(Relaxed)
    }
}

impl Metrics {
    /// Bytes queued to connections, summed over shards.
    pub fn queued_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.queued_bytes.load(Relaxed))
            .sum()
    }

    /// Shards refusing new work for memory now.
    pub fn memory_pressured_shards(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.memory_pressure.load(Relaxed))
            .sum()
    }

    /// Bytes in queue `i` of [`QUEUES`], summed over shards.
    fn queue_bytes(&self, i: usize) -> u64 {
        self.shards
            .iter()
            .map(|s| s.queue_bytes[i].load(Relaxed))
            .sum()
    }

    /// `/healthz`'s `memory`: the budget, the bytes queued against it (in all, and per
    /// queue), and which shards refuse new work for it.
    pub fn memory_json(&self) -> serde_json::Value {
        let queues: serde_json::Map<String, serde_json::Value> = QUEUES
            .iter()
            .enumerate()
            .map(|(i, q)| ((*q).to_owned(), self.queue_bytes(i).into()))
            .collect();
        serde_json::json!({
            "budget_bytes": self.memory_budget.load(Relaxed),
            "queued_bytes": self.queued_bytes(),
            "queues": queues,
            "pressured_shards": self.memory_pressured_shards(),
        })
    }

    /// The budget itself, process-wide (the per-shard gauges are in the per-shard table).
    pub(super) fn render_memory(&self, out: &mut String) {
        let name = "corelay_memory_budget_bytes";
        let _ = writeln!(out, "# HELP {name} limits.memory_budget: bytes all queues may hold (0: no bound).\n# TYPE {name} gauge\n{name} {}", self.memory_budget.load(Relaxed));
        let name = "corelay_queue_bytes";
        let _ = writeln!(out, "# HELP {name} Bytes held per shard and queue (outbound: connections' queues; home: commands and publishes until answered; mesh: sent toward other shards, not taken yet; held: packets a connection holds while its CONNECT is admitted or its own hook call is out; polling: request bodies; emits: @socket.io/redis-emitter emits queued to the shard).\n# TYPE {name} gauge");
        for (shard, s) in self.shards.iter().enumerate() {
            for (i, queue) in QUEUES.iter().enumerate() {
                let n = s.queue_bytes[i].load(Relaxed);
                let _ = writeln!(out, "{name}{{shard=\"{shard}\",queue=\"{queue}\"}} {n}");
            }
        }
    }
}
