//! How far the loadgen's own reading lags: bytes the kernel has received for its sockets
//! that it has not read yet.
//!
//! On a machine the loadgen shares with the server, a saturated loadgen looks like a slow
//! server: frames wait in the loadgen's receive queues, and that wait counts as delivery
//! latency. Sampling those queues during the window tells the two apart. By Little's law,
//! the bytes waiting divided by the bytes read per second is how long a frame waits for
//! the loadgen, on average, after the kernel has it.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Time between two samples.
const EVERY: Duration = Duration::from_millis(200);

/// Bytes waiting unread in a socket's receive queue (`FIONREAD`), `None` if the fd is not
/// a socket any more.
pub fn unread_bytes(fd: RawFd) -> Option<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which is valid for it.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) };
    (rc == 0).then_some(n.max(0) as u64)
}

/// The inode behind an fd, `None` if the fd is not open.
fn inode(fd: RawFd) -> Option<u64> {
    // SAFETY: fstat fills the stat buffer it is given; all-zero bytes are a valid `stat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a `stat` the call may write.
    let rc = unsafe { libc::fstat(fd, &mut st) };
    (rc == 0).then_some(st.st_ino as u64)
}

/// The sockets to watch, registered by each member once it owns its connection.
///
/// Each fd is kept with its socket's inode: a member whose connection ends early closes
/// its fd, and the number may then be reused by another file, which must not be counted.
#[derive(Debug, Clone, Default)]
pub struct Watched(Arc<Mutex<Vec<(RawFd, u64)>>>);

impl Watched {
    /// Adds a socket.
    pub fn add(&self, fd: RawFd) {
        if let (Some(ino), Ok(mut fds)) = (inode(fd), self.0.lock()) {
            fds.push((fd, ino));
        }
    }

    /// The sum of [`unread_bytes`] over every watched socket still open.
    fn total_unread(&self) -> u64 {
        let fds = match self.0.lock() {
            Ok(fds) => fds.clone(),
            Err(_) => return 0,
        };
        fds.into_iter()
            .filter(|&(fd, ino)| inode(fd) == Some(ino))
            .filter_map(|(fd, _)| unread_bytes(fd))
            .sum()
    }
}

/// Unread bytes over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Backlog {
    /// Samples taken.
    pub samples: u64,
    /// Mean of the samples, bytes.
    pub avg_bytes: f64,
    /// Largest sample, bytes.
    pub max_bytes: u64,
}

impl Backlog {
    /// The mean wait of a byte in the receive queues (Little's law), in ms, given the
    /// bytes read per second over the same window.
    pub fn lag_ms(&self, bytes_per_sec: f64) -> Option<f64> {
        (self.samples > 0 && bytes_per_sec > 0.0).then(|| 1000.0 * self.avg_bytes / bytes_per_sec)
    }
}

/// Samples `watched` every 200 ms from `start` until `end`.
pub async fn sample(watched: Watched, start: Instant, end: Instant) -> Backlog {
    tokio::time::sleep_until(start.into()).await;
    let mut ticks = tokio::time::interval(EVERY);
    let (mut samples, mut sum, mut max) = (0u64, 0u128, 0u64);
    loop {
        ticks.tick().await;
        if Instant::now() >= end {
            break;
        }
        let unread = watched.total_unread();
        samples += 1;
        sum += unread as u128;
        max = max.max(unread);
    }
    Backlog {
        samples,
        avg_bytes: if samples > 0 {
            sum as f64 / samples as f64
        } else {
            0.0
        },
        max_bytes: max,
    }
}

/// Bytes a server's unmasked WebSocket frame of `payload` bytes takes on the wire.
pub fn frame_bytes(payload: usize) -> u64 {
    let header = match payload {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    };
    (header + payload) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn counts_what_was_sent_and_not_read() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (rx, _) = listener.accept().unwrap();
        assert_eq!(unread_bytes(rx.as_raw_fd()), Some(0));
        tx.write_all(&[7u8; 1000]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while unread_bytes(rx.as_raw_fd()) != Some(1000) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(unread_bytes(rx.as_raw_fd()), Some(1000));
        let watched = Watched::default();
        watched.add(rx.as_raw_fd());
        watched.add(tx.as_raw_fd());
        assert_eq!(watched.total_unread(), 1000);
        // The socket closed and its number reused by a file with bytes to read (dup2 does
        // both at once, so no other test's fd is touched): not counted.
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(unread_bytes(file.as_raw_fd()).unwrap_or(0) > 0);
        // SAFETY: both fds are open; `rx` keeps owning its number, now the file's copy.
        assert!(unsafe { libc::dup2(file.as_raw_fd(), rx.as_raw_fd()) } >= 0);
        assert_eq!(watched.total_unread(), 0);
    }

    #[tokio::test]
    async fn samples_over_the_window() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (rx, _) = listener.accept().unwrap();
        tx.write_all(&[1u8; 4000]).unwrap();
        let watched = Watched::default();
        watched.add(rx.as_raw_fd());
        let start = Instant::now();
        let b = sample(watched, start, start + Duration::from_millis(700)).await;
        assert!(b.samples >= 3, "{b:?}");
        assert_eq!(b.max_bytes, 4000);
        assert!(b.avg_bytes > 3000.0, "{b:?}");
        // 4000 bytes waiting, 400,000 read per second: each waits 10 ms.
        assert!((b.lag_ms(400_000.0).unwrap() - 10.0 * b.avg_bytes / 4000.0).abs() < 1e-9);
        assert_eq!(Backlog::default().lag_ms(1.0), None);
    }

    #[test]
    fn frame_sizes() {
        assert_eq!(frame_bytes(0), 2);
        assert_eq!(frame_bytes(125), 127);
        assert_eq!(frame_bytes(126), 130);
        assert_eq!(frame_bytes(70_000), 70_010);
    }
}
