//! A TCP fault proxy owned by the test: it accepts on an address of the test's namespace
//! and forwards each connection to `upstream`, adding what its [`Faults`] say, changeable
//! while it runs:
//!
//! - latency with jitter, per direction, bytes kept in order (a chunk never leaves before
//!   the one read before it);
//! - a stall: bytes are held (not lost) until the stall ends;
//! - resets: while they are on, each connection lives a random time, then both its
//!   sockets are closed with an RST (`SO_LINGER` 0), no FIN first.
//!
//! The randomness comes from a seeded generator, so a run can be repeated.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// What the proxy does to the traffic; change it through [`FaultProxy::set`].
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Added to every chunk, in each direction.
    pub latency: Duration,
    /// Each chunk's delay is `latency` ± up to this much (uniform).
    pub jitter: Duration,
    /// Hold every byte until this is false again.
    pub stalled: bool,
    /// Reset each connection after a time uniform in this range (from when it opened or
    /// resets were turned on, whichever is later).
    pub reset_after: Option<(Duration, Duration)>,
}

/// A small xorshift generator: deterministic from its seed.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A duration uniform in `[lo, hi]`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_micros() as u64;
        lo + Duration::from_micros(if span == 0 {
            0
        } else {
            self.next() % (span + 1)
        })
    }
}

struct Shared {
    faults: Mutex<Faults>,
    rng: Mutex<Rng>,
    stop: AtomicBool,
    resets: AtomicU64,
    accepted: AtomicU64,
}

/// The running proxy; stops accepting on drop (connections it holds end with the test).
pub struct FaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Listens on `bind` (port 0 picks one) and forwards to `upstream`.
    pub fn start(bind: SocketAddr, upstream: SocketAddr, faults: Faults, seed: u64) -> FaultProxy {
        let listener = TcpListener::bind(bind).expect("bind the proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            faults: Mutex::new(faults),
            rng: Mutex::new(Rng::new(seed)),
            stop: AtomicBool::new(false),
            resets: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        });
        let s = shared.clone();
        std::thread::spawn(move || accept_loop(listener, upstream, s));
        FaultProxy { addr, shared }
    }

    /// Changes the faults (new chunks and new connections see them).
    pub fn set(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.shared.faults.lock().expect("faults"));
    }

    /// How many connections it reset so far.
    pub fn resets(&self) -> u64 {
        self.shared.resets.load(Ordering::Relaxed)
    }

    /// How many connections it accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => {
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                let s = shared.clone();
                std::thread::spawn(move || connection(client, upstream, s));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Closes with an RST instead of a FIN once the last descriptor goes.
fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn connection(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(2)) else {
        set_linger_zero(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let reset = Arc::new(AtomicBool::new(false));
    let live = Arc::new(AtomicU64::new(2));
    for (from, to) in [(&client, &server), (&server, &client)] {
        let (from, to) = (
            from.try_clone().expect("clone"),
            to.try_clone().expect("clone"),
        );
        let (s, r, l) = (shared.clone(), reset.clone(), live.clone());
        std::thread::spawn(move || {
            pump(from, to, s, r);
            l.fetch_sub(1, Ordering::SeqCst);
        });
    }
    // Resets apply to connections already open too: each draws its time to live when
    // resets are turned on, and forgets it when they are turned off.
    let mut deadline: Option<Instant> = None;
    while live.load(Ordering::SeqCst) > 0 && !shared.stop.load(Ordering::Relaxed) {
        let range = shared.faults.lock().expect("faults").reset_after;
        deadline = match (range, deadline) {
            (None, _) => None,
            (Some(_), Some(d)) => Some(d),
            (Some((lo, hi)), None) => {
                Some(Instant::now() + shared.rng.lock().expect("rng").between(lo, hi))
            }
        };
        if deadline.is_some_and(|d| Instant::now() >= d) {
            reset.store(true, Ordering::SeqCst);
            shared.resets.fetch_add(1, Ordering::Relaxed);
            for s in [&client, &server] {
                set_linger_zero(s);
                // Wakes the readers (no packet is sent); the last close then sends the RST.
                let _ = s.shutdown(Shutdown::Read);
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One direction: a reader stamping chunks with when they may leave, a writer sending them
/// then. A normal end (EOF) is passed on as a FIN; a reset passes nothing on.
fn pump(mut from: TcpStream, to: TcpStream, shared: Arc<Shared>, reset: Arc<AtomicBool>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = {
        let (shared, reset) = (shared.clone(), reset.clone());
        let mut to = to;
        std::thread::spawn(move || {
            for (due, chunk) in rx {
                loop {
                    let stalled = shared.faults.lock().expect("faults").stalled;
                    let now = Instant::now();
                    if reset.load(Ordering::SeqCst) {
                        return;
                    }
                    if !stalled && now >= due {
                        break;
                    }
                    let wait = if stalled {
                        Duration::from_millis(10)
                    } else {
                        due - now
                    };
                    std::thread::sleep(wait.min(Duration::from_millis(10)));
                }
                if to.write_all(&chunk).is_err() {
                    return;
                }
            }
            if !reset.load(Ordering::SeqCst) {
                let _ = to.shutdown(Shutdown::Write);
            }
        })
    };
    let mut last_due = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if reset.load(Ordering::SeqCst) {
            break;
        }
        let faults = shared.faults.lock().expect("faults").clone();
        let delay = if faults.jitter.is_zero() {
            faults.latency
        } else {
            let lo = faults.latency.saturating_sub(faults.jitter);
            shared
                .rng
                .lock()
                .expect("rng")
                .between(lo, faults.latency + faults.jitter)
        };
        last_due = last_due.max(Instant::now() + delay);
        if tx.send((last_due, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
}
