//! Socket.IO packets from one connection, turned into chat requests: CONNECT and
//! authentication, EVENTs checked locally (membership, limits) and forwarded to the
//! room's home shard, binary packets refused for chat events.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::events::{
    self, error_ack_json, history_ack_json, parse_event, ChatError, ChatRequest, ErrorCode, Parsed,
    PayloadLimits,
};
use super::follow;
use super::hooked;
use super::layer::{Chat, ChatHost};
use super::member::{ConnRef, Connected, Member, User};
use super::mesh::{home_of, HomeCmd, ReplyTo, UserCmd};
use crate::auth::{AuthError, Identity, Secret};
use crate::hooks::Hook;
use crate::metrics::ShardMetrics;
use crate::protocol::socketio::{self, encode_ack, PacketKind};
use crate::store::{HistoryQuery, HistoryStore};
use crate::transport::conn::{CloseReason, Flow};
use crate::transport::engine::EngineHandler;
use crate::transport::session::Session;
use crate::transport::websocket::FrameReader;
use crate::transport::websocket::{close_code, text_frame};

const PROTOCOL_ERROR: Flow = Flow::Close(CloseReason::Protocol(close_code::PROTOCOL));

/// Per-connection parser state that spans packets.
#[derive(Debug, Default)]
pub struct ConnState {
    /// A binary packet waiting for this many attachments, and its ack id.
    binary: Option<(usize, Option<u64>)>,
}

/// How long after a refused CONNECT the session may try again before it is closed.
const RETRY_CONNECT: Duration = Duration::from_secs(10);

/// The chat layer as the transport sees it: Socket.IO packets become chat requests.
#[derive(Debug, Default)]
pub struct ChatHandler;

impl<H: ChatHost> EngineHandler<H> for ChatHandler {
    fn on_open(&self, host: &H, session: &Rc<Session>, _path: &str) {
        let member = Member::new(session.clone(), &host.ctx().config.limits, Instant::now());
        host.chat().add_member(Rc::new(member));
    }

    fn on_message(&self, host: &H, session: &Rc<Session>, data: Vec<u8>) -> Flow {
        let Some(member) = host.chat().member(session.id) else {
            return PROTOCOL_ERROR;
        };
        let mut parser = member.parser();
        on_socketio(host.chat(), &member, &mut parser, data)
    }

    fn on_binary(&self, host: &H, session: &Rc<Session>, data: Vec<u8>) -> Flow {
        let Some(member) = host.chat().member(session.id) else {
            return PROTOCOL_ERROR;
        };
        let mut parser = member.parser();
        on_binary(host.chat(), &member, &mut parser, data)
    }

    fn ready_to_move(&self, host: &H, session: &Rc<Session>, reader: &mut FrameReader) -> bool {
        host.chat()
            .member(session.id)
            .is_some_and(|member| follow::ready_to_move(host.chat(), &member, reader))
    }

    fn move_away(&self, host: &H, session: &Rc<Session>) {
        let member = host.chat().member(session.id);
        match member
            .as_ref()
            .and_then(|m| m.take_deferred_join().map(|j| (m, j)))
        {
            Some((member, join)) => follow::hand_over(host, member, *join),
            None => host.close_session(session),
        }
    }

    fn on_close(&self, host: &H, session: &Rc<Session>) {
        if let Some(member) = host.chat().remove_member(session.id) {
            host.chat().leave_all(&member);
            host.chat().release_user(&member);
        }
    }
}

/// Handles one Socket.IO packet (the Engine.IO message body).
pub fn on_socketio(
    chat: &Chat,
    member: &Rc<Member>,
    state: &mut ConnState,
    mut data: Vec<u8>,
) -> Flow {
    if state.binary.is_some() {
        tracing::debug!("text packet while binary attachments were expected");
        return PROTOCOL_ERROR;
    }
    // Behind a pending hook: handled in order once it is answered. (Binary packets go on:
    // their attachments follow as frames of their own, and chat refuses them anyway.)
    if member.is_waiting() && !matches!(data.first(), Some(b'5' | b'6')) {
        if let Err(packet) = member.hold(data) {
            hooked::refuse_unheld(member, &packet);
        }
        return Flow::Continue;
    }
    let (kind, namespace, ack_id, attachments, body_at) = match socketio::parse(&data) {
        Ok(p) => (
            p.kind,
            p.namespace.to_string(),
            p.ack_id,
            p.attachments,
            data.len() - p.data.len(),
        ),
        Err(e) => {
            tracing::debug!(error = %e, "invalid Socket.IO packet");
            return PROTOCOL_ERROR;
        }
    };
    if kind == PacketKind::Connect {
        return on_connect(chat, member, &namespace, &data[body_at..]);
    }
    if namespace == "/" && member.is_pending() {
        // Sent right behind the CONNECT that is being admitted: kept for `on_admitted`.
        if member.hold(data).is_err() {
            tracing::debug!("too many packets before the CONNECT was answered");
            return PROTOCOL_ERROR;
        }
        return Flow::Continue;
    }
    if namespace != "/" || !member.is_connected() {
        // Like Socket.IO: packets for a namespace the client is not connected to are ignored.
        return Flow::Continue;
    }
    match kind {
        PacketKind::Disconnect => {
            chat.leave_all(member);
            chat.release_user(member);
            member.set_connected(None);
            Flow::Continue
        }
        PacketKind::Event => {
            let limits = PayloadLimits {
                max_text_bytes: chat.ctx.config.limits.max_text_bytes,
            };
            match parse_event(&mut data[body_at..], limits) {
                Err(e) => {
                    tracing::debug!(error = e.0, "invalid event");
                    PROTOCOL_ERROR
                }
                Ok(Parsed::Refused(err)) => {
                    refuse(member.session(), ack_id, &err);
                    Flow::Continue
                }
                Ok(Parsed::Request(req)) => {
                    handle_request(chat, member, req, ack_id);
                    Flow::Continue
                }
                Ok(Parsed::Other { event, args }) => {
                    match hooked::hooks_for(chat, Hook::Rpc) {
                        Some(hooks) => hooked::rpc(chat, member, hooks, (event, args), ack_id),
                        None => refuse(member.session(), ack_id, &Parsed::refusal(&event)),
                    }
                    Flow::Continue
                }
            }
        }
        PacketKind::BinaryEvent | PacketKind::BinaryAck => {
            if attachments == 0 {
                binary_refused(member.session(), kind, ack_id);
            } else {
                state.binary = Some((
                    attachments,
                    if kind == PacketKind::BinaryEvent {
                        ack_id
                    } else {
                        None
                    },
                ));
            }
            Flow::Continue
        }
        // The server asks clients for no acks, so client ACKs are ignored.
        PacketKind::Ack | PacketKind::ConnectError | PacketKind::Connect => Flow::Continue,
    }
}

/// Handles a binary WebSocket message: an attachment of the pending binary packet.
pub fn on_binary(_chat: &Chat, member: &Rc<Member>, state: &mut ConnState, _data: Vec<u8>) -> Flow {
    match state.binary.take() {
        None => {
            tracing::debug!("binary frame without a binary packet");
            PROTOCOL_ERROR
        }
        Some((1, ack_id)) => {
            binary_refused(member.session(), PacketKind::BinaryEvent, ack_id);
            Flow::Continue
        }
        Some((n, ack_id)) => {
            state.binary = Some((n - 1, ack_id));
            Flow::Continue
        }
    }
}

fn binary_refused(session: &Session, kind: PacketKind, ack_id: Option<u64>) {
    if kind == PacketKind::BinaryEvent {
        refuse(
            session,
            ack_id,
            &ChatError::new(
                ErrorCode::BadRequest,
                "chat events take no binary arguments",
            ),
        );
    }
}

fn on_connect(chat: &Chat, member: &Rc<Member>, namespace: &str, body: &[u8]) -> Flow {
    if namespace != "/" {
        member.session().push(
            text_frame(&socketio::encode_connect_error(
                namespace,
                "Invalid namespace",
            )),
            false,
        );
        return Flow::Continue;
    }
    let auth = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v @ serde_json::Value::Object(_)) => Some(v),
            _ => {
                tracing::debug!("CONNECT payload is not a JSON object");
                return PROTOCOL_ERROR;
            }
        }
    };
    match chat.ctx.auth.authenticate(auth.as_ref()) {
        Ok(identity) => admit(chat, member, identity),
        // No valid JWT: the application's backend may know the client (a cookie).
        Err(e) => match hooked::hooks_for(chat, Hook::Connect) {
            Some(hooks) => hooked::connect(chat, member, hooks, auth, e),
            None => refuse_connect(chat, member, &e),
        },
    }
    Flow::Continue
}

/// Connects the session as `identity` (a JWT's, or the connect hook's): at once, or once
/// the user's owner shard counted it.
pub fn admit(chat: &Chat, member: &Rc<Member>, identity: Identity) {
    if member.is_pending() {
        tracing::debug!("CONNECT while the previous one is being admitted: ignored");
        return;
    }
    let user = User {
        id: Arc::from(identity.user.as_str()),
        name: identity.name.as_deref().map(Arc::from),
    };
    // A second CONNECT replaces the identity: the old one's count goes first.
    chat.release_user(member);
    let identity = Rc::new(identity);
    if chat.ctx.config.limits.max_connections_per_user == 0 {
        connected(chat, member, user, identity, false);
    } else {
        // Counted by the user's owner shard; `on_admitted` completes the CONNECT
        // (at once when this shard is the owner).
        member.set_connected(None);
        let conn = member.conn_ref(chat.id);
        let id = user.id.clone();
        member.set_pending((user, identity));
        chat.to_user_owner(UserCmd::Acquire { user: id, conn });
    }
}

/// Refuses a CONNECT as `unauthorized` (`e` says why, in `data.reason`).
pub fn refuse_connect(chat: &Chat, member: &Member, e: &AuthError) {
    tracing::debug!(reason = %e, "CONNECT refused");
    let mut body =
        b"44{\"message\":\"unauthorized\",\"data\":{\"code\":\"unauthorized\",\"reason\":".to_vec();
    socketio::write_json_str(&mut body, &e.to_string());
    body.extend_from_slice(b"}}");
    member.session().push(text_frame(&body), false);
    close_unless_connected(chat, member);
}

/// The owner shard's answer to a CONNECT's count: complete the CONNECT, or refuse it
/// with `too_many_connections` (the session is then closed like an unauthorized one).
pub fn on_admitted(chat: &Chat, member: &Rc<Member>, (user, identity): Connected, admitted: bool) {
    let _entered = member.session().span.enter();
    let held = member.take_held();
    if admitted {
        connected(chat, member, user, identity, true);
        if held.is_empty() {
            // Also the path where this shard owns the user: the answer comes at once,
            // inside `on_connect`, while the parser is borrowed by the caller.
            return;
        }
        let mut parser = member.parser();
        for packet in held {
            if let Flow::Close(reason) = on_socketio(chat, member, &mut parser, packet) {
                member.session().close(reason);
                break;
            }
        }
        return;
    }
    ShardMetrics::inc(&chat.stats().user_limit_refusals);
    tracing::debug!(
        limit = chat.ctx.config.limits.max_connections_per_user,
        "CONNECT refused: the user has too many connections"
    );
    member.session().push(
        text_frame(&socketio::encode_connect_error("/", "too_many_connections")),
        false,
    );
    close_unless_connected(chat, member);
}

/// Completes a CONNECT: the session now acts as `user`.
fn connected(chat: &Chat, member: &Member, user: User, identity: Rc<Identity>, counted: bool) {
    let session = member.session();
    session
        .span
        .record("user", tracing::field::display(&user.id));
    member.set_counted(counted);
    member.set_connected(Some((user, identity)));
    session.connected();
    // The Socket.IO session id is distinct from the Engine.IO one, as in Socket.IO.
    let sid = crate::ids::new_sid(chat.id);
    session.push(text_frame(&socketio::encode_connect_ok(&sid)), false);
    tracing::debug!("connected");
}

/// After a refused CONNECT, a session that is not connected is closed unless it sends
/// another CONNECT soon.
pub fn close_unless_connected(chat: &Chat, member: &Member) {
    if !member.is_connected() {
        let session = member.session();
        let mut t = session.timers();
        let retry = Instant::now() + RETRY_CONNECT.min(chat.ctx.config.engineio.connect_timeout.0);
        t.connect_deadline = Some(t.connect_deadline.map_or(retry, |d| d.min(retry)));
        session.set_timers(t);
    }
}

fn refuse(session: &Session, ack_id: Option<u64>, err: &ChatError) {
    if let Some(id) = ack_id {
        session.push(text_frame(&encode_ack(id, &error_ack_json(err))), false);
    }
}

fn ok(session: &Session, ack_id: Option<u64>, json: &[u8]) {
    if let Some(id) = ack_id {
        session.push(text_frame(&encode_ack(id, json)), false);
    }
}

/// Handles a chat request from a connected session: checked here, then sent to the
/// room's home shard (a first join may move the connection there first).
pub fn handle_request(chat: &Chat, member: &Rc<Member>, req: ChatRequest, ack_id: Option<u64>) {
    let Some((user, identity)) = member.connected() else {
        return;
    };
    let asked = Asked::new(chat, member, user, Arc::from(req.room()), ack_id);
    if let ChatRequest::Join { since, token, .. } = req {
        return join(&asked, &identity, since, token);
    }
    if let ChatRequest::Leave { .. } = req {
        return leave(&asked);
    }
    // Everything else is for members of the room only.
    if !member.is_in(&asked.room) {
        let room = &asked.room;
        return asked.refuse(&ChatError::new(
            ErrorCode::NotJoined,
            format!("join {room:?} first"),
        ));
    }
    match req {
        ChatRequest::Message { text, cid, .. } => send(&asked, text, cid),
        ChatRequest::Typing { .. } => typing(&asked),
        ChatRequest::Presence { .. } => presence(&asked),
        ChatRequest::History { query, limit, .. } => history(&asked, query, limit),
        ChatRequest::Join { .. } | ChatRequest::Leave { .. } => {}
    }
}

/// A request a connected member made, with what every kind of request needs.
pub(super) struct Asked<'a> {
    pub(super) chat: &'a Chat,
    pub(super) member: &'a Rc<Member>,
    conn: ConnRef,
    /// The room's home shard.
    home: usize,
    pub(super) user: User,
    pub(super) room: Arc<str>,
    pub(super) ack_id: Option<u64>,
}

impl<'a> Asked<'a> {
    /// `member`'s request about `room`, acked to `ack_id`.
    pub(super) fn new(
        chat: &'a Chat,
        member: &'a Rc<Member>,
        user: User,
        room: Arc<str>,
        ack_id: Option<u64>,
    ) -> Asked<'a> {
        Asked {
            chat,
            member,
            conn: member.conn_ref(chat.id),
            home: home_of(&room, chat.count),
            user,
            room,
            ack_id,
        }
    }

    /// Acks the request with an error.
    pub(super) fn refuse(&self, err: &ChatError) {
        refuse(self.member.session(), self.ack_id, err);
    }

    /// Acks the request with this JSON.
    pub(super) fn ok(&self, json: &[u8]) {
        ok(self.member.session(), self.ack_id, json);
    }

    /// Takes a send token; false (and the client is told) past the connection's rate.
    fn within_rate(&self) -> bool {
        let ok = self.member.take_token(Instant::now());
        if !ok {
            self.refuse(&ChatError::new(
                ErrorCode::RateLimited,
                "too many requests; slow down",
            ));
        }
        ok
    }

    /// Whether the queue toward the room's home is full, or this shard or the home is past
    /// its part of `limits.memory_budget` (the client is told `unavailable`).
    fn overloaded(&self) -> bool {
        let full = self.chat.mesh_congested(self.home) || self.chat.memory_pressured(self.home);
        if full {
            self.refuse(&overloaded());
        }
        full
    }
}

/// `join`: checked here (room limit, grants or a room token), then answered by the room's
/// home; a connection's first join may move it to that home first.
fn join(asked: &Asked<'_>, identity: &Identity, since: Option<u64>, token: Option<Secret>) {
    let Asked {
        chat, member, room, ..
    } = asked;
    let is_member = member.is_in(room);
    let limit = chat.ctx.config.limits.max_rooms_per_conn;
    if !is_member && !member.is_joining(room) && member.room_count() >= limit {
        return asked.refuse(&ChatError::new(
            ErrorCode::Forbidden,
            format!("a connection may be in at most {limit} rooms"),
        ));
    }
    let allowed = identity.rooms.allows(room)
        || token.as_deref().is_some_and(|t| {
            chat.ctx
                .auth
                .check_room_token(t, &asked.user.id, room)
                .is_ok()
        });
    if !allowed {
        if let Some(hooks) = hooked::hooks_for(chat, Hook::Join) {
            return hooked::join(asked, hooks, since, token);
        }
        return asked.refuse(&ChatError::new(
            ErrorCode::Forbidden,
            format!("not allowed in room {room:?}"),
        ));
    }
    join_allowed(asked, since, token);
}

/// A join that is allowed: answered by the room's home; a connection's first join may
/// move it to that home first.
pub(super) fn join_allowed(asked: &Asked<'_>, since: Option<u64>, token: Option<Secret>) {
    let Asked {
        chat, member, room, ..
    } = asked;
    if !member.is_in(room) {
        if let Some(to) = member
            .first_join()
            .then(|| follow::destination(chat, member, room))
            .flatten()
        {
            // The join is handled where the connection lands, first thing.
            member.defer_join(follow::DeferredJoin {
                to,
                request: ChatRequest::Join {
                    room: room.to_string(),
                    since,
                    token,
                },
                ack_id: asked.ack_id,
                unread: Vec::new(),
            });
            return;
        }
        if asked.overloaded() {
            return;
        }
        member.start_joining(room.clone());
    }
    chat.to_home(
        room,
        HomeCmd::Join {
            room: room.clone(),
            conn: asked.conn,
            user: asked.user.clone(),
            since,
            ack_id: asked.ack_id,
        },
    );
}

/// `leave`: local delivery stops at once; the home answers if the room was joined.
fn leave(asked: &Asked<'_>) {
    let Asked {
        chat, member, room, ..
    } = asked;
    let (was_member, was_joining) = member.leave(room);
    if was_member {
        chat.remove_local_member(room, member);
    }
    if was_member || was_joining {
        chat.to_home(
            room,
            HomeCmd::Leave {
                room: room.clone(),
                conn: asked.conn,
                ack_id: asked.ack_id,
            },
        );
    } else {
        asked.ok(events::OK_ACK);
    }
}

/// `message`: to the home, which sequences, stores, fans out and acks it.
fn send(asked: &Asked<'_>, text: String, cid: Option<String>) {
    if asked.chat.ctx.is_draining() {
        return asked.refuse(&shutting_down());
    }
    // Refused for load before the rate is charged: a retry is not held against it.
    if asked.overloaded() || !asked.within_rate() {
        return;
    }
    match hooked::hooks_for(asked.chat, Hook::Publish) {
        Some(hooks) => hooked::publish(asked, hooks, text, cid),
        None => publish(asked, text, cid),
    }
}

/// A message checked (and passed by the publish hook): to its room's home.
pub(super) fn publish(asked: &Asked<'_>, text: String, cid: Option<String>) {
    asked.chat.to_home(
        &asked.room,
        HomeCmd::Publish {
            room: asked.room.clone(),
            user: asked.user.id.clone(),
            text,
            cid,
            reply: ReplyTo::Conn {
                conn: asked.conn,
                ack_id: asked.ack_id,
            },
        },
    );
}

/// `typing`: volatile. Under load it is dropped, and the client is told it was taken.
fn typing(asked: &Asked<'_>) {
    if !asked.within_rate() {
        return;
    }
    if !asked.chat.mesh_congested(asked.home) {
        asked.chat.to_home(
            &asked.room,
            HomeCmd::Typing {
                room: asked.room.clone(),
                conn: asked.conn,
                user: asked.user.id.clone(),
            },
        );
    }
    asked.ok(events::OK_ACK);
}

/// `presence`: the home knows who is in the room (cluster-wide in a cluster).
fn presence(asked: &Asked<'_>) {
    if asked.overloaded() {
        return;
    }
    asked.chat.to_home(
        &asked.room,
        HomeCmd::Presence {
            room: asked.room.clone(),
            reply: ReplyTo::Conn {
                conn: asked.conn,
                ack_id: asked.ack_id,
            },
        },
    );
}

/// `history`: read from the store on this shard, no home involved.
fn history(asked: &Asked<'_>, query: HistoryQuery, limit: usize) {
    if !asked.within_rate() {
        return;
    }
    let store = asked.chat.store.clone();
    let session = asked.member.session().clone();
    let (room, ack_id) = (asked.room.clone(), asked.ack_id);
    glommio::spawn_local(async move {
        let json = match store.read(&room, query, limit).await {
            Ok(messages) => history_ack_json(&messages),
            Err(e) => error_ack_json(&ChatError::new(
                ErrorCode::Unavailable,
                format!("history store: {e}"),
            )),
        };
        ok(&session, ack_id, &json);
    })
    .detach();
}

/// The refusal for work a client starts while the queue toward its room's home shard is
/// full (`limits.mesh_outbox`) or the queues to connections hold more than the memory
/// budget allows (`limits.memory_budget`): nothing was done; retry.
pub fn overloaded() -> ChatError {
    ChatError::new(
        ErrorCode::Unavailable,
        "the server is overloaded; retry shortly",
    )
}

/// The refusal for sends during a drain: nothing was stored; reconnect and retry.
pub fn shutting_down() -> ChatError {
    ChatError::new(
        ErrorCode::Unavailable,
        "the server is shutting down; reconnect and retry",
    )
}

#[cfg(test)]
mod tests;
