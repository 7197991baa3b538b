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

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, OnceLock};

use fjall::{Database, Guard, Keyspace, KeyspaceCreateOptions, PersistMode};
use futures::channel::oneshot;

use super::{check_batch, HistoryStore};
use crate::history::{Durability, HistoryQuery, StoreError, StoredMessage};

/// Name of the keyspace holding the rooms' streams.
const MESSAGES: &str = "messages";
/// Name of the keyspace holding the cid dedupe index.
const CIDS: &str = "cids";
/// Our own lock file in the data directory (fjall keeps its own `lock` too).
const LOCK_FILE: &str = "corelay.lock";
/// A group commit stops taking more appends once it holds this many messages.
const MAX_ROUND_MESSAGES: usize = 65_536;
/// The writer's cache of rooms' latest offsets is emptied past this many rooms.
const MAX_CACHED_ROOMS: usize = 100_000;
/// Longest room, user or cid the key encoding accepts (fjall keys are at most 64 KiB).
const MAX_KEY_PART: usize = 16 * 1024;
/// First byte of every encoded message value.
const VALUE_VERSION: u8 = 1;

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

        let spawn_error =
            |e: std::io::Error| StoreError::Open(format!("cannot start a store thread: {e}"));
        let mut reads = Vec::new();
        for i in 0..opts.read_threads.max(1) {
            let (tx, rx) = mpsc::channel();
            let reader = Reader {
                messages: messages.clone(),
                cids: cids.clone(),
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

/// Our exclusive lock on the data directory, held by the writer thread until fjall is
/// closed. Taken before fjall's own, so a second open fails at once with a clear error.
struct DirLock {
    _file: File,
}

impl DirLock {
    fn acquire(dir: &Path) -> Result<DirLock, StoreError> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| match e.kind() {
                ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => {
                    StoreError::Open(format!("data dir {} is not writable: {e}", dir.display()))
                }
                _ => StoreError::Open(format!("cannot create {}: {e}", path.display())),
            })?;
        // flock, not std's `File::try_lock`, which needs a newer Rust than the crate's MSRV.
        // The lock belongs to this open file description: it is released when the file is
        // closed, also when the process dies, and a second open conflicts even in-process.
        // SAFETY: `file` is open for the whole call; flock only takes the descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.kind() == ErrorKind::WouldBlock {
                StoreError::InUse(dir.to_path_buf())
            } else {
                StoreError::Open(format!("cannot lock {}: {e}", path.display()))
            });
        }
        // The holder's pid, for whoever wonders who holds the directory.
        file.set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(|e| {
                StoreError::Open(format!("data dir {} is not writable: {e}", dir.display()))
            })?;
        Ok(DirLock { _file: file })
    }
}

/// Maps an error from opening fjall to one that names the directory.
fn open_error(dir: &Path, e: fjall::Error) -> StoreError {
    match e {
        fjall::Error::Locked => StoreError::InUse(dir.to_path_buf()),
        fjall::Error::Io(e) | fjall::Error::Storage(fjall::LsmError::Io(e)) => {
            if matches!(
                e.kind(),
                ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem
            ) {
                StoreError::Open(format!("data dir {} is not writable: {e}", dir.display()))
            } else {
                StoreError::Open(format!("cannot open data dir {}: {e}", dir.display()))
            }
        }
        fjall::Error::InvalidVersion(v) => StoreError::Open(format!(
            "data dir {} holds data in an unsupported format ({v:?})",
            dir.display()
        )),
        fjall::Error::JournalRecovery(e) => StoreError::Corrupt(format!(
            "the journal in {} cannot be recovered: {e:?}",
            dir.display()
        )),
        e => StoreError::Open(format!("cannot open data dir {}: {e}", dir.display())),
    }
}

/// Maps an error met while reading: I/O is `Unavailable`, anything undecodable `Corrupt`.
fn read_error(e: fjall::Error) -> StoreError {
    match e {
        fjall::Error::Io(e) | fjall::Error::Storage(fjall::LsmError::Io(e)) => {
            StoreError::Unavailable(format!("read failed: {e}"))
        }
        e => StoreError::Corrupt(format!("read failed: {e}")),
    }
}

/// The key prefix of a room's stream: `u16-BE len | room`. `None` for a room too long to
/// have been stored.
fn room_prefix(room: &str) -> Option<Vec<u8>> {
    if room.len() > MAX_KEY_PART {
        return None;
    }
    let len = u16::try_from(room.len()).ok()?;
    let mut key = Vec::with_capacity(2 + room.len() + 8);
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(room.as_bytes());
    Some(key)
}

/// A message's key: its room's prefix, then the offset big-endian.
fn message_key(prefix: &[u8], offset: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + 8);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&offset.to_be_bytes());
    key
}

/// The cid index key of `(room, user, cid)`. `None` if a part is too long to be stored.
fn cid_key(room: &str, user: &str, cid: &str) -> Option<Vec<u8>> {
    let mut key = room_prefix(room)?;
    if user.len() > MAX_KEY_PART || cid.len() > MAX_KEY_PART {
        return None;
    }
    let user_len = u16::try_from(user.len()).ok()?;
    key.extend_from_slice(&user_len.to_be_bytes());
    key.extend_from_slice(user.as_bytes());
    key.extend_from_slice(cid.as_bytes());
    Some(key)
}

/// The offset at the end of a message key, checking that the key is the room's.
fn key_offset(prefix: &[u8], key: &[u8]) -> Result<u64, StoreError> {
    key.strip_prefix(prefix)
        .and_then(|rest| <[u8; 8]>::try_from(rest).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt(format!("malformed message key of {} bytes", key.len())))
}

/// Encodes what of a message is not in its key:
/// `version u8 | ts u64-LE | id (u16-LE len) | user (u16-LE len) | has_cid u8 | [cid (u16-LE len)] | text (rest)`.
fn encode_value(m: &StoredMessage) -> Result<Vec<u8>, StoreError> {
    let short = |what: &str, s: &str| -> Result<[u8; 2], StoreError> {
        if s.len() > MAX_KEY_PART {
            return Err(StoreError::Invalid(format!(
                "{what} of message {}#{} is {} bytes, more than {MAX_KEY_PART}",
                m.room,
                m.offset,
                s.len()
            )));
        }
        u16::try_from(s.len())
            .map(u16::to_le_bytes)
            .map_err(|_| StoreError::Invalid(format!("{what} too long")))
    };
    if u32::try_from(m.text.len()).is_err() {
        return Err(StoreError::Invalid(format!(
            "text of message {}#{} is too long",
            m.room, m.offset
        )));
    }
    let cid_len = m.cid.as_ref().map_or(0, |c| 2 + c.len());
    let mut v =
        Vec::with_capacity(1 + 8 + 4 + m.id.len() + m.user.len() + 1 + cid_len + m.text.len());
    v.push(VALUE_VERSION);
    v.extend_from_slice(&m.ts.to_le_bytes());
    v.extend_from_slice(&short("id", &m.id)?);
    v.extend_from_slice(m.id.as_bytes());
    v.extend_from_slice(&short("user", &m.user)?);
    v.extend_from_slice(m.user.as_bytes());
    match &m.cid {
        Some(cid) => {
            v.push(1);
            v.extend_from_slice(&short("cid", cid)?);
            v.extend_from_slice(cid.as_bytes());
        }
        None => v.push(0),
    }
    v.extend_from_slice(m.text.as_bytes());
    Ok(v)
}

/// A cursor over an encoded value; every read is bounds-checked.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).and_then(|b| b.first().copied())
    }

    fn u64_le(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    }

    fn short_str(&mut self) -> Option<String> {
        let len = self
            .take(2)
            .and_then(|b| <[u8; 2]>::try_from(b).ok())
            .map(u16::from_le_bytes)?;
        let bytes = self.take(usize::from(len))?;
        String::from_utf8(bytes.to_vec()).ok()
    }
}

/// Reads an encoded value back; anything unexpected is `Corrupt`, never a panic.
fn decode_value(room: &str, offset: u64, v: &[u8]) -> Result<StoredMessage, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("message {room}#{offset}: {what}"));
    let mut c = Cursor { rest: v };
    if c.u8() != Some(VALUE_VERSION) {
        return Err(corrupt("unknown value version"));
    }
    let ts = c.u64_le().ok_or_else(|| corrupt("truncated ts"))?;
    let id = c.short_str().ok_or_else(|| corrupt("bad id"))?;
    let user = c.short_str().ok_or_else(|| corrupt("bad user"))?;
    let cid = match c.u8() {
        Some(0) => None,
        Some(1) => Some(c.short_str().ok_or_else(|| corrupt("bad cid"))?),
        _ => return Err(corrupt("bad cid flag")),
    };
    let text = String::from_utf8(c.rest.to_vec()).map_err(|_| corrupt("text is not UTF-8"))?;
    Ok(StoredMessage {
        room: room.to_owned(),
        offset,
        id,
        user,
        text,
        ts,
        cid,
    })
}

/// The highest offset stored for a room, 0 when it has none.
fn latest_on_disk(messages: &Keyspace, room: &str) -> Result<u64, StoreError> {
    let Some(prefix) = room_prefix(room) else {
        return Ok(0);
    };
    match messages.prefix(&prefix).next_back() {
        None => Ok(0),
        Some(guard) => key_offset(&prefix, &guard.key().map_err(read_error)?),
    }
}

/// The writer thread's state: fjall handles and the rooms' latest offsets.
struct Writer {
    mode: PersistMode,
    dir: PathBuf,
    /// Latest stored offset of rooms written or checked since start (a cache of the disk).
    latest: HashMap<String, u64>,
    failure: Arc<OnceLock<String>>,
    messages: Keyspace,
    cids: Keyspace,
    db: Database,
    /// Declared last so it is dropped last: after fjall is closed.
    _lock: DirLock,
}

impl Writer {
    /// Serves write requests until closed, or until every handle is dropped.
    fn run(mut self, rx: mpsc::Receiver<WriteReq>) {
        let mut closing = None;
        'serve: while let Ok(first) = rx.recv() {
            // Group commit: everything that queued up meanwhile goes into one write.
            let mut round = vec![first];
            let mut queued = 0;
            while queued < MAX_ROUND_MESSAGES {
                match rx.try_recv() {
                    Ok(req) => {
                        if let WriteReq::Append { batch, .. } = &req {
                            queued += batch.len();
                        }
                        round.push(req);
                    }
                    Err(_) => break,
                }
            }
            let mut appends = Vec::new();
            for req in round {
                match req {
                    WriteReq::Append { batch, reply } => appends.push((batch, reply)),
                    WriteReq::Flush { reply } => {
                        self.commit(std::mem::take(&mut appends));
                        let _ = reply.send(self.sync());
                    }
                    WriteReq::Close { reply } => {
                        self.commit(std::mem::take(&mut appends));
                        closing = Some(reply);
                        // Requests queued behind the close are dropped: they get `Closed`.
                        break 'serve;
                    }
                }
            }
            self.commit(appends);
        }
        let synced = self.sync();
        if let Err(e) = &synced {
            tracing::error!(error = %e, "history store: final sync failed");
        }
        drop(self); // closes fjall, then releases the directory lock
        if let Some(reply) = closing {
            let _ = reply.send(synced);
        }
    }

    /// Syncs the journal to disk.
    fn sync(&self) -> Result<(), StoreError> {
        self.db
            .persist(PersistMode::SyncAll)
            .map_err(|e| self.write_failed(e))
    }

    /// Writes one group commit: checks each append on its own (a bad one is refused
    /// alone), writes the accepted ones as one atomic batch, and answers them all.
    fn commit(&mut self, appends: Vec<(Vec<StoredMessage>, Reply)>) {
        if appends.is_empty() {
            return;
        }
        if let Some(why) = self.failure.get() {
            for (_, reply) in appends {
                let _ = reply.send(Err(StoreError::Unavailable(why.clone())));
            }
            return;
        }
        let mut batch = self.db.batch().durability(Some(self.mode));
        let mut round_latest: HashMap<String, u64> = HashMap::new();
        let mut accepted = Vec::with_capacity(appends.len());
        let mut messages = 0;
        for (msgs, reply) in appends {
            match self.stage(&msgs, &mut round_latest, &mut batch) {
                Ok(()) => {
                    messages += msgs.len();
                    accepted.push(reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        if accepted.is_empty() {
            return;
        }
        let result = batch.commit().map_err(|e| self.write_failed(e));
        tracing::trace!(
            appends = accepted.len(),
            messages,
            ok = result.is_ok(),
            "history group commit"
        );
        if result.is_ok() {
            if self.latest.len() + round_latest.len() > MAX_CACHED_ROOMS {
                self.latest.clear();
            }
            self.latest.extend(round_latest);
        }
        for reply in accepted {
            let _ = reply.send(result.clone());
        }
    }

    /// Checks one append against the rooms' latest offsets (as of this round) and adds it
    /// to the batch. On error the batch is left as it was.
    fn stage(
        &mut self,
        msgs: &[StoredMessage],
        round_latest: &mut HashMap<String, u64>,
        batch: &mut fjall::OwnedWriteBatch,
    ) -> Result<(), StoreError> {
        let latest = &mut self.latest;
        let stored = &self.messages;
        let new_latest = check_batch(msgs, |room| {
            if let Some(o) = round_latest.get(room).or_else(|| latest.get(room)) {
                return Ok(*o);
            }
            let o = latest_on_disk(stored, room)?;
            latest.insert(room.to_owned(), o);
            Ok(o)
        })?;
        // Encode everything first, so a bad message leaves the batch untouched.
        let mut items = Vec::with_capacity(msgs.len());
        for m in msgs {
            let prefix = room_prefix(&m.room).ok_or_else(|| {
                StoreError::Invalid(format!(
                    "room name of {} bytes is longer than {MAX_KEY_PART}",
                    m.room.len()
                ))
            })?;
            let cid = match &m.cid {
                Some(cid) => Some(cid_key(&m.room, &m.user, cid).ok_or_else(|| {
                    StoreError::Invalid(format!(
                        "user or cid of message {}#{} is longer than {MAX_KEY_PART} bytes",
                        m.room, m.offset
                    ))
                })?),
                None => None,
            };
            items.push((
                message_key(&prefix, m.offset),
                encode_value(m)?,
                cid,
                m.offset,
            ));
        }
        for (key, value, cid, offset) in items {
            batch.insert(&self.messages, key, value);
            if let Some(cid) = cid {
                batch.insert(&self.cids, cid, offset.to_be_bytes());
            }
        }
        for (room, offset) in new_latest {
            round_latest.insert(room.to_owned(), offset);
        }
        Ok(())
    }

    /// Turns a failed write into `Unavailable`, and remembers it: fjall refuses every write
    /// after one failed (it poisons itself), so later appends fail fast with the cause.
    fn write_failed(&self, e: fjall::Error) -> StoreError {
        let why = match e {
            fjall::Error::Io(e) | fjall::Error::Storage(fjall::LsmError::Io(e)) => {
                if e.kind() == ErrorKind::StorageFull {
                    format!("disk full under {}: {e}", self.dir.display())
                } else {
                    format!("write to {} failed: {e}", self.dir.display())
                }
            }
            fjall::Error::Poisoned => format!(
                "writes to {} are refused after an earlier write failure",
                self.dir.display()
            ),
            e => format!("write to {} failed: {e}", self.dir.display()),
        };
        tracing::error!(error = %why, "history store write failed; appends will fail until corelay restarts");
        let why = format!("{why} (appends are refused until corelay restarts)");
        let _ = self.failure.set(why.clone());
        StoreError::Unavailable(why)
    }
}

/// A reader thread's fjall handles.
struct Reader {
    messages: Keyspace,
    cids: Keyspace,
}

impl Reader {
    /// Serves read requests until closed, or until every handle is dropped.
    fn run(self, rx: mpsc::Receiver<ReadReq>) {
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
    use super::*;

    fn msg(cid: Option<&str>) -> StoredMessage {
        StoredMessage {
            room: "r".into(),
            offset: 7,
            id: "01HX".into(),
            user: "alice".into(),
            text: "héllo".into(),
            ts: 1_700_000_000_000,
            cid: cid.map(str::to_owned),
        }
    }

    #[test]
    fn value_round_trips() {
        for m in [msg(None), msg(Some("c-1"))] {
            let v = encode_value(&m).expect("encodes");
            assert_eq!(decode_value("r", 7, &v).expect("decodes"), m);
        }
    }

    #[test]
    fn damaged_values_are_corrupt_not_panics() {
        let v = encode_value(&msg(Some("c-1"))).expect("encodes");
        for cut in 0..v.len() - "héllo".len() {
            let e = decode_value("r", 7, &v[..cut]).expect_err("truncated value must fail");
            assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
        }
        let mut bad = v.clone();
        bad[0] = 9;
        assert!(matches!(
            decode_value("r", 7, &bad),
            Err(StoreError::Corrupt(_))
        ));
        let mut bad = encode_value(&msg(None)).expect("encodes");
        let last = bad.len() - 1;
        bad[last] = 0xff; // text no longer UTF-8
        assert!(matches!(
            decode_value("r", 7, &bad),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn keys_keep_prefix_rooms_apart() {
        let a = room_prefix("a").expect("short");
        let ab = room_prefix("ab").expect("short");
        assert!(!message_key(&ab, 1).starts_with(&a));
        assert_eq!(key_offset(&a, &message_key(&a, 42)).expect("ok"), 42);
        assert!(key_offset(&a, &message_key(&ab, 42)).is_err());
    }

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
