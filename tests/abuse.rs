//! Hostile and broken clients: each offender is refused or closed, a well-behaved client
//! on the same server keeps receiving, and the server's memory stays bounded.

mod common;

use std::time::{Duration, Instant};

use common::{token, Server, WsClient};
use corelay::transport::websocket::client_frame;
use serde_json::json;
use tungstenite::protocol::frame::coding::{Data, OpCode};

const SECOND: Duration = Duration::from_secs(1);

/// A member and a sender in room "watch": proves the server still serves others.
struct Watch {
    sender: WsClient,
    member: WsClient,
    sent: u64,
}

impl Watch {
    fn new(server: &Server) -> Watch {
        let mut sender = WsClient::connect(server.port, &token("sender", Some(&["*"])));
        let mut member = WsClient::connect(server.port, &token("member", Some(&["*"])));
        assert_eq!(
            member.emit_ack("join", json!({"room": "watch"}))["ok"],
            true
        );
        assert_eq!(
            sender.emit_ack("join", json!({"room": "watch"}))["ok"],
            true
        );
        Watch {
            sender,
            member,
            sent: 0,
        }
    }

    fn still_serving(&mut self) {
        self.sent += 1;
        let ack = self
            .sender
            .emit_ack("message", json!({"room": "watch", "text": "still here"}));
        assert_eq!(ack["offset"], self.sent, "{ack}");
        loop {
            let ev = self
                .member
                .next_event(2 * SECOND)
                .expect("member still receives");
            if ev[0] == "message" {
                assert_eq!(ev[1]["offset"], self.sent);
                return;
            }
        }
    }
}

fn offender(server: &Server) -> WsClient {
    WsClient::connect(server.port, &token("offender", Some(&["*"])))
}

#[test]
fn garbage_closes_only_the_offender() {
    let server = Server::start(&[]);
    let mut watch = Watch::new(&server);
    let mask = [9, 8, 7, 6];
    let cases: Vec<(&str, Vec<u8>, Option<u16>)> = vec![
        (
            "unknown Engine.IO type",
            client_frame(OpCode::Data(Data::Text), true, b"zzz", mask),
            Some(1002),
        ),
        (
            "empty text frame",
            client_frame(OpCode::Data(Data::Text), true, b"", mask),
            Some(1002),
        ),
        (
            "unknown Socket.IO type",
            client_frame(OpCode::Data(Data::Text), true, b"4zzz", mask),
            Some(1002),
        ),
        (
            "invalid JSON",
            client_frame(
                OpCode::Data(Data::Text),
                true,
                b"42[\"message\",{\"room\":",
                mask,
            ),
            Some(1002),
        ),
        (
            "event not an array",
            client_frame(OpCode::Data(Data::Text), true, b"42{\"a\":1}", mask),
            Some(1002),
        ),
        (
            "event name not a string",
            client_frame(OpCode::Data(Data::Text), true, b"42[1,2]", mask),
            Some(1002),
        ),
        (
            "binary frame out of nowhere",
            client_frame(OpCode::Data(Data::Binary), true, b"\x01\x02", mask),
            Some(1002),
        ),
        (
            "invalid UTF-8",
            client_frame(OpCode::Data(Data::Text), true, b"42[\"\xff\"]", mask),
            Some(1007),
        ),
        ("unmasked frame", b"\x81\x0242".to_vec(), Some(1002)),
        (
            "reserved opcode",
            client_frame(OpCode::Data(Data::Reserved(3)), true, b"x", mask),
            Some(1002),
        ),
        (
            "too many attachments",
            client_frame(OpCode::Data(Data::Text), true, b"4511-[\"m\"]", mask),
            Some(1002),
        ),
    ];
    for (what, bytes, code) in cases {
        let mut c = offender(&server);
        c.send_raw(&bytes);
        assert_eq!(c.expect_closed(3 * SECOND), code, "{what}");
        watch.still_serving();
    }
    // A 2 MB frame is refused from its header, without reading the body.
    let mut c = offender(&server);
    let big = client_frame(OpCode::Data(Data::Text), true, &vec![b'a'; 2_000_000], mask);
    c.send_raw(&big[..64 * 1024]);
    assert_eq!(c.expect_closed(3 * SECOND), Some(1009));
    watch.still_serving();
    // HTTP garbage before any upgrade.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    use std::io::{Read, Write};
    raw.write_all(b"\x16\x03\x01 hello?\r\n\r\n").unwrap();
    let mut answer = String::new();
    raw.set_read_timeout(Some(2 * SECOND)).unwrap();
    let _ = raw.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    watch.still_serving();
    assert!(server.metric("corelay_protocol_errors_total") >= 11.0);
}

#[test]
fn binary_arguments_are_refused_and_the_connection_stays() {
    let server = Server::start(&[]);
    let mut c = offender(&server);
    assert_eq!(c.emit_ack("join", json!({"room": "r"}))["ok"], true);
    c.send_text("451-7[\"message\",{\"room\":\"r\",\"text\":{\"_placeholder\":true,\"num\":0}}]");
    c.send_binary(b"\x00\x01\x02");
    let ack = c.wait_ack(7);
    assert_eq!(ack["error"]["code"], "bad_request", "{ack}");
    // Two attachments, the ack comes after the second.
    c.send_text(
        "452-8[\"message\",{\"_placeholder\":true,\"num\":0},{\"_placeholder\":true,\"num\":1}]",
    );
    c.send_binary(b"a");
    c.send_binary(b"b");
    assert_eq!(c.wait_ack(8)["error"]["code"], "bad_request");
    assert_eq!(
        c.emit_ack("message", json!({"room": "r", "text": "fine"}))["ok"],
        true
    );
    // A text packet while attachments are still expected is a protocol error.
    c.send_text("451-[\"message\",{\"_placeholder\":true,\"num\":0}]");
    c.send_text("42[\"message\",{}]");
    assert_eq!(c.expect_closed(3 * SECOND), Some(1002));
}

#[test]
fn ten_thousand_joins_are_capped_and_memory_stays_bounded() {
    let server = Server::start(&[]);
    let mut watch = Watch::new(&server);
    let rss_before = server.rss_kib();
    let mut c = offender(&server);
    let (mut ok, mut refused) = (0, 0);
    let mut id = 1000u64;
    for chunk in 0..20 {
        let first = id;
        for i in 0..500 {
            id += 1;
            let room = format!("room-{}", chunk * 500 + i);
            c.send_text(&format!("42{id}[\"join\",{{\"room\":\"{room}\"}}]"));
        }
        for ack_id in first + 1..=id {
            let ack = c.wait_ack(ack_id);
            if ack["ok"] == true {
                ok += 1;
            } else {
                assert_eq!(ack["error"]["code"], "forbidden", "{ack}");
                refused += 1;
            }
        }
    }
    assert_eq!((ok, refused), (100, 9_900));
    watch.still_serving();
    let rss_after = server.rss_kib();
    assert!(
        rss_after < rss_before + 20 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert_eq!(server.health()["rooms"], 101);
}

#[test]
fn unknown_events_are_acked_or_ignored() {
    let server = Server::start(&[]);
    let mut c = offender(&server);
    for i in 0..100 {
        c.send_text(&format!("42[\"noise{i}\",{{}}]"));
    }
    let ack = c.emit_ack("noise", json!({}));
    assert_eq!(ack["error"]["code"], "bad_request");
    assert!(c.events.is_empty());
}

#[test]
fn a_slow_consumer_never_slows_the_room() {
    let server = Server::start(&[
        ("CORELAY_LIMITS_SEND_RATE", "100000"),
        ("CORELAY_LIMITS_SEND_BURST", "100000"),
        ("CORELAY_LIMITS_OUTBOUND_QUEUE", "256"),
        ("CORELAY_LIMITS_OUTBOUND_QUEUE_BYTES", "262144"),
    ]);
    let mut fast = WsClient::connect(server.port, &token("fast", Some(&["*"])));
    let mut sender = WsClient::connect(server.port, &token("sender", Some(&["*"])));
    let mut slow = WsClient::connect(server.port, &token("slow", Some(&["*"])));
    for c in [&mut fast, &mut sender, &mut slow] {
        assert_eq!(c.emit_ack("join", json!({"room": "busy"}))["ok"], true);
    }
    // `slow` never reads again. Shrink its receive buffer so the kernel holds little.
    socket2::SockRef::from(&slow.stream)
        .set_recv_buffer_size(4096)
        .unwrap();
    let rss_before = server.rss_kib();
    let text = "x".repeat(2000);
    let total = 3000u64;
    let fast_reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let started = Instant::now();
        while (got.len() as u64) < total {
            match fast.next_event(5 * SECOND) {
                Ok(ev) if ev[0] == "message" => got.push(ev[1]["offset"].as_u64().unwrap()),
                Ok(_) => {}
                Err(e) => panic!("fast member stalled after {} messages: {e:?}", got.len()),
            }
        }
        (got, started.elapsed())
    });
    let started = Instant::now();
    // Pipeline sends in windows of 100 so the sender is not the bottleneck.
    let mut next_id = 0;
    for window in 0..(total / 100) {
        for _ in 0..100 {
            next_id += 1;
            sender.send_text(&format!(
                "42{next_id}[\"message\",{{\"room\":\"busy\",\"text\":\"{text}\"}}]"
            ));
        }
        for ack_id in window * 100 + 1..=next_id {
            assert_eq!(sender.wait_ack(ack_id)["ok"], true);
        }
    }
    let send_time = started.elapsed();
    let (got, fast_time) = fast_reader.join().unwrap();
    assert_eq!(
        got,
        (1..=total).collect::<Vec<_>>(),
        "fast member missed or reordered"
    );
    assert!(
        fast_time < 20 * SECOND,
        "fast member took {fast_time:?} (sending took {send_time:?})"
    );
    assert!(server.metric("corelay_slow_consumer_closes_total") >= 1.0);
    // The server dropped the slow connection while the slow client still has not read a
    // byte (`fast` ended with its thread): only the sender remains.
    let deadline = Instant::now() + 5 * SECOND;
    while server.health()["connections"] != 1 {
        assert!(
            Instant::now() < deadline,
            "slow consumer was not disconnected: {}",
            server.health()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(slow);
    let rss_after = server.rss_kib();
    assert!(
        rss_after < rss_before + 30 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

#[test]
fn connection_limit_answers_503_and_frees_up() {
    let server = Server::start(&[("CORELAY_LIMITS_MAX_CONNECTIONS", "3")]);
    let mut held: Vec<WsClient> = (0..3)
        .map(|i| offender_named(&server, &format!("u{i}")))
        .collect();
    let err = WsClient::handshake(server.port, "/socket.io/?EIO=4&transport=websocket")
        .err()
        .expect("a fourth session is refused");
    assert!(err.starts_with("HTTP/1.1 503"), "{err}");
    let polling = common::http(
        server.port,
        "GET",
        "/socket.io/?EIO=4&transport=polling",
        &[],
        b"",
    );
    assert_eq!(polling.status, 503);
    assert!(polling.text().contains("connection limit"));
    // Health and metrics still answer at capacity.
    assert_eq!(server.health()["connections"], 3);
    drop(held.pop());
    let deadline = Instant::now() + 5 * SECOND;
    while server.health()["connections"] != 2 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let _again = offender_named(&server, "u9");
}

#[test]
fn slow_request_heads_are_dropped() {
    use std::io::{Read, Write};
    let server = Server::start(&[("CORELAY_LIMITS_HANDSHAKE_TIMEOUT", "300ms")]);
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    raw.write_all(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    raw.set_read_timeout(Some(3 * SECOND)).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = raw.read(&mut buf).unwrap_or(0);
    assert_eq!(
        n, 0,
        "the server closes a connection whose head never completes"
    );
    assert!(started.elapsed() < 2 * SECOND, "{:?}", started.elapsed());
}

fn offender_named(server: &Server, name: &str) -> WsClient {
    WsClient::connect(server.port, &token(name, Some(&["*"])))
}
