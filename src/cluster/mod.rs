//! Between hosts: Redis. Offsets, pub/sub, idempotent sends, presence and recent history of
//! a cluster of corelay hosts, through one Redis: standalone (classic or sharded pub/sub),
//! or a Redis Cluster reached through any of its nodes (each room on the master of its
//! slot, sharded pub/sub; see [`redis`]'s "Redis Cluster").
//!
//! [`redis::RedisCluster`] is the one value a process holds (`Clone + Send + Sync`; its
//! connections live on the [tokio bridge](crate::bridge)). Each shard wraps it in a
//! [`shard_link::ShardLink`], which runs the hot path on the shard's own connections to
//! Redis (TCP, TLS or a Unix socket). The rooms' home shards call:
//!
//! - [`ShardLink::publish_batch`](shard_link::ShardLink::publish_batch) runs the publish
//!   script: dedupe by `cid`, next offset, append to the room's stream, PUBLISH; Redis's
//!   order is the offset order on every host.
//! - [`ShardLink::subscribe`](shard_link::ShardLink::subscribe) /
//!   [`unsubscribe`](shard_link::ShardLink::unsubscribe) a room's channel; each shard reads
//!   its own [`ClusterEvent`] stream, returned by
//!   [`ShardLink::start`](shard_link::ShardLink::start).
//! - presence: [`presence_join`](redis::RedisCluster::presence_join),
//!   [`presence_leave`](redis::RedisCluster::presence_leave),
//!   [`presence_list`](redis::RedisCluster::presence_list). A host that stops refreshing
//!   (killed, or cut off from Redis) expires after `presence_ttl`; the next presence script
//!   run in that room by any host reaps it and publishes, once, the offline event of each
//!   of its users who is present through no live host. Every host refreshes the rooms it
//!   has users in every `presence_ttl / 3`, so the offline events go out within about
//!   `presence_ttl · 4/3` after a host dies, with no sweep over the cluster's other rooms.
//! - typing: [`publish_typing`](redis::RedisCluster::publish_typing) sends a typing notice
//!   on the room's channel, fire and forget (no offset, nothing stored).
//! - [`check()`] for `corelay check`.
//!
//! The history of a room lives in the same Redis stream the publish script writes;
//! [`crate::store::redis::RedisStore`] reads it through the same connection.
//!
//! # Keys
//!
//! Every key and channel of one room carries the room as a Redis Cluster hash tag
//! (`{room}`), so they all live on one slot and one script can touch them all:
//!
//! | key | type | what |
//! |---|---|---|
//! | `corelay:{room}:offset` | string | the room's latest offset (INCR); never expires |
//! | `corelay:{room}:stream` | stream | recent messages; entry id `<offset>-0`, fields `id user text ts [cid]`; trimmed by count (`MAXLEN ~`) and age |
//! | `corelay:{room}:cid:<len(user)>:<user>:<cid>` | string | `<offset>:<ts>:<id>`, the first ack of an idempotent send; expires after the dedupe window |
//! | `corelay:{room}:presence:<host>` | hash | user → display name, of the users connected through that host; kept 3 × `presence_ttl` unless refreshed (so that a reap finds the users of an expired host) |
//! | `corelay:{room}:presence:hosts` | zset | host → expiry time (Redis clock, ms): now + `presence_ttl` at each refresh |
//! | `corelay:{room}:reaped:<host>` | set | users of an expired host that a reap announced offline; deleted when the host refreshes again (it announces them online), else kept an hour |
//! | channel `corelay:{room}` | pub/sub | `m` + message JSON (offset order), `p` + presence JSON, `t` + typing JSON (volatile) |
//! | channel `corelay:ping:<host>` | pub/sub | this host's round-trip probe |
//!
//! The user id is length-prefixed in the dedupe key so that user `a:b` with cid `c` and user
//! `a` with cid `b:c` cannot share a key.
//!
//! Redis must keep its data (AOF or RDB persistence, `maxmemory-policy noeviction`): the
//! offset counter is the room's sequence for the whole cluster. A counter that is lost while
//! the stream survives heals itself (the script never goes below the stream's last entry),
//! and a host never gets an offset at or below the newest it delivered (the home shard passes
//! it as a floor with each message, [`ShardLink::publish_batch`](shard_link::ShardLink::publish_batch)).

use crate::history::StoredMessage;

mod check;
pub mod emitter;
pub(crate) mod keys;
mod options;
mod publish;
pub mod redis;
mod resp;
mod scripts;
pub mod shard_link;
mod tls;
pub mod topology;
pub(crate) mod wire;

pub use check::{check, CheckReport, CheckStep, ClusterCheck, MasterCheck};
pub(crate) use options::redact_url;
pub use options::{url_from_env, url_from_vars, RedisOptions};

/// A message to publish: everything but the offset, which the publish script assigns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// The room it is sent to.
    pub room: String,
    /// The sender's user id.
    pub user: String,
    /// The text (UTF-8).
    pub text: String,
    /// The client's idempotency key, if any.
    pub cid: Option<String>,
    /// Server time of acceptance, ms since the Unix epoch.
    pub ts: u64,
    /// The message's globally unique id.
    pub id: String,
}

impl NewMessage {
    /// The stored form of this message at `offset`.
    pub fn at(&self, offset: u64) -> StoredMessage {
        StoredMessage {
            room: self.room.clone(),
            offset,
            id: self.id.clone(),
            user: self.user.clone(),
            text: self.text.clone(),
            ts: self.ts,
            cid: self.cid.clone(),
        }
    }
}

/// What the sender is acked with: `{ok, id, offset, ts}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The message's offset in its room.
    pub offset: u64,
    /// The message's id.
    pub id: String,
    /// The message's server time (ms since the epoch).
    pub ts: u64,
}

/// What publishing one message gave ([`ShardLink::publish_batch`](shard_link::ShardLink::publish_batch)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// The message got the next offset, was added to the room's stream and published.
    Stored(StoredMessage),
    /// The same user already sent this `cid` to this room within the dedupe window: this is
    /// the first send's ack, unchanged; nothing was stored or published this time.
    Duplicate(Ack),
}

impl Published {
    /// The ack to send back, whichever the outcome.
    pub fn ack(&self) -> Ack {
        match self {
            Published::Stored(m) => Ack {
                offset: m.offset,
                id: m.id.clone(),
                ts: m.ts,
            },
            Published::Duplicate(a) => a.clone(),
        }
    }
}

/// One user present in a room, cluster-wide.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PresenceEntry {
    /// The user id.
    pub user: String,
    /// The display name, when the user has one.
    pub name: Option<String>,
}

/// What a shard reads from its [`ShardLink`](shard_link::ShardLink)'s event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// A message published to a room this shard subscribed to (by any host, this one
    /// included), in the room's offset order.
    Message(StoredMessage),
    /// A user came online in a room (their first connection on any host) or went offline
    /// (their last one left), as announced by `host`. A home shard ignores its own host's
    /// announcements (it told its local members already).
    Presence {
        /// The room.
        room: String,
        /// The user id.
        user: String,
        /// Display name, if known.
        name: Option<String>,
        /// `true`: came online; `false`: went offline.
        online: bool,
        /// The announcing host's id ([`RedisCluster::host_id`](redis::RedisCluster::host_id)).
        host: String,
    },
    /// A user is typing in a room, as announced by `host` (volatile: no offset, never
    /// stored, dropped when Redis is down). A home shard ignores its own host's notices
    /// (it told its local members already).
    Typing {
        /// The room.
        room: String,
        /// The user id.
        user: String,
        /// The announcing host's id.
        host: String,
    },
    /// The pub/sub link to Redis is down (`reason` says why): messages published meanwhile
    /// are not delivered live. Sends fail with `unavailable` until [`ClusterEvent::Reconnected`].
    Down {
        /// Why the link went down, for the log.
        reason: String,
    },
    /// The link is back and every subscribed room is subscribed again. Messages published
    /// while it was down were not delivered: compare each subscribed room's latest offset
    /// (from the store) with the last one delivered, and deliver the gap from the store.
    Reconnected,
}

impl ClusterEvent {
    /// About the bytes it holds, for the memory budget (a home counts the events waiting
    /// for it).
    pub fn weight(&self) -> usize {
        let carried = match self {
            ClusterEvent::Message(m) => {
                m.room.len()
                    + m.id.len()
                    + m.user.len()
                    + m.text.len()
                    + m.cid.as_ref().map_or(0, String::len)
            }
            ClusterEvent::Presence {
                room,
                user,
                name,
                host,
                ..
            } => room.len() + user.len() + host.len() + name.as_ref().map_or(0, String::len),
            ClusterEvent::Typing { room, user, host } => room.len() + user.len() + host.len(),
            ClusterEvent::Down { reason } => reason.len(),
            ClusterEvent::Reconnected => 0,
        };
        std::mem::size_of::<ClusterEvent>() + carried
    }
}

/// Why a Redis call failed. The text says what to do where there is something to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// Redis cannot be reached or the connection was lost; nothing was done. The protocol's
    /// `unavailable`.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis did not answer in time. A publish that timed out was not applied unless Redis
    /// ran it within the first half of the timeout and only its reply was late (the script
    /// refuses to run after that deadline), so a retry with the same `cid` is always safe.
    #[error("redis timeout: {0}")]
    Timeout(String),
    /// Redis refused the credentials, or the ACL user lacks a permission.
    #[error("redis refused access: {0}")]
    Auth(String),
    /// The TLS handshake failed (unknown CA, wrong host name, plain-text server, …).
    #[error("redis TLS: {0}")]
    Tls(String),
    /// The configuration is wrong (bad URL, unreadable certificate file, …).
    #[error("redis configuration: {0}")]
    Config(String),
    /// Redis answered with an error (out of memory, read-only replica, …).
    #[error("redis error: {0}")]
    Server(String),
    /// Redis answered something this code cannot decode (a corrupt entry, a foreign key).
    #[error("unexpected data from redis: {0}")]
    Protocol(String),
    /// [`RedisCluster::close`](redis::RedisCluster::close) was called.
    #[error("redis client is closed")]
    Closed,
}

impl ClusterError {
    /// Whether retrying later can succeed without changing the configuration: Redis is
    /// not reachable or did not answer in time. Refused credentials, TLS and configuration
    /// errors are not transient.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ClusterError::Unavailable(_) | ClusterError::Timeout(_)
        )
    }
}

/// `n` random bytes as lowercase hex.
pub(crate) fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    crate::ids::random_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
