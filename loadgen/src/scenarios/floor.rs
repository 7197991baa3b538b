//! `floor`: what this host's kernel charges for one small write over loopback TCP.
//!
//! A server's "CPU per delivery" can never go below the cost of the `send` each delivery
//! needs. On loopback that cost includes the receiving side's TCP work too (the kernel
//! runs the peer's receive path in the sender's context), so it is the floor under any
//! server measured with a local load generator. This scenario measures it with no server
//! at all: one thread writes frames round-robin to `sockets` connected pairs at a paced
//! rate (blocking `write`, `TCP_NODELAY`, as a server's writer would), another thread
//! drains the other ends, and the writer thread's own CPU time (user + system, from
//! `getrusage(RUSAGE_THREAD)`) is divided by the writes and by the messages written.
//! With `per_write > 1`, that many frames go out in one write: the saving a server gets
//! when a member's frames queue up between two writes.

use anyhow::{bail, Context as _};
use serde::Serialize;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to measure.
#[derive(Debug, Clone)]
pub struct FloorOpts {
    /// Connected socket pairs the writes go round-robin over.
    pub sockets: usize,
    /// Messages per second, paced evenly.
    pub rate: f64,
    /// Bytes of one message (a delivered `message` frame is ~120-200 bytes).
    pub frame_bytes: usize,
    /// Messages per write.
    pub per_write: usize,
    /// How long to write.
    pub duration: Duration,
}

/// The figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct FloorReport {
    /// Always `"floor"`.
    pub scenario: &'static str,
    /// Socket pairs used.
    pub sockets: usize,
    /// Messages per write.
    pub per_write: usize,
    /// Bytes per message.
    pub frame_bytes: usize,
    /// Messages written.
    pub messages: u64,
    /// `write` calls made.
    pub writes: u64,
    /// Wall time of the writing.
    pub wall_s: f64,
    /// Messages per second achieved.
    pub messages_per_sec: f64,
    /// The writer thread's user CPU, seconds.
    pub writer_user_s: f64,
    /// The writer thread's system CPU, seconds.
    pub writer_sys_s: f64,
    /// Writer CPU per message, µs: the floor under a server's CPU per delivery.
    pub cpu_us_per_message: f64,
    /// Writer CPU per `write` call, µs.
    pub cpu_us_per_write: f64,
    /// Bytes the reader got back (must equal what was written).
    pub bytes_read: u64,
}

impl FloorReport {
    /// A few lines for a human.
    pub fn human(&self) -> String {
        format!(
            "== corelay-loadgen floor (no server: the kernel's cost of one loopback write)\n\
             writes       {} writes of {} x {} bytes over {} sockets in {:.1} s ({:.0} msg/s)\n\
             writer cpu   user {:.3} s  sys {:.3} s\n\
             floor        {:.2} µs CPU per message ({:.2} µs per write)\n\
             read back    {} bytes\n",
            self.writes,
            self.per_write,
            self.frame_bytes,
            self.sockets,
            self.wall_s,
            self.messages_per_sec,
            self.writer_user_s,
            self.writer_sys_s,
            self.cpu_us_per_message,
            self.cpu_us_per_write,
            self.bytes_read,
        )
    }
}

/// This thread's (user, system) CPU time.
fn thread_cpu() -> (Duration, Duration) {
    // SAFETY: getrusage writes into the zeroed struct we own; RUSAGE_THREAD is valid on Linux.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let t = |tv: libc::timeval| Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000);
    (t(ru.ru_utime), t(ru.ru_stime))
}

/// Runs the measurement (blocking; a few seconds longer than `duration`).
pub fn run(opts: &FloorOpts) -> anyhow::Result<FloorReport> {
    if opts.sockets == 0 || opts.per_write == 0 || opts.frame_bytes == 0 || opts.rate <= 0.0 {
        bail!("sockets, per-write, frame-bytes and rate must be positive");
    }
    crate::proc::ensure_fd_limit(2 * opts.sockets as u64 + 64)?;
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let addr = listener.local_addr()?;
    let mut readers = Vec::with_capacity(opts.sockets);
    let mut writers = Vec::with_capacity(opts.sockets);
    for _ in 0..opts.sockets {
        let r = TcpStream::connect(addr).context("connecting a loopback pair")?;
        let (w, _) = listener.accept()?;
        w.set_nodelay(true)?;
        r.set_nonblocking(true)?;
        readers.push(r);
        writers.push(w);
    }

    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                let finished = done.load(Ordering::Acquire);
                let mut got = false;
                for mut r in &readers {
                    loop {
                        match r.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                total += n as u64;
                                got = true;
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(_) => break,
                        }
                    }
                }
                if finished && !got {
                    return total;
                }
                if !got {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        })
    };

    let batch = vec![b'x'; opts.frame_bytes * opts.per_write];
    let writes_per_sec = opts.rate / opts.per_write as f64;
    let total_writes = (writes_per_sec * opts.duration.as_secs_f64()).ceil() as u64;
    let gap = Duration::from_secs_f64(1.0 / writes_per_sec);
    let (u0, s0) = thread_cpu();
    let start = Instant::now();
    let mut next = start;
    for i in 0..total_writes {
        writers[(i % opts.sockets as u64) as usize]
            .write_all(&batch)
            .context("writing to a loopback socket")?;
        next += gap;
        let now = Instant::now();
        if next > now + Duration::from_micros(500) {
            std::thread::sleep(next - now);
        }
    }
    let (u1, s1) = thread_cpu();
    let wall = start.elapsed();
    // Let the reader drain what is in flight, then stop it.
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::Release);
    let bytes_read = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))?;

    let messages = total_writes * opts.per_write as u64;
    let user = (u1 - u0).as_secs_f64();
    let sys = (s1 - s0).as_secs_f64();
    Ok(FloorReport {
        scenario: "floor",
        sockets: opts.sockets,
        per_write: opts.per_write,
        frame_bytes: opts.frame_bytes,
        messages,
        writes: total_writes,
        wall_s: wall.as_secs_f64(),
        messages_per_sec: messages as f64 / wall.as_secs_f64(),
        writer_user_s: user,
        writer_sys_s: sys,
        cpu_us_per_message: (user + sys) * 1e6 / messages as f64,
        cpu_us_per_write: (user + sys) * 1e6 / total_writes as f64,
        bytes_read,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_written_is_read_back_and_cpu_is_counted() {
        let r = run(&FloorOpts {
            sockets: 8,
            rate: 20_000.0,
            frame_bytes: 100,
            per_write: 2,
            duration: Duration::from_millis(300),
        })
        .unwrap();
        assert_eq!(r.messages, r.writes * 2);
        assert_eq!(r.bytes_read, r.messages * 100);
        assert!(r.cpu_us_per_write > 0.0);
        assert!((r.cpu_us_per_message * 2.0 - r.cpu_us_per_write).abs() < 1e-6);
    }
}
