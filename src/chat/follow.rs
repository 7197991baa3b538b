//! A WebSocket connection follows the first room it joins to that room's home shard.
//!
//! A room's messages are sequenced on its home shard and delivered by every shard that
//! holds members. A member on another shard costs a crossing of the shard mesh for each
//! message it sends (and its ack back) and for each delivery batch it receives, and a
//! crossing wakes the other shard's thread whenever that thread sleeps: below capacity
//! that wake-up is most of what a delivery costs (docs/bench/journal.md, sixth part). So when a
//! connection joins its first room and the room's home is another shard, the connection
//! moves there before the join is handled: its socket is duplicated, its session (identity,
//! outbound queue, timers, rate limit) and the bytes read but not yet parsed travel through
//! the mesh, and the home shard handles the join and serves the connection from then on.
//!
//! It moves at most once, at its first join (`Member::first_join`), and only at a quiet
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

use super::events::ChatRequest;
use super::layer::{Chat, ChatHost};
use super::member::{Member, TokenBucket, User};
use super::mesh::{home_of, MemberMsg, ShardMsg};
use crate::auth::Identity;
use crate::metrics::ShardMetrics;
use crate::transport::conn::{CloseReason, Timers, Transport};
use crate::transport::websocket::FrameReader;
use crate::transport::{connection, ws_task};

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

impl MovedConn {
    /// The bytes of the frames it carries (its outbound queue), for the memory budget.
    pub fn queued_bytes(&self) -> usize {
        self.queued.iter().map(Bytes::len).sum()
    }
}

/// Where a connection making its first join, to `room`, should move to, if anywhere.
pub fn destination(chat: &Chat, member: &Member, room: &str) -> Option<usize> {
    let home = home_of(room, chat.count);
    let session = member.session();
    let quiet = session.is_movable()
        && session.transport() == Transport::WebSocket
        && session.socket().is_some()
        && member.is_connected()
        && !member.is_pending()
        && !member.has_held()
        && !member.in_hook_call()
        && member.room_count() == 0
        && !session.is_closing();
    let config = &chat.ctx.config.server;
    if home == chat.id || !quiet || !config.follow_rooms || chat.ctx.is_draining() {
        return None;
    }
    let shards = &chat.ctx.metrics.shards;
    let here = shards[chat.id].connections.load(Relaxed);
    let there = shards[home].connections.load(Relaxed);
    (there < here + here / 4 + BALANCE_SLACK).then_some(home)
}

/// After a frame was handled: whether the connection must now stop reading and move
/// (a first join was put off for it). The bytes read past that frame go with the join;
/// inside a fragmented message they cannot, and the join is handled here after all.
pub fn ready_to_move(chat: &Chat, member: &Rc<Member>, reader: &mut FrameReader) -> bool {
    let Some(mut join) = member.take_deferred_join() else {
        return false;
    };
    match reader.take_unread() {
        Some(unread) => {
            join.unread = unread;
            member.defer_join(*join);
            true
        }
        None => {
            let DeferredJoin {
                request, ack_id, ..
            } = *join;
            super::handler::handle_request(chat, member, request, ack_id);
            false
        }
    }
}

/// Sends a connection whose reader and writer have stopped to `join.to`; if it started
/// closing meanwhile, or cannot be handed over, it is closed here instead. The caller
/// closes its own descriptor afterwards (the receiving shard gets a duplicate).
pub fn hand_over<H: ChatHost>(host: &H, member: &Rc<Member>, join: DeferredJoin) {
    let session = member.session();
    let fd = session
        .socket()
        .filter(|_| !session.is_closing())
        .and_then(connection::duplicate);
    // The user and identity travel (taken only once the socket can travel too).
    let user = fd.as_ref().and_then(|_| member.take_connected());
    let (Some(fd), Some((user, identity))) = (fd, user) else {
        // It started closing while the writer stopped (a ping timeout, a drain): its
        // close frame is not written, the socket is cut.
        session.cut();
        host.close_session(session);
        return;
    };
    let to = join.to;
    host.detach_session(session);
    host.chat().remove_member(session.id);
    session.detach_socket();
    let moved = MovedConn {
        fd,
        sid: session.sid.clone(),
        user,
        identity: Rc::try_unwrap(identity).unwrap_or_else(|shared| (*shared).clone()),
        counted: member.take_counted(),
        queued: session.queue().take_frames(),
        bucket: member.bucket(),
        timers: session.timers(),
        join,
        from: host.shard_id(),
    };
    tracing::debug!(to, "moving to the home shard of the first room joined");
    host.chat()
        .send(to, ShardMsg::Member(MemberMsg::Moved(Box::new(moved))));
}

/// Serves a connection that moved here: handles its deferred join, then reads on.
pub async fn adopt<H: ChatHost>(host: Rc<H>, moved: Box<MovedConn>) {
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
    let stream = connection::stream_from(fd);
    let session = host.open_moved_session(sid, timers);
    session.attach_socket(stream.as_raw_fd());
    session
        .span
        .record("user", tracing::field::display(&user.id));
    session.queue().restore_frames(queued);
    let member = Rc::new(Member::with_bucket(session.clone(), bucket));
    member.first_join();
    member.set_counted(counted);
    member.set_connected(Some((user, Rc::new(identity))));
    host.chat().add_member(member.clone());
    ShardMetrics::inc(&host.stats().connections_moved_in);
    session.span.in_scope(|| {
        tracing::debug!(from, "moved here from another shard");
        if host.ctx().is_draining() {
            // The drain began while it travelled and may have closed this shard's
            // connections already: close it like them (clients reconnect elsewhere).
            session.close(CloseReason::Restart);
        } else {
            super::handler::handle_request(host.chat(), &member, request, ack_id);
        }
    });
    let reader = FrameReader::new(host.ctx().config.engineio.max_payload, &unread);
    let span = session.span.clone();
    ws_task::read_loop(host, session, stream, reader)
        .instrument(span)
        .await;
}
