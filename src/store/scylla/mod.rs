//! The ScyllaDB history store (`store.kind = "scylla"`): unbounded history that every host
//! of a cluster sees, with the `scylla` driver (1.x) running on the [tokio bridge](crate::bridge).
//!
//! # Layout (`deploy/scylla/schema.cql`, after Discord's)
//!
//! - `messages`: partition `(room, bucket)` with `bucket = offset / bucket_size`, clustering
//!   by `offset` ascending; columns `id`, `user`, `text`, `ts`, `cid`. A partition never holds
//!   more than `bucket_size` messages, however long the room lives. Reads walk buckets.
//! - `cids`: `((room, user), cid)` → `offset`, `ts` of the newest message sent with that cid,
//!   written with `USING TIMESTAMP = offset` so the highest offset wins in any arrival order.
//! - `room_latest`: `room` → `latest`, the room's **commit point**, written with
//!   `USING TIMESTAMP = latest`: a max register that never moves backwards.
//! - `meta`: `bucket_size`, checked at open (a different value would hide all history).
//!
//! Offsets are assigned by the room's home shard (from Redis in a cluster), never by the
//! store: the store keeps them as given, so they stay gap-free exactly when the home shard
//! hands them out gap-free. That is why no lightweight transaction is needed anywhere:
//! the store never allocates a number, it only records the highest one it committed.
//!
//! # Writing: rows first, then the commit point
//!
//! An append (1) checks the offsets (see *Ordering and conflicts*), (2) writes the message
//! rows and the cid rows, grouped by partition into small UNLOGGED batches (each one
//! partition, so each is atomic and isolated, at most 100 rows or ~64 KiB), up to 16 at a
//! time, and only when all of them are acked (3) **commits** by raising `room_latest` of
//! every room of the append: one statement for one room, one LOGGED batch for several
//! (atomic across rooms; more than 1000 rooms are committed 1000 at a time).
//!
//! Reads never return a message above its room's `room_latest` (`find_cid` neither). So a
//! message becomes visible only once all of its append's rows are stored, whatever the
//! append's size, and a failed append leaves nothing visible: its stray rows sit above the
//! commit point, invisible, until the home shard reuses those offsets (it does: a failed
//! write gives its offsets back), and the new rows overwrite them (the driver's client-side
//! monotonic timestamps make the newer write win). A stale cid row is ignored because the
//! message it points to must carry the same user and cid. (Were offsets skipped instead, a
//! later commit above them would make those whole, unacked messages visible.)
//! This is the "better choice" than writing message and cid in one logged batch: a
//! logged batch across many partitions pays a batchlog round trip on other nodes, hits the
//! batch size limits on large group commits (the suite appends 10 000 messages at once),
//! and still does not isolate readers from a half-applied batch.
//!
//! A failure is [`StoreError::Unavailable`] and means "not acked": if the request timed out
//! *after* the commit reached the replicas, the append may still be complete and visible
//! (never partly: the commit is one cell per room, or one logged batch). A retry with the
//! same `cid` then finds it through `find_cid`, as with the embedded store after a failed sync.
//!
//! # Ordering and conflicts
//!
//! Appends touching a room are serialized per room on the bridge (a FIFO async lock per
//! room, taken in the order the appends' futures are first polled), so a pipelined
//! `append(1..4)`, `append(5..9)` is checked and committed in that order. The check uses the
//! latest offset this process committed or read for the room (read from `room_latest` the
//! first time, and again after any failure). On one host, where the home shard is the room's
//! only writer, that is exactly the room's latest stored offset, and [`StoreError::OffsetConflict`]
//! means what the trait says. A cluster does not use this path (see *Cluster mode*).
//!
//! # Cluster mode
//!
//! With `redis.url` set, Redis's publish script assigns every offset (one counter per room,
//! cluster-wide) and several hosts write the same room at once, so appends reach ScyllaDB
//! out of offset order. They go through [`ScyllaStore::append_cluster`] instead: message
//! rows written at the given offsets (idempotent: a rewrite is the same row), then
//! `room_latest` raised with `USING TIMESTAMP = offset`, which makes it a max register
//! whatever the arrival order: a host committing 6 after another committed 7 changes
//! nothing. No lock, no read before the write, no lightweight transaction. Offsets are
//! never reused (the counter only rises), so there are no stray rows to overwrite. Offsets
//! below `room_latest` whose rows are still in flight (or whose write failed) read as a
//! hole until they land; [`crate::store::cluster::ClusterStore`] reads recent history
//! from the Redis stream for that reason, and ScyllaDB only below the stream's window.
//!
//! # Failures and timeouts
//!
//! Every statement is prepared, idempotent, runs at the configured consistency
//! (LOCAL_QUORUM by default) with a client-side `request_timeout` that covers the request
//! and its retries, and is retried at most `retries` times on errors that may pass (node
//! unavailable / overloaded / bootstrapping, server-side timeouts or failures, a broken
//! connection). [`ScyllaStore::health`] reports the last request's failure until a request
//! succeeds again. The driver answers through the bridge, so a shard never blocks.

//!
//! # Files
//!
//! - this one: [`ScyllaStore`], the state its clones share, and the calls it runs on the
//!   bridge;
//! - `schema`: the shipped schema, rendering and applying it, and the statements the store
//!   prepares;
//! - `open`: checking the configuration, connecting, preparing, checking the bucket size;
//! - `write`: appends (rows in partition batches, then the commit point), single-writer and
//!   cluster;
//! - `read`: history reads (walking buckets below the commit point) and cid lookups;
//! - `errors`: what a failed request means, and the bounded retry policy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use scylla::client::session::Session;

use super::HistoryStore;
use crate::bridge::Bridge;
use crate::config::ScyllaConfig;
use crate::history::{HistoryQuery, StoreError, StoredMessage};

mod errors;
mod open;
mod read;
mod schema;
mod write;

use errors::bridge_error;
use open::{check_config, open_conn};
use read::{find_cid, read, read_latest};
use schema::Statements;
pub use schema::{apply_schema, render_schema, schema_statements, statement_texts, SCHEMA_CQL};
use write::{append, append_cluster};

/// Past this many tracked rooms, the idle ones' cached latest offsets are forgotten.
const MAX_TRACKED_ROOMS: usize = 100_000;

/// A live session and its prepared statements.
struct Conn {
    session: Session,
    st: Statements,
}

/// A room's append lock, holding the latest offset this process knows to be committed
/// (`None`: unknown, read it from `room_latest` first).
type RoomSlot = Arc<tokio::sync::Mutex<Option<u64>>>;

/// What every clone of one [`ScyllaStore`] shares. The mutexes are only ever taken briefly
/// and never across an await, almost always on the bridge thread.
struct Shared {
    bridge: Bridge,
    /// The configured nodes, as `[a, b]`, for messages.
    nodes: String,
    keyspace: String,
    bucket_size: u64,
    closed: AtomicBool,
    /// Taken out (and dropped on the bridge) by `close`.
    conn: Mutex<Option<Arc<Conn>>>,
    rooms: Mutex<HashMap<String, RoomSlot>>,
    /// The last request's failure, cleared by the next success.
    failure: Mutex<Option<String>>,
    /// Whether `failure` is set: spares successful calls the lock.
    failing: AtomicBool,
}

/// Locks a mutex whose data stays consistent even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn conn(&self) -> Result<Arc<Conn>, StoreError> {
        lock(&self.conn).clone().ok_or(StoreError::Closed)
    }

    /// The append locks of these rooms (sorted, distinct), created as needed.
    fn slots(&self, rooms: &[&str]) -> Vec<RoomSlot> {
        let mut map = lock(&self.rooms);
        if map.len() > MAX_TRACKED_ROOMS {
            map.retain(|_, slot| Arc::strong_count(slot) > 1);
        }
        rooms
            .iter()
            .map(|room| map.entry((*room).to_owned()).or_default().clone())
            .collect()
    }

    /// Records a call's outcome for [`ScyllaStore::health`].
    fn record<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Ok(_) if self.failing.load(Ordering::Acquire) => {
                let mut failure = lock(&self.failure);
                *failure = None;
                self.failing.store(false, Ordering::Release);
            }
            Ok(_) => {}
            Err(StoreError::Unavailable(why)) => {
                let mut failure = lock(&self.failure);
                *failure = Some(why.clone());
                self.failing.store(true, Ordering::Release);
            }
            Err(_) => {}
        }
    }

    fn bucket(&self, offset: u64) -> i64 {
        // Offsets reaching the store are at most i64::MAX (checked), so this fits.
        i64::try_from(offset / self.bucket_size).unwrap_or(i64::MAX)
    }
}

/// The ScyllaDB-backed [`HistoryStore`]: a handle to a driver session on the bridge.
///
/// Cheap to clone, `Send + Sync`. See the module docs for the layout, the write protocol
/// and what a failure means; call [`ScyllaStore::close`] on shutdown.
#[derive(Clone)]
pub struct ScyllaStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ScyllaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScyllaStore")
            .field("nodes", &self.shared.nodes)
            .field("keyspace", &self.shared.keyspace)
            .field("bucket_size", &self.shared.bucket_size)
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl ScyllaStore {
    /// Connects to the configured nodes on the process-wide bridge, prepares the statements
    /// and checks the keyspace, blocking the calling thread (call it on the main thread,
    /// before the shards start; never on a shard).
    ///
    /// Fails with [`StoreError::Open`]: "cannot reach ScyllaDB at \[nodes\]: …" when no node
    /// answers, "… run `corelay schema apply`" when the keyspace or its tables are missing,
    /// and a message naming both values when the keyspace uses another `bucket_size`.
    pub fn open(cfg: &ScyllaConfig) -> Result<ScyllaStore, StoreError> {
        let bridge = Bridge::global().map_err(|e| StoreError::Open(e.to_string()))?;
        futures::executor::block_on(ScyllaStore::connect(cfg, bridge))
    }

    /// Like [`ScyllaStore::open`], as a future any executor can await, on the given bridge.
    pub async fn connect(cfg: &ScyllaConfig, bridge: Bridge) -> Result<ScyllaStore, StoreError> {
        check_config(cfg)?;
        let nodes = format!("[{}]", cfg.nodes.join(", "));
        let conn = bridge
            .spawn(open_conn(cfg.clone(), nodes.clone()))
            .await
            .map_err(|e| StoreError::Open(e.to_string()))??;
        tracing::info!(nodes = %nodes, keyspace = %cfg.keyspace, "scylla history store open");
        Ok(ScyllaStore {
            shared: Arc::new(Shared {
                bridge,
                nodes,
                keyspace: cfg.keyspace.clone(),
                bucket_size: cfg.bucket_size,
                closed: AtomicBool::new(false),
                conn: Mutex::new(Some(Arc::new(conn))),
                rooms: Mutex::new(HashMap::new()),
                failure: Mutex::new(None),
                failing: AtomicBool::new(false),
            }),
        })
    }

    /// The keyspace this store writes to.
    pub fn keyspace(&self) -> &str {
        &self.shared.keyspace
    }

    /// Whether requests are going through, without I/O: `Closed` after
    /// [`ScyllaStore::close`]; `Unavailable` (with the cause) while the last request failed
    /// that way, until one succeeds; else `Ok`. Calls are still attempted either way.
    pub fn health(&self) -> Result<(), StoreError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        if !self.shared.failing.load(Ordering::Acquire) {
            return Ok(());
        }
        match lock(&self.shared.failure).as_ref() {
            Some(why) => Err(StoreError::Unavailable(why.clone())),
            None => Ok(()),
        }
    }

    /// Closes the session (on the bridge). Calls already running finish; later calls on any
    /// clone get [`StoreError::Closed`]. Acked appends are already durable on the replicas
    /// (per the consistency level), so there is nothing to flush. Calling it again is harmless.
    pub async fn close(&self) -> Result<(), StoreError> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let conn = lock(&self.shared.conn).take();
        if let Some(conn) = conn {
            // Dropped on the bridge, where its connections' tasks live.
            let _ = self.shared.bridge.spawn(async move { drop(conn) }).await;
        }
        Ok(())
    }

    /// Cluster mode (`store.kind = "scylla"` with `redis.url`): stores messages at the
    /// offsets Redis's publish script gave them, whichever host sent them and in whatever
    /// order they arrive. See *Cluster mode* in the module docs.
    ///
    /// Unlike [`HistoryStore::append`] there is no single-writer check: another host may
    /// have committed higher offsets of the room already, and a message may be written
    /// again (a retry with the same `cid`): the same primary key, so the same row. Each
    /// room's `room_latest` only ever rises (a max register). `cid` rows are not written:
    /// Redis dedupes in cluster mode. Fails with [`StoreError::Unavailable`] (nothing
    /// acked; some rows may have landed, which a rewrite makes whole) or
    /// [`StoreError::Invalid`] (offset 0 or above `i64::MAX`, nothing sent).
    pub async fn append_cluster(&self, batch: Vec<StoredMessage>) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.call(append_cluster(self.shared.clone(), batch)).await
    }

    /// Runs one call on the bridge and records its outcome for `health`.
    async fn call<F, T>(&self, fut: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        let result = self
            .shared
            .bridge
            .spawn(fut)
            .await
            .unwrap_or_else(|e| Err(bridge_error(e)));
        self.shared.record(&result);
        result
    }
}

impl HistoryStore for ScyllaStore {
    async fn append(&self, batch: Vec<StoredMessage>) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.call(append(self.shared.clone(), batch)).await
    }

    async fn read(
        &self,
        room: &str,
        query: HistoryQuery,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.call(read(self.shared.clone(), room.to_owned(), query, limit))
            .await
    }

    async fn latest_offset(&self, room: &str) -> Result<u64, StoreError> {
        let shared = self.shared.clone();
        let room = room.to_owned();
        self.call(async move { read_latest(&*shared.conn()?, &room).await })
            .await
    }

    async fn find_cid(
        &self,
        room: &str,
        user: &str,
        cid: &str,
        not_before_ts: u64,
    ) -> Result<Option<StoredMessage>, StoreError> {
        self.call(find_cid(
            self.shared.clone(),
            room.to_owned(),
            user.to_owned(),
            cid.to_owned(),
            not_before_ts,
        ))
        .await
    }
}
