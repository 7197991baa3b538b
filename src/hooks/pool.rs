//! A shard's connections to the backend: at most `hooks.max_connections` at once (a call
//! waits for a permit), and those idle kept for the next call. An idle connection the
//! backend may have closed by now (Node closes after 5 s) is not reused.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use glommio::sync::{Permit, Semaphore};

use super::conn::Conn;

/// Longest a connection stays idle in the pool before it is dropped rather than reused.
const MAX_IDLE: Duration = Duration::from_secs(4);

/// One shard's bounded set of connections to the backend.
pub struct Pool {
    permits: Semaphore,
    idle: RefCell<Vec<Conn>>,
}

impl Pool {
    /// A pool of at most `max` connections.
    pub fn new(max: usize) -> Pool {
        Pool {
            permits: Semaphore::new(max as u64),
            idle: RefCell::new(Vec::new()),
        }
    }

    /// Waits for the right to use a connection (the caller's timeout bounds the wait);
    /// `None` if the pool is closed.
    pub async fn permit(&self) -> Option<Permit<'_>> {
        self.permits.acquire_permit(1).await.ok()
    }

    /// The most recently used idle connection still fresh enough, if any.
    pub fn take_idle(&self, now: Instant) -> Option<Conn> {
        let mut idle = self.idle.borrow_mut();
        while let Some(conn) = idle.pop() {
            if now.saturating_duration_since(conn.idle_since) < MAX_IDLE {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps a connection whose last answer was read whole, for the next call.
    pub fn put_back(&self, mut conn: Conn, now: Instant) {
        conn.idle_since = now;
        let mut idle = self.idle.borrow_mut();
        // Oldest first: stale ones are dropped at the bottom of the stack.
        idle.retain(|c| now.saturating_duration_since(c.idle_since) < MAX_IDLE);
        idle.push(conn);
    }
}
