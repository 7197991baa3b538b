//! The history store of a cluster with ScyllaDB (`store.kind = "scylla"` with `redis.url`):
//! Redis is the sequencer and the recent window, ScyllaDB the unbounded durable history.
//!
//! # Writing
//!
//! The [publish script](crate::cluster::shard_link::ShardLink::publish_batch) still does what it does
//! for the `redis` store: dedupe by `cid`, assign the offset, XADD to the room's stream
//! (trimmed by `history.max_len` / `max_age`), PUBLISH. The home shard then hands the
//! messages it published to [`ClusterStore::persist`], which writes them to ScyllaDB at
//! those offsets ([`ScyllaStore::append_cluster`]: hosts write concurrently, out of offset
//! order, and a rewrite is the same row), and acks the senders only once ScyllaDB has them.
//! A retry of a send whose ScyllaDB write failed hits the script's dedupe and gets the first
//! offset back; [`ClusterStore::persist_duplicate`] writes that message (read back from the
//! stream) again before the retry is acked.
//!
//! # Reading
//!
//! Every published message is in the room's stream until it is trimmed, so reads go to
//! the stream first, and to ScyllaDB only for what lies below the stream's window
//! ([`HistoryStore::read`] explains the merge). Gap fills and catch-ups of the home shards
//! (just behind the newest offset) are therefore Redis reads only; `history` and
//! `join {since}` reaching further back read ScyllaDB. A message is readable from the
//! stream as soon as the script ran, before its ScyllaDB write: exactly as with the `redis`
//! store, and as live delivery (which also precedes the ack in a cluster).
//!
//! # The sequencer never goes back
//!
//! [`HistoryStore::latest_offset`] (called when a home shard loads a room, and when it
//! catches up after a lost Redis link) also compares the Redis counter with ScyllaDB's
//! `room_latest`, and raises the counter when ScyllaDB is ahead: after Redis lost its data,
//! or for a keyspace first written by a single host, new messages then continue the room's
//! durable stream instead of overwriting it.

use super::redis::RedisStore;
use super::scylla::ScyllaStore;
use super::HistoryStore;
use crate::history::{HistoryQuery, StoreError, StoredMessage};

/// Recent history from the rooms' Redis streams, durable history in ScyllaDB: the store of
/// a cluster with `store.kind = "scylla"`. Cheap to clone, `Send + Sync`.
#[derive(Clone, Debug)]
pub struct ClusterStore {
    recent: RedisStore,
    durable: ScyllaStore,
}

impl ClusterStore {
    /// Composes the two: `recent` over the cluster's Redis connection, `durable` an open
    /// ScyllaDB store.
    pub fn new(recent: RedisStore, durable: ScyllaStore) -> ClusterStore {
        ClusterStore { recent, durable }
    }

    /// The Redis part (the streams the publish script writes).
    pub fn recent(&self) -> &RedisStore {
        &self.recent
    }

    /// The ScyllaDB part.
    pub fn durable(&self) -> &ScyllaStore {
        &self.durable
    }

    /// Writes messages the publish script stored (offsets assigned, possibly several rooms)
    /// to ScyllaDB; the senders may be acked once this returns `Ok`. `Unavailable` means
    /// not durable yet: the messages are in the stream and published, and writing them
    /// again is harmless (same rows).
    pub async fn persist(&self, batch: Vec<StoredMessage>) -> Result<(), StoreError> {
        self.durable.append_cluster(batch).await
    }

    /// A retried send (same user, room and `cid`) that the publish script answered with the
    /// first send's `offset`: makes sure that message is in ScyllaDB before the retry is
    /// acked, since the first send's write may have failed. The message is read back from
    /// the stream (the retry's own text may differ) and written again; when the stream no
    /// longer holds it, ScyllaDB must (else `Unavailable`, saying so).
    pub async fn persist_duplicate(
        &self,
        room: &str,
        user: &str,
        cid: &str,
        offset: u64,
    ) -> Result<(), StoreError> {
        match message_at(&self.recent, room, offset).await? {
            Some(m) if m.user == user && m.cid.as_deref() == Some(cid) => {
                self.durable.append_cluster(vec![m]).await
            }
            Some(m) => Err(StoreError::Corrupt(format!(
                "the dedupe record of user {user:?}, cid {cid:?} in room {room:?} names offset \
                 {offset}, which holds a message of user {:?} with cid {:?}",
                m.user, m.cid
            ))),
            None => match message_at(&self.durable, room, offset).await? {
                Some(_) => Ok(()),
                None => Err(StoreError::Unavailable(format!(
                    "message {offset} of room {room:?} (user {user:?}, cid {cid:?}) is no \
                     longer in the Redis stream and not in ScyllaDB"
                ))),
            },
        }
    }

    /// `Ok` when both parts are (no I/O); else the first failing part's error.
    pub fn health(&self) -> Result<(), StoreError> {
        self.recent.health()?;
        self.durable.health()
    }

    /// Closes both parts (the Redis connection itself belongs to the cluster layer).
    pub async fn close(&self) -> Result<(), StoreError> {
        self.recent.close();
        self.durable.close().await
    }

    /// The newest `limit` messages below `before` (`None`: the newest of all), oldest first:
    /// the stream's, completed from ScyllaDB below the stream's oldest entry.
    async fn below(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let query = before.map_or(HistoryQuery::Latest, HistoryQuery::Before);
        let recent = self.recent.read(room, query, limit).await?;
        if recent.len() >= limit {
            return Ok(recent);
        }
        // The stream has nothing older: below its oldest entry (or below `before` when it
        // has none there), only ScyllaDB can have more.
        let floor = recent.first().map(|m| m.offset).or(before);
        if floor.is_some_and(|f| f <= 1) {
            return Ok(recent);
        }
        let query = floor.map_or(HistoryQuery::Latest, HistoryQuery::Before);
        let mut older = self.durable.read(room, query, limit - recent.len()).await?;
        older.extend(recent);
        Ok(older)
    }

    /// The oldest `limit` messages above `after`, oldest first: the stream's when it holds
    /// `after + 1`, else ScyllaDB's up to the stream's oldest entry, then the stream's.
    async fn above(
        &self,
        room: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let recent = self
            .recent
            .read(room, HistoryQuery::After(after), limit)
            .await?;
        if recent
            .first()
            .is_some_and(|m| Some(m.offset) == after.checked_add(1))
        {
            return Ok(recent);
        }
        // Nothing in the stream above `after`: when Redis has handed out no offset above it
        // either, there is nothing anywhere (a client polling for news costs no ScyllaDB read).
        if recent.is_empty() && after >= self.recent.latest_offset(room).await? {
            return Ok(recent);
        }
        let mut older = self
            .durable
            .read(room, HistoryQuery::After(after), limit)
            .await?;
        if let Some(first) = recent.first() {
            older.retain(|m| m.offset < first.offset);
        }
        older.extend(recent);
        older.truncate(limit);
        Ok(older)
    }
}

impl HistoryStore for ClusterStore {
    /// Writes the batch to ScyllaDB as [`ClusterStore::persist`] does: the messages are
    /// expected in the Redis stream already (the publish script put them there); this does
    /// not write the stream.
    async fn append(&self, batch: Vec<StoredMessage>) -> Result<(), StoreError> {
        self.persist(batch).await
    }

    /// Reads the stream first and ScyllaDB only for what the stream no longer holds (see
    /// the module docs). A ScyllaDB failure fails the read only when ScyllaDB was needed.
    async fn read(
        &self,
        room: &str,
        query: HistoryQuery,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        match query {
            HistoryQuery::Latest => self.below(room, None, limit).await,
            HistoryQuery::Before(o) => self.below(room, Some(o), limit).await,
            HistoryQuery::After(o) => self.above(room, o, limit).await,
        }
    }

    /// The Redis counter, first raised to ScyllaDB's `room_latest` when that is ahead (see
    /// the module docs). When ScyllaDB cannot answer, the Redis counter alone (logged):
    /// Redis is the sequencer, and sends fail anyway until ScyllaDB is back.
    async fn latest_offset(&self, room: &str) -> Result<u64, StoreError> {
        let (recent, durable) = futures::future::join(
            self.recent.latest_offset(room),
            self.durable.latest_offset(room),
        )
        .await;
        let recent = recent?;
        match durable {
            Ok(durable) if durable > recent => {
                if self.recent.raise_offset(room, durable).await? {
                    tracing::warn!(
                        %room,
                        redis = recent,
                        scylla = durable,
                        "the Redis offset counter was behind ScyllaDB: raised it (Redis lost \
                         data, or this keyspace was written by a single host before)"
                    );
                }
                Ok(durable)
            }
            Ok(_) => Ok(recent),
            Err(e) => {
                tracing::warn!(%room, error = %e, "cannot compare the offset counter with ScyllaDB");
                Ok(recent)
            }
        }
    }

    /// Redis's dedupe record (the publish script's), as with the `redis` store.
    async fn find_cid(
        &self,
        room: &str,
        user: &str,
        cid: &str,
        not_before_ts: u64,
    ) -> Result<Option<StoredMessage>, StoreError> {
        self.recent.find_cid(room, user, cid, not_before_ts).await
    }
}

/// The message at exactly `offset` in `store`, if it holds it.
async fn message_at<S: HistoryStore>(
    store: &S,
    room: &str,
    offset: u64,
) -> Result<Option<StoredMessage>, StoreError> {
    let Some(below) = offset.checked_sub(1) else {
        return Ok(None);
    };
    Ok(store
        .read(room, HistoryQuery::After(below), 1)
        .await?
        .into_iter()
        .find(|m| m.offset == offset))
}
