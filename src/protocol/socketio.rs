//! Socket.IO v5 packets, carried inside Engine.IO message packets.
//!
//! `<type>[<attachments>-][<namespace>,][<ack id>][<json>]`, for example
//! `2["message",{"room":"a"}]` or `21["join",{"room":"a"}]` (ack id 1).

use std::io::Write;

use thiserror::Error;

/// The Socket.IO packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketKind {
    Connect,
    Disconnect,
    Event,
    Ack,
    ConnectError,
    BinaryEvent,
    BinaryAck,
}

impl PacketKind {
    fn from_byte(b: u8) -> Option<PacketKind> {
        Some(match b {
            b'0' => PacketKind::Connect,
            b'1' => PacketKind::Disconnect,
            b'2' => PacketKind::Event,
            b'3' => PacketKind::Ack,
            b'4' => PacketKind::ConnectError,
            b'5' => PacketKind::BinaryEvent,
            b'6' => PacketKind::BinaryAck,
            _ => return None,
        })
    }

    /// Whether binary attachments follow this packet.
    pub fn is_binary(self) -> bool {
        matches!(self, PacketKind::BinaryEvent | PacketKind::BinaryAck)
    }
}

/// The most attachments one binary packet may announce (PROTOCOL.md, Errors).
pub const MAX_ATTACHMENTS: usize = 10;

/// A parsed packet, borrowing the frame's bytes. `data` is the raw JSON (maybe empty).
#[derive(Debug, PartialEq, Eq)]
pub struct Packet<'a> {
    pub kind: PacketKind,
    pub attachments: usize,
    /// The namespace, `/` when the packet names none.
    pub namespace: &'a str,
    pub ack_id: Option<u64>,
    pub data: &'a [u8],
}

/// Why a Socket.IO packet could not be parsed; any of these closes the connection.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("empty packet")]
    Empty,
    #[error("unknown packet type {0:?}")]
    UnknownType(char),
    #[error("bad attachment count")]
    BadAttachments,
    #[error("too many attachments ({0} > {MAX_ATTACHMENTS})")]
    TooManyAttachments(usize),
    #[error("namespace is not UTF-8")]
    BadNamespace,
    #[error("ack id out of range")]
    BadAckId,
}

/// Parses one Socket.IO packet (the bytes after the Engine.IO `4`).
pub fn parse(bytes: &[u8]) -> Result<Packet<'_>, PacketError> {
    let (&first, mut rest) = bytes.split_first().ok_or(PacketError::Empty)?;
    let kind = PacketKind::from_byte(first).ok_or(PacketError::UnknownType(first as char))?;

    let mut attachments = 0;
    if kind.is_binary() {
        let dash = rest
            .iter()
            .position(|&b| b == b'-')
            .ok_or(PacketError::BadAttachments)?;
        let digits = &rest[..dash];
        if digits.is_empty() || digits.len() > 3 || !digits.iter().all(u8::is_ascii_digit) {
            return Err(PacketError::BadAttachments);
        }
        attachments = digits
            .iter()
            .fold(0usize, |n, d| n * 10 + usize::from(d - b'0'));
        if attachments > MAX_ATTACHMENTS {
            return Err(PacketError::TooManyAttachments(attachments));
        }
        rest = &rest[dash + 1..];
    }

    let mut namespace = "/";
    if rest.first() == Some(&b'/') {
        let end = rest.iter().position(|&b| b == b',').unwrap_or(rest.len());
        namespace = std::str::from_utf8(&rest[..end]).map_err(|_| PacketError::BadNamespace)?;
        rest = rest.get(end + 1..).unwrap_or(&[]);
    }

    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let ack_id = if digits == 0 {
        None
    } else {
        if digits > 15 {
            return Err(PacketError::BadAckId);
        }
        let id = rest[..digits]
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        rest = &rest[digits..];
        Some(id)
    };

    Ok(Packet {
        kind,
        attachments,
        namespace,
        ack_id,
        data: rest,
    })
}

/// Appends the Engine.IO + Socket.IO prefix of a packet on `/` (e.g. `43` + ack id).
fn push_prefix(out: &mut Vec<u8>, kind: u8, ack_id: Option<u64>) {
    out.push(b'4');
    out.push(kind);
    if let Some(id) = ack_id {
        // Writing into a Vec cannot fail.
        let _ = write!(out, "{id}");
    }
}

/// Engine.IO message carrying a Socket.IO CONNECT answer: `40{"sid":"..."}`.
pub fn encode_connect_ok(sid: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(40);
    push_prefix(&mut out, b'0', None);
    out.extend_from_slice(b"{\"sid\":");
    write_json_str(&mut out, sid);
    out.push(b'}');
    out
}

/// Engine.IO message carrying CONNECT_ERROR: `44[/ns,]{"message":"..."}`.
pub fn encode_connect_error(namespace: &str, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"44");
    if namespace != "/" {
        out.extend_from_slice(namespace.as_bytes());
        out.push(b',');
    }
    out.extend_from_slice(b"{\"message\":");
    write_json_str(&mut out, message);
    out.push(b'}');
    out
}

/// Engine.IO message carrying an ACK with one argument: `43<id>[<json>]`.
pub fn encode_ack(ack_id: u64, json_arg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json_arg.len() + 24);
    push_prefix(&mut out, b'3', Some(ack_id));
    out.push(b'[');
    out.extend_from_slice(json_arg);
    out.push(b']');
    out
}

/// Engine.IO message carrying an EVENT with one argument: `42["<name>",<json>]`.
pub fn encode_event(name: &str, json_arg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json_arg.len() + name.len() + 8);
    push_prefix(&mut out, b'2', None);
    out.push(b'[');
    write_json_str(&mut out, name);
    out.push(b',');
    out.extend_from_slice(json_arg);
    out.push(b']');
    out
}

/// Appends `s` as a JSON string literal (quoted and escaped).
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    serde_json::to_writer(out, s).expect("string serializes");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_event_with_ack() {
        let p = parse(b"212[\"join\",{\"room\":\"a\"}]").unwrap();
        assert_eq!(p.kind, PacketKind::Event);
        assert_eq!(p.namespace, "/");
        assert_eq!(p.ack_id, Some(12));
        assert_eq!(p.data, b"[\"join\",{\"room\":\"a\"}]");
    }

    #[test]
    fn parses_connect_with_namespace_and_auth() {
        let p = parse(b"0/admin,{\"token\":\"x\"}").unwrap();
        assert_eq!(p.kind, PacketKind::Connect);
        assert_eq!(p.namespace, "/admin");
        assert_eq!(p.ack_id, None);
        assert_eq!(p.data, b"{\"token\":\"x\"}");
        let p = parse(b"0").unwrap();
        assert_eq!((p.namespace, p.data), ("/", &b""[..]));
        let p = parse(b"1/admin,").unwrap();
        assert_eq!((p.kind, p.namespace), (PacketKind::Disconnect, "/admin"));
    }

    #[test]
    fn parses_binary_packets() {
        let p = parse(b"51-[\"x\",{\"_placeholder\":true,\"num\":0}]").unwrap();
        assert_eq!((p.kind, p.attachments), (PacketKind::BinaryEvent, 1));
        let p = parse(b"62-/ns,7[{}]").unwrap();
        assert_eq!(
            (p.kind, p.attachments, p.namespace, p.ack_id),
            (PacketKind::BinaryAck, 2, "/ns", Some(7))
        );
        assert_eq!(parse(b"511-[]"), Err(PacketError::TooManyAttachments(11)));
        assert_eq!(parse(b"5-[]"), Err(PacketError::BadAttachments));
        assert_eq!(parse(b"5[]"), Err(PacketError::BadAttachments));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse(b""), Err(PacketError::Empty));
        assert_eq!(parse(b"9[]"), Err(PacketError::UnknownType('9')));
        assert_eq!(parse(b"21234567890123456[]"), Err(PacketError::BadAckId));
        assert!(parse(b"0/\xff,{}").is_err());
    }

    #[test]
    fn encodes_answers() {
        assert_eq!(encode_connect_ok("s1"), b"40{\"sid\":\"s1\"}");
        assert_eq!(
            encode_connect_error("/", "unauthorized"),
            b"44{\"message\":\"unauthorized\"}"
        );
        assert_eq!(
            encode_connect_error("/x", "Invalid namespace"),
            b"44/x,{\"message\":\"Invalid namespace\"}"
        );
        assert_eq!(encode_ack(5, b"{\"ok\":true}"), b"435[{\"ok\":true}]");
        assert_eq!(encode_event("typing", b"{}"), b"42[\"typing\",{}]");
    }
}
