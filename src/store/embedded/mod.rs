//! The embedded history store: fjall (an LSM tree) in a local data directory, the default
//! on a single host (`store = "embedded"`).
//!
//! # Threads
//!
//! fjall's calls block, and a shard must never block on disk. So the store runs fjall on
//! its own threads, fed by channels, and answers through `futures::channel::oneshot`
//! (which wakes a glommio task from another thread):
//!
//! - one **writer** thread does group commit: it takes every append that queued up while
//!   the previous write was in progress, checks them, and writes them as **one** atomic
//!   fjall batch with **one** journal sync (fdatasync with [`Durability::Fsync`]), then
//!   acks them all. Throughput therefore grows with the number of appends in flight.
//! - `read_threads` **reader** threads (default 1) answer reads, round-robin, so a read
//!   never queues behind an fsync;
//! - fjall itself gets one background worker (flushes and compaction).
//!
//! # Layout
//!
//! Keyspace `messages`: key `u16-BE len(room) | room | offset u64-BE`, so a prefix scan on
//! `len | room` is exactly the room's stream in offset order (the length prefix keeps
//! rooms "a" and "ab" apart whatever bytes their names hold). Value: a small hand encoding
//! of `id`, `user`, `ts`, `cid`, `text` (room and offset are in the key).
//!
//! Keyspace `cids`: key `u16-BE len(room) | room | u16-BE len(user) | user | cid`, value the
//! offset (u64-BE) of the newest message sent with it, written in the same atomic batch as
//! the message. Entries are not expired yet: the dedupe window is applied on read, through
//! the message's `ts`.
//!
//! # Failures
//!
//! A failed journal write or sync (disk full, I/O error) fails every append of that group
//! commit with [`StoreError::Unavailable`]. fjall then refuses further writes (it cannot
//! know what reached the disk), so appends keep failing fast with `Unavailable` until
//! corelay restarts, and [`EmbeddedStore::health`] says why; reads keep working. A message
//! whose append failed during the sync may still be found after the restart (it may have
//! reached the disk); a retry with the same `cid` then gets that message back.

//!
//! # Files
//!
//! - this one: [`EmbeddedStore`], its options, and the requests it sends to its threads;
//! - `writer`: the writer thread (group commit, offset checks, write failures);
//! - `reader`: the reader threads (history reads, cid lookups);
//! - `encoding`: the key and value encodings of the layout above;
//! - `dir`: the data directory's lock, and the errors of opening fjall in it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, OnceLock};

use fjall::{Database, KeyspaceCreateOptions, PersistMode};
use futures::channel::oneshot;

use super::HistoryStore;
use crate::history::{Durability, HistoryQuery, StoreError, StoredMessage};

mod dir;
mod encoding;
mod feed;
mod reader;
mod writer;

use dir::{open_error, DirLock};
use feed::{FeedLedger, FEED_CURSORS, FEED_DIRTY};
use reader::Reader;
use writer::Writer;

/// Name of the keyspace holding the rooms' streams.
const MESSAGES: &str = "messages";
/// Name of the keyspace holding the cid dedupe index.
const CIDS: &str = "cids";

/// Tuning of the embedded store beyond what [`EmbeddedStore::open`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// When an append is acked: after fdatasync (default) or after the OS has the bytes.
    pub durability: Durability,
    /// Threads answering reads (at least 1; default 1).
    pub read_threads: usize,
    /// fjall's block cache, in bytes (default 32 MiB).
    pub cache_bytes: u64,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            durability: Durability::Fsync,
            read_threads: 1,
            cache_bytes: 32 * 1024 * 1024,
        }
    }
}

/// What an append, flush or close answers.
type Reply = oneshot::Sender<Result<(), StoreError>>;

/// A request to the writer thread.
enum WriteReq {
    Append {
        batch: Vec<StoredMessage>,
        reply: Reply,
    },
    Flush {
        reply: Reply,
    },
    /// The backend's feed acknowledged these rooms up to these offsets.
    FeedDelivered {
        rooms: Vec<(String, u64)>,
        reply: Reply,
    },
    Close {
        reply: Reply,
    },
}

/// A request to a reader thread.
enum ReadReq {
    Read {
        room: String,
        query: HistoryQuery,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<StoredMessage>, StoreError>>,
    },
    Latest {
        room: String,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    FindCid {
        room: String,
        user: String,
        cid: String,
        not_before_ts: u64,
        reply: oneshot::Sender<Result<Option<StoredMessage>, StoreError>>,
    },
    /// The rooms the feed owes messages.
    FeedPending {
        reply: oneshot::Sender<Result<Vec<crate::store::FeedPending>, StoreError>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// What every clone of one [`EmbeddedStore`] shares: the ends of the threads' channels.
struct Shared {
    dir: PathBuf,
    writes: mpsc::Sender<WriteReq>,
    reads: Vec<mpsc::Sender<ReadReq>>,
    next_reader: AtomicUsize,
    closed: AtomicBool,
    /// Set by the writer on the first failed write: fjall refuses writes from then on.
    write_failure: Arc<OnceLock<String>>,
    /// Whether appends mark their rooms for the backend's feed (see `feed`).
    feed: Arc<AtomicBool>,
}

/// The fjall-backed [`HistoryStore`]: durable history on one host.
///
/// A handle to the store's threads; cheap to clone, `Send + Sync`. See the module docs for
/// the threads, the layout and what happens on disk errors; call [`EmbeddedStore::close`]
/// for a clean shutdown.
#[derive(Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("dir", &self.shared.dir)
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl EmbeddedStore {
    /// Opens (creating it if needed) the store in `dir` with default tuning.
    ///
    /// Fails with [`StoreError::InUse`] when another store (in this or another process)
    /// holds `dir`, with [`StoreError::Open`] naming `dir` and the OS error when it cannot
    /// be created or written, and with [`StoreError::Corrupt`] when its journal cannot be
    /// recovered.
    pub fn open(dir: &Path, durability: Durability) -> Result<EmbeddedStore, StoreError> {
        EmbeddedStore::open_with(
            dir,
            EmbeddedOptions {
                durability,
                ..EmbeddedOptions::default()
            },
        )
    }

    /// Like [`EmbeddedStore::open`], with explicit tuning.
    pub fn open_with(dir: &Path, opts: EmbeddedOptions) -> Result<EmbeddedStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Open(format!("cannot create data dir {}: {e}", dir.display()))
        })?;
        let lock = DirLock::acquire(dir)?;
        let db = Database::builder(dir)
            .worker_threads(1)
            .cache_size(opts.cache_bytes)
            .manual_journal_persist(true)
            .open()
            .map_err(|e| open_error(dir, e))?;
        let messages = db
            .keyspace(MESSAGES, KeyspaceCreateOptions::default)
            .map_err(|e| open_error(dir, e))?;
        let cids = db
            .keyspace(CIDS, KeyspaceCreateOptions::default)
            .map_err(|e| open_error(dir, e))?;
        let ledger = FeedLedger {
            dirty: db
                .keyspace(FEED_DIRTY, KeyspaceCreateOptions::default)
                .map_err(|e| open_error(dir, e))?,
            cursors: db
                .keyspace(FEED_CURSORS, KeyspaceCreateOptions::default)
                .map_err(|e| open_error(dir, e))?,
        };
        let feed = Arc::new(AtomicBool::new(false));

        let spawn_error =
            |e: std::io::Error| StoreError::Open(format!("cannot start a store thread: {e}"));
        let mut reads = Vec::new();
        for i in 0..opts.read_threads.max(1) {
            let (tx, rx) = mpsc::channel();
            let reader = Reader {
                messages: messages.clone(),
                cids: cids.clone(),
                ledger: ledger.clone(),
            };
            std::thread::Builder::new()
                .name(format!("corelay-store-r{i}"))
                .spawn(move || reader.run(rx))
                .map_err(spawn_error)?;
            reads.push(tx);
        }

        let write_failure = Arc::new(OnceLock::new());
        let (writes, rx) = mpsc::channel();
        let writer = Writer {
            mode: match opts.durability {
                Durability::Fsync => PersistMode::SyncData,
                Durability::Buffered => PersistMode::Buffer,
            },
            dir: dir.to_path_buf(),
            latest: HashMap::new(),
            failure: write_failure.clone(),
            messages,
            cids,
            ledger,
            feed: feed.clone(),
            db,
            _lock: lock,
        };
        std::thread::Builder::new()
            .name("corelay-store-w".into())
            .spawn(move || writer.run(rx))
            .map_err(spawn_error)?;

        tracing::info!(dir = %dir.display(), durability = ?opts.durability, "embedded history store open");
        Ok(EmbeddedStore {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                writes,
                reads,
                next_reader: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
                write_failure,
                feed,
            }),
        })
    }

    /// The data directory this store holds.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Whether appends can succeed, without I/O: `Closed` after [`EmbeddedStore::close`],
    /// `Unavailable` (with the cause) after a failed write, else `Ok`.
    pub fn health(&self) -> Result<(), StoreError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        match self.shared.write_failure.get() {
            Some(why) => Err(StoreError::Unavailable(why.clone())),
            None => Ok(()),
        }
    }

    /// Syncs the journal to disk (`fsync`), covering every append acked before.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.write_call(|reply| WriteReq::Flush { reply }).await
    }

    /// From now on, appends mark their rooms for the backend's feed, in the same atomic
    /// write as the messages (see `feed`).
    pub fn enable_feed(&self) {
        self.shared.feed.store(true, Ordering::Release);
    }

    /// The rooms holding messages the feed has not delivered (see `feed`).
    pub async fn feed_pending(&self) -> Result<Vec<crate::store::FeedPending>, StoreError> {
        self.read_call(|reply| ReadReq::FeedPending { reply }).await
    }

    /// The feed delivered `rooms` up to these offsets: moves their cursors, and clears the
    /// marks they reached.
    pub async fn feed_delivered(&self, rooms: Vec<(String, u64)>) -> Result<(), StoreError> {
        self.write_call(|reply| WriteReq::FeedDelivered { rooms, reply })
            .await
    }

    /// Clean shutdown: lets the readers finish what is queued, commits and syncs pending
    /// appends, closes fjall and releases the data directory, then returns. Later calls on
    /// any clone get [`StoreError::Closed`]; a second `close` returns `Ok` at once.
    pub async fn close(&self) -> Result<(), StoreError> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        for reader in &self.shared.reads {
            let (reply, done) = oneshot::channel();
            if reader.send(ReadReq::Close { reply }).is_ok() {
                let _ = done.await;
            }
        }
        let (reply, done) = oneshot::channel();
        self.shared
            .writes
            .send(WriteReq::Close { reply })
            .map_err(|_| StoreError::Unavailable("the store's writer thread has stopped".into()))?;
        done.await.map_err(|_| {
            StoreError::Unavailable("the store's writer thread stopped while closing".into())
        })?
    }

    /// The error for a call whose thread is gone: `Closed` if we closed it, else it died.
    fn gone(&self) -> StoreError {
        if self.shared.closed.load(Ordering::Acquire) {
            StoreError::Closed
        } else {
            StoreError::Unavailable("a store thread has stopped unexpectedly".into())
        }
    }

    async fn write_call(&self, make: impl FnOnce(Reply) -> WriteReq) -> Result<(), StoreError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        let (reply, answer) = oneshot::channel();
        self.shared
            .writes
            .send(make(reply))
            .map_err(|_| self.gone())?;
        answer.await.map_err(|_| self.gone())?
    }

    async fn read_call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> ReadReq,
    ) -> Result<T, StoreError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        let (reply, answer) = oneshot::channel();
        let n = self.shared.next_reader.fetch_add(1, Ordering::Relaxed);
        let reader = self
            .shared
            .reads
            .get(n % self.shared.reads.len())
            .ok_or_else(|| self.gone())?;
        reader.send(make(reply)).map_err(|_| self.gone())?;
        answer.await.map_err(|_| self.gone())?
    }
}

impl HistoryStore for EmbeddedStore {
    async fn append(&self, batch: Vec<StoredMessage>) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        if let Some(why) = self.shared.write_failure.get() {
            return Err(StoreError::Unavailable(why.clone()));
        }
        self.write_call(|reply| WriteReq::Append { batch, reply })
            .await
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
        self.read_call(|reply| ReadReq::Read {
            room: room.to_owned(),
            query,
            limit,
            reply,
        })
        .await
    }

    async fn latest_offset(&self, room: &str) -> Result<u64, StoreError> {
        self.read_call(|reply| ReadReq::Latest {
            room: room.to_owned(),
            reply,
        })
        .await
    }

    async fn find_cid(
        &self,
        room: &str,
        user: &str,
        cid: &str,
        not_before_ts: u64,
    ) -> Result<Option<StoredMessage>, StoreError> {
        self.read_call(|reply| ReadReq::FindCid {
            room: room.to_owned(),
            user: user.to_owned(),
            cid: cid.to_owned(),
            not_before_ts,
            reply,
        })
        .await
    }
}
