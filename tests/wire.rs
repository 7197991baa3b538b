//! The wire protocol, byte by byte, against the real binary with two shards:
//! handshake, ping/pong, CONNECT, acks and every error code.

mod common;

use std::time::Duration;

use common::{http_get, token, Server, WsClient};
use serde_json::json;
use tungstenite::protocol::frame::coding::Control;

const SECOND: Duration = Duration::from_secs(1);

#[test]
fn handshake_sends_the_open_packet() {
    let server = Server::start(&[]);
    let (_c, open) = WsClient::open(server.port);
    let sid = open["sid"].as_str().unwrap();
    assert_eq!(sid.len(), 20);
    assert_eq!(open["upgrades"], json!([]));
    assert_eq!(open["pingInterval"], 25000);
    assert_eq!(open["pingTimeout"], 20000);
    assert_eq!(open["maxPayload"], 1_000_000);
}

#[test]
fn bad_handshakes_get_engineio_errors() {
    let server = Server::start(&[]);
    let cases = [
        (
            "/socket.io/?EIO=3&transport=websocket",
            5,
            "Unsupported protocol version",
        ),
        (
            "/socket.io/?transport=websocket",
            5,
            "Unsupported protocol version",
        ),
        (
            "/socket.io/?EIO=4&transport=carrier-pigeon",
            0,
            "Transport unknown",
        ),
        ("/socket.io/?EIO=4", 0, "Transport unknown"),
    ];
    for (path, code, message) in cases {
        // Both as a WebSocket upgrade and as a plain GET: 400 before any upgrade.
        let err = WsClient::handshake(server.port, path)
            .err()
            .expect("refused");
        assert!(err.starts_with("HTTP/1.1 400"), "{path}: {err}");
        let (status, body) = http_get(server.port, path);
        assert_eq!(status, 400, "{path}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v, json!({"code": code, "message": message}), "{path}");
    }
    // A websocket transport request without the upgrade headers.
    let (status, body) = http_get(server.port, "/socket.io/?EIO=4&transport=websocket");
    assert_eq!(status, 400);
    assert!(body.contains("\"code\":3"), "{body}");
    assert_eq!(http_get(server.port, "/nope").0, 404);
}

#[test]
fn server_pings_and_closes_on_missed_pong() {
    let server = Server::start(&[
        ("CORELAY_ENGINEIO_PING_INTERVAL", "300"),
        ("CORELAY_ENGINEIO_PING_TIMEOUT", "300"),
    ]);
    let (mut c, open) = WsClient::open(server.port);
    assert_eq!(open["pingInterval"], 300);
    c.answer_pings = false;
    for _ in 0..3 {
        assert_eq!(c.recv_text(2 * SECOND).unwrap(), "2");
        c.send_text("3");
    }
    // Now stay silent: the session must end within pingTimeout (+ sweep slack).
    assert_eq!(c.recv_text(2 * SECOND).unwrap(), "2");
    let started = std::time::Instant::now();
    c.expect_closed(3 * SECOND);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn websocket_ping_gets_pong_and_engineio_ping_probe_is_answered() {
    let server = Server::start(&[]);
    let (mut c, _) = WsClient::open(server.port);
    c.send_control(Control::Ping, b"hi");
    let f = c.recv_frame(2 * SECOND).unwrap();
    assert_eq!((f.opcode, f.payload.as_slice()), (0xA, &b"hi"[..]));
    c.send_text("2probe");
    assert_eq!(c.recv_text(2 * SECOND).unwrap(), "3probe");
}

#[test]
fn connect_with_token_and_refusals() {
    let server = Server::start(&[]);
    let (mut c, _) = WsClient::open(server.port);
    c.send_text("40{\"token\":\"not-a-jwt\"}");
    let reply = c.recv_text(2 * SECOND).unwrap();
    assert!(
        reply.starts_with("44{\"message\":\"unauthorized\""),
        "{reply}"
    );
    // Still open: a second CONNECT with a good token works.
    c.send_text(&format!(
        "40{{\"token\":\"{}\"}}",
        token("alice", Some(&["*"]))
    ));
    assert!(c.recv_text(2 * SECOND).unwrap().starts_with("40{\"sid\":"));
    c.send_text("40/admin,{}");
    assert_eq!(
        c.recv_text(2 * SECOND).unwrap(),
        "44/admin,{\"message\":\"Invalid namespace\"}"
    );
    let (mut none, _) = WsClient::open(server.port);
    none.send_text("40");
    assert!(none
        .recv_text(2 * SECOND)
        .unwrap()
        .starts_with("44{\"message\":\"unauthorized\""));
}

#[test]
fn connect_timeout_closes_a_silent_session() {
    let server = Server::start(&[("CORELAY_ENGINEIO_CONNECT_TIMEOUT", "500ms")]);
    let (mut c, _) = WsClient::open(server.port);
    c.expect_closed(3 * SECOND);
}

#[test]
fn dev_mode_accepts_a_user_name() {
    let server = Server::start_with(&[], &["--store", "memory"], false);
    let (mut c, _) = WsClient::open(server.port);
    c.send_text("40{\"user\":\"alice\"}");
    assert!(c.recv_text(2 * SECOND).unwrap().starts_with("40{\"sid\":"));
    let ack = c.emit_ack("join", json!({"room": "anything"}));
    assert_eq!(ack["ok"], true);
    let (mut anon, _) = WsClient::open(server.port);
    anon.send_text("40{}");
    assert!(anon
        .recv_text(2 * SECOND)
        .unwrap()
        .starts_with("44{\"message\":\"unauthorized\""));
}

#[test]
fn dev_mode_refuses_a_public_address() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_corelay"))
        .args(["serve", "--listen", "0.0.0.0:0", "--store", "memory"])
        .env_remove("CORELAY_JWT_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dev mode"), "{err}");
}

#[test]
fn start_errors_are_clear() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_corelay"));
        cmd.arg("serve")
            .args(args)
            .env("CORELAY_JWT_SECRET", common::SECRET);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--store",
            "memory",
        ],
        &[],
    );
    assert!(err.contains("port already in use"), "{err}");
    let err = run(
        &["--store", "memory"],
        &[("CORELAY_LIMITS_MAX_TEXT_BYTES", "lots")],
    );
    assert!(err.contains("invalid configuration"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[server]\nshards = 0\n").unwrap();
    let err = run(&["--config", cfg.to_str().unwrap()], &[]);
    assert!(err.contains("server.shards"), "{err}");
    let err = run(&["--config", "/nonexistent/corelay.toml"], &[]);
    assert!(err.contains("cannot read config file"), "{err}");
}

#[test]
fn every_error_code_is_reachable() {
    let server = Server::start(&[
        ("CORELAY_LIMITS_SEND_RATE", "1"),
        ("CORELAY_LIMITS_SEND_BURST", "3"),
    ]);
    let mut c = WsClient::connect(server.port, &token("bob", Some(&["team-*"])));
    let code = |v: serde_json::Value| v["error"]["code"].as_str().unwrap().to_string();

    assert_eq!(
        code(c.emit_ack("join", json!({"room": "bad room!"}))),
        "bad_request"
    );
    assert_eq!(code(c.emit_ack("join", json!({}))), "bad_request");
    assert_eq!(
        code(c.emit_ack("frobnicate", json!({"room": "x"}))),
        "bad_request"
    );
    assert_eq!(
        code(c.emit_ack("join", json!({"room": "other"}))),
        "forbidden"
    );
    assert_eq!(
        code(c.emit_ack("message", json!({"room": "team-1", "text": "hi"}))),
        "not_joined"
    );
    assert_eq!(
        code(c.emit_ack("history", json!({"room": "team-1"}))),
        "not_joined"
    );
    assert_eq!(
        code(c.emit_ack("presence", json!({"room": "team-1"}))),
        "not_joined"
    );
    let joined = c.emit_ack("join", json!({"room": "team-1"}));
    assert_eq!(joined, json!({"ok": true, "room": "team-1", "offset": 0}));
    assert_eq!(
        code(c.emit_ack(
            "message",
            json!({"room": "team-1", "text": "x".repeat(4097)})
        )),
        "too_large"
    );
    assert_eq!(
        code(c.emit_ack(
            "history",
            json!({"room": "team-1", "before": 1, "after": 1})
        )),
        "bad_request"
    );
    assert_eq!(
        code(c.emit_ack(
            "message",
            json!({"room": "team-1", "text": "a", "cid": "c".repeat(65)})
        )),
        "bad_request"
    );
    // Burst of 3, then rate limited.
    let mut results = Vec::new();
    for i in 0..6 {
        results.push(c.emit_ack(
            "message",
            json!({"room": "team-1", "text": format!("m{i}")}),
        ));
    }
    assert!(results[0]["ok"] == true, "{results:?}");
    assert!(
        results.iter().any(|r| r["error"]["code"] == "rate_limited"),
        "{results:?}"
    );
    // The connection is still fine.
    let p = c.emit_ack("presence", json!({"room": "team-1"}));
    assert_eq!(p, json!({"ok": true, "users": [{"user": "bob"}]}));
    // A room token admits to a room outside the claim; a wrong one is forbidden.
    let auth = corelay::auth::Authenticator::new(Some(common::SECRET));
    let good = auth.mint_room_token("bob", "other", 60).unwrap();
    let wrong_user = auth.mint_room_token("eve", "other", 60).unwrap();
    assert_eq!(
        code(c.emit_ack("join", json!({"room": "other", "token": wrong_user}))),
        "forbidden"
    );
    assert_eq!(
        c.emit_ack("join", json!({"room": "other", "token": good}))["ok"],
        true
    );
}

#[test]
fn leaving_an_unjoined_room_and_unacked_unknown_events_keep_the_connection() {
    let server = Server::start(&[]);
    let mut c = WsClient::connect(server.port, &token("u", Some(&["*"])));
    let v = c.emit_ack("leave", json!({"room": "never-joined"}));
    assert_eq!(v, json!({"ok": true}));
    // An unknown event without an ack id is ignored; the connection stays up.
    c.send_text("42[\"mystery\",{}]");
    assert_eq!(c.emit_ack("join", json!({"room": "r"}))["ok"], true);
}

#[test]
fn messages_flow_between_shards_with_acks_in_offset_order() {
    let server = Server::start(&[
        ("CORELAY_LIMITS_SEND_RATE", "1000"),
        ("CORELAY_LIMITS_SEND_BURST", "1000"),
    ]);
    // Connect until there is a client on each shard.
    let mut clients: Vec<(usize, WsClient, String)> = Vec::new();
    let mut before = server.connections_per_shard();
    let mut tries = 0;
    // Extra connections stay open: closing them would make the per-shard counts fall
    // while we watch them rise.
    let mut extras = Vec::new();
    while !(clients.iter().any(|(s, _, _)| *s == 0) && clients.iter().any(|(s, _, _)| *s == 1)) {
        tries += 1;
        let name = format!("u{tries}");
        let c = WsClient::connect(server.port, &token(&name, Some(&["*"])));
        let after = server.connections_per_shard();
        let shard = (0..2).find(|&i| after[i] > before[i]).unwrap();
        before = after;
        if clients.iter().any(|(s, _, _)| *s == shard) {
            extras.push(c);
            continue;
        }
        clients.push((shard, c, name));
        assert!(
            before.iter().sum::<u64>() < 60,
            "could not reach both shards"
        );
    }
    let (_, mut a, a_name) = clients.remove(0);
    let (_, mut b, _) = clients.remove(0);
    assert_eq!(b.emit_ack("join", json!({"room": "lobby"}))["ok"], true);
    assert_eq!(a.emit_ack("join", json!({"room": "lobby"}))["ok"], true);
    // b sees a's presence.
    let ev = b.next_event(2 * SECOND).unwrap();
    assert_eq!(ev[0], "presence");
    assert_eq!(ev[1]["online"], true);
    for i in 1..=50u64 {
        let ack = a.emit_ack(
            "message",
            json!({"room": "lobby", "text": format!("m{i}"), "cid": format!("c{i}")}),
        );
        assert_eq!(ack["offset"], i, "{ack}");
    }
    for i in 1..=50u64 {
        let ev = b.next_event(2 * SECOND).unwrap();
        assert_eq!(ev[0], "message");
        assert_eq!(ev[1]["offset"], i);
        assert_eq!(ev[1]["text"], format!("m{i}"));
        assert_eq!(ev[1]["cid"], format!("c{i}"));
    }
    // The sender got no copy of its own messages.
    assert!(a.events.iter().all(|e| e[0] != "message"), "{:?}", a.events);
    // A retried cid returns the first ack and stores nothing.
    let again = a.emit_ack(
        "message",
        json!({"room": "lobby", "text": "dup", "cid": "c7"}),
    );
    assert_eq!(again["offset"], 7);
    let hist = a.emit_ack("history", json!({"room": "lobby", "limit": 3}));
    let offsets: Vec<u64> = hist["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![48, 49, 50]);
    assert!(
        b.next_event(Duration::from_millis(300)).is_err(),
        "duplicate delivered"
    );
    // Typing goes to b only.
    a.send_text("42[\"typing\",{\"room\":\"lobby\"}]");
    let ev = b.next_event(2 * SECOND).unwrap();
    assert_eq!(ev, json!(["typing", {"room": "lobby", "user": a_name}]));
    assert!(
        a.next_event(Duration::from_millis(200)).is_err(),
        "typing echoed to its sender"
    );
    // join with since replays exactly what was missed.
    let rejoin = b.emit_ack("join", json!({"room": "lobby", "since": 45}));
    let missed: Vec<u64> = rejoin["missed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(missed, vec![46, 47, 48, 49, 50]);
    assert_eq!(rejoin["truncated"], false);
    assert_eq!(rejoin["offset"], 50);
}
