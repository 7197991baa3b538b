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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::stream::{self, StreamExt as _, TryStreamExt as _};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{DbError, ExecutionError, NewSessionError, PrepareError, RequestAttemptError};
use scylla::policies::retry::{RequestInfo, RetryDecision, RetryPolicy, RetrySession};
use scylla::policies::timestamp_generator::MonotonicTimestampGenerator;
use scylla::response::query_result::QueryResult;
use scylla::statement::batch::{Batch, BatchStatement, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::unprepared::Statement;
use scylla::statement::Consistency;
use scylla::value::CqlTimestamp;

use super::{check_batch, HistoryStore};
use crate::bridge::{Bridge, BridgeError};
use crate::config::{ScyllaConfig, ScyllaConsistency};
use crate::history::{HistoryQuery, StoreError, StoredMessage};

/// `deploy/scylla/schema.cql`, as shipped (keyspace `corelay`, replication factor 3).
pub const SCHEMA_CQL: &str = include_str!("../../deploy/scylla/schema.cql");

/// The keyspace name written in [`SCHEMA_CQL`], replaced by the configured one.
const SCHEMA_KEYSPACE: &str = "corelay";
/// The replication factor written in [`SCHEMA_CQL`], replaced on request.
const SCHEMA_RF: &str = "'replication_factor': 3";
/// Most rows in one UNLOGGED (single-partition) batch.
const MAX_BATCH_ROWS: usize = 100;
/// Rough byte budget of one UNLOGGED batch (well under ScyllaDB's batch size warning).
const MAX_BATCH_BYTES: usize = 64 * 1024;
/// Most rooms committed in one LOGGED batch.
const MAX_COMMIT_ROOMS: usize = 1000;
/// Row batches of one append in flight at once.
const WRITE_CONCURRENCY: usize = 16;
/// Past this many tracked rooms, the idle ones' cached latest offsets are forgotten.
const MAX_TRACKED_ROOMS: usize = 100_000;
/// DDL (`schema apply`) gets at least this long: schema changes wait for agreement.
const DDL_TIMEOUT: Duration = Duration::from_secs(60);

/// One prepared statement per query the store makes.
struct Statements {
    insert_message: PreparedStatement,
    insert_cid: PreparedStatement,
    set_latest: PreparedStatement,
    get_latest: PreparedStatement,
    read_desc: PreparedStatement,
    read_asc: PreparedStatement,
    get_message: PreparedStatement,
    get_cid: PreparedStatement,
    get_meta: PreparedStatement,
    put_meta: PreparedStatement,
}

/// The CQL of every statement the store prepares, for keyspace `ks` (already checked to be
/// a plain identifier). Public so tests and operators can see what runs.
pub fn statement_texts(ks: &str) -> Vec<String> {
    cql(ks).into_iter().map(|(_, text)| text).collect()
}

/// `(name, text)` of every statement, in [`Statements`] order.
fn cql(ks: &str) -> [(&'static str, String); 10] {
    const COLUMNS: &str = r#""offset", id, "user", "text", ts, cid"#;
    [
        (
            "insert_message",
            format!(
                r#"INSERT INTO {ks}.messages (room, bucket, "offset", id, "user", "text", ts, cid) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"#
            ),
        ),
        (
            "insert_cid",
            format!(
                r#"INSERT INTO {ks}.cids (room, "user", cid, "offset", ts) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"#
            ),
        ),
        (
            "set_latest",
            format!("UPDATE {ks}.room_latest USING TIMESTAMP ? SET latest = ? WHERE room = ?"),
        ),
        (
            "get_latest",
            format!("SELECT latest FROM {ks}.room_latest WHERE room = ?"),
        ),
        (
            "read_desc",
            format!(
                r#"SELECT {COLUMNS} FROM {ks}.messages WHERE room = ? AND bucket = ? AND "offset" <= ? ORDER BY "offset" DESC LIMIT ?"#
            ),
        ),
        (
            "read_asc",
            format!(
                r#"SELECT {COLUMNS} FROM {ks}.messages WHERE room = ? AND bucket = ? AND "offset" >= ? AND "offset" <= ? ORDER BY "offset" ASC LIMIT ?"#
            ),
        ),
        (
            "get_message",
            format!(
                r#"SELECT {COLUMNS} FROM {ks}.messages WHERE room = ? AND bucket = ? AND "offset" = ?"#
            ),
        ),
        (
            "get_cid",
            format!(
                r#"SELECT "offset", ts FROM {ks}.cids WHERE room = ? AND "user" = ? AND cid = ?"#
            ),
        ),
        (
            "get_meta",
            format!("SELECT value FROM {ks}.meta WHERE key = ?"),
        ),
        (
            "put_meta",
            format!("INSERT INTO {ks}.meta (key, value) VALUES (?, ?)"),
        ),
    ]
}

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

// ---------------------------------------------------------------------------------------
// Opening
// ---------------------------------------------------------------------------------------

/// Checks what the configuration must satisfy before anything is sent.
fn check_config(cfg: &ScyllaConfig) -> Result<(), StoreError> {
    let bad = |m: String| {
        Err(StoreError::Open(format!(
            "invalid [scylla] configuration: {m}"
        )))
    };
    if cfg.nodes.is_empty() {
        return bad("scylla.nodes is empty: list at least one host:port".into());
    }
    check_keyspace(&cfg.keyspace)?;
    if cfg.bucket_size == 0 || i64::try_from(cfg.bucket_size).is_err() {
        return bad(format!(
            "scylla.bucket_size must be between 1 and {}, got {}",
            i64::MAX,
            cfg.bucket_size
        ));
    }
    if cfg.request_timeout.0.is_zero() {
        return bad("scylla.request_timeout must be positive".into());
    }
    Ok(())
}

/// A keyspace name is spliced into CQL, so it must be a plain identifier.
fn check_keyspace(ks: &str) -> Result<(), StoreError> {
    let mut chars = ks.chars();
    let ok = ks.len() <= 48
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Open(format!(
            "invalid [scylla] configuration: scylla.keyspace {ks:?} must be a letter followed by \
             at most 47 letters, digits or underscores"
        )))
    }
}

/// The driver's consistency for the configured one.
fn consistency(c: ScyllaConsistency) -> Consistency {
    match c {
        ScyllaConsistency::Any => Consistency::Any,
        ScyllaConsistency::One => Consistency::One,
        ScyllaConsistency::Two => Consistency::Two,
        ScyllaConsistency::Three => Consistency::Three,
        ScyllaConsistency::Quorum => Consistency::Quorum,
        ScyllaConsistency::All => Consistency::All,
        ScyllaConsistency::LocalQuorum => Consistency::LocalQuorum,
        ScyllaConsistency::EachQuorum => Consistency::EachQuorum,
        ScyllaConsistency::LocalOne => Consistency::LocalOne,
    }
}

/// How long opening may take in all: connecting, preparing, checking `meta`.
fn open_deadline(cfg: &ScyllaConfig) -> Duration {
    (cfg.request_timeout.0 * 5).max(Duration::from_secs(10))
}

/// Opens a session to the configured nodes (on the bridge).
async fn session(cfg: &ScyllaConfig, nodes: &str) -> Result<Session, StoreError> {
    let profile = ExecutionProfile::builder()
        .consistency(consistency(cfg.consistency))
        .request_timeout(Some(cfg.request_timeout.0))
        .retry_policy(Arc::new(BoundedRetry { max: cfg.retries }))
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&cfg.nodes)
        .default_execution_profile_handle(profile.into_handle())
        .connection_timeout(cfg.request_timeout.0.max(Duration::from_secs(2)))
        .timestamp_generator(Arc::new(MonotonicTimestampGenerator::new()))
        .keyspaces_to_fetch([cfg.keyspace.clone()]);
    if let Some(user) = &cfg.username {
        builder = builder.user(user, cfg.password.as_deref().unwrap_or(""));
    }
    let unreachable =
        |why: String| StoreError::Open(format!("cannot reach ScyllaDB at {nodes}: {why}"));
    match tokio::time::timeout(open_deadline(cfg), builder.build()).await {
        Err(_) => Err(unreachable(format!(
            "no answer within {} ms",
            open_deadline(cfg).as_millis()
        ))),
        Ok(Err(e)) => Err(unreachable(session_error(&e))),
        Ok(Ok(s)) => Ok(s),
    }
}

/// The text of a session error, with a hint for the common causes.
fn session_error(e: &NewSessionError) -> String {
    let text = e.to_string();
    if text.contains("uthenticat") {
        format!("{text} (check scylla.username and scylla.password)")
    } else {
        text
    }
}

/// Connects, prepares every statement and checks (or records) the bucket size.
async fn open_conn(cfg: ScyllaConfig, nodes: String) -> Result<Conn, StoreError> {
    let session = session(&cfg, &nodes).await?;
    let deadline = open_deadline(&cfg);
    let texts = cql(&cfg.keyspace);
    let mut prepared = Vec::with_capacity(texts.len());
    for (name, text) in texts {
        let result = tokio::time::timeout(deadline, session.prepare(text.as_str())).await;
        let mut p = match result {
            Err(_) => {
                return Err(StoreError::Open(format!(
                    "cannot reach ScyllaDB at {nodes}: preparing {name} got no answer within {} ms",
                    deadline.as_millis()
                )))
            }
            Ok(Err(e)) => return Err(prepare_error(&cfg.keyspace, &nodes, name, &e)),
            Ok(Ok(p)) => p,
        };
        p.set_is_idempotent(true);
        prepared.push(p);
    }
    let mut it = prepared.into_iter();
    let mut next = || {
        it.next()
            .ok_or_else(|| StoreError::Open("internal: statement count".into()))
    };
    let st = Statements {
        insert_message: next()?,
        insert_cid: next()?,
        set_latest: next()?,
        get_latest: next()?,
        read_desc: next()?,
        read_asc: next()?,
        get_message: next()?,
        get_cid: next()?,
        get_meta: next()?,
        put_meta: next()?,
    };
    let conn = Conn { session, st };
    check_bucket_size(&conn, &cfg, &nodes).await?;
    Ok(conn)
}

/// Maps a failed PREPARE: a missing keyspace or table says what to run.
fn prepare_error(ks: &str, nodes: &str, name: &str, e: &PrepareError) -> StoreError {
    let db = match e {
        PrepareError::AllAttemptsFailed {
            first_attempt: RequestAttemptError::DbError(db, msg),
        } => Some((db, msg)),
        _ => None,
    };
    match db {
        Some((DbError::Invalid | DbError::ConfigError, msg)) => StoreError::Open(format!(
            "keyspace {ks} or its tables are missing on ScyllaDB at {nodes} ({msg}): \
             run `corelay schema apply`"
        )),
        Some((DbError::Unauthorized, msg)) => StoreError::Open(format!(
            "ScyllaDB at {nodes} refuses access to keyspace {ks} ({msg}): grant scylla.username \
             SELECT and MODIFY on it"
        )),
        _ => StoreError::Open(format!(
            "cannot prepare statement {name} on ScyllaDB at {nodes}: {e}"
        )),
    }
}

/// Refuses to run with another bucket size than the keyspace was written with (every
/// partition key depends on it), and records it on first use.
async fn check_bucket_size(conn: &Conn, cfg: &ScyllaConfig, nodes: &str) -> Result<(), StoreError> {
    let open_err = |what: &str, e: ExecutionError| {
        StoreError::Open(format!(
            "cannot {what} on ScyllaDB at {nodes}: {e}{}",
            schema_hint(&e)
        ))
    };
    let result = conn
        .session
        .execute_unpaged(&conn.st.get_meta, ("bucket_size",))
        .await
        .map_err(|e| open_err("read the bucket size", e))?;
    let stored: Option<(Option<String>,)> = result
        .into_rows_result()
        .map_err(|e| StoreError::Corrupt(format!("meta: {e}")))?
        .maybe_first_row()
        .map_err(|e| StoreError::Corrupt(format!("meta: {e}")))?;
    match stored.and_then(|(v,)| v) {
        None => {
            conn.session
                .execute_unpaged(
                    &conn.st.put_meta,
                    ("bucket_size", cfg.bucket_size.to_string()),
                )
                .await
                .map_err(|e| open_err("record the bucket size", e))?;
            Ok(())
        }
        Some(v) if v.trim().parse::<u64>() == Ok(cfg.bucket_size) => Ok(()),
        Some(v) => Err(StoreError::Open(format!(
            "keyspace {} was written with bucket_size {v}, but scylla.bucket_size is {}: the \
             bucket size is part of the data layout; set scylla.bucket_size = {v}",
            cfg.keyspace, cfg.bucket_size
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------

/// A `messages` row: room, bucket, offset, id, user, text, ts, cid.
type MessageRow<'a> = (
    &'a str,
    i64,
    i64,
    &'a str,
    &'a str,
    &'a str,
    CqlTimestamp,
    Option<&'a str>,
);
/// A `cids` row: room, user, cid, offset, ts, then the write timestamp (= offset).
type CidRow<'a> = (&'a str, &'a str, &'a str, i64, CqlTimestamp, i64);

/// A running write request.
type WriteFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send + 'a>>;

/// One write request of an append: rows of one partition, at most one batch's worth.
enum Job<'a> {
    Messages(Vec<MessageRow<'a>>),
    Cids(Vec<CidRow<'a>>),
}

/// An offset or ts as the bigint CQL stores; larger values cannot be stored.
fn to_i64(m: &StoredMessage, what: &str, v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| {
        StoreError::Invalid(format!(
            "{what} {v} of message {}#{} is above {}",
            m.room,
            m.offset,
            i64::MAX
        ))
    })
}

/// Roughly how many bytes a message's rows take in a batch.
fn row_bytes(m: &StoredMessage) -> usize {
    64 + m.room.len()
        + m.id.len()
        + m.user.len()
        + m.text.len()
        + m.cid.as_ref().map_or(0, String::len)
}

/// Splits one partition's rows into batches of at most [`MAX_BATCH_ROWS`] rows and about
/// [`MAX_BATCH_BYTES`] bytes (a larger row goes alone).
fn chunks<T>(rows: Vec<(T, usize)>, into: &mut Vec<Vec<T>>) {
    let mut current = Vec::new();
    let mut bytes = 0;
    for (row, size) in rows {
        if !current.is_empty()
            && (current.len() >= MAX_BATCH_ROWS || bytes + size > MAX_BATCH_BYTES)
        {
            into.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(row);
    }
    if !current.is_empty() {
        into.push(current);
    }
}

/// The write requests of an append, grouped by partition. Fails (before any I/O) on a
/// message the schema cannot hold.
fn jobs<'a>(
    shared: &Shared,
    batch: &'a [StoredMessage],
    with_cids: bool,
) -> Result<Vec<Job<'a>>, StoreError> {
    let mut messages: BTreeMap<(&str, i64), Vec<(MessageRow<'a>, usize)>> = BTreeMap::new();
    let mut cids: BTreeMap<(&str, &str), Vec<(CidRow<'a>, usize)>> = BTreeMap::new();
    for m in batch {
        let offset = to_i64(m, "offset", m.offset)?;
        let ts = CqlTimestamp(to_i64(m, "ts", m.ts)?);
        let bucket = shared.bucket(m.offset);
        let size = row_bytes(m);
        messages.entry((&m.room, bucket)).or_default().push((
            (
                &m.room,
                bucket,
                offset,
                &m.id,
                &m.user,
                &m.text,
                ts,
                m.cid.as_deref(),
            ),
            size,
        ));
        if let Some(cid) = m.cid.as_ref().filter(|_| with_cids) {
            cids.entry((&m.room, &m.user))
                .or_default()
                .push(((&m.room, &m.user, cid, offset, ts, offset), size));
        }
    }
    let mut out = Vec::new();
    let mut rows = Vec::new();
    for (_, part) in messages {
        chunks(part, &mut rows);
    }
    out.extend(rows.drain(..).map(Job::Messages));
    let mut rows = Vec::new();
    for (_, part) in cids {
        chunks(part, &mut rows);
    }
    out.extend(rows.into_iter().map(Job::Cids));
    Ok(out)
}

/// The same prepared statement `n` times, as an idempotent batch of the given type.
fn batch_of(p: &PreparedStatement, n: usize, kind: BatchType) -> Batch {
    let mut batch =
        Batch::new_with_statements(kind, vec![BatchStatement::PreparedStatement(p.clone()); n]);
    batch.set_is_idempotent(true);
    batch
}

/// Runs one write request.
async fn run_job(conn: &Conn, job: Job<'_>) -> Result<(), StoreError> {
    let session = &conn.session;
    let (result, what) = match job {
        Job::Messages(rows) => (
            match rows.as_slice() {
                [one] => session.execute_unpaged(&conn.st.insert_message, one).await,
                _ => {
                    let batch = batch_of(&conn.st.insert_message, rows.len(), BatchType::Unlogged);
                    session.batch(&batch, &rows).await
                }
            },
            "store messages",
        ),
        Job::Cids(rows) => (
            match rows.as_slice() {
                [one] => session.execute_unpaged(&conn.st.insert_cid, one).await,
                _ => {
                    let batch = batch_of(&conn.st.insert_cid, rows.len(), BatchType::Unlogged);
                    session.batch(&batch, &rows).await
                }
            },
            "store cids",
        ),
    };
    result.map(drop).map_err(|e| unavailable(what, &e))
}

/// Raises the commit point of every room of an append (see the module docs).
async fn commit(conn: &Conn, latest: &HashMap<&str, u64>) -> Result<(), StoreError> {
    let mut rows: Vec<(i64, i64, &str)> = Vec::with_capacity(latest.len());
    for (room, offset) in latest {
        // Checked to fit when the rows were built.
        let o =
            i64::try_from(*offset).map_err(|_| StoreError::Invalid("offset too large".into()))?;
        rows.push((o, o, room));
    }
    rows.sort_unstable_by_key(|r| r.2);
    for part in rows.chunks(MAX_COMMIT_ROOMS) {
        let result = match part {
            [one] => {
                conn.session
                    .execute_unpaged(&conn.st.set_latest, *one)
                    .await
            }
            _ => {
                let batch = batch_of(&conn.st.set_latest, part.len(), BatchType::Logged);
                conn.session.batch(&batch, part).await
            }
        };
        result.map_err(|e| unavailable("commit the append", &e))?;
    }
    Ok(())
}

/// Runs an append's write requests, [`WRITE_CONCURRENCY`] at a time; the first failure
/// ends it.
async fn run_jobs(conn: &Conn, jobs: Vec<Job<'_>>) -> Result<(), StoreError> {
    // Boxed: a stream over borrowing futures otherwise trips the compiler's `Send` check
    // (higher-ranked lifetimes in the closure).
    let writes: Vec<WriteFuture<'_>> = jobs
        .into_iter()
        .map(|job| -> WriteFuture<'_> { Box::pin(run_job(conn, job)) })
        .collect();
    stream::iter(writes)
        .buffer_unordered(WRITE_CONCURRENCY)
        .try_for_each(|()| async { Ok(()) })
        .await
}

/// A cluster append, on the bridge (see [`ScyllaStore::append_cluster`]): the message
/// rows, then each room's commit point raised to the batch's highest offset of that room.
/// No lock, no read, no order check: every host may write any offset, in any order.
async fn append_cluster(shared: Arc<Shared>, batch: Vec<StoredMessage>) -> Result<(), StoreError> {
    let conn = shared.conn()?;
    let mut highest: HashMap<&str, u64> = HashMap::new();
    for m in &batch {
        if m.offset == 0 {
            return Err(StoreError::Invalid(format!(
                "message {} of room {:?} has offset 0; offsets start at 1",
                m.id, m.room
            )));
        }
        let h = highest.entry(m.room.as_str()).or_insert(0);
        *h = (*h).max(m.offset);
    }
    let jobs = jobs(&shared, &batch, false)?;
    run_jobs(&conn, jobs).await?;
    commit(&conn, &highest).await
}

/// An append, on the bridge: check, write the rows, commit (see the module docs).
async fn append(shared: Arc<Shared>, batch: Vec<StoredMessage>) -> Result<(), StoreError> {
    let conn = shared.conn()?;
    let mut rooms: Vec<&str> = batch.iter().map(|m| m.room.as_str()).collect();
    rooms.sort_unstable();
    rooms.dedup();
    // Queue on every room's lock in one poll, so appends keep their order on each room.
    let slots = shared.slots(&rooms);
    let mut guards = futures::future::join_all(slots.into_iter().map(|s| s.lock_owned())).await;

    let unknown: Vec<usize> = (0..rooms.len()).filter(|i| guards[*i].is_none()).collect();
    let read =
        futures::future::join_all(unknown.iter().map(|i| read_latest(&conn, rooms[*i]))).await;
    for (i, latest) in unknown.into_iter().zip(read) {
        *guards[i] = Some(latest?);
    }
    let known: HashMap<&str, u64> = rooms
        .iter()
        .zip(&guards)
        .map(|(room, g)| (*room, g.unwrap_or(0)))
        .collect();
    let new_latest = check_batch(&batch, |room| {
        known
            .get(room)
            .copied()
            .ok_or_else(|| StoreError::Unavailable(format!("internal: room {room:?} not locked")))
    })?;
    let jobs = jobs(&shared, &batch, true)?;

    let written: Result<(), StoreError> = async {
        run_jobs(&conn, jobs).await?;
        commit(&conn, &new_latest).await
    }
    .await;
    match written {
        Ok(()) => {
            for (room, guard) in rooms.iter().zip(guards.iter_mut()) {
                if let Some(latest) = new_latest.get(room) {
                    **guard = Some(*latest);
                }
            }
            Ok(())
        }
        Err(e) => {
            // The commit may or may not have landed: read the truth next time.
            for guard in &mut guards {
                **guard = None;
            }
            Err(e)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------

/// A `messages` row as read: offset, id, user, text, ts, cid.
type ReadRow = (i64, String, String, String, CqlTimestamp, Option<String>);

/// The room's commit point: its highest stored offset, 0 when it has none.
async fn read_latest(conn: &Conn, room: &str) -> Result<u64, StoreError> {
    let result = conn
        .session
        .execute_unpaged(&conn.st.get_latest, (room,))
        .await
        .map_err(|e| unavailable("read the latest offset", &e))?;
    let row: Option<(Option<i64>,)> = result
        .into_rows_result()
        .map_err(|e| corrupt(room, &e))?
        .maybe_first_row()
        .map_err(|e| corrupt(room, &e))?;
    match row.and_then(|(v,)| v) {
        None => Ok(0),
        Some(v) => u64::try_from(v).map_err(|_| {
            StoreError::Corrupt(format!("room {room:?}: latest offset {v} is negative"))
        }),
    }
}

/// Decodes `messages` rows; anything unexpected is `Corrupt`, never a panic.
fn decode(room: &str, result: QueryResult) -> Result<Vec<StoredMessage>, StoreError> {
    let rows = result.into_rows_result().map_err(|e| corrupt(room, &e))?;
    let mut out = Vec::with_capacity(rows.rows_num());
    for row in rows.rows::<ReadRow>().map_err(|e| corrupt(room, &e))? {
        let (offset, id, user, text, ts, cid) = row.map_err(|e| corrupt(room, &e))?;
        let offset = u64::try_from(offset)
            .map_err(|_| StoreError::Corrupt(format!("room {room:?}: negative offset {offset}")))?;
        let ts = u64::try_from(ts.0).map_err(|_| {
            StoreError::Corrupt(format!("message {room}#{offset}: negative ts {}", ts.0))
        })?;
        out.push(StoredMessage {
            room: room.to_owned(),
            offset,
            id,
            user,
            text,
            ts,
            cid,
        });
    }
    Ok(out)
}

/// `LIMIT` for the next bucket: what is still wanted, at most a bucket, at most `i32::MAX`.
fn page(want: usize, bucket_size: u64) -> i32 {
    let cap = usize::try_from(bucket_size).unwrap_or(usize::MAX);
    i32::try_from(want.min(cap)).unwrap_or(i32::MAX)
}

/// The newest `limit` messages with offset ≤ `hi`, oldest first, walking buckets down.
async fn walk_down(
    shared: &Shared,
    conn: &Conn,
    room: &str,
    hi: u64,
    limit: usize,
) -> Result<Vec<StoredMessage>, StoreError> {
    let mut out = Vec::new();
    if hi == 0 {
        return Ok(out);
    }
    let hi_i = i64::try_from(hi).unwrap_or(i64::MAX);
    let mut bucket = shared.bucket(hi);
    loop {
        let want = page(limit - out.len(), shared.bucket_size);
        let result = conn
            .session
            .execute_unpaged(&conn.st.read_desc, (room, bucket, hi_i, want))
            .await
            .map_err(|e| unavailable("read history", &e))?;
        out.extend(decode(room, result)?);
        if out.len() >= limit || bucket == 0 {
            break;
        }
        bucket -= 1;
    }
    out.truncate(limit);
    out.reverse();
    Ok(out)
}

/// The oldest `limit` messages with `lo` ≤ offset ≤ `hi`, walking buckets up.
async fn walk_up(
    shared: &Shared,
    conn: &Conn,
    room: &str,
    lo: u64,
    hi: u64,
    limit: usize,
) -> Result<Vec<StoredMessage>, StoreError> {
    let mut out = Vec::new();
    let (lo_i, hi_i) = (
        i64::try_from(lo).unwrap_or(i64::MAX),
        i64::try_from(hi).unwrap_or(i64::MAX),
    );
    let last = shared.bucket(hi);
    let mut bucket = shared.bucket(lo);
    while bucket <= last && out.len() < limit {
        let want = page(limit - out.len(), shared.bucket_size);
        let result = conn
            .session
            .execute_unpaged(&conn.st.read_asc, (room, bucket, lo_i, hi_i, want))
            .await
            .map_err(|e| unavailable("read history", &e))?;
        out.extend(decode(room, result)?);
        bucket += 1;
    }
    out.truncate(limit);
    Ok(out)
}

/// A read, on the bridge: the commit point first, then the buckets below it.
async fn read(
    shared: Arc<Shared>,
    room: String,
    query: HistoryQuery,
    limit: usize,
) -> Result<Vec<StoredMessage>, StoreError> {
    let conn = shared.conn()?;
    let latest = read_latest(&conn, &room).await?;
    match query {
        HistoryQuery::Latest => walk_down(&shared, &conn, &room, latest, limit).await,
        HistoryQuery::Before(o) => {
            let hi = latest.min(o.saturating_sub(1));
            walk_down(&shared, &conn, &room, hi, limit).await
        }
        HistoryQuery::After(o) if o >= latest => Ok(Vec::new()),
        HistoryQuery::After(o) => walk_up(&shared, &conn, &room, o + 1, latest, limit).await,
    }
}

/// A cid lookup, on the bridge: the cid row, then (at once) the commit point and the
/// message it names, which must be committed and carry the same user and cid.
async fn find_cid(
    shared: Arc<Shared>,
    room: String,
    user: String,
    cid: String,
    not_before_ts: u64,
) -> Result<Option<StoredMessage>, StoreError> {
    let conn = shared.conn()?;
    let result = conn
        .session
        .execute_unpaged(&conn.st.get_cid, (&room, &user, &cid))
        .await
        .map_err(|e| unavailable("look up a cid", &e))?;
    let row: Option<(Option<i64>, Option<CqlTimestamp>)> = result
        .into_rows_result()
        .map_err(|e| corrupt(&room, &e))?
        .maybe_first_row()
        .map_err(|e| corrupt(&room, &e))?;
    let Some((Some(offset), Some(ts))) = row else {
        return Ok(None);
    };
    if i64::try_from(not_before_ts).is_ok_and(|nb| ts.0 < nb) {
        return Ok(None);
    }
    let Ok(offset_u) = u64::try_from(offset) else {
        return Err(StoreError::Corrupt(format!(
            "cid {cid:?} of {user:?} in room {room:?} names negative offset {offset}"
        )));
    };
    let message = async {
        conn.session
            .execute_unpaged(
                &conn.st.get_message,
                (&room, shared.bucket(offset_u), offset),
            )
            .await
            .map_err(|e| unavailable("look up a cid", &e))
    };
    let (latest, message) = futures::future::join(read_latest(&conn, &room), message).await;
    if offset_u > latest? {
        return Ok(None); // not committed: its append failed or is still running
    }
    let found = decode(&room, message?)?.into_iter().next().filter(|m| {
        m.user == user && m.cid.as_deref() == Some(cid.as_str()) && m.ts >= not_before_ts
    });
    Ok(found)
}

// ---------------------------------------------------------------------------------------
// Errors and retries
// ---------------------------------------------------------------------------------------

/// A failed request: nothing acked. Names what failed, and the timeout when it was one.
fn unavailable(what: &str, e: &ExecutionError) -> StoreError {
    match e {
        ExecutionError::RequestTimeout(d) => StoreError::Unavailable(format!(
            "cannot {what}: ScyllaDB did not answer within {} ms",
            d.as_millis()
        )),
        e => StoreError::Unavailable(format!("cannot {what}: {e}{}", schema_hint(e))),
    }
}

/// A hint when a request failed because the schema is missing.
fn schema_hint(e: &ExecutionError) -> &'static str {
    match e {
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(DbError::Invalid, _))
        | ExecutionError::PrepareError(PrepareError::AllAttemptsFailed {
            first_attempt: RequestAttemptError::DbError(DbError::Invalid, _),
        }) => " (is the schema applied? run `corelay schema apply`)",
        _ => "",
    }
}

/// Data that does not decode as the schema says.
fn corrupt(room: &str, e: &dyn std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!(
        "room {room:?}: unexpected answer from ScyllaDB: {e}"
    ))
}

/// The bridge could not run a call.
fn bridge_error(e: BridgeError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Retries a failed idempotent request at most `max` times, on errors that may pass:
/// unavailable / overloaded / bootstrapping coordinators and broken connections (on the
/// next node of the plan), server-side timeouts and failures (on the same node). The
/// profile's `request_timeout` bounds the whole, retries included.
#[derive(Debug)]
struct BoundedRetry {
    max: u32,
}

impl RetryPolicy for BoundedRetry {
    fn new_session(&self) -> Box<dyn RetrySession> {
        Box::new(BoundedRetrySession {
            max: self.max,
            used: 0,
        })
    }
}

/// The retry state of one request.
struct BoundedRetrySession {
    max: u32,
    used: u32,
}

impl RetrySession for BoundedRetrySession {
    fn decide_should_retry(&mut self, info: RequestInfo<'_>) -> RetryDecision {
        if !info.is_idempotent || info.consistency.is_serial() || self.used >= self.max {
            return RetryDecision::DontRetry;
        }
        let decision = match info.error {
            RequestAttemptError::BrokenConnectionError(_)
            | RequestAttemptError::UnableToAllocStreamId => RetryDecision::RetryNextTarget(None),
            RequestAttemptError::DbError(db, _) => match db {
                DbError::Unavailable { .. } | DbError::Overloaded | DbError::IsBootstrapping => {
                    RetryDecision::RetryNextTarget(None)
                }
                DbError::ReadTimeout { .. }
                | DbError::WriteTimeout { .. }
                | DbError::ReadFailure { .. }
                | DbError::WriteFailure { .. }
                | DbError::ServerError => RetryDecision::RetrySameTarget(None),
                _ => RetryDecision::DontRetry,
            },
            _ => RetryDecision::DontRetry,
        };
        if decision != RetryDecision::DontRetry {
            self.used += 1;
        }
        decision
    }

    fn reset(&mut self) {
        self.used = 0;
    }
}

// ---------------------------------------------------------------------------------------
// Schema
// ---------------------------------------------------------------------------------------

/// [`SCHEMA_CQL`] for keyspace `keyspace` (a plain identifier), with the replication
/// factor replaced when one is given. Comment lines are kept as they are.
pub fn render_schema(
    keyspace: &str,
    replication_factor: Option<u32>,
) -> Result<String, StoreError> {
    check_keyspace(keyspace)?;
    if replication_factor == Some(0) {
        return Err(StoreError::Open(
            "the replication factor must be at least 1".into(),
        ));
    }
    let mut out = String::with_capacity(SCHEMA_CQL.len() + 64);
    for line in SCHEMA_CQL.lines() {
        if line.trim_start().starts_with("--") {
            out.push_str(line);
        } else {
            let mut l = line
                .replace(
                    &format!("KEYSPACE IF NOT EXISTS {SCHEMA_KEYSPACE}"),
                    &format!("KEYSPACE IF NOT EXISTS {keyspace}"),
                )
                .replace(&format!("{SCHEMA_KEYSPACE}."), &format!("{keyspace}."));
            if let Some(rf) = replication_factor {
                l = l.replace(SCHEMA_RF, &format!("'replication_factor': {rf}"));
            }
            out.push_str(&l);
        }
        out.push('\n');
    }
    Ok(out)
}

/// The statements of a schema text: `--` comment lines dropped, split on `;`, trimmed.
pub fn schema_statements(cql: &str) -> Vec<String> {
    let code: Vec<&str> = cql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect();
    code.join("\n")
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Connects with the `[scylla]` settings and runs the schema's statements in order (each is
/// `IF NOT EXISTS`; the driver waits for schema agreement after each). Returns the
/// statements it ran. Runs on `bridge`; any executor may await it.
pub async fn apply_schema(
    cfg: &ScyllaConfig,
    replication_factor: Option<u32>,
    bridge: Bridge,
) -> Result<Vec<String>, StoreError> {
    check_config(cfg)?;
    let statements = schema_statements(&render_schema(&cfg.keyspace, replication_factor)?);
    let cfg = cfg.clone();
    bridge
        .spawn(async move {
            let nodes = format!("[{}]", cfg.nodes.join(", "));
            let session = session(&cfg, &nodes).await?;
            for text in &statements {
                let mut st = Statement::new(text.as_str());
                st.set_request_timeout(Some(cfg.request_timeout.0.max(DDL_TIMEOUT)));
                st.set_is_idempotent(true);
                session.query_unpaged(st, ()).await.map_err(|e| {
                    StoreError::Unavailable(format!(
                        "ScyllaDB at {nodes} refused `{}`: {e}",
                        text.lines().next().unwrap_or_default()
                    ))
                })?;
            }
            Ok(statements)
        })
        .await
        .map_err(bridge_error)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_renders_for_another_keyspace() {
        let text = render_schema("chat_test_1", Some(1)).expect("render");
        let statements = schema_statements(&text);
        assert_eq!(statements.len(), 5, "{statements:#?}");
        for s in &statements {
            assert!(!s.contains("corelay"), "keyspace left in: {s}");
            assert!(s.contains("chat_test_1"), "{s}");
        }
        assert!(statements[0].starts_with("CREATE KEYSPACE IF NOT EXISTS chat_test_1"));
        assert!(statements[0].contains("'replication_factor': 1"));
        assert!(statements[0].contains("NetworkTopologyStrategy"));
        // The shipped file, for the default keyspace, is what `schema print` prints.
        assert_eq!(render_schema("corelay", None).expect("render"), SCHEMA_CQL);
        for s in statement_texts("chat_test_1") {
            assert!(s.contains("chat_test_1.") && !s.contains("corelay"), "{s}");
        }
    }

    #[test]
    fn keyspace_names_are_checked() {
        for bad in ["", "1abc", "a-b", "a;DROP", "a b", &"x".repeat(49)] {
            assert!(render_schema(bad, None).is_err(), "{bad:?}");
        }
        assert!(render_schema("corelay", Some(0)).is_err());
        assert!(render_schema("Abc_9", Some(3)).is_ok());
    }

    #[test]
    fn batches_are_split_by_rows_and_bytes() {
        let mut out: Vec<Vec<u32>> = Vec::new();
        chunks((0..250).map(|i| (i, 10)).collect(), &mut out);
        assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), [100, 100, 50]);
        let mut out: Vec<Vec<u32>> = Vec::new();
        chunks(
            vec![(1, 40_000), (2, 40_000), (3, 100_000), (4, 10)],
            &mut out,
        );
        assert_eq!(out, [vec![1], vec![2], vec![3], vec![4]]);
    }
}
