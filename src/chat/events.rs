//! Chat events on the wire: parsing what clients send (`join`, `message`, …) and
//! encoding what the server sends back (acks, `message`, `typing`, `presence`).

use std::io::Write;

use simd_json::prelude::*;
use simd_json::value::borrowed::Object;
use simd_json::BorrowedValue;

use crate::protocol::socketio::write_json_str;
use crate::store::{HistoryQuery, StoredMessage};

/// The error codes of PROTOCOL.md, sent in `{"ok":false,"error":{code,message}}` acks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotJoined,
    TooLarge,
    RateLimited,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// The code's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A refused request: the code and a human message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatError {
    pub code: ErrorCode,
    pub message: String,
}

impl ChatError {
    /// A refusal with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ChatError {
        ChatError {
            code,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> ChatError {
        ChatError::new(ErrorCode::BadRequest, message)
    }
}

/// A well-formed client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatRequest {
    Join {
        room: String,
        since: Option<u64>,
        /// A room token (a credential: its `Debug` is redacted).
        token: Option<crate::auth::Secret>,
    },
    Leave {
        room: String,
    },
    Message {
        room: String,
        text: String,
        cid: Option<String>,
    },
    Typing {
        room: String,
    },
    History {
        room: String,
        query: HistoryQuery,
        limit: usize,
    },
    Presence {
        room: String,
    },
}

impl ChatRequest {
    /// The room the request is about.
    pub fn room(&self) -> &str {
        match self {
            ChatRequest::Join { room, .. }
            | ChatRequest::Leave { room }
            | ChatRequest::Message { room, .. }
            | ChatRequest::Typing { room }
            | ChatRequest::History { room, .. }
            | ChatRequest::Presence { room } => room,
        }
    }
}

/// What an EVENT packet turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A known event with a valid payload.
    Request(ChatRequest),
    /// A known event with a bad payload: answered with an error ack.
    Refused(ChatError),
    /// An event that is not a chat event: the backend's (the rpc hook), else refused
    /// with [`Parsed::refusal`].
    Other {
        event: String,
        /// The arguments after the name, as a JSON array.
        args: String,
    },
}

impl Parsed {
    /// The refusal of an event that is not a chat event, when no backend takes it.
    pub fn refusal(event: &str) -> ChatError {
        ChatError::bad(format!("unknown event {event:?}"))
    }
}

/// The EVENT's data is not a Socket.IO event at all (not JSON, not an array whose
/// first element is the event name): the connection is closed.
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidEvent(pub &'static str);

/// The limits that payload parsing enforces.
#[derive(Debug, Clone, Copy)]
pub struct PayloadLimits {
    pub max_text_bytes: usize,
}

/// Parses an EVENT's JSON data (`["name", {...}, ...]`). The buffer is used as
/// scratch space by simd-json.
pub fn parse_event(data: &mut [u8], limits: PayloadLimits) -> Result<Parsed, InvalidEvent> {
    let value = simd_json::to_borrowed_value(data).map_err(|_| InvalidEvent("invalid JSON"))?;
    let args = value
        .as_array()
        .ok_or(InvalidEvent("event data is not an array"))?;
    let name = args
        .first()
        .and_then(|v| v.as_str())
        .ok_or(InvalidEvent("event name is not a string"))?;
    if !is_chat_event(name) {
        let rest = BorrowedValue::Array(Box::new(args.get(1..).unwrap_or_default().to_vec()));
        return Ok(Parsed::Other {
            event: name.to_string(),
            args: rest.encode(),
        });
    }
    let payload = args.get(1);
    Ok(match parse_request(name, payload, limits) {
        Ok(r) => Parsed::Request(r),
        Err(e) => Parsed::Refused(e),
    })
}

/// Whether `name` is one of the chat events of PROTOCOL.md.
fn is_chat_event(name: &str) -> bool {
    matches!(
        name,
        "join" | "leave" | "message" | "typing" | "history" | "presence"
    )
}

/// The request a chat event names, from its payload object; a bad payload is the error
/// to ack with.
fn parse_request(
    name: &str,
    payload: Option<&BorrowedValue<'_>>,
    limits: PayloadLimits,
) -> Result<ChatRequest, ChatError> {
    let obj = payload
        .and_then(|p| p.as_object())
        .ok_or_else(|| ChatError::bad(format!("{name} expects an object payload")))?;
    let fields = Fields(obj);
    let room = match fields.get("room") {
        Some(v) => v
            .as_str()
            .ok_or_else(|| ChatError::bad("room must be a string"))?,
        None => return Err(ChatError::bad("room is required")),
    };
    validate_room(room)?;
    let room = room.to_string();

    Ok(match name {
        "join" => ChatRequest::Join {
            room,
            since: fields.opt_u64("since")?,
            token: fields.opt_str("token")?.map(crate::auth::Secret::new),
        },
        "leave" => ChatRequest::Leave { room },
        "typing" => ChatRequest::Typing { room },
        "presence" => ChatRequest::Presence { room },
        "message" => parse_message(room, &fields, limits)?,
        _ => parse_history(room, &fields)?, // "history"
    })
}

/// A request's payload object, read field by field; a `null` field counts as absent.
struct Fields<'a, 'v>(&'a Object<'v>);

impl<'a, 'v> Fields<'a, 'v> {
    /// Field `k`, unless absent or `null`.
    fn get(&self, k: &str) -> Option<&'a BorrowedValue<'v>> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    /// Field `k` as a non-negative integer, if given.
    fn opt_u64(&self, k: &str) -> Result<Option<u64>, ChatError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| ChatError::bad(format!("{k} must be a non-negative integer"))),
        }
    }

    /// Field `k` as a string, if given.
    fn opt_str(&self, k: &str) -> Result<Option<&'a str>, ChatError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| ChatError::bad(format!("{k} must be a string"))),
        }
    }
}

/// `message {room, text, cid?}`: the text within `limits`, the cid 1 to 64 bytes.
fn parse_message(
    room: String,
    fields: &Fields<'_, '_>,
    limits: PayloadLimits,
) -> Result<ChatRequest, ChatError> {
    let text = fields
        .opt_str("text")?
        .ok_or_else(|| ChatError::bad("text is required"))?;
    if text.len() > limits.max_text_bytes {
        return Err(ChatError::new(
            ErrorCode::TooLarge,
            format!(
                "text is {} bytes, the limit is {}",
                text.len(),
                limits.max_text_bytes
            ),
        ));
    }
    let cid = fields.opt_str("cid")?;
    if let Some(c) = cid {
        if c.is_empty() || c.len() > 64 {
            return Err(ChatError::bad("cid must be 1 to 64 bytes"));
        }
    }
    Ok(ChatRequest::Message {
        room,
        text: text.to_string(),
        cid: cid.map(str::to_string),
    })
}

/// `history {room, before? | after?, limit?}`: at most one of `before` and `after`; the
/// limit 50 by default, at least 1, capped at 100.
fn parse_history(room: String, fields: &Fields<'_, '_>) -> Result<ChatRequest, ChatError> {
    let before = fields.opt_u64("before")?;
    let after = fields.opt_u64("after")?;
    let limit = match fields.get("limit") {
        None => 50,
        Some(v) => match v.as_i64() {
            Some(n) if n < 1 => return Err(ChatError::bad("limit must be at least 1")),
            Some(n) => (n as u64).min(100) as usize,
            None => match v.as_u64() {
                Some(_) => 100,
                None => return Err(ChatError::bad("limit must be an integer")),
            },
        },
    };
    let query = match (before, after) {
        (Some(_), Some(_)) => return Err(ChatError::bad("give before or after, not both")),
        (Some(b), None) => HistoryQuery::Before(b),
        (None, Some(a)) => HistoryQuery::After(a),
        (None, None) => HistoryQuery::Latest,
    };
    Ok(ChatRequest::History { room, query, limit })
}

/// Room names: 1–128 bytes of `[A-Za-z0-9_.:@-]` (PROTOCOL.md, Rooms).
pub fn validate_room(room: &str) -> Result<(), ChatError> {
    let ok = !room.is_empty()
        && room.len() <= 128
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ChatError::bad(
            "room must be 1-128 characters of A-Z a-z 0-9 _ . : @ -",
        ))
    }
}

/// Writes a stored message as the JSON object clients see: `{room,id,offset,user,text,ts,cid?}`.
pub fn write_message_json(out: &mut Vec<u8>, m: &StoredMessage) {
    out.extend_from_slice(b"{\"room\":");
    write_json_str(out, &m.room);
    out.extend_from_slice(b",\"id\":");
    write_json_str(out, &m.id);
    let _ = write!(out, ",\"offset\":{},\"user\":", m.offset);
    write_json_str(out, &m.user);
    out.extend_from_slice(b",\"text\":");
    write_json_str(out, &m.text);
    let _ = write!(out, ",\"ts\":{}", m.ts);
    if let Some(cid) = &m.cid {
        out.extend_from_slice(b",\"cid\":");
        write_json_str(out, cid);
    }
    out.push(b'}');
}

/// Writes a JSON array of messages (for `missed` and `history`).
pub fn write_messages_json(out: &mut Vec<u8>, messages: &[StoredMessage]) {
    out.push(b'[');
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_message_json(out, m);
    }
    out.push(b']');
}

/// The ack body for a refused request.
pub fn error_ack_json(err: &ChatError) -> Vec<u8> {
    coded_error_ack_json(err.code.as_str(), &err.message)
}

/// The ack body for a request refused with any code (the application's backend picks
/// codes of its own).
pub fn coded_error_ack_json(code: &str, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + code.len() + message.len());
    out.extend_from_slice(b"{\"ok\":false,\"error\":{\"code\":");
    write_json_str(&mut out, code);
    out.extend_from_slice(b",\"message\":");
    write_json_str(&mut out, message);
    out.extend_from_slice(b"}}");
    out
}

/// The ack body for an accepted message: `{"ok":true,"id","offset","ts"}`.
pub fn message_ack_json(m: &StoredMessage) -> Vec<u8> {
    let mut out = Vec::with_capacity(80);
    out.extend_from_slice(b"{\"ok\":true,\"id\":");
    write_json_str(&mut out, &m.id);
    let _ = write!(out, ",\"offset\":{},\"ts\":{}}}", m.offset, m.ts);
    out
}

/// The ack body for a join: `{ok, room, offset, missed?, truncated?}`.
pub fn join_ack_json(room: &str, offset: u64, missed: Option<(&[StoredMessage], bool)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"{\"ok\":true,\"room\":");
    write_json_str(&mut out, room);
    let _ = write!(out, ",\"offset\":{offset}");
    if let Some((messages, truncated)) = missed {
        out.extend_from_slice(b",\"missed\":");
        write_messages_json(&mut out, messages);
        let _ = write!(out, ",\"truncated\":{truncated}");
    }
    out.push(b'}');
    out
}

/// The ack body for `history`.
pub fn history_ack_json(messages: &[StoredMessage]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + messages.len() * 128);
    out.extend_from_slice(b"{\"ok\":true,\"messages\":");
    write_messages_json(&mut out, messages);
    out.push(b'}');
    out
}

/// The plain `{"ok":true}` ack.
pub const OK_ACK: &[u8] = b"{\"ok\":true}";

/// One present user, as listed by the `presence` ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentUser {
    pub user: String,
    pub name: Option<String>,
}

/// The ack body for `presence`: `{ok, users:[{user, name?}]}`.
pub fn presence_ack_json(users: &[PresentUser]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + users.len() * 32);
    out.extend_from_slice(b"{\"ok\":true,\"users\":[");
    for (i, u) in users.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"user\":");
        write_json_str(&mut out, &u.user);
        if let Some(name) = &u.name {
            out.extend_from_slice(b",\"name\":");
            write_json_str(&mut out, name);
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

/// The `typing` event body: `{room, user}`.
pub fn typing_json(room: &str, user: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + room.len() + user.len());
    out.extend_from_slice(b"{\"room\":");
    write_json_str(&mut out, room);
    out.extend_from_slice(b",\"user\":");
    write_json_str(&mut out, user);
    out.push(b'}');
    out
}

/// The `presence` event body: `{room, user, online}`.
pub fn presence_event_json(room: &str, user: &str, online: bool) -> Vec<u8> {
    let mut out = typing_json(room, user);
    out.pop();
    let _ = write!(out, ",\"online\":{online}}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: PayloadLimits = PayloadLimits { max_text_bytes: 10 };

    fn parse(s: &str) -> Result<Parsed, InvalidEvent> {
        parse_event(&mut s.as_bytes().to_vec(), LIMITS)
    }

    fn refused(s: &str) -> ErrorCode {
        match parse(s) {
            Ok(Parsed::Refused(e)) => e.code,
            Ok(Parsed::Other { event, .. }) => Parsed::refusal(&event).code,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn parses_each_event() {
        assert_eq!(
            parse(r#"["join",{"room":"a","since":3}]"#).unwrap(),
            Parsed::Request(ChatRequest::Join {
                room: "a".into(),
                since: Some(3),
                token: None
            })
        );
        assert_eq!(
            parse(r#"["message",{"room":"a","text":"h\u00e9","cid":"c1"}]"#).unwrap(),
            Parsed::Request(ChatRequest::Message {
                room: "a".into(),
                text: "hé".into(),
                cid: Some("c1".into())
            })
        );
        assert_eq!(
            parse(r#"["history",{"room":"a","before":9,"limit":500}]"#).unwrap(),
            Parsed::Request(ChatRequest::History {
                room: "a".into(),
                query: HistoryQuery::Before(9),
                limit: 100
            })
        );
        assert_eq!(
            parse(r#"["history",{"room":"a"}]"#).unwrap(),
            Parsed::Request(ChatRequest::History {
                room: "a".into(),
                query: HistoryQuery::Latest,
                limit: 50
            })
        );
        assert!(matches!(
            parse(r#"["typing",{"room":"a"}]"#).unwrap(),
            Parsed::Request(ChatRequest::Typing { .. })
        ));
    }

    #[test]
    fn refuses_bad_payloads() {
        assert_eq!(refused(r#"["nope",{}]"#), ErrorCode::BadRequest);
        assert_eq!(refused(r#"["join"]"#), ErrorCode::BadRequest);
        assert_eq!(
            refused(r#"["join",{"room":"bad room!"}]"#),
            ErrorCode::BadRequest
        );
        assert_eq!(refused(r#"["join",{"room":7}]"#), ErrorCode::BadRequest);
        assert_eq!(
            refused(r#"["join",{"room":"a","since":-1}]"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            refused(r#"["message",{"room":"a"}]"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            refused(r#"["message",{"room":"a","text":"12345678901"}]"#),
            ErrorCode::TooLarge
        );
        let long_cid = format!(
            r#"["message",{{"room":"a","text":"x","cid":"{}"}}]"#,
            "c".repeat(65)
        );
        assert_eq!(refused(&long_cid), ErrorCode::BadRequest);
        assert_eq!(
            refused(r#"["history",{"room":"a","before":1,"after":2}]"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            refused(r#"["history",{"room":"a","limit":0}]"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            refused(r#"["history",{"room":"a","limit":"x"}]"#),
            ErrorCode::BadRequest
        );
        let long_room = format!(r#"["join",{{"room":"{}"}}]"#, "r".repeat(129));
        assert_eq!(refused(&long_room), ErrorCode::BadRequest);
    }

    #[test]
    fn invalid_events_close() {
        assert!(parse("[").is_err());
        assert!(parse("{}").is_err());
        assert!(parse("[1,2]").is_err());
        assert!(parse("[]").is_err());
    }

    #[test]
    fn encodes_bodies() {
        let m = StoredMessage {
            room: "r".into(),
            offset: 3,
            id: "ID".into(),
            user: "u\"".into(),
            text: "hi".into(),
            ts: 5,
            cid: None,
        };
        let mut out = Vec::new();
        write_message_json(&mut out, &m);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["user"], "u\"");
        assert_eq!(v["offset"], 3);
        assert!(v.get("cid").is_none());
        let v: serde_json::Value =
            serde_json::from_slice(&join_ack_json("r", 3, Some((&[m], false)))).unwrap();
        assert_eq!(v["missed"][0]["text"], "hi");
        assert_eq!(v["truncated"], false);
        let v: serde_json::Value =
            serde_json::from_slice(&presence_event_json("r", "u", true)).unwrap();
        assert_eq!(v, serde_json::json!({"room":"r","user":"u","online":true}));
        let v: serde_json::Value = serde_json::from_slice(&error_ack_json(&ChatError::new(
            ErrorCode::NotJoined,
            "join first",
        )))
        .unwrap();
        assert_eq!(v["error"]["code"], "not_joined");
    }
}
