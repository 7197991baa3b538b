//! Codec microbenchmarks: the per-message CPU cost on the hot path, without sockets.
//!
//! - `decode/eio_sio_packet`: Engine.IO `parse_text` + Socket.IO `parse` of a typical
//!   client packet `42<ack>["message",{"room","text"(100 chars),"cid"}]`.
//! - `event_payload/simd_json` vs `event_payload/serde_json`: parsing that packet's JSON
//!   into a message request — corelay's `parse_event` (simd-json, parses in place, so
//!   each iteration copies the bytes into a reused buffer first) against an equivalent
//!   serde_json path (`serde_json::Value`, then the same room/text/cid extraction and
//!   checks). The serde path reads the bytes directly; the simd path also pays the
//!   ~150-byte restoring memcpy (as the server's own buffer is consumed only once).
//! - `encode/message_frame`: what the room's home shard does once per delivered message:
//!   `write_message_json` inside a `42["message",…]` wrapper (reused buffer), then
//!   `text_frame`.
//! - `encode/ack_frame`: the sender's ack: `message_ack_json` + `encode_ack` + `text_frame`.
//! - `ws_read/masked_text_frame`: one masked client text frame read by `FrameReader`
//!   from an in-memory `futures::io::Cursor` (header parse, unmask, UTF-8 check, copy
//!   out); the reader is reused across iterations, as on a connection.
//!
//! Run: `cargo bench -p corelay --bench codec` (add `-- --warm-up-time 1
//! --measurement-time 3` for a shorter run).

use std::hint::black_box;

use corelay::chat::events::{
    message_ack_json, parse_event, validate_room, write_message_json, ChatRequest, Parsed,
    PayloadLimits,
};
use corelay::config::LimitsConfig;
use corelay::protocol::{engineio, socketio};
use corelay::store::StoredMessage;
use corelay::transport::websocket::{client_frame, text_frame, FrameReader, Message};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::executor::block_on;
use futures::io::Cursor;
use tungstenite::protocol::frame::coding::{Data, OpCode};

/// 100 characters of chat text.
const TEXT: &str = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat, 0123456789 abcdefg";

/// A typical client `message` packet as it arrives in a WebSocket text frame.
fn client_packet() -> Vec<u8> {
    assert_eq!(TEXT.len(), 100);
    format!(r#"4217["message",{{"room":"lobby","text":"{TEXT}","cid":"c-01J9ZQ3K7X4M2N8P"}}]"#)
        .into_bytes()
}

/// The JSON data of that packet (what `parse_event` receives).
fn event_json() -> Vec<u8> {
    let packet = client_packet();
    let eio = engineio::parse_text(&packet).unwrap();
    socketio::parse(eio.data).unwrap().data.to_vec()
}

/// A delivered message as the store returns it.
fn stored_message() -> StoredMessage {
    StoredMessage {
        room: "lobby".to_owned(),
        offset: 123_456,
        id: "01J9ZQ3K7X4M2N8PQRSTVWXYZ0".to_owned(),
        user: "user-4711".to_owned(),
        text: TEXT.to_owned(),
        ts: 1_760_000_000_000,
        cid: Some("c-01J9ZQ3K7X4M2N8P".to_owned()),
    }
}

fn limits() -> PayloadLimits {
    PayloadLimits {
        max_text_bytes: LimitsConfig::default().max_text_bytes,
    }
}

/// The serde_json equivalent of `parse_event` for the fields a `message` uses: the same
/// shape checks, room validation, text limit and cid bounds, owned strings out.
fn parse_message_serde(data: &[u8], limits: PayloadLimits) -> Option<ChatRequest> {
    let value: serde_json::Value = serde_json::from_slice(data).ok()?;
    let args = value.as_array()?;
    let name = args.first()?.as_str()?;
    if name != "message" {
        return None;
    }
    let obj = args.get(1)?.as_object()?;
    let field = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let room = field("room")?.as_str()?;
    validate_room(room).ok()?;
    let text = field("text")?.as_str()?;
    if text.len() > limits.max_text_bytes {
        return None;
    }
    let cid = match field("cid") {
        None => None,
        Some(v) => Some(v.as_str()?),
    };
    if cid.is_some_and(|c| c.is_empty() || c.len() > 64) {
        return None;
    }
    Some(ChatRequest::Message {
        room: room.to_string(),
        text: text.to_string(),
        cid: cid.map(str::to_string),
    })
}

fn bench_decode(c: &mut Criterion) {
    let packet = client_packet();
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("eio_sio_packet", |b| {
        b.iter(|| {
            let eio = engineio::parse_text(black_box(&packet)).unwrap();
            let sio = socketio::parse(eio.data).unwrap();
            black_box((sio.kind, sio.ack_id, sio.data.len()))
        })
    });
    group.finish();
}

fn bench_event_payload(c: &mut Criterion) {
    let json = event_json();
    let limits = limits();

    // Both paths must agree before we compare their speed.
    let simd = parse_event(&mut json.clone(), limits).unwrap();
    let serde = parse_message_serde(&json, limits).unwrap();
    assert_eq!(simd, Parsed::Request(serde));

    let mut group = c.benchmark_group("event_payload");
    group.throughput(Throughput::Bytes(json.len() as u64));
    let mut scratch = json.clone();
    group.bench_function("simd_json", |b| {
        b.iter(|| {
            // simd-json parses in place: restore the input each time (one memcpy).
            scratch.copy_from_slice(&json);
            black_box(parse_event(black_box(&mut scratch), limits).unwrap())
        })
    });
    group.bench_function("serde_json", |b| {
        b.iter(|| black_box(parse_message_serde(black_box(&json), limits).unwrap()))
    });
    group.finish();
}

fn bench_encode(c: &mut Criterion) {
    let m = stored_message();
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1));

    // As the home shard does it: one reused payload buffer per delivery batch.
    let mut payload = Vec::with_capacity(512);
    group.bench_function("message_frame", |b| {
        b.iter(|| {
            payload.clear();
            payload.extend_from_slice(b"42[\"message\",");
            write_message_json(&mut payload, black_box(&m));
            payload.push(b']');
            black_box(text_frame(&payload))
        })
    });
    group.bench_function("ack_frame", |b| {
        b.iter(|| {
            let body = message_ack_json(black_box(&m));
            black_box(text_frame(&socketio::encode_ack(17, &body)))
        })
    });
    group.finish();
}

fn bench_ws_read(c: &mut Criterion) {
    let packet = client_packet();
    let frame = client_frame(
        OpCode::Data(Data::Text),
        true,
        &packet,
        [0x37, 0xfa, 0x21, 0x3d],
    );
    let max_message = 1 << 20;

    let mut group = c.benchmark_group("ws_read");
    group.throughput(Throughput::Bytes(frame.len() as u64));
    let mut reader = FrameReader::new(max_message, &[]);
    group.bench_function("masked_text_frame", |b| {
        b.iter(|| {
            let mut io = Cursor::new(black_box(frame.as_slice()));
            match block_on(reader.next(&mut io)).unwrap() {
                Message::Text(t) => black_box(t),
                other => panic!("unexpected {other:?}"),
            }
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_decode,
    bench_event_payload,
    bench_encode,
    bench_ws_read
);
criterion_main!(benches);
