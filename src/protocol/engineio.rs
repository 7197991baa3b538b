//! Engine.IO v4: the packet framing under Socket.IO.
//!
//! Over WebSocket one frame carries one packet: a type digit followed by the data
//! (`4` + a Socket.IO packet for messages). Binary WebSocket frames are binary
//! message packets (Socket.IO attachments).

use serde::Serialize;

/// The Engine.IO packet types (the first character of a text packet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketType {
    Open,
    Close,
    Ping,
    Pong,
    Message,
    Upgrade,
    Noop,
}

impl PacketType {
    /// The type from its wire digit, or `None` for anything else.
    pub fn from_byte(b: u8) -> Option<PacketType> {
        Some(match b {
            b'0' => PacketType::Open,
            b'1' => PacketType::Close,
            b'2' => PacketType::Ping,
            b'3' => PacketType::Pong,
            b'4' => PacketType::Message,
            b'5' => PacketType::Upgrade,
            b'6' => PacketType::Noop,
            _ => return None,
        })
    }

    /// The wire digit of this type.
    pub fn as_byte(self) -> u8 {
        match self {
            PacketType::Open => b'0',
            PacketType::Close => b'1',
            PacketType::Ping => b'2',
            PacketType::Pong => b'3',
            PacketType::Message => b'4',
            PacketType::Upgrade => b'5',
            PacketType::Noop => b'6',
        }
    }
}

/// A text packet split into its type and data, borrowing the frame's bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct TextPacket<'a> {
    pub kind: PacketType,
    pub data: &'a [u8],
}

/// Splits a text packet; `None` when it is empty or the type digit is unknown.
pub fn parse_text(packet: &[u8]) -> Option<TextPacket<'_>> {
    let (&first, data) = packet.split_first()?;
    Some(TextPacket {
        kind: PacketType::from_byte(first)?,
        data,
    })
}

/// The body of the open packet (`0{...}`) the server sends after the handshake.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenPayload<'a> {
    pub sid: &'a str,
    pub upgrades: &'a [&'a str],
    pub ping_interval: u64,
    pub ping_timeout: u64,
    pub max_payload: usize,
}

/// Encodes the open packet: `0` followed by its JSON body.
pub fn encode_open(open: &OpenPayload<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.push(PacketType::Open.as_byte());
    // Serializing a struct of plain fields into a Vec cannot fail.
    serde_json::to_writer(&mut out, open).expect("open packet serializes");
    out
}

/// The Engine.IO error codes used in HTTP 400 answers to bad handshakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    TransportUnknown,
    SessionIdUnknown,
    BadHandshakeMethod,
    BadRequest,
    Forbidden,
    UnsupportedProtocolVersion,
}

impl HandshakeError {
    /// The numeric code Engine.IO clients expect.
    pub fn code(self) -> u8 {
        match self {
            HandshakeError::TransportUnknown => 0,
            HandshakeError::SessionIdUnknown => 1,
            HandshakeError::BadHandshakeMethod => 2,
            HandshakeError::BadRequest => 3,
            HandshakeError::Forbidden => 4,
            HandshakeError::UnsupportedProtocolVersion => 5,
        }
    }

    /// The message Engine.IO servers send with the code.
    pub fn message(self) -> &'static str {
        match self {
            HandshakeError::TransportUnknown => "Transport unknown",
            HandshakeError::SessionIdUnknown => "Session ID unknown",
            HandshakeError::BadHandshakeMethod => "Bad handshake method",
            HandshakeError::BadRequest => "Bad request",
            HandshakeError::Forbidden => "Forbidden",
            HandshakeError::UnsupportedProtocolVersion => "Unsupported protocol version",
        }
    }

    /// The JSON body of the HTTP 400 answer: `{"code":N,"message":"..."}`.
    pub fn body(self) -> String {
        format!(
            "{{\"code\":{},\"message\":\"{}\"}}",
            self.code(),
            self.message()
        )
    }
}

/// An Engine.IO-style JSON error body with a message of the server's own, as
/// engine.io sends for a refused request: `{"code":N,"message":"..."}`.
pub fn error_body(code: HandshakeError, message: &str) -> Vec<u8> {
    let mut out = format!("{{\"code\":{},\"message\":", code.code()).into_bytes();
    crate::protocol::socketio::write_json_str(&mut out, message);
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_types_and_data() {
        let p = parse_text(b"42[\"x\"]").unwrap();
        assert_eq!(p.kind, PacketType::Message);
        assert_eq!(p.data, b"2[\"x\"]");
        assert_eq!(parse_text(b"3").unwrap().kind, PacketType::Pong);
        assert_eq!(parse_text(b""), None);
        assert_eq!(parse_text(b"9abc"), None);
        for b in b'0'..=b'6' {
            assert_eq!(PacketType::from_byte(b).unwrap().as_byte(), b);
        }
    }

    #[test]
    fn open_packet_has_the_fields_clients_read() {
        let open = encode_open(&OpenPayload {
            sid: "abc",
            upgrades: &[],
            ping_interval: 25000,
            ping_timeout: 20000,
            max_payload: 1_000_000,
        });
        assert_eq!(
            std::str::from_utf8(&open).unwrap(),
            r#"0{"sid":"abc","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#
        );
    }

    #[test]
    fn error_bodies() {
        assert_eq!(
            HandshakeError::UnsupportedProtocolVersion.body(),
            r#"{"code":5,"message":"Unsupported protocol version"}"#
        );
        assert_eq!(
            error_body(HandshakeError::Forbidden, "slow \"down\""),
            br#"{"code":4,"message":"slow \"down\""}"#
        );
    }
}
