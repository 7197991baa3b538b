//! Connections per user (`limits.max_connections_per_user`), counted per process.
//!
//! Each user's count is owned by one shard, `home_of(user)` (the same stable hash that
//! places rooms), so no count is shared or locked: the shard holding a connection asks
//! the owner over the mesh at Socket.IO CONNECT (`Acquire`, answered with
//! `MemberMsg::Admitted`) and tells it when that connection stops being connected
//! (`Release`: Socket.IO disconnect, or the session ended however it ended). A user's
//! entry exists only while it has connections, so the map is bounded by the process's
//! connections; entries reuse the user id's `Arc`, so counting allocates nothing per
//! connection.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

/// The counts this shard owns.
#[derive(Default)]
pub struct UserCounts {
    counts: RefCell<HashMap<Arc<str>, u32>>,
}

impl UserCounts {
    /// Counts one more connection for `user` unless it already has `limit` (0: no limit).
    /// True when counted.
    pub fn acquire(&self, user: Arc<str>, limit: u32) -> bool {
        let mut counts = self.counts.borrow_mut();
        match counts.get_mut(&user) {
            Some(n) if limit != 0 && *n >= limit => false,
            Some(n) => {
                *n += 1;
                true
            }
            None => {
                counts.insert(user, 1);
                true
            }
        }
    }

    /// Forgets one connection of `user` (a release without an acquire is ignored).
    pub fn release(&self, user: &str) {
        let mut counts = self.counts.borrow_mut();
        if let Some(n) = counts.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                counts.remove(user);
            }
        }
    }

    /// Connections counted for `user`.
    pub fn count(&self, user: &str) -> u32 {
        self.counts.borrow().get(user).copied().unwrap_or(0)
    }

    /// Users with at least one counted connection.
    pub fn users(&self) -> usize {
        self.counts.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_up_to_the_limit_and_forgets_at_zero() {
        let c = UserCounts::default();
        let alice: Arc<str> = Arc::from("alice");
        assert!(c.acquire(alice.clone(), 2));
        assert!(c.acquire(alice.clone(), 2));
        assert!(!c.acquire(alice.clone(), 2));
        assert!(c.acquire(Arc::from("bob"), 2));
        assert_eq!(c.count("alice"), 2);
        c.release("alice");
        assert!(c.acquire(alice.clone(), 2));
        c.release("alice");
        c.release("alice");
        c.release("bob");
        assert_eq!(
            c.users(),
            0,
            "no entry is kept for a user without connections"
        );
        c.release("carol");
        assert_eq!(c.users(), 0);
        for _ in 0..1000 {
            assert!(c.acquire(alice.clone(), 0), "0 is no limit");
        }
        assert_eq!(c.count("alice"), 1000);
    }
}
