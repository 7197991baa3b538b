//! A monotonic clock expressed in Unix nanoseconds.
//!
//! Send times ride in message texts as Unix nanoseconds, so that any process on the machine
//! can read them; they are derived from one [`Instant`] so that they never go backwards.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A monotonic clock anchored to the wall clock once, at creation.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
    base_unix_ns: u64,
}

impl Clock {
    /// Anchors a new clock to the current wall-clock time.
    pub fn new() -> Clock {
        let base = Instant::now();
        let base_unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Clock { base, base_unix_ns }
    }

    /// Now, in Unix nanoseconds.
    pub fn now_ns(&self) -> u64 {
        self.base_unix_ns + self.base.elapsed().as_nanos() as u64
    }

    /// The Unix-nanosecond time of an instant (instants before the anchor map to it).
    pub fn ns_at(&self, at: Instant) -> u64 {
        self.base_unix_ns + at.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// The instant of a Unix-nanosecond time (times before the anchor map to it).
    pub fn instant_at(&self, ns: u64) -> Instant {
        self.base + Duration::from_nanos(ns.saturating_sub(self.base_unix_ns))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Parses a duration: `250ms`, `10s`, `2m`, `1h`, or a plain number of seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?} (try 500ms, 10s, 2m)"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m or h)")),
    };
    if !(secs.is_finite() && (0.0..1e9).contains(&secs)) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("3d").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn clock_round_trip() {
        let c = Clock::new();
        let now = Instant::now();
        let ns = c.ns_at(now);
        let back = c.instant_at(ns);
        let diff = if back > now { back - now } else { now - back };
        assert!(diff < Duration::from_micros(1));
        assert!(c.now_ns() >= ns);
    }
}
