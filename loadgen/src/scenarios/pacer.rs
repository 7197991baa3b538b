//! The pacer: hands each paced send to a sender at its scheduled time.
//!
//! Message `k` is due at `start + k / rate` and carries that time, so a late send shows as
//! latency rather than vanishing (no coordinated omission). The pacer's own lateness is
//! therefore part of every ack and delivery latency the loadgen reports, and it must be
//! small. tokio's timers fire on a 1 ms wheel: a pacer on them handed sends out 0.5–1 ms
//! late on average, and at 14,000 msg/s they left in bursts of 14 per tick. This one waits
//! on a `timerfd` (the kernel's high-resolution timer, through tokio's reactor, on the
//! senders' own thread so that handing a send out wakes no other thread), and wakes at
//! most once per [`QUANTUM`], which bounds both its lateness and its wake-ups at high rates.

use super::member::{Cmd, RunCtx};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;

/// The shortest time between two wake-ups of the pacer: sends due within it after a
/// wake-up wait for the next one. 10,000 wake-ups a second at most.
pub const QUANTUM: Duration = Duration::from_micros(100);

/// When each paced send is due: `total` sends, `k` at `start + k / rate`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// When send 0 is due.
    pub start: Instant,
    /// Sends per second.
    pub rate: f64,
    /// How many sends in all.
    pub total: u64,
}

impl Schedule {
    /// The sends due from `start` (included) to `end` (excluded) at `rate` per second.
    pub fn between(start: Instant, end: Instant, rate: f64) -> Schedule {
        let span = end.saturating_duration_since(start).as_secs_f64();
        let total = if rate > 0.0 && rate.is_finite() {
            (span * rate).floor() as u64
        } else {
            0
        };
        Schedule { start, rate, total }
    }

    /// When send `k` is due.
    pub fn due(&self, k: u64) -> Instant {
        self.start + Duration::from_secs_f64(k as f64 / self.rate)
    }
}

/// A one-shot timer with the kernel's resolution, for a task on a tokio runtime.
pub struct Timer {
    fd: OwnedFd,
}

impl Timer {
    /// A new timer (one file descriptor). Made before the run's connections are opened, so
    /// that a run at the descriptor limit fails on a connection, with its clear message.
    pub fn new() -> io::Result<Timer> {
        // SAFETY: plain syscall; the descriptor it returns is owned by `fd` from here on.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Timer { fd })
    }

    /// Registers the timer with the current runtime's reactor.
    fn register(self) -> io::Result<AsyncTimer> {
        // SAFETY: an `OwnedFd` keeps its descriptor open, and the same, for as long as it
        // lives, and the `AsyncFd` owns it.
        let fd = unsafe { AsyncFd::register_with_interest(self.fd, Interest::READABLE) }?;
        Ok(AsyncTimer { fd })
    }
}

/// A [`Timer`] registered with a runtime.
struct AsyncTimer {
    fd: AsyncFd<OwnedFd>,
}

impl AsyncTimer {
    /// Waits until `at` (`Instant` is `CLOCK_MONOTONIC` on Linux, as the timer is).
    async fn sleep_until(&self, at: Instant) -> io::Result<()> {
        let wait = at.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return Ok(());
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: wait.as_secs() as libc::time_t,
                tv_nsec: wait.subsec_nanos() as libc::c_long,
            },
        };
        let fd = self.fd.get_ref().as_raw_fd();
        // SAFETY: `fd` is our timerfd and `spec` a valid, initialised itimerspec.
        if unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            let mut ready = self.fd.readable().await?;
            let read = ready.try_io(|inner| {
                let mut expirations = [0u8; 8];
                // SAFETY: reads at most 8 bytes into an 8-byte buffer.
                let n =
                    unsafe { libc::read(inner.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match read {
                Ok(result) => {
                    // A one-shot timer fires once per arming, so it cannot be readable again
                    // before the next `timerfd_settime`: saying so now saves the read that
                    // would find it empty.
                    ready.clear_ready();
                    return result;
                }
                Err(_would_block) => continue,
            }
        }
    }
}

/// What [`run`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paced {
    /// Sends handed out: `schedule.total`.
    pub handed: u64,
    /// Wake-ups that handed sends out.
    pub wakes: u64,
}

/// Hands sends out in order, each once it is due, calling `hand_out(k, due)`. Must run on
/// a tokio runtime with I/O enabled.
pub async fn run(
    timer: Timer,
    schedule: &Schedule,
    mut hand_out: impl FnMut(u64, Instant),
) -> io::Result<Paced> {
    let timer = timer.register()?;
    let mut k = 0u64;
    let mut wakes = 0u64;
    let mut last_wake: Option<Instant> = None;
    while k < schedule.total {
        let due = schedule.due(k);
        let earliest = last_wake.map_or(due, |w| (w + QUANTUM).max(due));
        timer.sleep_until(earliest).await?;
        let now = Instant::now();
        last_wake = Some(now);
        wakes += 1;
        while k < schedule.total {
            let due = schedule.due(k);
            if due > now {
                break;
            }
            hand_out(k, due);
            k += 1;
        }
    }
    Ok(Paced { handed: k, wakes })
}

/// The pacer of a fan-out run, to spawn on the senders' runtime: sends go to `senders`
/// round robin. A failing timer (it cannot, short of the reactor failing) ends the sends
/// and counts as error `pacer_timer`.
pub async fn pace(
    ctx: Arc<RunCtx>,
    timer: Timer,
    senders: Vec<mpsc::Sender<Cmd>>,
    schedule: Schedule,
) {
    if senders.is_empty() {
        return;
    }
    let paced = run(timer, &schedule, |k, due| {
        hand_to(&ctx, &senders[(k % senders.len() as u64) as usize], due)
    })
    .await;
    if let Err(e) = paced {
        eprintln!("corelay-loadgen: the pacer's timer failed, sends stopped: {e}");
        ctx.errors.add("pacer_timer");
    }
}

/// Gives one send, stamped with its due time, to a sender; a sender whose queue is full
/// (it fell that far behind) counts as a pacer overflow.
fn hand_to(ctx: &RunCtx, tx: &mpsc::Sender<Cmd>, due: Instant) {
    let cmd = Cmd::Send {
        t_ns: ctx.clock.ns_at(due),
    };
    match tx.try_send(cmd) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            ctx.counters.pacer_overflow.fetch_add(1, Relaxed);
            ctx.errors.add("pacer_overflow");
        }
        Err(mpsc::error::TrySendError::Closed(_)) => ctx.errors.add("sender_gone"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_counts_the_sends_in_the_window() {
        let t0 = Instant::now();
        let s = Schedule::between(t0, t0 + Duration::from_secs(2), 1500.0);
        assert_eq!(s.total, 3000);
        assert_eq!(s.due(0), t0);
        assert_eq!(s.due(1500), t0 + Duration::from_secs(1));
        assert_eq!(Schedule::between(t0, t0, 10.0).total, 0);
        assert_eq!(
            Schedule::between(t0 + Duration::from_secs(1), t0, 10.0).total,
            0
        );
        assert_eq!(
            Schedule::between(t0, t0 + Duration::from_secs(1), 0.0).total,
            0
        );
    }

    /// Every send is handed out once, in order, never before it is due, and the sends due
    /// closer together than the quantum share wake-ups.
    #[tokio::test(flavor = "current_thread")]
    async fn hands_out_every_send_in_order_never_early() {
        let start = Instant::now() + Duration::from_millis(5);
        // One send per 10 µs for 200 ms.
        let schedule = Schedule::between(start, start + Duration::from_millis(200), 100_000.0);
        let mut seen = Vec::new();
        let paced = run(Timer::new().unwrap(), &schedule, |k, due| {
            seen.push((k, due, Instant::now()));
        })
        .await
        .unwrap();
        assert_eq!(paced.handed, 20_000);
        assert_eq!(seen.len(), 20_000);
        for (i, &(k, due, at)) in seen.iter().enumerate() {
            assert_eq!(k, i as u64);
            assert_eq!(due, schedule.due(k));
            assert!(at >= due, "send {k} handed out before it was due");
        }
        // Wake-ups are a quantum (100 µs) apart at least: 2,000 in 200 ms, plus the first.
        // Woken for every send, it would wake far more often.
        assert!(paced.wakes <= 2_001, "{} wake-ups in 200 ms", paced.wakes);
    }

    /// The timer waits at least as long as asked; a time already past returns at once.
    #[tokio::test(flavor = "current_thread")]
    async fn the_timer_never_fires_early() {
        let timer = Timer::new().unwrap().register().unwrap();
        for _ in 0..20 {
            let at = Instant::now() + Duration::from_micros(300);
            timer.sleep_until(at).await.unwrap();
            assert!(Instant::now() >= at);
        }
        let t = Instant::now();
        timer
            .sleep_until(t - Duration::from_millis(1))
            .await
            .unwrap();
        assert!(t.elapsed() < Duration::from_millis(50));
    }
}
