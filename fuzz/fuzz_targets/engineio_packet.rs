//! Fuzzes Engine.IO v4 packet framing (`corelay::protocol::engineio`) the way both
//! transports feed it: a WebSocket text frame is one packet; a long-polling POST body
//! is packets joined by the record separator `\x1e`, binary ones as `b<base64>`.
//!
//! The polling split lives inside `transport::polling::post` (not public: it needs a
//! shard and a session), so this target mirrors it: split on `\x1e`, base64-decode `b`
//! packets, `parse_text` the others, and hand message packets (`4…`) to the Socket.IO
//! parser as the server does.
//!
//! Checks: no panic; `parse_text` keeps the data a suffix of the packet and its type
//! digit round-trips through `PacketType::as_byte`.

#![no_main]

use base64::Engine as _;
use corelay::protocol::engineio::{parse_text, PacketType};
use corelay::protocol::socketio;
use libfuzzer_sys::fuzz_target;

/// The record separator between packets in a polling payload.
const SEPARATOR: u8 = 0x1e;

fn one_packet(packet: &[u8]) {
    let Some(p) = parse_text(packet) else {
        assert!(packet.is_empty() || PacketType::from_byte(packet[0]).is_none());
        return;
    };
    assert_eq!(p.kind.as_byte(), packet[0]);
    assert_eq!(PacketType::from_byte(packet[0]), Some(p.kind));
    assert_eq!(p.data, &packet[1..]);
    if p.kind == PacketType::Message {
        let _ = socketio::parse(p.data);
    }
}

fuzz_target!(|body: &[u8]| {
    // As one WebSocket text frame.
    one_packet(body);
    // As a polling POST body.
    for packet in body.split(|&b| b == SEPARATOR) {
        match packet.first() {
            Some(b'b') => {
                if let Ok(data) = base64::engine::general_purpose::STANDARD.decode(&packet[1..]) {
                    // A binary packet: a Socket.IO attachment, kept as is by the server.
                    let _ = data.len();
                }
            }
            _ => one_packet(packet),
        }
    }
});
