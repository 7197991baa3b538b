//! What a run prints: a progress line on stderr (when it is a terminal), a human summary,
//! and, as the last line of stdout, one JSON object with every figure.

use crate::stats::Percentiles;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Every figure of a run. Fields that do not apply to a scenario are `null` in the JSON.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// `fanout`, `connect`, `churn` or `history`.
    pub scenario: String,
    /// Free-form label from `--label`.
    pub label: Option<String>,
    /// Targets, as given.
    pub targets: Vec<String>,
    /// Connections asked for (measured members; extra churn/reader connections not included).
    pub connections: u64,
    /// Connections that opened (and joined).
    pub connected: u64,
    /// Source addresses used (0: the kernel's choice).
    pub source_addrs: u32,
    /// Rooms.
    pub rooms: Option<u64>,
    /// Members per room.
    pub room_size: Option<u64>,
    /// Senders.
    pub senders: Option<u64>,
    /// Total send rate asked for, messages/s.
    pub rate: Option<f64>,
    /// Message text size (bytes, at least).
    pub text_bytes: Option<u64>,
    /// Warm-up, s.
    pub warmup_s: Option<f64>,
    /// Measured window (or hold time), s.
    pub duration_s: f64,
    /// Grace period, s.
    pub grace_s: Option<f64>,
    /// Messages sent in the window.
    pub sent: Option<u64>,
    /// Window messages acked ok.
    pub acked: Option<u64>,
    /// Window messages acked with an error.
    pub ack_errors: Option<u64>,
    /// Deliveries expected (members − 1 per window message not refused).
    pub expected: Option<u64>,
    /// Deliveries received.
    pub received: Option<u64>,
    /// Expected − received.
    pub loss: Option<u64>,
    /// Loss as a percentage of expected.
    pub loss_pct: Option<f64>,
    /// Received beyond expected.
    pub excess: Option<u64>,
    /// Gaps + reorders + duplicates, summed over (receiver, room).
    pub order_violations: Option<u64>,
    /// Offsets a receiver never got between two it got.
    pub order_gaps: Option<u64>,
    /// Offsets that arrived after a higher one.
    pub order_reorders: Option<u64>,
    /// Offsets delivered twice.
    pub order_duplicates: Option<u64>,
    /// Send → ack latency, ms.
    pub ack_p50_ms: Option<f64>,
    /// Send → ack latency p99, ms.
    pub ack_p99_ms: Option<f64>,
    /// Send → ack latency p99.9, ms.
    pub ack_p999_ms: Option<f64>,
    /// Send → ack latency max, ms.
    pub ack_max_ms: Option<f64>,
    /// Send → delivery latency p50, ms.
    pub delivery_p50_ms: Option<f64>,
    /// Send → delivery latency p99, ms.
    pub delivery_p99_ms: Option<f64>,
    /// Send → delivery latency p99.9, ms.
    pub delivery_p999_ms: Option<f64>,
    /// Send → delivery latency max, ms.
    pub delivery_max_ms: Option<f64>,
    /// Deliveries of window messages per second of window.
    pub deliveries_per_sec: Option<f64>,
    /// Handshake time p50 (TCP connect to Socket.IO CONNECT ack), ms.
    pub connect_p50_ms: Option<f64>,
    /// Handshake time p99, ms.
    pub connect_p99_ms: Option<f64>,
    /// Handshake time p99.9, ms.
    pub connect_p999_ms: Option<f64>,
    /// Handshake time max, ms.
    pub connect_max_ms: Option<f64>,
    /// Server CPU time in the window / deliveries, µs.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// The user-space part of `server_cpu_us_per_delivery` (the server's own code); the
    /// rest is kernel time (syscalls, TCP).
    pub server_user_us_per_delivery: Option<f64>,
    /// Server CPU use in the window, % of one core.
    pub server_cpu_pct: Option<f64>,
    /// Server RSS at the end of the window (or hold), KiB.
    pub server_rss_kib: Option<u64>,
    /// Server RSS growth from before connecting to all connected, per connection, KiB.
    pub kib_per_connection: Option<f64>,
    /// How late the loadgen wrote a window message against its schedule, p50, ms (part
    /// of the ack and delivery latency, spent in the loadgen).
    pub send_lag_p50_ms: Option<f64>,
    /// The same, p99, ms.
    pub send_lag_p99_ms: Option<f64>,
    /// This process's CPU use in the window, % of one core.
    pub loadgen_cpu_pct: Option<f64>,
    /// Bytes received by the kernel for the measured connections but not yet read by
    /// the loadgen, mean of samples over the window, KiB.
    pub loadgen_unread_kib_avg: Option<f64>,
    /// The largest of those samples, KiB.
    pub loadgen_unread_kib_max: Option<f64>,
    /// How long a delivered frame waited, on average, for the loadgen to read it (Little's
    /// law over the samples), ms: the loadgen's own share of the delivery latency.
    pub loadgen_lag_ms: Option<f64>,
    /// Connections lost during the run.
    pub disconnects: u64,
    /// All errors.
    pub errors: u64,
    /// Errors by kind.
    pub error_kinds: BTreeMap<String, u64>,
    /// The run hit its hard deadline.
    pub deadline_hit: bool,
    /// Scenario-specific figures (churn, history).
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
        None => "-".into(),
    }
}

fn fmt_opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

impl Summary {
    /// Fills the ack latency fields.
    pub fn set_ack(&mut self, p: Percentiles) {
        (
            self.ack_p50_ms,
            self.ack_p99_ms,
            self.ack_p999_ms,
            self.ack_max_ms,
        ) = (p.p50, p.p99, p.p999, p.max);
    }

    /// Fills the delivery latency fields.
    pub fn set_delivery(&mut self, p: Percentiles) {
        (
            self.delivery_p50_ms,
            self.delivery_p99_ms,
            self.delivery_p999_ms,
            self.delivery_max_ms,
        ) = (p.p50, p.p99, p.p999, p.max);
    }

    /// Fills the connect-time fields.
    pub fn set_connect(&mut self, p: Percentiles) {
        (
            self.connect_p50_ms,
            self.connect_p99_ms,
            self.connect_p999_ms,
            self.connect_max_ms,
        ) = (p.p50, p.p99, p.p999, p.max);
    }

    /// The human-readable summary (several lines).
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "== corelay-loadgen {}{} against {}",
            self.scenario,
            self.label
                .as_ref()
                .map(|l| format!(" [{l}]"))
                .unwrap_or_default(),
            self.targets.join(", ")
        );
        let _ = writeln!(
            s,
            "connections  {}/{} open{}{}",
            self.connected,
            self.connections,
            match (self.rooms, self.room_size) {
                (Some(r), Some(m)) => format!(", {r} rooms of {m}"),
                _ => String::new(),
            },
            self.senders
                .map(|x| format!(", {x} senders"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            s,
            "connect      p50 {} ms  p99 {} ms  p99.9 {} ms  max {} ms",
            fmt_ms(self.connect_p50_ms),
            fmt_ms(self.connect_p99_ms),
            fmt_ms(self.connect_p999_ms),
            fmt_ms(self.connect_max_ms)
        );
        if let Some(rate) = self.rate {
            let _ = writeln!(
                s,
                "sent         {} msgs in {:.1} s (asked {rate} msg/s), acked {}, ack errors {}",
                fmt_opt(self.sent),
                self.duration_s,
                fmt_opt(self.acked),
                fmt_opt(self.ack_errors)
            );
            let _ = writeln!(
                s,
                "ack          p50 {} ms  p99 {} ms  p99.9 {} ms  max {} ms",
                fmt_ms(self.ack_p50_ms),
                fmt_ms(self.ack_p99_ms),
                fmt_ms(self.ack_p999_ms),
                fmt_ms(self.ack_max_ms)
            );
            let _ = writeln!(
                s,
                "delivery     p50 {} ms  p99 {} ms  p99.9 {} ms  max {} ms",
                fmt_ms(self.delivery_p50_ms),
                fmt_ms(self.delivery_p99_ms),
                fmt_ms(self.delivery_p999_ms),
                fmt_ms(self.delivery_max_ms)
            );
            let _ = writeln!(
                s,
                "deliveries   {} of {} expected ({:.0}/s), loss {} ({:.3}%), excess {}",
                fmt_opt(self.received),
                fmt_opt(self.expected),
                self.deliveries_per_sec.unwrap_or(0.0),
                fmt_opt(self.loss),
                self.loss_pct.unwrap_or(0.0),
                fmt_opt(self.excess)
            );
            let _ = writeln!(
                s,
                "order        {} violations (gaps {}, reorders {}, duplicates {})",
                fmt_opt(self.order_violations),
                fmt_opt(self.order_gaps),
                fmt_opt(self.order_reorders),
                fmt_opt(self.order_duplicates)
            );
        }
        if self.server_rss_kib.is_some() {
            let _ = writeln!(
                s,
                "server       cpu {}% ({} µs/delivery, {} in user space), rss {} KiB ({} KiB/connection)",
                self.server_cpu_pct
                    .map(|v| format!("{v:.0}"))
                    .unwrap_or_else(|| "-".into()),
                self.server_cpu_us_per_delivery
                    .map(|v| format!("{v:.2}"))
                    .unwrap_or_else(|| "-".into()),
                self.server_user_us_per_delivery
                    .map(|v| format!("{v:.2}"))
                    .unwrap_or_else(|| "-".into()),
                fmt_opt(self.server_rss_kib),
                self.kib_per_connection
                    .map(|v| format!("{v:.1}"))
                    .unwrap_or_else(|| "-".into())
            );
        }
        if self.send_lag_p50_ms.is_some() {
            let _ = writeln!(
                s,
                "sends late   p50 {} ms  p99 {} ms (the loadgen's own delay before writing)",
                fmt_ms(self.send_lag_p50_ms),
                fmt_ms(self.send_lag_p99_ms)
            );
        }
        if let Some(v) = self.loadgen_cpu_pct {
            let _ = write!(s, "loadgen      cpu {v:.0}%");
            if let (Some(avg), Some(max)) =
                (self.loadgen_unread_kib_avg, self.loadgen_unread_kib_max)
            {
                let _ = write!(
                    s,
                    ", unread in its sockets avg {avg:.0} KiB (max {max:.0} KiB): frames waited {} ms for it",
                    fmt_ms(self.loadgen_lag_ms)
                );
            }
            let _ = writeln!(s);
        }
        let extra: Vec<String> = self.extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for chunk in extra.chunks(4) {
            let _ = writeln!(s, "{:<12} {}", "more", chunk.join("  "));
        }
        let _ = write!(
            s,
            "errors       {} {}{}",
            self.errors,
            serde_json::to_string(&self.error_kinds).unwrap_or_default(),
            if self.deadline_hit {
                "  (HARD DEADLINE HIT)"
            } else {
                ""
            }
        );
        s
    }

    /// Prints the human summary, then the JSON object as the last line of stdout.
    pub fn print(&self) {
        let json = serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", self.human());
        let _ = writeln!(out, "{json}");
        let _ = out.flush();
    }
}

/// A once-a-second progress line on stderr, drawn only when stderr is a terminal.
pub struct Progress {
    stop: Option<watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Starts drawing `line()` every second (when `enabled` and stderr is a terminal).
    pub fn start(
        enabled: bool,
        line: impl Fn(Duration) -> String + Send + Sync + 'static,
    ) -> Progress {
        if !enabled || !std::io::stderr().is_terminal() {
            return Progress {
                stop: None,
                task: None,
            };
        }
        let (tx, mut rx) = watch::channel(false);
        let line = Arc::new(line);
        let start = Instant::now();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = rx.wait_for(|s| *s) => break,
                    _ = tick.tick() => {
                        eprint!("\r\x1b[K{}", line(start.elapsed()));
                    }
                }
            }
            eprint!("\r\x1b[K");
        });
        Progress {
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops and erases the line.
    pub async fn finish(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(true);
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_every_field_and_extra_is_flat() {
        let mut s = Summary {
            scenario: "fanout".into(),
            rate: Some(100.0),
            ..Summary::default()
        };
        s.extra.insert("churn_opened".into(), Value::from(5));
        let v: Value = serde_json::to_value(&s).unwrap();
        for k in [
            "scenario",
            "connections",
            "rate",
            "sent",
            "acked",
            "expected",
            "received",
            "loss",
            "order_violations",
            "ack_p50_ms",
            "ack_p99_ms",
            "ack_p999_ms",
            "ack_max_ms",
            "delivery_p50_ms",
            "delivery_p99_ms",
            "delivery_p999_ms",
            "delivery_max_ms",
            "deliveries_per_sec",
            "server_cpu_us_per_delivery",
            "server_user_us_per_delivery",
            "server_rss_kib",
            "kib_per_connection",
            "loadgen_cpu_pct",
            "loadgen_unread_kib_avg",
            "loadgen_lag_ms",
            "send_lag_p99_ms",
            "errors",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["churn_opened"], 5);
        assert!(s.human().contains("fanout"));
    }
}
