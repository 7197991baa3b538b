//! The writer thread: group commit (every append queued meanwhile, checked one by one and
//! written as one atomic fjall batch with one journal sync), flush and close, and what a
//! failed write means from then on.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock};

use fjall::{Database, Keyspace, PersistMode};

use super::dir::DirLock;
use super::encoding::{cid_key, encode_value, message_key, room_prefix, MAX_KEY_PART};
use super::reader::latest_on_disk;
use super::{Reply, WriteReq};
use crate::history::{StoreError, StoredMessage};
use crate::store::check_batch;

/// A group commit stops taking more appends once it holds this many messages.
const MAX_ROUND_MESSAGES: usize = 65_536;
/// The writer's cache of rooms' latest offsets is emptied past this many rooms.
const MAX_CACHED_ROOMS: usize = 100_000;

/// The writer thread's state: fjall handles and the rooms' latest offsets.
pub(super) struct Writer {
    pub(super) mode: PersistMode,
    pub(super) dir: PathBuf,
    /// Latest stored offset of rooms written or checked since start (a cache of the disk).
    pub(super) latest: HashMap<String, u64>,
    pub(super) failure: Arc<OnceLock<String>>,
    pub(super) messages: Keyspace,
    pub(super) cids: Keyspace,
    /// The feed's marks and cursors (see `feed`).
    pub(super) ledger: super::feed::FeedLedger,
    /// Whether appends mark their rooms for the feed.
    pub(super) feed: Arc<AtomicBool>,
    pub(super) db: Database,
    /// Declared last so it is dropped last: after fjall is closed.
    pub(super) _lock: DirLock,
}

impl Writer {
    /// Serves write requests until closed, or until every handle is dropped.
    pub(super) fn run(mut self, rx: mpsc::Receiver<WriteReq>) {
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
                    WriteReq::FeedDelivered { rooms, reply } => {
                        // After the appends before it: a mark they raised stays.
                        self.commit(std::mem::take(&mut appends));
                        let _ = reply.send(self.feed_delivered(&rooms));
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
        if self.feed.load(Ordering::Acquire) {
            for (room, offset) in &new_latest {
                self.ledger.mark(batch, room, *offset);
            }
        }
        for (room, offset) in new_latest {
            round_latest.insert(room.to_owned(), offset);
        }
        Ok(())
    }

    /// Moves the feed's cursors (no sync: a lost cursor only means a redelivery).
    fn feed_delivered(&self, rooms: &[(String, u64)]) -> Result<(), StoreError> {
        if let Some(why) = self.failure.get() {
            return Err(StoreError::Unavailable(why.clone()));
        }
        let mut batch = self.db.batch().durability(Some(PersistMode::Buffer));
        self.ledger.delivered(&mut batch, rooms)?;
        batch.commit().map_err(|e| self.write_failed(e))
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
