//! The in-memory history store: for tests and throwaway runs (`store = "memory"`).
//!
//! Nothing survives a restart. All shards of one process share one map behind an
//! `Arc<Mutex<…>>`: acceptable here only because this backend is not meant to carry
//! production load; the real backends keep no shared lock on the hot path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{check_batch, HistoryStore};
use crate::history::{HistoryQuery, StoreError, StoredMessage};

/// One room's stream and its cid index.
#[derive(Debug, Default)]
struct Room {
    /// Messages in offset order (offsets strictly increase, see `check_batch`).
    messages: Vec<StoredMessage>,
    /// `(user, cid)` → offset of the newest message sent with that cid.
    cids: HashMap<(String, String), u64>,
    /// The highest offset appended while the feed was on (0: none).
    feed_mark: u64,
    /// The highest offset the feed's backend acknowledged.
    feed_cursor: u64,
}

#[derive(Debug, Default)]
struct Inner {
    rooms: Mutex<HashMap<String, Room>>,
    closed: AtomicBool,
    /// Whether appends mark their rooms for the backend's feed.
    feed: AtomicBool,
}

/// In-memory [`HistoryStore`] shared by every shard of one process.
///
/// For tests and throwaway runs only: it is one `Arc<Mutex<HashMap>>`, a lock that every
/// shard takes, and it forgets everything on restart.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl MemoryStore {
    /// A new, empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Marks the store closed: later calls fail with [`StoreError::Closed`], like the other
    /// backends after their shutdown.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
    }

    /// `Ok` unless closed (memory never runs out of disk).
    pub fn health(&self) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }

    /// From now on, appends mark their rooms for the backend's feed.
    pub fn enable_feed(&self) {
        self.inner.feed.store(true, Ordering::Release);
    }

    /// The rooms holding messages the feed has not delivered.
    pub fn feed_pending(&self) -> Result<Vec<super::FeedPending>, StoreError> {
        let rooms = self.rooms()?;
        Ok(rooms
            .iter()
            .filter(|(_, r)| r.feed_mark > r.feed_cursor)
            .map(|(room, r)| super::FeedPending {
                room: room.clone(),
                delivered: r.feed_cursor,
                latest: r.feed_mark,
            })
            .collect())
    }

    /// The feed delivered `rooms` up to these offsets.
    pub fn feed_delivered(&self, delivered: &[(String, u64)]) -> Result<(), StoreError> {
        let mut rooms = self.rooms()?;
        for (room, offset) in delivered {
            let r = rooms.entry(room.clone()).or_default();
            r.feed_cursor = *offset;
            if r.feed_mark <= *offset {
                r.feed_mark = 0;
            }
        }
        Ok(())
    }

    fn rooms(&self) -> Result<MutexGuard<'_, HashMap<String, Room>>, StoreError> {
        self.health()?;
        // A panic while holding the lock cannot leave a half-applied batch (appends are
        // checked before anything is written), so a poisoned lock is still consistent.
        Ok(self
            .inner
            .rooms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

impl HistoryStore for MemoryStore {
    async fn append(&self, batch: Vec<StoredMessage>) -> Result<(), StoreError> {
        let mut rooms = self.rooms()?;
        check_batch(&batch, |room| {
            Ok(rooms
                .get(room)
                .and_then(|r| r.messages.last())
                .map_or(0, |m| m.offset))
        })?;
        let feed = self.inner.feed.load(Ordering::Acquire);
        for m in batch {
            let room = rooms.entry(m.room.clone()).or_default();
            if let Some(cid) = &m.cid {
                room.cids.insert((m.user.clone(), cid.clone()), m.offset);
            }
            if feed {
                room.feed_mark = m.offset;
            }
            room.messages.push(m);
        }
        Ok(())
    }

    async fn read(
        &self,
        room: &str,
        query: HistoryQuery,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let rooms = self.rooms()?;
        let Some(r) = rooms.get(room) else {
            return Ok(Vec::new());
        };
        let msgs = &r.messages;
        let slice = match query {
            HistoryQuery::Latest => &msgs[msgs.len().saturating_sub(limit)..],
            HistoryQuery::Before(o) => {
                let end = msgs.partition_point(|m| m.offset < o);
                &msgs[end.saturating_sub(limit)..end]
            }
            HistoryQuery::After(o) => {
                let start = msgs.partition_point(|m| m.offset <= o);
                let end = start.saturating_add(limit).min(msgs.len());
                &msgs[start..end]
            }
        };
        Ok(slice.to_vec())
    }

    async fn latest_offset(&self, room: &str) -> Result<u64, StoreError> {
        let rooms = self.rooms()?;
        Ok(rooms
            .get(room)
            .and_then(|r| r.messages.last())
            .map_or(0, |m| m.offset))
    }

    async fn find_cid(
        &self,
        room: &str,
        user: &str,
        cid: &str,
        not_before_ts: u64,
    ) -> Result<Option<StoredMessage>, StoreError> {
        let rooms = self.rooms()?;
        let Some(r) = rooms.get(room) else {
            return Ok(None);
        };
        let Some(offset) = r.cids.get(&(user.to_owned(), cid.to_owned())) else {
            return Ok(None);
        };
        let found = r
            .messages
            .binary_search_by_key(offset, |m| m.offset)
            .ok()
            .and_then(|i| r.messages.get(i))
            .filter(|m| m.ts >= not_before_ts)
            .cloned();
        Ok(found)
    }
}
