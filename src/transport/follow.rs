//! A WebSocket connection follows the first room it joins to that room's home shard.
//!
//! A room's messages are sequenced on its home shard and delivered by every shard that
//! holds members. A member on another shard costs a crossing of the shard mesh for each
//! message it sends (and its ack back) and for each delivery batch it receives, and a
//! crossing wakes the other shard's thread whenever that thread sleeps: below capacity
//! that wake-up is most of what a delivery costs (BENCHMARKS.md, sixth part). So when a
//! connection joins its first room and the room's home is another shard, the connection
//! moves there before the join is handled: its socket is duplicated, its session (identity,
//! outbound queue, timers, rate limit) and the bytes read but not yet parsed travel through
//! the mesh, and the home shard handles the join and serves the connection from then on.
//!
//! It moves at most once, at its first join (`Session::joined_once`), and only at a quiet
//! moment: a connected WebSocket in no room and joining none, its reader between two
//! frames, the process not draining. Nothing in flight names the connection then, so
//! nothing has to be forwarded after it. It stays where it is when its destination already
//! holds clearly more connections than this shard (one hot room must not pull every
//! connection onto one core), and `server.follow_rooms = false` turns the whole thing off.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use tracing::Instrument as _;

use super::conn::{CloseReason, Timers, Transport};
use super::websocket::FrameReader;
use crate::auth::Identity;
use crate::chat::events::ChatRequest;
use crate::chat::mesh::{home_of, MemberMsg, ShardMsg};
use crate::chat::session::{Session, TokenBucket, User};
use crate::metrics::ShardMetrics;
use crate::shard::Shard;

/// Connections a destination may hold beyond this shard's count plus a quarter before a
/// connection stops following its room there.
const BALANCE_SLACK: u64 = 64;

/// A first join put off because its connection is moving to the room's home shard,
/// which handles it first thing.
#[derive(Debug)]
pub struct DeferredJoin {
    /// The room's home shard.
    pub to: usize,
    /// The join itself (`ChatRequest::Join`), checked again where it lands.
    pub request: ChatRequest,
    pub ack_id: Option<u64>,
    /// Bytes read from the socket after the join's frame, not parsed yet (filled in by
    /// [`ready_to_move`]).
    pub unread: Vec<u8>,
}

/// A connection on its way to another shard: everything its session holds that matters
/// once it is connected and in no room. The receiving shard owns the socket.
#[derive(Debug)]
pub struct MovedConn {
    fd: OwnedFd,
    sid: String,
    user: User,
    identity: Identity,
    /// The user's owner shard counts this connection (released when it ends).
    counted: bool,
    queued: VecDeque<Bytes>,
    bucket: TokenBucket,
    timers: Timers,
    join: DeferredJoin,
    from: usize,
}

/// Where a connection making its first join, to `room`, should move to, if anywhere.
pub fn destination(shard: &Shard, session: &Session, room: &str) -> Option<usize> {
    let home = home_of(room, shard.count);
    let quiet = session.movable.get()
        && session.transport.get() == Transport::WebSocket
        && session.fd.get().is_some()
        && session.user.borrow().is_some()
        && session.pending_user.borrow().is_none()
        && session.held.borrow().is_empty()
        && session.joined.borrow().is_empty()
        && session.joining.borrow().is_empty()
        && !session.is_closing();
    let config = &shard.ctx.config.server;
    if home == shard.id || !quiet || !config.follow_rooms || shard.ctx.draining.load(Relaxed) {
        return None;
    }
    let shards = &shard.ctx.metrics.shards;
    let here = shards[shard.id].connections.load(Relaxed);
    let there = shards[home].connections.load(Relaxed);
    (there < here + here / 4 + BALANCE_SLACK).then_some(home)
}

/// After a frame was handled: whether the connection must now stop reading and move
/// (a first join was put off for it). The bytes read past that frame go with the join;
/// inside a fragmented message they cannot, and the join is handled here after all.
pub fn ready_to_move(shard: &Shard, session: &Rc<Session>, reader: &mut FrameReader) -> bool {
    let Some(mut join) = session.deferred_join.borrow_mut().take() else {
        return false;
    };
    match reader.take_unread() {
        Some(unread) => {
            join.unread = unread;
            *session.deferred_join.borrow_mut() = Some(join);
            true
        }
        None => {
            let DeferredJoin {
                request, ack_id, ..
            } = *join;
            crate::chat::handler::handle_request(shard, session, request, ack_id);
            false
        }
    }
}

/// Sends a connection whose reader and writer have stopped to `join.to`; if it started
/// closing meanwhile, or cannot be handed over, it is closed here instead. The caller
/// closes its own descriptor afterwards (the receiving shard gets a duplicate).
pub fn hand_over(shard: &Shard, session: &Rc<Session>, join: DeferredJoin) {
    let fd = session
        .fd
        .get()
        .filter(|_| !session.is_closing())
        .and_then(super::connection::duplicate);
    // The user and identity travel (taken only once the socket can travel too).
    let user = fd.as_ref().and_then(|_| session.user.borrow_mut().take());
    let (Some(fd), Some((user, identity))) = (fd, user) else {
        // It started closing while the writer stopped (a ping timeout, a drain): its
        // close frame is not written, the socket is cut.
        session.cut();
        shard.close_session(session);
        return;
    };
    let to = join.to;
    shard.detach_session(session);
    session.fd.set(None);
    let moved = MovedConn {
        fd,
        sid: session.sid.clone(),
        user,
        identity: Rc::try_unwrap(identity).unwrap_or_else(|shared| (*shared).clone()),
        counted: session.counted.replace(false),
        queued: session.out.borrow_mut().take_frames(),
        bucket: session.bucket.get(),
        timers: session.timers.get(),
        join,
        from: shard.id,
    };
    tracing::debug!(to, "moving to the home shard of the first room joined");
    shard.send(to, ShardMsg::Member(MemberMsg::Moved(Box::new(moved))));
}

/// Serves a connection that moved here: handles its deferred join, then reads on.
pub async fn adopt(shard: Rc<Shard>, moved: Box<MovedConn>) {
    let MovedConn {
        fd,
        sid,
        user,
        identity,
        counted,
        queued,
        bucket,
        timers,
        join:
            DeferredJoin {
                request,
                ack_id,
                unread,
                ..
            },
        from,
    } = *moved;
    let stream = super::connection::stream_from(fd);
    let session = shard.open_moved_session(sid, timers);
    session.joined_once.set(true);
    session.fd.set(Some(stream.as_raw_fd()));
    session.bucket.set(bucket);
    session.counted.set(counted);
    session
        .span
        .record("user", tracing::field::display(&user.id));
    *session.user.borrow_mut() = Some((user, Rc::new(identity)));
    session.out.borrow_mut().restore_frames(queued);
    ShardMetrics::inc(&shard.stats().connections_moved_in);
    session.span.in_scope(|| {
        tracing::debug!(from, "moved here from another shard");
        if shard.ctx.draining.load(Relaxed) {
            // The drain began while it travelled and may have closed this shard's
            // connections already: close it like them (clients reconnect elsewhere).
            session.close(CloseReason::Restart);
        } else {
            crate::chat::handler::handle_request(&shard, &session, request, ack_id);
        }
    });
    let reader = FrameReader::new(shard.ctx.config.engineio.max_payload, &unread);
    let span = session.span.clone();
    super::connection::read_loop(shard, session, stream, reader)
        .instrument(span)
        .await;
}
