//! The messages shards send each other. Plain data, `Send`, moved through bounded
//! SPSC channels: requests go to a room's home shard, room events and answers come back
//! to the shards that hold the connections.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::member::{ConnRef, User};

/// The shard that owns a room: a stable hash of its name modulo the shard count.
pub fn home_of(room: &str, shards: usize) -> usize {
    // FNV-1a: stable across processes and builds (unlike std's RandomState).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in room.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards as u64) as usize
}

/// Where the answer to a request goes.
#[derive(Debug)]
pub enum ReplyTo {
    /// An ack frame to a connection (nothing when the client asked for no ack).
    Conn { conn: ConnRef, ack_id: Option<u64> },
    /// The JSON ack body, to an HTTP API request waiting on its shard.
    Api(futures::channel::oneshot::Sender<Bytes>),
}

impl ReplyTo {
    /// The connection that asked, if a connection did.
    pub fn conn(&self) -> Option<ConnRef> {
        match self {
            ReplyTo::Conn { conn, .. } => Some(*conn),
            ReplyTo::Api(_) => None,
        }
    }
}

/// A request to a room's home shard.
#[derive(Debug)]
pub enum HomeCmd {
    /// Add a connection to the room; answered with `MemberMsg::Joined`.
    Join {
        room: Arc<str>,
        conn: ConnRef,
        user: User,
        since: Option<u64>,
        ack_id: Option<u64>,
    },
    /// Remove a connection (a `leave`, or the connection ended).
    Leave {
        room: Arc<str>,
        conn: ConnRef,
        ack_id: Option<u64>,
    },
    /// Sequence, store and fan out a message (to every member but the sender).
    Publish {
        room: Arc<str>,
        user: Arc<str>,
        text: String,
        cid: Option<String>,
        reply: ReplyTo,
    },
    /// Fan out a typing notice (volatile).
    Typing {
        room: Arc<str>,
        conn: ConnRef,
        user: Arc<str>,
    },
    /// List who is present.
    Presence { room: Arc<str>, reply: ReplyTo },
}

/// A request to the shard that owns a user's connection count (`home_of(user)`).
#[derive(Debug)]
pub enum UserCmd {
    /// Count one more connection of `user` if under the limit; answered with
    /// `MemberMsg::Admitted`.
    Acquire { user: Arc<str>, conn: ConnRef },
    /// One counted connection of `user` is no longer connected.
    Release { user: Arc<str> },
}

/// A message to the shard that holds connections.
#[derive(Debug)]
pub enum MemberMsg {
    /// A room event encoded once (a full WebSocket frame) for the room's local members.
    Deliver {
        room: Arc<str>,
        frame: Bytes,
        except: Option<ConnRef>,
        volatile: bool,
        sent_at: Instant,
    },
    /// A frame for one connection (an ack).
    Reply { conn: u64, frame: Bytes },
    /// The home shard answered a join: if admitted, start delivering to the connection;
    /// either way send the ack frame (empty when the client asked for no ack).
    Joined {
        room: Arc<str>,
        conn: u64,
        frame: Bytes,
        admitted: bool,
    },
    /// The answer to `UserCmd::Acquire`: whether the connection was counted (and may
    /// complete its Socket.IO CONNECT).
    Admitted {
        conn: u64,
        user: Arc<str>,
        admitted: bool,
    },
    /// A connection whose request names a session this shard owns: serve it here.
    Adopt {
        /// A duplicate of the connection's socket, owned by the message: dropped
        /// undelivered, it closes.
        fd: std::os::fd::OwnedFd,
        handoff: Box<crate::transport::connection::Handoff>,
    },
    /// A connected WebSocket moving here, the home shard of the first room it joins
    /// (`chat::follow`).
    Moved(Box<super::follow::MovedConn>),
}

/// Everything that crosses the shard mesh. (`MemberMsg::Adopt` and `Moved` carry a
/// socket as an `OwnedFd`: whoever holds the message owns the descriptor.)
#[derive(Debug)]
pub enum ShardMsg {
    Home(HomeCmd),
    Member(MemberMsg),
    Users(UserCmd),
}

impl HomeCmd {
    /// About the bytes it holds, for the memory budget: its own size and its text.
    pub fn weight(&self) -> usize {
        let text = match self {
            HomeCmd::Publish { text, cid, .. } => text.len() + cid.as_ref().map_or(0, String::len),
            _ => 0,
        };
        std::mem::size_of::<HomeCmd>() + text
    }
}

impl ShardMsg {
    /// About the bytes it holds, for the memory budget (the sender counts them until the
    /// receiving shard takes the message): its own size, and its text, frame or queued
    /// frames. The same message always weighs the same.
    pub fn weight(&self) -> usize {
        let carried = match self {
            ShardMsg::Home(cmd) => cmd.weight(),
            ShardMsg::Users(_) => 0,
            ShardMsg::Member(m) => match m {
                MemberMsg::Deliver { frame, .. }
                | MemberMsg::Reply { frame, .. }
                | MemberMsg::Joined { frame, .. } => frame.len(),
                MemberMsg::Admitted { .. } => 0,
                MemberMsg::Adopt { handoff, .. } => handoff.leftover.len(),
                MemberMsg::Moved(moved) => moved.queued_bytes(),
            },
        };
        std::mem::size_of::<ShardMsg>() + carried
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_is_stable_and_spread() {
        assert_eq!(home_of("lobby", 4), home_of("lobby", 4));
        let mut seen = [0usize; 4];
        for i in 0..1000 {
            seen[home_of(&format!("room-{i}"), 4)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
    }
}
