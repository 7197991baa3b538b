//! Engine.IO long-polling and the upgrade to WebSocket, byte by byte, with requests
//! spread over both shards.

mod common;

use std::time::Duration;

use common::{
    chunked, http, parse_answers, raw_exchange, token, HttpAnswer, PollClient, Server, WsClient,
};
use serde_json::{json, Value};

fn ack_of(packets: &[String], id: u64) -> Option<Value> {
    let prefix = format!("43{id}");
    packets.iter().find_map(|p| {
        let rest = p.strip_prefix(&prefix)?;
        let v: Value = serde_json::from_str(rest).ok()?;
        Some(v[0].clone())
    })
}

fn connect(port: u16, user: &str) -> PollClient {
    let (c, _) = PollClient::open(port);
    let auth = format!("40{{\"token\":\"{}\"}}", token(user, Some(&["*"])));
    assert_eq!(c.post(&[&auth]).text(), "ok");
    let packets = c.get_packets();
    assert!(packets[0].starts_with("40{\"sid\":"), "{packets:?}");
    c
}

#[test]
fn handshake_post_get_and_acks() {
    let server = Server::start(&[]);
    let (c, open) = PollClient::open(server.port);
    assert_eq!(open["upgrades"], json!(["websocket"]));
    assert_eq!(open["pingInterval"], 25000);
    let auth = format!("40{{\"token\":\"{}\"}}", token("pat", Some(&["*"])));
    let a = c.post(&[&auth, "421[\"join\",{\"room\":\"r\"}]"]);
    assert_eq!((a.status, a.text()), (200, "ok".to_string()));
    assert!(a.head.contains("text/plain"));
    let mut packets = c.get_packets();
    if packets.len() < 2 {
        packets.extend(c.get_packets());
    }
    assert!(packets[0].starts_with("40{\"sid\":"));
    assert_eq!(
        ack_of(&packets, 1),
        Some(json!({"ok": true, "room": "r", "offset": 0}))
    );
}

#[test]
fn sessions_work_whichever_shard_takes_each_request() {
    let server = Server::start(&[]);
    let mut clients = Vec::new();
    for i in 0..12 {
        clients.push(connect(server.port, &format!("user{i}")));
    }
    let per_shard = server.connections_per_shard();
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "sessions on both shards: {per_shard:?}"
    );
    // Every session, whatever shard its requests land on, joins and chats.
    for c in &clients {
        assert_eq!(c.post(&["427[\"join\",{\"room\":\"poll\"}]"]).text(), "ok");
        let packets = c.get_packets();
        assert_eq!(ack_of(&packets, 7).unwrap()["ok"], true, "{packets:?}");
    }
    let sender = &clients[0];
    assert_eq!(
        sender
            .post(&["428[\"message\",{\"room\":\"poll\",\"text\":\"hello\"}]"])
            .text(),
        "ok"
    );
    for c in &clients[1..] {
        let mut seen = Vec::new();
        while !seen.iter().any(|p: &String| p.contains("hello")) {
            seen.extend(c.get_packets());
            assert!(seen.len() < 50, "{seen:?}");
        }
    }
}

#[test]
fn overlapping_gets_close_the_session() {
    let server = Server::start(&[]);
    let c = connect(server.port, "dup");
    let port = server.port;
    let sid = c.sid.clone();
    let waiting = std::thread::spawn(move || {
        http(
            port,
            "GET",
            &format!("/socket.io/?EIO=4&transport=polling&sid={sid}"),
            &[],
            b"",
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    let second = c.get();
    assert_eq!(second.status, 400, "{}", second.text());
    let first = waiting.join().unwrap();
    assert_eq!(first.status, 200);
    assert!(
        first.text().ends_with('1'),
        "the waiting GET gets the close packet: {}",
        first.text()
    );
    let after = c.get();
    assert_eq!(after.status, 400);
    assert!(after.text().contains("\"code\":1"), "{}", after.text());
}

#[test]
fn payload_limits_and_bad_requests() {
    let server = Server::start(&[]);
    let c = connect(server.port, "big");
    let huge = format!(
        "42[\"message\",{{\"room\":\"r\",\"text\":\"{}\"}}]",
        "x".repeat(1_100_000)
    );
    assert_eq!(c.post(&[&huge]).status, 413);
    assert_eq!(c.get().status, 400, "the session is gone after a 413");

    let a = http(
        server.port,
        "GET",
        "/socket.io/?EIO=3&transport=polling",
        &[],
        b"",
    );
    assert_eq!(a.status, 400);
    assert_eq!(
        a.text(),
        r#"{"code":5,"message":"Unsupported protocol version"}"#
    );
    let a = http(
        server.port,
        "POST",
        "/socket.io/?EIO=4&transport=polling",
        &[],
        b"40",
    );
    assert_eq!(a.text(), r#"{"code":2,"message":"Bad handshake method"}"#);
    let a = http(
        server.port,
        "GET",
        "/socket.io/?EIO=4&transport=polling&sid=00nosuchsessionxxxxx",
        &[],
        b"",
    );
    assert_eq!(a.text(), r#"{"code":1,"message":"Session ID unknown"}"#);
    let a = http(
        server.port,
        "GET",
        "/socket.io/?EIO=4&transport=polling&sid=zz",
        &[],
        b"",
    );
    assert_eq!(a.text(), r#"{"code":1,"message":"Session ID unknown"}"#);
    // Garbage packets close the session.
    let c = connect(server.port, "garbage");
    assert_eq!(c.post(&["9garbage"]).status, 400);
    assert_eq!(c.get().status, 400, "the session ended with the bad packet");
}

#[test]
fn binary_packets_over_polling_are_parsed_and_refused() {
    let server = Server::start(&[]);
    let c = connect(server.port, "bin");
    assert_eq!(c.post(&["421[\"join\",{\"room\":\"r\"}]"]).text(), "ok");
    let _ = c.get_packets();
    let a = c.post(&[
        "451-2[\"message\",{\"_placeholder\":true,\"num\":0}]",
        "bAQID",
    ]);
    assert_eq!(a.text(), "ok");
    let packets = c.get_packets();
    assert_eq!(
        ack_of(&packets, 2).unwrap()["error"]["code"],
        "bad_request",
        "{packets:?}"
    );
}

#[test]
fn upgrade_to_websocket() {
    let server = Server::start(&[]);
    let c = connect(server.port, "up");
    assert_eq!(c.post(&["421[\"join\",{\"room\":\"u\"}]"]).text(), "ok");
    let _ = c.get_packets();
    // A GET waits while the WebSocket is probed.
    let port = server.port;
    let sid = c.sid.clone();
    let pending = std::thread::spawn(move || {
        http(
            port,
            "GET",
            &format!("/socket.io/?EIO=4&transport=polling&sid={sid}"),
            &[],
            b"",
        )
    });
    std::thread::sleep(Duration::from_millis(200));
    let mut ws = WsClient::handshake(
        server.port,
        &format!("/socket.io/?EIO=4&transport=websocket&sid={}", c.sid),
    )
    .unwrap();
    ws.send_text("2probe");
    assert_eq!(ws.recv_text(Duration::from_secs(2)).unwrap(), "3probe");
    let released = pending.join().unwrap();
    assert_eq!(
        released.text(),
        "6",
        "the pending GET is released with a noop"
    );
    ws.send_text("5");
    // Now the session speaks over the WebSocket.
    let ack = ws.emit_ack("message", json!({"room": "u", "text": "over ws"}));
    assert_eq!(ack["offset"], 1);
    assert_eq!(c.get().status, 400, "polling is refused after the upgrade");
    // A second WebSocket for the session is upgraded and closed at once.
    let mut second = WsClient::handshake(
        server.port,
        &format!("/socket.io/?EIO=4&transport=websocket&sid={}", c.sid),
    )
    .expect("the second WebSocket's handshake completes");
    second.answer_pings = false;
    assert_eq!(second.expect_closed(Duration::from_secs(2)), Some(1000));
    assert_eq!(
        ws.emit_ack("history", json!({"room": "u"}))["messages"][0]["text"],
        "over ws"
    );
}

#[test]
fn cors_for_allowed_origins_only() {
    let server = Server::start(&[("CORELAY_SERVER_CORS_ORIGINS", "http://app.example")]);
    let ok = http(
        server.port,
        "GET",
        "/socket.io/?EIO=4&transport=polling",
        &[("Origin", "http://app.example")],
        b"",
    );
    assert!(
        ok.head
            .contains("Access-Control-Allow-Origin: http://app.example"),
        "{}",
        ok.head
    );
    assert!(ok.head.contains("Access-Control-Allow-Credentials: true"));
    let other = http(
        server.port,
        "GET",
        "/socket.io/?EIO=4&transport=polling",
        &[("Origin", "http://evil.example")],
        b"",
    );
    assert!(
        !other.head.contains("Access-Control-Allow-Origin"),
        "{}",
        other.head
    );
    let pre = http(
        server.port,
        "OPTIONS",
        "/socket.io/?EIO=4&transport=polling",
        &[
            ("Origin", "http://app.example"),
            ("Access-Control-Request-Method", "POST"),
        ],
        b"",
    );
    assert_eq!(pre.status, 204);
    assert!(
        pre.head
            .contains("Access-Control-Allow-Methods: GET, POST, OPTIONS"),
        "{}",
        pre.head
    );
    // None by default.
    let plain = Server::start(&[]);
    let a = http(
        plain.port,
        "GET",
        "/socket.io/?EIO=4&transport=polling",
        &[("Origin", "http://app.example")],
        b"",
    );
    assert!(!a.head.contains("Access-Control-Allow-Origin"));
}

fn chunked_post_head(sid: &str, connection: &str) -> Vec<u8> {
    format!(
        "POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain;charset=UTF-8\r\nTransfer-Encoding: chunked\r\nConnection: {connection}\r\n\r\n"
    )
    .into_bytes()
}

#[test]
fn chunked_polling_posts() {
    let server = Server::start(&[]);
    let port = server.port;
    let timeout = Duration::from_secs(5);
    // Several sessions, so that requests land on the owning shard and on the other one.
    for i in 0..4 {
        let c = connect(port, &format!("chunky{i}"));
        // A chunked POST, cut in pieces the server reads apart, then a GET on the same
        // connection.
        let mut raw = chunked_post_head(&c.sid, "keep-alive");
        let head_len = raw.len();
        raw.extend(chunked(b"421[\"join\",{\"room\":\"chunks\"}]", 7));
        let get = format!(
            "GET /socket.io/?EIO=4&transport=polling&sid={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            c.sid
        );
        let cuts = [head_len - 3, head_len + 2, head_len + 20, raw.len() - 4];
        raw.extend_from_slice(get.as_bytes());
        let answers = raw_exchange(port, &raw, &cuts, timeout);
        assert_eq!(answers.len(), 2, "two answers on the connection");
        assert_eq!(
            (answers[0].status, answers[0].text()),
            (200, "ok".to_string())
        );
        assert_eq!(answers[1].status, 200);
        let packets: Vec<String> = answers[1]
            .text()
            .split('\u{1e}')
            .map(str::to_string)
            .collect();
        assert_eq!(ack_of(&packets, 1).unwrap()["ok"], true, "{packets:?}");

        // A malformed chunk: 400 (Engine.IO's "Bad request"), the connection closes, the
        // session lives on.
        for bad in [
            b"zz\r\n42\r\n0\r\n\r\n".as_slice(),
            b"2\r\n42XX0\r\n\r\n",
            b"2;a b\r\n42\r\n0\r\n\r\n",
            b"2\r\n42\r\n0\r\nno colon here\r\n\r\n",
        ] {
            let mut raw = chunked_post_head(&c.sid, "keep-alive");
            raw.extend_from_slice(bad);
            let answers = raw_exchange(port, &raw, &[], timeout);
            assert_eq!(answers.len(), 1, "{:?}", String::from_utf8_lossy(bad));
            assert_eq!(answers[0].status, 400);
            assert_eq!(answers[0].text(), r#"{"code":3,"message":"Bad request"}"#);
            assert!(
                answers[0].head.contains("Connection: close"),
                "{}",
                answers[0].head
            );
        }
        // A body cut short by the client: no answer, nothing hangs, the session lives on.
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(timeout)).unwrap();
        std::io::Write::write_all(&mut s, &chunked_post_head(&c.sid, "close")).unwrap();
        std::io::Write::write_all(&mut s, b"5\r\n42[").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut s, &mut rest).unwrap();
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
        assert_eq!(
            c.post(&["429[\"leave\",{\"room\":\"chunks\"}]"]).text(),
            "ok"
        );
        assert_eq!(ack_of(&c.get_packets(), 9).unwrap()["ok"], true);

        // Over maxPayload: the same 413 as an oversized Content-Length body, and the
        // session ends.
        let mut raw = chunked_post_head(&c.sid, "keep-alive");
        let huge = format!(
            "42[\"message\",{{\"room\":\"r\",\"text\":\"{}\"}}]",
            "x".repeat(1_100_000)
        );
        raw.extend(chunked(huge.as_bytes(), 64 * 1024));
        let answers = raw_exchange(port, &raw, &[], timeout);
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].status, 413);
        assert_eq!(c.get().status, 400, "the session is gone after a 413");
    }
}

/// One request on a new TCP connection with `Connection: close` (a chunked body when
/// `chunked_body`); the server must answer with `Connection: close` and close its side.
fn fresh_request(
    port: u16,
    method: &str,
    path: &str,
    body: &[u8],
    chunked_body: bool,
) -> HttpAnswer {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut raw =
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n").into_bytes();
    if method == "POST" && chunked_body {
        raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
        raw.extend(chunked(body, 9));
    } else if method == "POST" {
        raw.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        raw.extend_from_slice(body);
    } else {
        raw.extend_from_slice(b"\r\n");
    }
    s.write_all(&raw).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .unwrap_or_else(|e| panic!("the server keeps the connection open: {e}"));
    let mut answers = parse_answers(&got);
    assert_eq!(answers.len(), 1, "{}", String::from_utf8_lossy(&got));
    let answer = answers.remove(0);
    assert!(answer.head.contains("Connection: close"), "{}", answer.head);
    answer
}

#[test]
fn every_request_on_a_fresh_connection_with_connection_close() {
    let server = Server::start_sharded(2, &[], &["--store", "memory"], true);
    let port = server.port;
    // Sessions until both shards own one: handshakes, like every request here, land
    // wherever the kernel puts a new connection, so the requests below reach the owning
    // shard and the other one (handed over) alike.
    let mut sids: Vec<String> = Vec::new();
    while !(sids.iter().any(|s| s.starts_with("00")) && sids.iter().any(|s| s.starts_with("01"))) {
        assert!(sids.len() < 40, "every handshake on one shard: {sids:?}");
        let open = fresh_request(
            port,
            "GET",
            "/socket.io/?EIO=4&transport=polling",
            b"",
            false,
        );
        assert_eq!(open.status, 200, "{}", open.text());
        let v: Value = serde_json::from_str(&open.text()[1..]).unwrap();
        sids.push(v["sid"].as_str().unwrap().to_string());
    }
    for (n, sid) in sids.iter().enumerate() {
        let path = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
        let post = |body: &str, i: usize| {
            let a = fresh_request(port, "POST", &path, body.as_bytes(), i % 2 == 1);
            assert_eq!((a.status, a.text()), (200, "ok".to_string()), "{sid}");
        };
        let get = || {
            let a = fresh_request(port, "GET", &path, b"", false);
            assert_eq!(a.status, 200, "{sid}: {}", a.text());
            a.text()
                .split('\u{1e}')
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        post(
            &format!(
                "40{{\"token\":\"{}\"}}",
                token(&format!("fresh{n}"), Some(&["*"]))
            ),
            n,
        );
        assert!(get()[0].starts_with("40{\"sid\":"), "{sid}");
        post("421[\"join\",{\"room\":\"fresh\"}]", n + 1);
        assert_eq!(ack_of(&get(), 1).unwrap()["ok"], true, "{sid}");
        for i in 0..6u64 {
            let id = 10 + i;
            post(
                &format!("42{id}[\"message\",{{\"room\":\"fresh\",\"text\":\"m{i}\"}}]"),
                i as usize,
            );
            let mut packets = get();
            while ack_of(&packets, id).is_none() {
                assert!(packets.len() < 100, "{packets:?}");
                packets.extend(get());
            }
            assert_eq!(
                ack_of(&packets, id).unwrap()["ok"],
                true,
                "{sid}: {packets:?}"
            );
        }
    }
}
