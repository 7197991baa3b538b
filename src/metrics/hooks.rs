//! The hooks' counters (calls, failures by reason, latency), kept per shard like the rest
//! and rendered summed over shards, one series per hook.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// The hooks' names, in the order of their index (`hooks::Hook as usize`).
pub const HOOKS: [&str; 4] = ["connect", "join", "publish", "rpc"];
/// Why a hook call failed, in the order of their index (`hooks::FailureKind as usize`).
pub const HOOK_FAILURES: [&str; 8] = [
    "timeout",
    "connect",
    "io",
    "status",
    "redirect",
    "too_large",
    "not_json",
    "shape",
];
/// Upper bounds (seconds) of the hook latency histogram buckets.
pub const HOOK_LATENCY_BUCKETS: [f64; 10] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// One shard's hook counters.
#[derive(Default)]
pub struct HookStats {
    calls: [AtomicU64; HOOKS.len()],
    failures: [[AtomicU64; HOOK_FAILURES.len()]; HOOKS.len()],
    buckets: [[AtomicU64; HOOK_LATENCY_BUCKETS.len()]; HOOKS.len()],
    sum_ns: [AtomicU64; HOOKS.len()],
}

impl HookStats {
    /// Records a finished call of hook `hook` (an index into [`HOOKS`]) and how long it took.
    pub fn observe(&self, hook: usize, took: Duration) {
        let (Some(calls), Some(buckets), Some(sum)) = (
            self.calls.get(hook),
            self.buckets.get(hook),
            self.sum_ns.get(hook),
        ) else {
            return;
        };
        calls.fetch_add(1, Relaxed);
        let secs = took.as_secs_f64();
        for (bound, n) in HOOK_LATENCY_BUCKETS.iter().zip(buckets) {
            if secs <= *bound {
                n.fetch_add(1, Relaxed);
            }
        }
        sum.fetch_add(took.as_nanos() as u64, Relaxed);
    }

    /// Counts a failed call of `hook` for `reason` (an index into [`HOOK_FAILURES`]).
    pub fn failed(&self, hook: usize, reason: usize) {
        if let Some(n) = self.failures.get(hook).and_then(|f| f.get(reason)) {
            n.fetch_add(1, Relaxed);
        }
    }
}

/// The hooks' figures for the console, summed over `shards`: per hook, its calls, failed
/// calls and the sum of their durations (ms).
pub(super) fn json<'a>(shards: impl Iterator<Item = &'a HookStats> + Clone) -> serde_json::Value {
    let sum = |f: &dyn Fn(&HookStats) -> u64| shards.clone().map(f).sum::<u64>();
    let mut out = serde_json::Map::new();
    for (h, hook) in HOOKS.iter().enumerate() {
        let failures: u64 = (0..HOOK_FAILURES.len())
            .map(|r| sum(&|s| s.failures[h][r].load(Relaxed)))
            .sum();
        out.insert(
            (*hook).to_owned(),
            serde_json::json!({
                "calls": sum(&|s| s.calls[h].load(Relaxed)),
                "failures": failures,
                "latency_sum_ms": sum(&|s| s.sum_ns[h].load(Relaxed)) / 1_000_000,
            }),
        );
    }
    serde_json::Value::Object(out)
}

/// Renders the hooks' series, summed over `shards`.
pub(super) fn render<'a>(out: &mut String, shards: impl Iterator<Item = &'a HookStats> + Clone) {
    let sum = |f: &dyn Fn(&HookStats) -> u64| shards.clone().map(f).sum::<u64>();
    let name = "corelay_hook_calls_total";
    let _ = writeln!(out, "# HELP {name} Calls of the backend's hooks, by hook (failed ones included).\n# TYPE {name} counter");
    for (h, hook) in HOOKS.iter().enumerate() {
        let n = sum(&|s| s.calls[h].load(Relaxed));
        let _ = writeln!(out, "{name}{{hook=\"{hook}\"}} {n}");
    }
    let name = "corelay_hook_failures_total";
    let _ = writeln!(out, "# HELP {name} Hook calls that failed (hooks.on_failure decided), by hook and reason.\n# TYPE {name} counter");
    for (h, hook) in HOOKS.iter().enumerate() {
        for (r, reason) in HOOK_FAILURES.iter().enumerate() {
            let n = sum(&|s| s.failures[h][r].load(Relaxed));
            let _ = writeln!(out, "{name}{{hook=\"{hook}\",reason=\"{reason}\"}} {n}");
        }
    }
    let name = "corelay_hook_latency_seconds";
    let _ = writeln!(out, "# HELP {name} Time a hook call took, from asking to the answer or the failure.\n# TYPE {name} histogram");
    for (h, hook) in HOOKS.iter().enumerate() {
        for (b, bound) in HOOK_LATENCY_BUCKETS.iter().enumerate() {
            let n = sum(&|s| s.buckets[h][b].load(Relaxed));
            let _ = writeln!(out, "{name}_bucket{{hook=\"{hook}\",le=\"{bound}\"}} {n}");
        }
        let count = sum(&|s| s.calls[h].load(Relaxed));
        let ns = sum(&|s| s.sum_ns[h].load(Relaxed));
        let _ = writeln!(out, "{name}_bucket{{hook=\"{hook}\",le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{hook=\"{hook}\"}} {}", ns as f64 / 1e9);
        let _ = writeln!(out, "{name}_count{{hook=\"{hook}\"}} {count}");
    }
}
