//! Engine.IO v4 and Socket.IO v5 text packets, as carried one per WebSocket text frame.
//!
//! Only what a chat client needs: decoding every packet type a server may send (so that an
//! unexpected one is recognised rather than misread), and encoding CONNECT, EVENT and PONG.
//! Nothing here panics on network input: malformed text is a [`CodecError`].

use serde::Serialize;
use std::fmt;

/// A malformed Engine.IO or Socket.IO packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError(pub &'static str);

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed packet: {}", self.0)
    }
}

impl std::error::Error for CodecError {}

/// An Engine.IO v4 packet (the first character of the frame is its type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EioPacket<'a> {
    /// `0{...}`: the handshake, with its JSON body.
    Open(&'a str),
    /// `1`: the server closes the session.
    Close,
    /// `2...`: a ping (the client answers with a pong carrying the same payload).
    Ping(&'a str),
    /// `3...`: a pong.
    Pong(&'a str),
    /// `4...`: a message: a Socket.IO packet.
    Message(&'a str),
    /// `5`: upgrade (not expected on a WebSocket-only session).
    Upgrade,
    /// `6`: noop.
    Noop,
}

/// Decodes one Engine.IO packet from a WebSocket text frame.
pub fn decode_eio(frame: &str) -> Result<EioPacket<'_>, CodecError> {
    let mut chars = frame.char_indices();
    let (_, kind) = chars.next().ok_or(CodecError("empty frame"))?;
    let rest = &frame[kind.len_utf8()..];
    Ok(match kind {
        '0' => EioPacket::Open(rest),
        '1' => EioPacket::Close,
        '2' => EioPacket::Ping(rest),
        '3' => EioPacket::Pong(rest),
        '4' => EioPacket::Message(rest),
        '5' => EioPacket::Upgrade,
        '6' => EioPacket::Noop,
        _ => return Err(CodecError("unknown Engine.IO packet type")),
    })
}

/// The Socket.IO packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SioKind {
    /// `0`: CONNECT (its ack carries `{"sid":...}`).
    Connect,
    /// `1`: DISCONNECT.
    Disconnect,
    /// `2`: EVENT.
    Event,
    /// `3`: ACK.
    Ack,
    /// `4`: CONNECT_ERROR.
    ConnectError,
    /// `5`: BINARY_EVENT.
    BinaryEvent,
    /// `6`: BINARY_ACK.
    BinaryAck,
}

/// A decoded Socket.IO packet borrowing from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SioPacket<'a> {
    /// Packet type.
    pub kind: SioKind,
    /// Number of binary attachments (binary packets only).
    pub attachments: u32,
    /// Namespace (`/` when absent).
    pub nsp: &'a str,
    /// Ack id, when present.
    pub id: Option<u64>,
    /// The JSON payload text (may be empty).
    pub data: &'a str,
}

/// Decodes a Socket.IO packet: `<type>[<attachments>-][<nsp>,][<id>][<json>]`.
pub fn decode_sio(text: &str) -> Result<SioPacket<'_>, CodecError> {
    let bytes = text.as_bytes();
    let kind = match bytes.first() {
        Some(b'0') => SioKind::Connect,
        Some(b'1') => SioKind::Disconnect,
        Some(b'2') => SioKind::Event,
        Some(b'3') => SioKind::Ack,
        Some(b'4') => SioKind::ConnectError,
        Some(b'5') => SioKind::BinaryEvent,
        Some(b'6') => SioKind::BinaryAck,
        Some(_) => return Err(CodecError("unknown Socket.IO packet type")),
        None => return Err(CodecError("empty Socket.IO packet")),
    };
    let mut i = 1;
    let mut attachments = 0u32;
    if matches!(kind, SioKind::BinaryEvent | SioKind::BinaryAck) {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || bytes.get(i) != Some(&b'-') {
            return Err(CodecError("binary packet without attachment count"));
        }
        attachments = text[start..i]
            .parse()
            .map_err(|_| CodecError("attachment count out of range"))?;
        i += 1;
    }
    let mut nsp = "/";
    if bytes.get(i) == Some(&b'/') {
        let end = text[i..]
            .find(',')
            .map(|p| i + p)
            .ok_or(CodecError("namespace without ','"))?;
        nsp = &text[i..end];
        i = end + 1;
    }
    let start = i;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        i += 1;
    }
    let id = if i > start {
        Some(
            text[start..i]
                .parse()
                .map_err(|_| CodecError("ack id out of range"))?,
        )
    } else {
        None
    };
    Ok(SioPacket {
        kind,
        attachments,
        nsp,
        id,
        data: &text[i..],
    })
}

/// The event name of an EVENT payload `["name", ...]`, read without a full JSON parse.
///
/// Returns `None` for a payload that does not start with a plain string (names with
/// escapes are not used by the chat protocol and are treated as unknown).
pub fn event_name(data: &str) -> Option<&str> {
    let rest = data.strip_prefix("[\"")?;
    let end = rest.find('"')?;
    let name = &rest[..end];
    if name.contains('\\') {
        return None;
    }
    Some(name)
}

/// Encodes the CONNECT packet for namespace `/` with a JSON auth payload: `40{...}`.
pub fn encode_connect(auth_json: &str) -> String {
    format!("40{auth_json}")
}

/// Encodes an EVENT `42[<id>]["event", payload]`.
pub fn encode_event<T: Serialize + ?Sized>(
    id: Option<u64>,
    event: &str,
    payload: &T,
) -> Result<String, serde_json::Error> {
    let body = serde_json::to_string(&(event, payload))?;
    Ok(match id {
        Some(id) => format!("42{id}{body}"),
        None => format!("42{body}"),
    })
}

/// Encodes the pong answering a ping with `payload` (usually empty): `3<payload>`.
pub fn encode_pong(payload: &str) -> String {
    format!("3{payload}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn eio_types() {
        assert_eq!(
            decode_eio("0{\"sid\":\"x\"}"),
            Ok(EioPacket::Open("{\"sid\":\"x\"}"))
        );
        assert_eq!(decode_eio("1"), Ok(EioPacket::Close));
        assert_eq!(decode_eio("2"), Ok(EioPacket::Ping("")));
        assert_eq!(decode_eio("2probe"), Ok(EioPacket::Ping("probe")));
        assert_eq!(decode_eio("3"), Ok(EioPacket::Pong("")));
        assert_eq!(decode_eio("42[\"a\"]"), Ok(EioPacket::Message("2[\"a\"]")));
        assert_eq!(decode_eio("6"), Ok(EioPacket::Noop));
        assert!(decode_eio("").is_err());
        assert!(decode_eio("9").is_err());
        assert!(decode_eio("é").is_err());
    }

    #[test]
    fn sio_event_and_ack() {
        let p = decode_sio("2[\"message\",{\"offset\":3}]").unwrap();
        assert_eq!(p.kind, SioKind::Event);
        assert_eq!(p.id, None);
        assert_eq!(p.nsp, "/");
        assert_eq!(p.data, "[\"message\",{\"offset\":3}]");

        let p = decode_sio("312[{\"ok\":true}]").unwrap();
        assert_eq!(p.kind, SioKind::Ack);
        assert_eq!(p.id, Some(12));
        assert_eq!(p.data, "[{\"ok\":true}]");

        let p = decode_sio("0{\"sid\":\"abc\"}").unwrap();
        assert_eq!(p.kind, SioKind::Connect);
        assert_eq!(p.data, "{\"sid\":\"abc\"}");

        let p = decode_sio("4{\"message\":\"unauthorized\"}").unwrap();
        assert_eq!(p.kind, SioKind::ConnectError);

        let p = decode_sio("1").unwrap();
        assert_eq!(p.kind, SioKind::Disconnect);
        assert_eq!(p.data, "");
    }

    #[test]
    fn sio_namespace_and_binary() {
        let p = decode_sio("4/admin,{\"message\":\"Invalid namespace\"}").unwrap();
        assert_eq!(p.nsp, "/admin");
        assert_eq!(p.kind, SioKind::ConnectError);

        let p = decode_sio("52-/chat,7[\"up\",{\"_placeholder\":true,\"num\":0}]").unwrap();
        assert_eq!(p.kind, SioKind::BinaryEvent);
        assert_eq!(p.attachments, 2);
        assert_eq!(p.nsp, "/chat");
        assert_eq!(p.id, Some(7));
    }

    #[test]
    fn sio_malformed() {
        assert!(decode_sio("").is_err());
        assert!(decode_sio("9[]").is_err());
        assert!(decode_sio("5[]").is_err());
        assert!(decode_sio("5x-[]").is_err());
        assert!(decode_sio("2/nsp[]").is_err());
        assert!(decode_sio("399999999999999999999999[]").is_err());
    }

    #[test]
    fn event_names() {
        assert_eq!(event_name("[\"message\",{}]"), Some("message"));
        assert_eq!(event_name("[\"presence\"]"), Some("presence"));
        assert_eq!(event_name("[\"a\\\"b\",1]"), None);
        assert_eq!(event_name("[1]"), None);
        assert_eq!(event_name(""), None);
    }

    #[test]
    fn encoding() {
        assert_eq!(encode_connect("{\"token\":\"t\"}"), "40{\"token\":\"t\"}");
        assert_eq!(
            encode_event(Some(5), "join", &json!({"room": "r"})).unwrap(),
            "425[\"join\",{\"room\":\"r\"}]"
        );
        assert_eq!(
            encode_event(None, "typing", &json!({"room": "r"})).unwrap(),
            "42[\"typing\",{\"room\":\"r\"}]"
        );
        assert_eq!(encode_pong(""), "3");
        // Round trip through both layers.
        let frame = encode_event(Some(9), "message", &json!({"text": "t=1"})).unwrap();
        let EioPacket::Message(m) = decode_eio(&frame).unwrap() else {
            panic!("not a message")
        };
        let p = decode_sio(m).unwrap();
        assert_eq!((p.kind, p.id), (SioKind::Event, Some(9)));
        assert_eq!(event_name(p.data), Some("message"));
    }
}
