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
//!
//! Two readers: [`Reader::Epoll`] (the default) sleeps in `epoll_wait` like a real client
//! (tokio, Node), so a write to an idle reader also pays for waking it up, which the
//! kernel charges to the writer too; [`Reader::Spin`] sweeps the sockets without ever
//! sleeping, the bare TCP cost with no wake-ups.

use anyhow::{bail, Context as _};
use serde::Serialize;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the far ends are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reader {
    /// One thread blocked in `epoll_wait` on every socket, as an event-loop client is.
    Epoll,
    /// One thread sweeping every socket with non-blocking reads, never sleeping long.
    Spin,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct FloorOpts {
    /// How the far ends are read.
    pub reader: Reader,
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
    /// How the far ends were read.
    pub reader: Reader,
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
             writes       {} writes of {} x {} bytes over {} sockets in {:.1} s ({:.0} msg/s), {:?} reader\n\
             writer cpu   user {:.3} s  sys {:.3} s\n\
             floor        {:.2} µs CPU per message ({:.2} µs per write)\n\
             read back    {} bytes\n",
            self.writes,
            self.per_write,
            self.frame_bytes,
            self.sockets,
            self.wall_s,
            self.messages_per_sec,
            self.reader,
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
    // SAFETY: `rusage` is plain integers, for which all zeroes is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own; RUSAGE_THREAD is valid on Linux.
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
        let mode = opts.reader;
        std::thread::spawn(move || match mode {
            Reader::Spin => read_spinning(&readers, &done),
            Reader::Epoll => read_with_epoll(&readers, &done),
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
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))??;

    let messages = total_writes * opts.per_write as u64;
    let user = (u1 - u0).as_secs_f64();
    let sys = (s1 - s0).as_secs_f64();
    Ok(FloorReport {
        scenario: "floor",
        reader: opts.reader,
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

/// Reads everything a socket has now; the bytes read.
fn drain(mut r: &TcpStream, buf: &mut [u8]) -> u64 {
    let mut total = 0;
    loop {
        match r.read(buf) {
            Ok(0) => return total,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return total, // WouldBlock, or the pair is gone
        }
    }
}

/// Sweeps every socket until `done` and a sweep finds nothing; the bytes read.
fn read_spinning(readers: &[TcpStream], done: &AtomicBool) -> anyhow::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let finished = done.load(Ordering::Acquire);
        let got: u64 = readers.iter().map(|r| drain(r, &mut buf)).sum();
        total += got;
        if finished && got == 0 {
            return Ok(total);
        }
        if got == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// Waits in `epoll_wait` on every socket (level-triggered) and reads what is ready, until
/// `done` and a wait times out; the bytes read.
fn read_with_epoll(readers: &[TcpStream], done: &AtomicBool) -> anyhow::Result<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain epoll calls on descriptors this function owns or borrows; the epoll
    // descriptor is closed before returning.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        bail!("epoll_create1: {}", std::io::Error::last_os_error());
    }
    for (i, r) in readers.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: `ep` is our epoll descriptor, `r` a socket we borrow, `ev` lives on our
        // stack for the call.
        if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, r.as_raw_fd(), &mut ev) } < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: `ep` is ours and closed once, here, before returning.
            unsafe { libc::close(ep) };
            bail!("epoll_ctl: {e}");
        }
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        // SAFETY: `events` is a live buffer of `events.len()` entries for the kernel to fill.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 100) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            // SAFETY: `ep` is ours and closed once, here, before returning.
            unsafe { libc::close(ep) };
            bail!("epoll_wait: {e}");
        }
        if n == 0 && done.load(Ordering::Acquire) {
            // SAFETY: `ep` is ours and closed once, here, before returning.
            unsafe { libc::close(ep) };
            return Ok(total);
        }
        for ev in &events[..n as usize] {
            if let Some(r) = readers.get(ev.u64 as usize) {
                total += drain(r, &mut buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_written_is_read_back_and_cpu_is_counted() {
        for reader in [Reader::Epoll, Reader::Spin] {
            check(reader);
        }
    }

    fn check(reader: Reader) {
        let r = run(&FloorOpts {
            reader,
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
