//! The per-source-address limit on new Engine.IO sessions (`limits.connect_rate_per_ip`,
//! `limits.connect_burst_per_ip`), shared by every shard of the process without a lock.
//!
//! Each address has a token bucket kept as one number, its GCRA "theoretical arrival
//! time" (`tat`): a session is allowed when `max(tat, now) + interval` is at most
//! `burst × interval` ahead of now, and then `tat` moves to that value. A bucket with
//! `tat <= now` is full, the same as no bucket at all.
//!
//! The buckets live in one fixed table of `AtomicU64` slots allocated at start (so memory
//! is bounded whatever the number of attacking addresses): a slot packs a 20-bit
//! fingerprint of the address with a 44-bit `tat` in 10 µs ticks (5.5 years of uptime).
//! An address probes a window of [`PROBE`] slots from its hash (keyed per process, so
//! nobody can aim collisions); a new address takes an empty or full slot, else evicts
//! the bucket closest to full — the addresses hitting the limit hardest are evicted
//! last. Updates are compare-and-swap loops; no shard ever waits for another. (Two shards
//! adding the same new address at the same instant may, rarely, give it two buckets for
//! a while: the limit is then briefly looser, never stricter.)
//!
//! IPv6 addresses are limited per /64 (one host usually owns a whole /64); IPv4-mapped
//! IPv6 addresses count as their IPv4 address.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Slots in the table: 65,536 × 8 bytes = 512 KiB per process.
pub const SLOTS: usize = 1 << 16;
/// Slots an address may occupy, starting at its hash.
pub const PROBE: usize = 8;

/// Length of one clock tick.
const TICK: Duration = Duration::from_micros(10);
const TAT_BITS: u32 = 44;
const TAT_MASK: u64 = (1 << TAT_BITS) - 1;
/// The longest a bucket may reach ahead (about 1.4 years of ticks), so that `tat` fits
/// its bits for years of uptime.
const MAX_WINDOW: u64 = 1 << 42;

/// Why a new session was refused: when the address may try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds for the `Retry-After` header (at least 1).
    pub fn secs(self) -> u64 {
        (self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0)).max(1)
    }
}

/// The process-wide table of per-address buckets.
pub struct ConnectLimiter {
    /// Empty when the limit is off.
    slots: Box<[AtomicU64]>,
    /// Ticks between two sessions at the sustained rate.
    interval: u64,
    /// How far ahead of now a bucket's `tat` may be: `burst × interval`.
    window: u64,
    epoch: Instant,
    hasher: std::collections::hash_map::RandomState,
}

impl ConnectLimiter {
    /// A limiter for `rate` sessions per second with `burst`; either 0 turns it off
    /// (and allocates nothing). `rate` is at most [`crate::config::MAX_CONNECT_RATE`].
    pub fn new(rate: f64, burst: f64) -> ConnectLimiter {
        let on = rate > 0.0 && burst >= 1.0;
        let interval = if on {
            (((1.0 / rate) / TICK.as_secs_f64()).round().max(1.0) as u64).min(MAX_WINDOW)
        } else {
            0
        };
        ConnectLimiter {
            slots: if on {
                (0..SLOTS).map(|_| AtomicU64::new(0)).collect()
            } else {
                Box::new([])
            },
            interval,
            window: (burst.floor() as u64)
                .saturating_mul(interval)
                .min(MAX_WINDOW),
            epoch: Instant::now(),
            hasher: Default::default(),
        }
    }

    /// `now` in ticks since the limiter was built. Tick 0 marks an empty slot, so the
    /// clock starts at 1.
    fn ticks(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.epoch).as_nanos() / TICK.as_nanos()) as u64 + 1
    }

    /// Whether the limit is on.
    pub fn enabled(&self) -> bool {
        !self.slots.is_empty()
    }

    /// Bytes the table holds (fixed once built).
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.slots)
    }

    /// Takes one session from `ip`'s bucket at `now`, or says when to retry.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), RetryAfter> {
        if !self.enabled() {
            return Ok(());
        }
        let hash = self.hasher.hash_one(limit_key(ip));
        let start = hash as usize & (SLOTS - 1);
        let fingerprint = hash >> TAT_BITS; // the top 20 bits
        let now = self.ticks(now);
        loop {
            let mut mine = None;
            // The slot to take for a new bucket: empty or full first, else closest to full.
            let mut victim: Option<(usize, u64)> = None;
            for i in 0..PROBE {
                let at = (start + i) & (SLOTS - 1);
                let v = self.slots[at].load(Ordering::Acquire);
                if v != 0 && v >> TAT_BITS == fingerprint {
                    mine = Some((at, v));
                    break;
                }
                let free = v == 0 || v & TAT_MASK <= now;
                let better = match victim {
                    None => true,
                    Some((_, w)) => {
                        let w_free = w == 0 || w & TAT_MASK <= now;
                        free && !w_free || (free == w_free && v & TAT_MASK < w & TAT_MASK)
                    }
                };
                if better {
                    victim = Some((at, v));
                }
            }
            let (at, old, tat) = match (mine, victim) {
                (Some((at, v)), _) => (at, v, v & TAT_MASK),
                (None, Some((at, v))) => (at, v, 0),
                (None, None) => return Ok(()), // PROBE > 0: unreachable
            };
            let next = tat.max(now) + self.interval;
            if next - now > self.window {
                let wait = next - self.window - now;
                return Err(RetryAfter(TICK * wait.min(u64::from(u32::MAX)) as u32));
            }
            let new = fingerprint << TAT_BITS | (next & TAT_MASK);
            if self.slots[at]
                .compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(());
            }
            // Another shard changed the slot meanwhile: look again.
        }
    }

    /// Slots holding a bucket that is not full at `now` (for tests and diagnostics).
    pub fn active_buckets(&self, now: Instant) -> usize {
        let now = self.ticks(now);
        self.slots
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) & TAT_MASK > now)
            .count()
    }
}

/// The key an address is limited by: IPv4 as is, IPv6 by its /64.
fn limit_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(u32::from(v4)),
            None => (u128::from(v6) >> 64 << 64) | 1,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    #[test]
    fn burst_then_refused_until_a_token_refills() {
        let l = ConnectLimiter::new(2.0, 3.0);
        let t0 = Instant::now();
        let a = v4(0x7f00_0001);
        for _ in 0..3 {
            assert_eq!(l.check(a, t0), Ok(()));
        }
        let retry = l.check(a, t0).unwrap_err();
        assert!(
            retry.0 > Duration::from_millis(490) && retry.0 <= Duration::from_millis(500),
            "{retry:?}"
        );
        assert_eq!(retry.secs(), 1);
        // Another address is not affected.
        assert_eq!(l.check(v4(0x7f00_0002), t0), Ok(()));
        // Half a second later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(l.check(a, t1), Ok(()));
        assert!(l.check(a, t1).is_err());
        // Long idle: the full burst again.
        let t2 = t1 + Duration::from_secs(10);
        for _ in 0..3 {
            assert_eq!(l.check(a, t2), Ok(()));
        }
        assert!(l.check(a, t2).is_err());
    }

    #[test]
    fn off_allocates_nothing_and_allows_all() {
        for (rate, burst) in [(0.0, 10.0), (10.0, 0.0)] {
            let l = ConnectLimiter::new(rate, burst);
            assert!(!l.enabled());
            assert_eq!(l.memory_bytes(), 0);
            let t0 = Instant::now();
            for _ in 0..1000 {
                assert_eq!(l.check(v4(1), t0), Ok(()));
            }
        }
    }

    #[test]
    fn ipv6_is_limited_per_64_and_mapped_v4_as_v4() {
        let l = ConnectLimiter::new(1.0, 1.0);
        let t0 = Instant::now();
        let a: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(l.check(IpAddr::V6(a), t0), Ok(()));
        assert!(l.check(IpAddr::V6(b), t0).is_err(), "same /64");
        assert_eq!(l.check(IpAddr::V6(c), t0), Ok(()));
        assert_eq!(l.check(v4(0x0a00_0001), t0), Ok(()));
        let mapped = Ipv4Addr::from(0x0a00_0001).to_ipv6_mapped();
        assert!(l.check(IpAddr::V6(mapped), t0).is_err());
    }

    #[test]
    fn a_flood_of_addresses_stays_in_the_table_and_the_heavy_one_stays_limited() {
        let l = ConnectLimiter::new(1.0, 5.0);
        let bytes = l.memory_bytes();
        assert_eq!(bytes, SLOTS * 8);
        let t0 = Instant::now();
        let heavy = v4(0xc633_6401);
        for _ in 0..5 {
            assert_eq!(l.check(heavy, t0), Ok(()));
        }
        assert!(l.check(heavy, t0).is_err());
        // A million other addresses, each opening one session, within one second.
        for i in 0..1_000_000u32 {
            let t = t0 + Duration::from_micros(u64::from(i));
            assert_eq!(l.check(v4(0x0a00_0000 + i), t), Ok(()));
        }
        assert_eq!(l.memory_bytes(), bytes, "the table never grows");
        // The evictions took the buckets closest to full; the heavy one is still empty.
        assert!(l.check(heavy, t0 + Duration::from_millis(999)).is_err());
        // Once every bucket refilled, every slot is free for reuse.
        let later = t0 + Duration::from_secs(6);
        assert_eq!(l.active_buckets(later), 0);
        assert_eq!(l.check(heavy, later), Ok(()));
    }

    #[test]
    fn shards_share_one_bucket() {
        let l = std::sync::Arc::new(ConnectLimiter::new(0.001, 10_000.0));
        let t0 = Instant::now();
        let ip = v4(0x7f00_0001);
        let allowed: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let l = l.clone();
                    s.spawn(move || (0..5000).filter(|_| l.check(ip, t0).is_ok()).count())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(allowed, 10_000, "exactly the burst, across threads");
    }
}
