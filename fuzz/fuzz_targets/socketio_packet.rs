//! Fuzzes the Socket.IO v5 packet parser (`corelay::protocol::socketio::parse`), fed the
//! bytes after the Engine.IO `4` of every message packet a client sends.
//!
//! Checks: no panic; a parsed packet announces at most `MAX_ATTACHMENTS` attachments
//! and none unless it is a binary packet; its namespace starts with `/`; its data is a
//! suffix of the input; an ack id has at most 15 digits. An EVENT's data then goes
//! through the chat event parser, as on the server.

#![no_main]

use corelay::chat::events::{parse_event, PayloadLimits};
use corelay::protocol::socketio::{parse, PacketKind, MAX_ATTACHMENTS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(p) = parse(bytes) else {
        return;
    };
    assert!(p.attachments <= MAX_ATTACHMENTS);
    if !p.kind.is_binary() {
        assert_eq!(p.attachments, 0);
    }
    assert!(p.namespace.starts_with('/'));
    assert!(bytes.ends_with(p.data));
    if let Some(id) = p.ack_id {
        assert!(id < 1_000_000_000_000_000);
    }
    if p.kind == PacketKind::Event && !p.data.is_empty() {
        let mut data = p.data.to_vec();
        let _ = parse_event(
            &mut data,
            PayloadLimits {
                max_text_bytes: 4096,
            },
        );
    }
});
