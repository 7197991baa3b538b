//! The feed's ledger in the embedded store: which rooms hold messages the backend's feed
//! has not had yet, and how far it got in each.
//!
//! Keyspace `feed_dirty`: key the room's prefix (see `encoding`), value the highest offset
//! appended while the feed was on (u64-BE). The writer puts it **in the same atomic batch
//! as the messages**, so a message that was acked (durable) always has its room marked:
//! after a crash the feed finds every room it owes something, and only those.
//!
//! Keyspace `feed_cursors`: same key, value the highest offset the backend acknowledged.
//! Written by the writer thread too, so that clearing a room's mark (when the cursor
//! reached it) can never race with an append raising it. Cursors are written without a
//! sync: a cursor lost in a crash only means some messages are delivered again, which the
//! feed allows (at least once).

use fjall::{Keyspace, OwnedWriteBatch};

use super::encoding::room_prefix;
use super::reader::read_error;
use crate::history::StoreError;
use crate::store::FeedPending;

/// Name of the keyspace of the rooms the feed owes messages.
pub(super) const FEED_DIRTY: &str = "feed_dirty";
/// Name of the keyspace of the feed's cursors.
pub(super) const FEED_CURSORS: &str = "feed_cursors";

/// The two keyspaces of the ledger.
#[derive(Clone)]
pub(super) struct FeedLedger {
    pub(super) dirty: Keyspace,
    pub(super) cursors: Keyspace,
}

impl FeedLedger {
    /// Marks `room` as holding messages up to `latest` (staged into the append's batch).
    pub(super) fn mark(&self, batch: &mut OwnedWriteBatch, room: &str, latest: u64) {
        if let Some(key) = room_prefix(room) {
            batch.insert(&self.dirty, key, latest.to_be_bytes());
        }
    }

    /// Moves the cursors of `rooms` to the given offsets, and clears the mark of each
    /// room whose mark is not above its new cursor (staged into `batch`).
    pub(super) fn delivered(
        &self,
        batch: &mut OwnedWriteBatch,
        rooms: &[(String, u64)],
    ) -> Result<(), StoreError> {
        for (room, offset) in rooms {
            let Some(key) = room_prefix(room) else {
                continue;
            };
            if let Some(v) = self.dirty.get(&key).map_err(read_error)? {
                if offset_of(&v)? <= *offset {
                    batch.remove(&self.dirty, key.clone());
                }
            }
            batch.insert(&self.cursors, key, offset.to_be_bytes());
        }
        Ok(())
    }

    /// Every marked room whose mark is above its cursor.
    pub(super) fn pending(&self) -> Result<Vec<FeedPending>, StoreError> {
        let mut out = Vec::new();
        for guard in self.dirty.iter() {
            let (key, value) = guard.into_inner().map_err(read_error)?;
            let latest = offset_of(&value)?;
            let delivered = match self.cursors.get(&key).map_err(read_error)? {
                Some(v) => offset_of(&v)?,
                None => 0,
            };
            if latest > delivered {
                out.push(FeedPending {
                    room: room_of(&key)?,
                    delivered,
                    latest,
                });
            }
        }
        Ok(out)
    }
}

fn offset_of(v: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = v
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("feed ledger value of {} bytes", v.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

/// The room of a room prefix (`u16-BE len | room`).
fn room_of(key: &[u8]) -> Result<String, StoreError> {
    let corrupt = || StoreError::Corrupt("feed ledger key is not a room".into());
    let (len, name) = key.split_first_chunk::<2>().ok_or_else(corrupt)?;
    if usize::from(u16::from_be_bytes(*len)) != name.len() {
        return Err(corrupt());
    }
    String::from_utf8(name.to_vec()).map_err(|_| corrupt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_keys_round_trip_and_bad_ones_are_refused() {
        let key = room_prefix("général").expect("short");
        assert_eq!(room_of(&key).expect("room"), "général");
        assert!(room_of(&[0, 5, b'a']).is_err());
        assert!(room_of(&[0]).is_err());
        assert!(offset_of(&[1, 2, 3]).is_err());
        assert_eq!(offset_of(&7u64.to_be_bytes()).expect("offset"), 7);
    }
}
