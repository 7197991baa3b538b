//! The memory budget's figures (`limits.memory_budget`) over shards, for `/healthz` and
//! `/metrics`: each shard publishes its own queued bytes and pressure in its counters.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use super::Metrics;

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

    /// `/healthz`'s `memory`: the budget, the bytes queued against it, and which shards
    /// refuse new work for it.
    pub fn memory_json(&self) -> serde_json::Value {
        serde_json::json!({
            "budget_bytes": self.memory_budget.load(Relaxed),
            "queued_bytes": self.queued_bytes(),
            "pressured_shards": self.memory_pressured_shards(),
        })
    }

    /// The budget itself, process-wide (the per-shard gauges are in the per-shard table).
    pub(super) fn render_memory(&self, out: &mut String) {
        let name = "corelay_memory_budget_bytes";
        let _ = writeln!(out, "# HELP {name} limits.memory_budget: bytes all outbound queues may hold (0: no bound).\n# TYPE {name} gauge\n{name} {}", self.memory_budget.load(Relaxed));
    }
}
