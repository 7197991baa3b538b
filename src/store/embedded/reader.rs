//! The reader threads: history reads (forward scans where offsets are contiguous), latest
//! offsets and cid lookups, each answered on the request's oneshot, so a read never queues
//! behind the writer's sync.

use std::sync::mpsc;

use fjall::{Guard, Keyspace};

use super::encoding::{cid_key, decode_value, key_offset, message_key, room_prefix};
use super::ReadReq;
use crate::history::{HistoryQuery, StoreError, StoredMessage};

/// Maps an error met while reading: I/O is `Unavailable`, anything undecodable `Corrupt`.
pub(super) fn read_error(e: fjall::Error) -> StoreError {
    match e {
        fjall::Error::Io(e) | fjall::Error::Storage(fjall::LsmError::Io(e)) => {
            StoreError::Unavailable(format!("read failed: {e}"))
        }
        e => StoreError::Corrupt(format!("read failed: {e}")),
    }
}

/// The highest offset stored for a room, 0 when it has none.
pub(super) fn latest_on_disk(messages: &Keyspace, room: &str) -> Result<u64, StoreError> {
    let Some(prefix) = room_prefix(room) else {
        return Ok(0);
    };
    match messages.prefix(&prefix).next_back() {
        None => Ok(0),
        Some(guard) => key_offset(&prefix, &guard.key().map_err(read_error)?),
    }
}

/// A reader thread's fjall handles.
pub(super) struct Reader {
    pub(super) messages: Keyspace,
    pub(super) cids: Keyspace,
    pub(super) ledger: super::feed::FeedLedger,
}

impl Reader {
    /// Serves read requests until closed, or until every handle is dropped.
    pub(super) fn run(self, rx: mpsc::Receiver<ReadReq>) {
        let mut closing = None;
        while let Ok(req) = rx.recv() {
            match req {
                ReadReq::Read {
                    room,
                    query,
                    limit,
                    reply,
                } => {
                    let _ = reply.send(self.read(&room, query, limit));
                }
                ReadReq::Latest { room, reply } => {
                    let _ = reply.send(latest_on_disk(&self.messages, &room));
                }
                ReadReq::FindCid {
                    room,
                    user,
                    cid,
                    not_before_ts,
                    reply,
                } => {
                    let _ = reply.send(self.find_cid(&room, &user, &cid, not_before_ts));
                }
                ReadReq::FeedPending { reply } => {
                    let _ = reply.send(self.ledger.pending());
                }
                ReadReq::Close { reply } => {
                    closing = Some(reply);
                    break;
                }
            }
        }
        drop(self); // our fjall handles go before we say we are done
        if let Some(reply) = closing {
            let _ = reply.send(());
        }
    }

    fn read(
        &self,
        room: &str,
        query: HistoryQuery,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let Some(prefix) = room_prefix(room) else {
            return Ok(Vec::new());
        };
        match query {
            HistoryQuery::Latest => match latest_on_disk(&self.messages, room)? {
                0 => Ok(Vec::new()),
                last => self.newest_up_to(room, &prefix, last, limit),
            },
            HistoryQuery::Before(o) => match o.checked_sub(1) {
                None | Some(0) => Ok(Vec::new()),
                Some(last) => self.newest_up_to(room, &prefix, last, limit),
            },
            HistoryQuery::After(o) => {
                let Some(first) = o.checked_add(1) else {
                    return Ok(Vec::new());
                };
                let range = message_key(&prefix, first)..=message_key(&prefix, u64::MAX);
                collect(room, &prefix, self.messages.range(range), limit)
            }
        }
    }

    /// The newest `limit` messages with offset <= `last`, oldest first.
    ///
    /// Offsets are normally contiguous, so this reads forward from `last - limit + 1`
    /// (forward scans are about twice as fast as reverse ones in fjall); only when that
    /// comes up short because of gaps does it scan backwards.
    fn newest_up_to(
        &self,
        room: &str,
        prefix: &[u8],
        last: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let span = u64::try_from(limit).unwrap_or(u64::MAX).saturating_sub(1);
        let first = last.saturating_sub(span).max(1);
        let range = message_key(prefix, first)..=message_key(prefix, last);
        let out = collect(room, prefix, self.messages.range(range), limit)?;
        if out.len() == limit || first == 1 {
            return Ok(out);
        }
        let range = message_key(prefix, 0)..=message_key(prefix, last);
        let mut out = collect(room, prefix, self.messages.range(range).rev(), limit)?;
        out.reverse();
        Ok(out)
    }

    fn find_cid(
        &self,
        room: &str,
        user: &str,
        cid: &str,
        not_before_ts: u64,
    ) -> Result<Option<StoredMessage>, StoreError> {
        let (Some(key), Some(prefix)) = (cid_key(room, user, cid), room_prefix(room)) else {
            return Ok(None);
        };
        let Some(value) = self.cids.get(&key).map_err(read_error)? else {
            return Ok(None);
        };
        let offset = <[u8; 8]>::try_from(&*value)
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Corrupt(format!("cid entry of room {room} is malformed")))?;
        let Some(stored) = self
            .messages
            .get(message_key(&prefix, offset))
            .map_err(read_error)?
        else {
            return Err(StoreError::Corrupt(format!(
                "cid entry of room {room} points at missing offset {offset}"
            )));
        };
        let m = decode_value(room, offset, &stored)?;
        if m.user != user || m.cid.as_deref() != Some(cid) {
            return Err(StoreError::Corrupt(format!(
                "cid entry of room {room} points at offset {offset}, another user's or cid's message"
            )));
        }
        Ok((m.ts >= not_before_ts).then_some(m))
    }
}

/// Decodes up to `limit` entries of a room's key range, in the iterator's order.
fn collect(
    room: &str,
    prefix: &[u8],
    entries: impl Iterator<Item = Guard>,
    limit: usize,
) -> Result<Vec<StoredMessage>, StoreError> {
    let mut out = Vec::with_capacity(limit.min(1024));
    for guard in entries.take(limit) {
        let (key, value) = guard.into_inner().map_err(read_error)?;
        out.push(decode_value(room, key_offset(prefix, &key)?, &value)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::encoding::{message_key, room_prefix};
    use super::super::{EmbeddedStore, MESSAGES};
    use crate::history::{Durability, HistoryQuery, StoreError};
    use crate::store::HistoryStore;
    use fjall::{Database, KeyspaceCreateOptions, PersistMode};

    #[test]
    fn corrupt_value_on_disk_reads_as_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = Database::builder(dir.path()).open().expect("open fjall");
            let ks = db
                .keyspace(MESSAGES, KeyspaceCreateOptions::default)
                .expect("keyspace");
            let prefix = room_prefix("bad").expect("short");
            ks.insert(message_key(&prefix, 1), b"\x01garbage".as_slice())
                .expect("insert");
            let short = room_prefix("short").expect("short");
            ks.insert([short.as_slice(), &[1, 2, 3]].concat(), b"".as_slice())
                .expect("insert");
            db.persist(PersistMode::SyncAll).expect("persist");
        }
        let store = EmbeddedStore::open(dir.path(), Durability::Fsync).expect("open store");
        let got = futures::executor::block_on(store.read("bad", HistoryQuery::After(0), 10));
        assert!(matches!(got, Err(StoreError::Corrupt(_))), "{got:?}");
        let got = futures::executor::block_on(store.latest_offset("bad"));
        assert_eq!(got.expect("last key is well formed"), 1);
        let got = futures::executor::block_on(store.latest_offset("short"));
        assert!(matches!(got, Err(StoreError::Corrupt(_))), "{got:?}");
        futures::executor::block_on(store.close()).expect("close");
    }
}
