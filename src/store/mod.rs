//! The history store: where every room's message stream is kept, so that `join {since}`,
//! `history` and idempotent sends (`cid`) can be answered after the live fan-out is gone.
//!
//! One trait, [`HistoryStore`], is met by every backend (memory, embedded fjall, ScyllaDB,
//! Redis streams, and Redis + ScyllaDB composed for a cluster), and one test suite (`tests/store_suite.rs`) checks them all the same
//! way. A shard holds the configured backend as one [`Store`] value (enum dispatch, no
//! `dyn`), cloned from the value the main thread opened.
//!
//! Offsets are assigned by the room's home shard, never by the store: the store only keeps
//! them, refuses to overwrite one ([`StoreError::OffsetConflict`]) and answers range reads.
//!
//! # Shutting down
//!
//! Call [`Store::close`] once, after the shards have stopped sending appends: it writes out
//! and syncs what is pending, stops the store's threads and releases the data directory
//! (so it can be opened again, by this process or another). Calls made on any clone after
//! that fail with [`StoreError::Closed`]. Dropping every clone without `close` also stops
//! the threads, but does not wait for them; acked appends are durable either way (per the
//! configured [`Durability`]).

use std::collections::HashMap;
use std::path::Path;

pub mod cluster;
pub mod embedded;
pub mod memory;
pub mod redis;
pub mod scylla;

// Re-exported so the history store's callers (chat, transport, tests, benches) keep
// naming them `store::…`; they are defined in `history` so that `cluster` and `config`
// can use them without importing `store`.
pub use crate::history::{Durability, HistoryQuery, StoreError, StoredMessage};

/// The contract every history backend meets (memory, embedded, scylla, later redis).
///
/// Futures need not be `Send`: they run on a glommio shard. Calls never block the calling
/// thread on disk I/O (the embedded store does its work on its own threads).
// `async fn` in a public trait cannot promise `Send` futures; that is intended here: the
// callers are thread-per-core shards that never move a future between threads.
#[allow(async_fn_in_trait)]
pub trait HistoryStore {
    /// Durably appends messages (offsets already assigned by the room's home shard; per room
    /// they are contiguous and increasing, possibly several rooms in one batch). Returns once
    /// durable per the store's durability setting. All or nothing.
    ///
    /// Rejects with [`StoreError::OffsetConflict`] any offset not above the room's latest
    /// stored one. Appends are applied in the order their futures are first polled.
    async fn append(&self, batch: Vec<StoredMessage>) -> Result<(), StoreError>;

    /// Reads a slice of a room's stream, at most `limit` messages, oldest first.
    async fn read(
        &self,
        room: &str,
        query: HistoryQuery,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError>;

    /// Highest stored offset of the room, 0 when empty.
    async fn latest_offset(&self, room: &str) -> Result<u64, StoreError>;

    /// The message this user stored in this room with this cid at `ts >= not_before_ts`, if
    /// any (idempotent sends). When a cid was reused, only its newest message counts.
    async fn find_cid(
        &self,
        room: &str,
        user: &str,
        cid: &str,
        not_before_ts: u64,
    ) -> Result<Option<StoredMessage>, StoreError>;
}

/// A room the backend's feed owes messages: what it delivered, and the highest offset
/// stored while the feed was on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedPending {
    /// The room.
    pub room: String,
    /// The highest offset the feed's backend acknowledged (0: none).
    pub delivered: u64,
    /// The highest offset stored.
    pub latest: u64,
}

/// The configured backend, as one value a shard can hold (enum dispatch, no `dyn`).
///
/// Cheap to clone (`Arc` inside) and `Send`: open it once on the main thread and move a
/// clone into each shard.
#[derive(Clone, Debug)]
pub enum Store {
    /// In-process maps; nothing survives a restart. For tests and throwaway runs.
    Memory(memory::MemoryStore),
    /// fjall on local disk: the single-host default.
    Embedded(embedded::EmbeddedStore),
    /// ScyllaDB: unbounded history shared by the hosts of a cluster.
    Scylla(scylla::ScyllaStore),
    /// Redis streams: each room's recent history, written by the cluster's publish script.
    Redis(redis::RedisStore),
    /// A cluster with ScyllaDB: recent history from the Redis streams, durable history in
    /// ScyllaDB, written by the home shards at the offsets Redis assigned.
    Cluster(cluster::ClusterStore),
}

impl Store {
    /// A fresh, empty in-memory store (`store = "memory"`).
    pub fn memory() -> Store {
        Store::Memory(memory::MemoryStore::new())
    }

    /// Opens (creating it if needed) the embedded store in `dir` (`store = "embedded"`).
    ///
    /// Fails with [`StoreError::InUse`] when another store holds the directory, and with
    /// [`StoreError::Open`] (naming the directory and the OS error) when it cannot be
    /// created, written or read.
    pub fn open_embedded(dir: &Path, durability: Durability) -> Result<Store, StoreError> {
        embedded::EmbeddedStore::open(dir, durability).map(Store::Embedded)
    }

    /// Connects to ScyllaDB with the `[scylla]` settings (`store = "scylla"`), blocking the
    /// calling thread: call it on the main thread before the shards start. The driver runs
    /// on the process-wide [tokio bridge](crate::bridge::Bridge::global).
    ///
    /// Fails with [`StoreError::Open`] saying what is wrong: no node reachable ("cannot
    /// reach ScyllaDB at \[nodes\]: …"), keyspace or tables missing ("… run `corelay schema
    /// apply`"), or a `bucket_size` other than the keyspace was written with.
    pub fn open_scylla(config: &crate::config::ScyllaConfig) -> Result<Store, StoreError> {
        scylla::ScyllaStore::open(config).map(Store::Scylla)
    }

    /// The Redis store over `cluster`'s connection (`store = "redis"`). No I/O: the cluster
    /// is connected already. See [`redis::RedisStore`] for who writes the streams.
    pub fn redis(cluster: &crate::cluster::redis::RedisCluster) -> Store {
        Store::Redis(redis::RedisStore::new(cluster))
    }

    /// The store of a cluster with ScyllaDB (`store = "scylla"` and `redis.url` set): the
    /// streams of `cluster`'s Redis for recent history, `durable` for all of it. No I/O.
    pub fn cluster(
        cluster: &crate::cluster::redis::RedisCluster,
        durable: scylla::ScyllaStore,
    ) -> Store {
        Store::Cluster(cluster::ClusterStore::new(
            redis::RedisStore::new(cluster),
            durable,
        ))
    }

    /// Whether [`Store::persist_published`] does anything: true only for [`Store::Cluster`]
    /// (so the home shard copies nothing for the `redis` store).
    pub fn persists_published(&self) -> bool {
        matches!(self, Store::Cluster(_))
    }

    /// Cluster mode: makes messages the publish script stored durable before their senders
    /// are acked. Writes them to ScyllaDB for [`Store::Cluster`]; a no-op for the others
    /// (for the `redis` store the script's stream write is the durable write).
    pub async fn persist_published(&self, batch: Vec<StoredMessage>) -> Result<(), StoreError> {
        match self {
            Store::Cluster(s) => s.persist(batch).await,
            _ => Ok(()),
        }
    }

    /// Cluster mode: a retried send the publish script answered with the first send's
    /// `offset`; makes sure that message is durable before the retry is acked (see
    /// [`cluster::ClusterStore::persist_duplicate`]). A no-op but for [`Store::Cluster`].
    pub async fn persist_duplicate(
        &self,
        room: &str,
        user: &str,
        cid: &str,
        offset: u64,
    ) -> Result<(), StoreError> {
        match self {
            Store::Cluster(s) => s.persist_duplicate(room, user, cid, offset).await,
            _ => Ok(()),
        }
    }

    /// Turns on the backend's feed ledger: from now on every append also marks its room as
    /// owed to the feed, in the same write (so nothing acked can be missed after a crash).
    /// Only a single host's stores keep one; the others answer [`StoreError::Invalid`].
    pub fn enable_feed(&self) -> Result<(), StoreError> {
        match self {
            Store::Memory(s) => s.enable_feed(),
            Store::Embedded(s) => s.enable_feed(),
            Store::Scylla(_) | Store::Redis(_) | Store::Cluster(_) => {
                return Err(StoreError::Invalid(
                    "the feed's ledger is kept by the embedded and memory stores only".into(),
                ))
            }
        }
        Ok(())
    }

    /// The rooms the feed owes messages (see [`Store::enable_feed`]).
    pub async fn feed_pending(&self) -> Result<Vec<FeedPending>, StoreError> {
        match self {
            Store::Memory(s) => s.feed_pending(),
            Store::Embedded(s) => s.feed_pending().await,
            Store::Scylla(_) | Store::Redis(_) | Store::Cluster(_) => Ok(Vec::new()),
        }
    }

    /// The feed's backend acknowledged `rooms` up to these offsets: their cursors move,
    /// and a room whose every message was delivered is no longer owed anything.
    pub async fn feed_delivered(&self, rooms: Vec<(String, u64)>) -> Result<(), StoreError> {
        match self {
            Store::Memory(s) => s.feed_delivered(&rooms),
            Store::Embedded(s) => s.feed_delivered(rooms).await,
            Store::Scylla(_) | Store::Redis(_) | Store::Cluster(_) => Ok(()),
        }
    }

    /// Syncs everything appended so far to disk (a no-op for memory and ScyllaDB, whose
    /// acks already mean the replicas have it, per the consistency level). Useful with
    /// [`Durability::Buffered`] to bound what a machine crash can lose.
    pub async fn flush(&self) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) | Store::Scylla(_) | Store::Redis(_) | Store::Cluster(_) => Ok(()),
            Store::Embedded(s) => s.flush().await,
        }
    }

    /// Clean shutdown: syncs what is pending, stops the store's threads and releases the
    /// data directory. Call once, after the shards stopped appending; later calls on any
    /// clone get [`StoreError::Closed`]. Calling it again is harmless.
    ///
    /// Usable outside glommio too, e.g. `futures::executor::block_on(store.close())` on the
    /// main thread after the shards have exited.
    pub async fn close(&self) -> Result<(), StoreError> {
        match self {
            Store::Memory(s) => {
                s.close();
                Ok(())
            }
            Store::Embedded(s) => s.close().await,
            Store::Scylla(s) => s.close().await,
            Store::Redis(s) => {
                s.close();
                Ok(())
            }
            Store::Cluster(s) => s.close().await,
        }
    }

    /// Whether the store can take appends, without doing any I/O: cheap enough for
    /// `/healthz`. After a failed write (disk full, I/O error) the embedded store refuses
    /// further appends until corelay is restarted, and this reports why; reads keep working.
    pub fn health(&self) -> Result<(), StoreError> {
        match self {
            Store::Memory(s) => s.health(),
            Store::Embedded(s) => s.health(),
            Store::Scylla(s) => s.health(),
            Store::Redis(s) => s.health(),
            Store::Cluster(s) => s.health(),
        }
    }
}

impl HistoryStore for Store {
    async fn append(&self, batch: Vec<StoredMessage>) -> Result<(), StoreError> {
        match self {
            Store::Memory(s) => s.append(batch).await,
            Store::Embedded(s) => s.append(batch).await,
            Store::Scylla(s) => s.append(batch).await,
            Store::Redis(s) => s.append(batch).await,
            Store::Cluster(s) => s.append(batch).await,
        }
    }

    async fn read(
        &self,
        room: &str,
        query: HistoryQuery,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        match self {
            Store::Memory(s) => s.read(room, query, limit).await,
            Store::Embedded(s) => s.read(room, query, limit).await,
            Store::Scylla(s) => s.read(room, query, limit).await,
            Store::Redis(s) => s.read(room, query, limit).await,
            Store::Cluster(s) => s.read(room, query, limit).await,
        }
    }

    async fn latest_offset(&self, room: &str) -> Result<u64, StoreError> {
        match self {
            Store::Memory(s) => s.latest_offset(room).await,
            Store::Embedded(s) => s.latest_offset(room).await,
            Store::Scylla(s) => s.latest_offset(room).await,
            Store::Redis(s) => s.latest_offset(room).await,
            Store::Cluster(s) => s.latest_offset(room).await,
        }
    }

    async fn find_cid(
        &self,
        room: &str,
        user: &str,
        cid: &str,
        not_before_ts: u64,
    ) -> Result<Option<StoredMessage>, StoreError> {
        match self {
            Store::Memory(s) => s.find_cid(room, user, cid, not_before_ts).await,
            Store::Embedded(s) => s.find_cid(room, user, cid, not_before_ts).await,
            Store::Scylla(s) => s.find_cid(room, user, cid, not_before_ts).await,
            Store::Redis(s) => s.find_cid(room, user, cid, not_before_ts).await,
            Store::Cluster(s) => s.find_cid(room, user, cid, not_before_ts).await,
        }
    }
}

/// Checks that a batch only moves each room's stream forward: every offset above the
/// room's latest (as `latest` reports it, or as an earlier message of the same batch set
/// it). Returns each room's new latest offset. Gaps are accepted (the home shard owns the
/// numbering) but logged, since the protocol promises none.
pub(crate) fn check_batch<'a, F>(
    batch: &'a [StoredMessage],
    mut latest: F,
) -> Result<HashMap<&'a str, u64>, StoreError>
where
    F: FnMut(&str) -> Result<u64, StoreError>,
{
    let mut next: HashMap<&'a str, u64> = HashMap::new();
    for m in batch {
        let prev = match next.get(m.room.as_str()) {
            Some(prev) => *prev,
            None => latest(&m.room)?,
        };
        if m.offset <= prev {
            return Err(StoreError::OffsetConflict {
                room: m.room.clone(),
                offset: m.offset,
                latest: prev,
            });
        }
        if m.offset != prev + 1 {
            tracing::warn!(
                room = %m.room,
                offset = m.offset,
                latest = prev,
                "history append leaves a gap in the room's offsets"
            );
        }
        next.insert(m.room.as_str(), m.offset);
    }
    Ok(next)
}
