//! The history data model shared by the history stores (`store`) and the Redis cluster
//! layer (`cluster`): one stored message, the slices a read can ask for, why a store call
//! failed, and how durable an append is.
//!
//! It lives apart from both so that neither has to import the other for these types, and
//! so that `config` can name [`Durability`] without importing `store`. It imports no other
//! module of the crate; keep it that way (`tests/layers.rs` checks the module graph).

use std::path::PathBuf;

/// One chat message as stored and replayed.
///
/// The field names are those of the protocol's server → client `message` event, so the
/// value can be serialized straight onto the wire (`cid` is left out when it is `None`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredMessage {
    /// The room the message was sent to.
    pub room: String,
    /// The message's position in the room's stream: 1, 2, 3, … assigned by the home shard.
    pub offset: u64,
    /// Globally unique id that sorts by time.
    pub id: String,
    /// The sender's user id (`sub`).
    pub user: String,
    /// The message text (UTF-8).
    pub text: String,
    /// Server time of acceptance, in milliseconds since the Unix epoch.
    pub ts: u64,
    /// The client's idempotency key, if it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
}

/// Which slice of a room's stream to read.
///
/// Whatever the slice, results come back oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryQuery {
    /// The newest `limit` messages of the room.
    Latest,
    /// The newest `limit` messages with an offset below the given one.
    Before(u64),
    /// The oldest `limit` messages with an offset above the given one.
    After(u64),
}

/// Why a store call failed.
///
/// `Clone` so that one failed group commit can answer every request it carried.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store cannot serve the call right now (disk full, I/O error, store thread gone);
    /// nothing was stored. The protocol's `unavailable`.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Data read back from the store cannot be decoded; the store never guesses.
    #[error("store data corrupt: {0}")]
    Corrupt(String),
    /// The store could not be opened (permissions, read-only disk, bad directory, …).
    #[error("cannot open store: {0}")]
    Open(String),
    /// The data directory is locked by another open store.
    #[error("data dir {} is in use by another corelay process", .0.display())]
    InUse(PathBuf),
    /// An append carried an offset that is not above the room's latest stored one (or not
    /// increasing within the batch): storing it would overwrite or reorder an acked message.
    /// Nothing of the batch was stored. This is a sequencing bug in the caller.
    #[error("offset {offset} of room {room:?} is not above its latest stored offset {latest}")]
    OffsetConflict {
        /// The room whose stream was hit.
        room: String,
        /// The offending offset.
        offset: u64,
        /// The room's latest offset at that point (stored, or earlier in the same batch).
        latest: u64,
    },
    /// An append carried a message the store cannot represent (e.g. a field too long for
    /// its encoding). Nothing of the batch was stored.
    #[error("invalid message for the store: {0}")]
    Invalid(String),
    /// The store was closed by [`Store::close`](crate::store::Store::close); no more calls
    /// are served.
    #[error("store is closed")]
    Closed,
}

/// Durability of an append: `Fsync` (default) syncs to disk before acking; `Buffered`
/// writes to the OS only (survives a crash of corelay, not of the machine).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `fdatasync` the journal before acking an append.
    #[default]
    Fsync,
    /// Hand the journal write to the OS and ack; the OS writes it out later.
    Buffered,
}
