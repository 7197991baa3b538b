//! The application's backend in the loop of a connection's requests (PROTOCOL.md,
//! "Hooks"): the body chat sends for each hook, and what the answer, or a failure under
//! `hooks.on_failure`, does. Each call runs in a task of its own, so a slow backend
//! stalls no other connection. While a connect, join or publish hook is pending, the
//! connection's later packets are held (`Member::hold`, at most `MAX_HELD_PACKETS`; one
//! more is refused `rate_limited`) and handled in order once it is answered; rpc calls do
//! not hold the connection (at most [`MAX_RPC_CALLS`] at once).
//! With every hook off, chat pays one `None` check per request and nothing else.

use std::future::Future;
use std::rc::Rc;

use serde_json::{json, Map, Value};
use tracing::Instrument as _;

use super::events::{coded_error_ack_json, ChatError, ErrorCode};
use super::handler::{self, Asked, ConnState};
use super::layer::Chat;
use super::member::Member;
use crate::auth::{AuthError, Identity, RoomGrant, Secret};
use crate::config::OnFailure;
use crate::hooks::{answer, ConnectAnswer, Failure, Hook, Hooks, Refusal, RpcAnswer, Verdict};
use crate::protocol::socketio::{self, encode_ack};
use crate::transport::conn::Flow;
use crate::transport::websocket::text_frame;

/// Most rpc calls one connection may have under way; one more is `rate_limited`.
pub const MAX_RPC_CALLS: u32 = 16;

/// This shard's hooks client when `hook` is on (a cheap `None` when hooks are off).
pub fn hooks_for(chat: &Chat, hook: Hook) -> Option<Rc<Hooks>> {
    chat.hooks.as_ref().filter(|h| h.enabled(hook)).cloned()
}

/// Runs a hook `call` in a task of its own; `then` gets its result on this shard if the
/// connection is still here. `waits`: the connection's later packets wait behind it.
fn spawn<T: 'static>(
    chat: &Chat,
    member: &Rc<Member>,
    waits: bool,
    call: impl Future<Output = T> + 'static,
    then: impl FnOnce(&Chat, &Rc<Member>, T) + 'static,
) {
    let Some(chat) = chat.shared() else {
        return;
    };
    member.hook_call(true, waits);
    let member = member.clone();
    let span = member.session().span.clone();
    let task = async move {
        let result = call.await;
        let here = chat
            .member(member.session().id)
            .is_some_and(|m| Rc::ptr_eq(&m, &member));
        if here {
            // Still counted as a hook call: nothing done here may move the connection.
            then(&chat, &member, result);
        }
        member.hook_call(false, waits);
        if here && waits {
            resume(&chat, &member);
        }
    };
    // Boxed: a hook call's future is large, and glommio's task stacks are small.
    glommio::spawn_local(Box::pin(task.instrument(span))).detach();
}

/// Handles the packets held behind a hook, in order, until another hook holds them.
fn resume(chat: &Chat, member: &Rc<Member>) {
    // Counted as a hook call while packets are replayed: a first join among them must
    // not move the connection (a move happens only between two frames of its reader).
    member.hook_call(true, false);
    while !member.is_waiting() && !member.is_pending() {
        let Some(packet) = member.next_held() else {
            break;
        };
        // Held packets are text packets, replayed with a parser state of their own: the
        // live one may await a binary packet's attachments, and a CONNECT admitted in
        // place borrows it.
        let flow = handler::on_socketio(chat, member, &mut ConnState::default(), packet);
        if let Flow::Close(reason) = flow {
            member.session().close(reason);
            break;
        }
    }
    member.hook_call(false, false);
}

/// A packet that came behind a pending hook when [`super::member::MAX_HELD_PACKETS`]
/// were held already: refused (`rate_limited`, when it asks for an ack), not queued.
pub fn refuse_unheld(member: &Member, packet: &[u8]) {
    tracing::debug!("too many packets behind a pending hook: refused");
    if let Ok(p) = socketio::parse(packet) {
        if let (socketio::PacketKind::Event, Some(id)) = (p.kind, p.ack_id) {
            let err = ChatError::new(
                ErrorCode::RateLimited,
                "too many requests behind a pending one; slow down",
            );
            let ack = super::events::error_ack_json(&err);
            member
                .session()
                .push(text_frame(&encode_ack(id, &ack)), false);
        }
    }
}

/// A JSON body (a `Value` always serializes).
fn to_body(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// `connect`: a CONNECT without a valid JWT. `{user}` connects it as that user,
/// `{error}` refuses it with the backend's code; a failure refuses it as `unauthorized`
/// whatever the policy (there is no user to allow).
pub fn connect(
    chat: &Chat,
    member: &Rc<Member>,
    hooks: Rc<Hooks>,
    auth: Option<Value>,
    refused: AuthError,
) {
    let handshake = member.session().handshake().unwrap_or_default();
    let headers: Map<String, Value> = handshake
        .headers
        .into_iter()
        .map(|(name, value)| (name.to_string(), Value::String(value)))
        .collect();
    let body = to_body(&json!({
        "auth": auth.unwrap_or(Value::Null),
        "headers": headers,
        "remote_addr": handshake.remote_addr.map(|a| a.to_string()),
    }));
    let call = async move { hooks.ask(Hook::Connect, &body, answer::connect).await };
    spawn(
        chat,
        member,
        true,
        call,
        move |chat, member, result| match result {
            Ok(ConnectAnswer::Accept { user, name, rooms }) => {
                let rooms = RoomGrant::from_list(rooms.unwrap_or_default());
                handler::admit(chat, member, Identity { user, name, rooms });
            }
            Ok(ConnectAnswer::Refuse(r)) => {
                let code = r.code.as_deref().unwrap_or("unauthorized");
                tracing::debug!(code, "CONNECT refused by the backend");
                let mut frame = b"44{\"message\":".to_vec();
                socketio::write_json_str(&mut frame, code);
                frame.extend_from_slice(b",\"data\":{\"code\":");
                socketio::write_json_str(&mut frame, code);
                frame.extend_from_slice(b",\"message\":");
                socketio::write_json_str(&mut frame, &r.message);
                frame.extend_from_slice(b"}}");
                member.session().push(text_frame(&frame), false);
                handler::close_unless_connected(chat, member);
            }
            Err(_) => handler::refuse_connect(chat, member, &refused),
        },
    );
}

/// Asks `hook` (join, publish) about a member's request; `then` gets the request back
/// with the verdict, the connection's later packets waiting meanwhile. A failure under
/// `hooks.on_failure = "allow"` is a plain allow.
fn ask_verdict(
    asked: &Asked<'_>,
    hooks: Rc<Hooks>,
    hook: Hook,
    body: &Value,
    then: impl FnOnce(&Asked<'_>, Result<Verdict, Failure>) + 'static,
) {
    let body = to_body(body);
    let (user, room, ack_id) = (asked.user.clone(), asked.room.clone(), asked.ack_id);
    let policy = hooks.on_failure();
    let call = async move { hooks.ask(hook, &body, answer::verdict).await };
    spawn(
        asked.chat,
        asked.member,
        true,
        call,
        move |chat, member, result| {
            let result = match result {
                Err(_) if policy == OnFailure::Allow => Ok(Verdict::Allow { text: None }),
                other => other,
            };
            then(&Asked::new(chat, member, user, room, ack_id), result);
        },
    );
}

/// `join`: one the user's grants and room token do not allow. `{ok:true}` lets it go
/// on; `{error}` is its error ack (`forbidden` unless the backend gives a code).
pub(super) fn join(asked: &Asked<'_>, hooks: Rc<Hooks>, since: Option<u64>, token: Option<Secret>) {
    let body = json!({"user": &*asked.user.id, "room": &*asked.room});
    ask_verdict(
        asked,
        hooks,
        Hook::Join,
        &body,
        move |asked, result| match result {
            Ok(Verdict::Allow { .. }) => handler::join_allowed(asked, since, token),
            Ok(Verdict::Refuse(r)) => refuse_coded(asked, &r, ErrorCode::Forbidden),
            Err(_) => asked.refuse(&ChatError::new(
                ErrorCode::Forbidden,
                "the application's backend did not answer the join hook",
            )),
        },
    );
}

/// `publish`: before the message takes an offset. `{ok:true}` sends it, `{ok:true,
/// text}` sends the rewritten text, `{error}` is the sender's error ack.
pub(super) fn publish(asked: &Asked<'_>, hooks: Rc<Hooks>, text: String, cid: Option<String>) {
    let mut body = json!({"user": &*asked.user.id, "room": &*asked.room, "text": &text});
    if let Some(cid) = &cid {
        body["cid"] = Value::String(cid.clone());
    }
    ask_verdict(asked, hooks, Hook::Publish, &body, move |asked, result| {
        if asked.chat.ctx.is_draining() {
            // Answered during a drain: as for any send then, nothing is stored.
            return asked.refuse(&handler::shutting_down());
        }
        let max = asked.chat.ctx.config.limits.max_text_bytes;
        match result {
            Ok(Verdict::Allow { text: None }) => handler::publish(asked, text, cid),
            Ok(Verdict::Allow { text: Some(new) }) if new.len() <= max => {
                handler::publish(asked, new, cid)
            }
            Ok(Verdict::Allow { .. }) => asked.refuse(&ChatError::new(
                ErrorCode::TooLarge,
                format!("the backend's rewrite is over {max} bytes; nothing was stored"),
            )),
            Ok(Verdict::Refuse(r)) => refuse_coded(asked, &r, ErrorCode::Forbidden),
            Err(_) => asked.refuse(&ChatError::new(
                ErrorCode::Unavailable,
                "the application's backend did not answer; nothing was stored",
            )),
        }
    });
}

/// The error ack of a backend's refusal: its code, else `default`.
fn refuse_coded(asked: &Asked<'_>, refusal: &Refusal, default: ErrorCode) {
    let code = refusal.code.as_deref().unwrap_or(default.as_str());
    let message = match refusal.message.as_str() {
        "" => code,
        m => m,
    };
    asked.ok(&coded_error_ack_json(code, message));
}

/// `rpc`: a client event that is not a chat event, to the backend; the client's ack is
/// `{ok:true, result}` or `{ok:false, error}`. Charged to the connection's send rate.
pub fn rpc(
    chat: &Chat,
    member: &Rc<Member>,
    hooks: Rc<Hooks>,
    (event, args): (String, String),
    ack_id: Option<u64>,
) {
    let Some(user) = member.user() else {
        return;
    };
    let push = move |member: &Member, json: &[u8]| {
        if let Some(id) = ack_id {
            member
                .session()
                .push(text_frame(&encode_ack(id, json)), false);
        }
    };
    if !member.take_token(std::time::Instant::now()) || member.hook_calls() >= MAX_RPC_CALLS {
        let err = ChatError::new(ErrorCode::RateLimited, "too many requests; slow down");
        return push(member, &super::events::error_ack_json(&err));
    }
    let args: Value = serde_json::from_str(&args).unwrap_or(Value::Array(Vec::new()));
    let body = to_body(&json!({"user": &*user.id, "event": event, "args": args}));
    let call = async move { hooks.ask(Hook::Rpc, &body, answer::rpc).await };
    spawn(chat, member, false, call, move |_, member, result| {
        let ack = match result {
            Ok(RpcAnswer::Result(result)) => json!({"ok": true, "result": result}),
            Ok(RpcAnswer::Error(error)) => json!({"ok": false, "error": error}),
            Err(_) => json!({"ok": false, "error": {
                "code": "unavailable",
                "message": "the application's backend did not answer",
            }}),
        };
        push(member, &to_body(&ack));
    });
}
