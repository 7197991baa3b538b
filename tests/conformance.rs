//! The Engine.IO v4 and Socket.IO v5 protocol test suites, case for case, against
//! `corelay serve --conformance` (the reference test server's behaviour): raw
//! Engine.IO echo at `/engine.io/`, echo events at `/socket.io/`.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::{http, ReadEnd, Server, WsClient};
use serde_json::Value;

const SECOND: Duration = Duration::from_secs(1);

/// The suites' timings are tight (ping 300 ms, pong timeout 200 ms): run one at a time
/// so two suites on a two-core machine do not starve each other's replies.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn server() -> (std::sync::MutexGuard<'static, ()>, Server) {
    server_with_shards(2)
}

fn server_with_shards(shards: usize) -> (std::sync::MutexGuard<'static, ()>, Server) {
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    (
        guard,
        Server::start_sharded(shards, &[], &["--store", "memory", "--conformance"], false),
    )
}

fn open_polling(port: u16, base: &str) -> String {
    let a = http(
        port,
        "GET",
        &format!("{base}?EIO=4&transport=polling"),
        &[],
        b"",
    );
    assert_eq!(a.status, 200);
    let open: Value = serde_json::from_str(&a.text()[1..]).unwrap();
    open["sid"].as_str().unwrap().to_string()
}

fn poll_path(base: &str, sid: &str) -> String {
    format!("{base}?EIO=4&transport=polling&sid={sid}")
}

fn ws(port: u16, base: &str) -> WsClient {
    let mut c = WsClient::handshake(port, &format!("{base}?EIO=4&transport=websocket")).unwrap();
    c.answer_pings = false;
    c
}

/// Next text packet, skipping pings (answering them).
fn next_non_ping(c: &mut WsClient) -> String {
    loop {
        let t = c
            .recv_text(2 * SECOND)
            .unwrap_or_else(|e| panic!("next packet: {e:?}"));
        if t == "2" {
            c.send_text("3");
            continue;
        }
        return t;
    }
}

fn check_open(text: &str, upgrades: Value) {
    assert!(text.starts_with('0'), "{text}");
    let v: Value = serde_json::from_str(&text[1..]).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "maxPayload",
            "pingInterval",
            "pingTimeout",
            "sid",
            "upgrades"
        ]
    );
    assert!(v["sid"].is_string());
    assert_eq!(v["upgrades"], upgrades);
    assert_eq!(v["pingInterval"], 300);
    assert_eq!(v["pingTimeout"], 200);
    assert_eq!(v["maxPayload"], 1_000_000);
}

/// The Engine.IO cases that both suites share, run on `base`.
fn engineio_handshakes(port: u16, base: &str) {
    let a = http(
        port,
        "GET",
        &format!("{base}?EIO=4&transport=polling"),
        &[],
        b"",
    );
    assert_eq!(a.status, 200);
    check_open(&a.text(), serde_json::json!(["websocket"]));
    for q in [
        "transport=polling",
        "EIO=abc&transport=polling",
        "EIO=4",
        "EIO=4&transport=abc",
    ] {
        assert_eq!(
            http(port, "GET", &format!("{base}?{q}"), &[], b"").status,
            400,
            "{q}"
        );
    }
    for method in ["POST", "PUT"] {
        let a = http(
            port,
            method,
            &format!("{base}?EIO=4&transport=polling"),
            &[],
            b"",
        );
        assert_eq!(a.status, 400, "{method}");
    }
    let mut c = ws(port, base);
    let open = c.recv_text(2 * SECOND).unwrap();
    check_open(&open, serde_json::json!([]));
    for q in [
        "transport=websocket",
        "EIO=abc&transport=websocket",
        "EIO=4",
        "EIO=4&transport=abc",
    ] {
        assert!(
            WsClient::handshake(port, &format!("{base}?{q}")).is_err(),
            "{q}"
        );
    }
}

fn heartbeat_and_close(port: u16, base: &str) {
    // Polling: three ping/pong rounds.
    let sid = open_polling(port, base);
    for _ in 0..3 {
        let a = http(port, "GET", &poll_path(base, &sid), &[], b"");
        assert_eq!(
            (a.status, a.text()),
            (200, "2".to_string()),
            "heartbeat GET"
        );
        assert_eq!(
            http(port, "POST", &poll_path(base, &sid), &[], b"3").status,
            200
        );
    }
    // Polling: no pong → closed.
    let sid = open_polling(port, base);
    std::thread::sleep(Duration::from_millis(300 + 200 + 100));
    assert_eq!(
        http(port, "GET", &poll_path(base, &sid), &[], b"").status,
        400
    );
    // WebSocket: three ping/pong rounds, then silence closes it.
    let mut c = ws(port, base);
    c.recv_text(SECOND).unwrap();
    for _ in 0..3 {
        assert_eq!(c.recv_text(2 * SECOND).unwrap(), "2");
        c.send_text("3");
    }
    let mut c = ws(port, base);
    c.recv_text(SECOND).unwrap();
    c.expect_closed(3 * SECOND);
    // Polling close: the pending GET gets a noop, then the session is gone.
    let sid = open_polling(port, base);
    let path = poll_path(base, &sid);
    let pending = std::thread::spawn(move || http(port, "GET", &path, &[], b""));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        http(port, "POST", &poll_path(base, &sid), &[], b"1").status,
        200
    );
    let a = pending.join().unwrap();
    assert_eq!((a.status, a.text()), (200, "6".to_string()));
    assert_eq!(
        http(port, "GET", &poll_path(base, &sid), &[], b"").status,
        400
    );
    // WebSocket close.
    let mut c = ws(port, base);
    c.recv_text(SECOND).unwrap();
    c.send_text("1");
    c.expect_closed(2 * SECOND);
}

fn upgrades(port: u16, base: &str, echo: bool) {
    let sid = open_polling(port, base);
    let mut c =
        WsClient::handshake(port, &format!("{base}?EIO=4&transport=websocket&sid={sid}")).unwrap();
    c.send_text("2probe");
    assert_eq!(c.recv_text(SECOND).unwrap(), "3probe");
    let a = http(port, "GET", &poll_path(base, &sid), &[], b"");
    assert_eq!(
        (a.status, a.text()),
        (200, "6".to_string()),
        "noop ends the polling request"
    );
    c.send_text("5");
    if echo {
        c.send_text("4hello");
        assert_eq!(next_non_ping(&mut c), "4hello");
    }
    // Polling is refused after the upgrade; a second WebSocket for the sid is accepted
    // and closed at once, and the first one goes on.
    assert_eq!(
        http(port, "GET", &poll_path(base, &sid), &[], b"").status,
        400
    );
    second_websocket_is_closed(port, base, &sid);
    if echo {
        c.send_text("4hello");
        assert_eq!(next_non_ping(&mut c), "4hello");
    }
}

/// A WebSocket for a sid that already upgraded: the handshake completes, then the
/// server closes that socket (as the reference server does).
fn second_websocket_is_closed(port: u16, base: &str, sid: &str) {
    let second = WsClient::handshake(port, &format!("{base}?EIO=4&transport=websocket&sid={sid}"));
    let mut second = second.unwrap_or_else(|answer| panic!("upgrade refused: {answer}"));
    second.answer_pings = false;
    second.expect_closed(2 * SECOND);
}

/// "closes the session upon ping timeout" (HTTP long-polling), both suites: a GET
/// exactly pingInterval + pingTimeout after the handshake gets 400, whatever the
/// sweeper's tick.
#[test]
fn polling_session_is_gone_right_after_ping_timeout() {
    for shards in [1, 2] {
        let (_one, s) = server_with_shards(shards);
        for base in ["/engine.io/", "/socket.io/"] {
            for _ in 0..3 {
                let sid = open_polling(s.port, base);
                std::thread::sleep(Duration::from_millis(300 + 200));
                let a = http(s.port, "GET", &poll_path(base, &sid), &[], b"");
                assert_eq!(
                    (a.status, a.text()),
                    (
                        400,
                        r#"{"code":1,"message":"Session ID unknown"}"#.to_string()
                    ),
                    "{shards} shard(s), {base}"
                );
            }
        }
    }
}

/// "ignores WebSocket connection with same sid after upgrade", both suites: the second
/// socket is upgraded and closed, the first keeps echoing.
#[test]
fn second_websocket_after_upgrade_is_closed_and_the_first_goes_on() {
    for shards in [1, 2] {
        let (_one, s) = server_with_shards(shards);
        let port = s.port;
        for base in ["/engine.io/", "/socket.io/"] {
            // Several sessions: with two shards, some second sockets land on the shard
            // that does not own the session and are handed over.
            for _ in 0..4 {
                let sid = open_polling(port, base);
                let mut c = WsClient::handshake(
                    port,
                    &format!("{base}?EIO=4&transport=websocket&sid={sid}"),
                )
                .unwrap();
                c.answer_pings = false;
                c.send_text("2probe");
                assert_eq!(c.recv_text(SECOND).unwrap(), "3probe");
                c.send_text("5");
                second_websocket_is_closed(port, base, &sid);
                if base == "/engine.io/" {
                    c.send_text("4hello");
                    assert_eq!(next_non_ping(&mut c), "4hello");
                } else {
                    c.send_text("40");
                    assert!(next_non_ping(&mut c).starts_with("40"));
                }
            }
        }
    }
}

/// "forcefully closes the session" (HTTP long-polling), both suites: the GET sent with
/// the close POST gets the noop even when it arrives after the POST (with two shards, a
/// GET that reached the other shard is handed over and can come second); the next GET
/// gets 400, and so does a POST meanwhile.
#[test]
fn polling_close_releases_a_get_that_comes_after_it() {
    for shards in [1, 2] {
        let (_one, s) = server_with_shards(shards);
        let port = s.port;
        for base in ["/engine.io/", "/socket.io/"] {
            for _ in 0..4 {
                // The GET strictly after the POST.
                let sid = open_polling(port, base);
                let path = poll_path(base, &sid);
                let close = http(port, "POST", &path, &[], b"1");
                assert_eq!((close.status, close.text()), (200, "ok".to_string()));
                assert_eq!(http(port, "POST", &path, &[], b"4x").status, 400);
                let late = http(port, "GET", &path, &[], b"");
                assert_eq!((late.status, late.text()), (200, "6".to_string()));
                assert_eq!(http(port, "GET", &path, &[], b"").status, 400);
                // Both at once, as the suites send them.
                let sid = open_polling(port, base);
                let path = poll_path(base, &sid);
                let get = {
                    let path = path.clone();
                    std::thread::spawn(move || http(port, "GET", &path, &[], b""))
                };
                let close = http(port, "POST", &path, &[], b"1");
                assert_eq!(close.status, 200);
                let got = get.join().unwrap();
                assert_eq!((got.status, got.text()), (200, "6".to_string()));
                assert_eq!(http(port, "GET", &path, &[], b"").status, 400);
            }
        }
        // Not claimed by a GET, the closed session is forgotten after a short grace.
        let sid = open_polling(port, "/engine.io/");
        let path = poll_path("/engine.io/", &sid);
        assert_eq!(http(port, "POST", &path, &[], b"1").status, 200);
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(http(port, "GET", &path, &[], b"").status, 400);
    }
}

#[test]
fn engineio_suite() {
    let (_one, s) = server();
    let port = s.port;
    let base = "/engine.io/";
    engineio_handshakes(port, base);

    // Messages over polling: one text packet, several, text and binary.
    for body in [
        "4hello",
        "4test1\u{1e}4test2\u{1e}4test3",
        "4hello\u{1e}bAQIDBA==",
    ] {
        let sid = open_polling(port, base);
        let a = http(port, "POST", &poll_path(base, &sid), &[], body.as_bytes());
        assert_eq!((a.status, a.text()), (200, "ok".to_string()));
        let a = http(port, "GET", &poll_path(base, &sid), &[], b"");
        assert_eq!((a.status, a.text()), (200, body.to_string()));
    }
    // An invalid packet closes the session.
    let sid = open_polling(port, base);
    assert_eq!(
        http(port, "POST", &poll_path(base, &sid), &[], b"abc").status,
        400
    );
    assert_eq!(
        http(port, "GET", &poll_path(base, &sid), &[], b"").status,
        400
    );
    // Duplicate GETs: the first gets a close packet, the second a 400, then the session is gone.
    let sid = open_polling(port, base);
    let path = poll_path(base, &sid);
    let first = std::thread::spawn(move || http(port, "GET", &path, &[], b""));
    std::thread::sleep(Duration::from_millis(20));
    let second = http(
        port,
        "GET",
        &format!("{}&t=burst", poll_path(base, &sid)),
        &[],
        b"",
    );
    assert_eq!(second.status, 400);
    let first = first.join().unwrap();
    assert_eq!((first.status, first.text()), (200, "1".to_string()));
    assert_eq!(
        http(port, "GET", &poll_path(base, &sid), &[], b"").status,
        400
    );
    // A cancelled GET closes the session.
    let sid = open_polling(port, base);
    let mut raw = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        raw,
        "GET {} HTTP/1.1\r\nHost: x\r\n\r\n",
        poll_path(base, &sid)
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    drop(raw);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        http(port, "GET", &poll_path(base, &sid), &[], b"").status,
        400
    );

    // Messages over WebSocket: text and binary echo; an invalid packet closes.
    let mut c = ws(port, base);
    c.recv_text(SECOND).unwrap();
    c.send_text("4hello");
    assert_eq!(next_non_ping(&mut c), "4hello");
    c.send_binary(&[1, 2, 3, 4]);
    let f = c.recv_frame(SECOND).unwrap();
    assert_eq!((f.opcode, f.payload), (0x2, vec![1, 2, 3, 4]));
    c.send_text("abc");
    c.expect_closed(2 * SECOND);

    heartbeat_and_close(port, base);
    upgrades(port, base, true);
}

/// A Socket.IO connection on `/`, past the handshake and the `auth` event.
fn socketio_connection(port: u16) -> WsClient {
    let mut c = ws(port, "/socket.io/");
    c.recv_text(SECOND).unwrap();
    c.send_text("40");
    assert!(next_non_ping(&mut c).starts_with("40"));
    assert_eq!(next_non_ping(&mut c), r#"42["auth",{}]"#);
    c
}

#[test]
fn socketio_suite() {
    let (_one, s) = server();
    let port = s.port;
    let base = "/socket.io/";
    engineio_handshakes(port, base);
    heartbeat_and_close(port, base);
    upgrades(port, base, false);

    // Connect: main and custom namespaces, with and without a payload.
    for (connect, prefix, auth) in [
        ("40", "40", r#"42["auth",{}]"#),
        (
            r#"40{"token":"123"}"#,
            "40",
            r#"42["auth",{"token":"123"}]"#,
        ),
        ("40/custom,", "40/custom,", r#"42/custom,["auth",{}]"#),
        (
            r#"40/custom,{"token":"abc"}"#,
            "40/custom,",
            r#"42/custom,["auth",{"token":"abc"}]"#,
        ),
    ] {
        let mut c = ws(port, base);
        c.recv_text(SECOND).unwrap();
        c.send_text(connect);
        let handshake = next_non_ping(&mut c);
        assert!(handshake.starts_with(prefix), "{handshake}");
        let v: Value = serde_json::from_str(&handshake[prefix.len()..]).unwrap();
        assert_eq!(v.as_object().unwrap().keys().collect::<Vec<_>>(), ["sid"]);
        assert_eq!(next_non_ping(&mut c), auth);
    }
    let mut c = ws(port, base);
    c.recv_text(SECOND).unwrap();
    c.send_text("40/random");
    assert_eq!(
        next_non_ping(&mut c),
        r#"44/random,{"message":"Invalid namespace"}"#
    );
    let mut c = ws(port, base);
    c.recv_text(SECOND).unwrap();
    c.send_text("4abc");
    c.expect_closed(2 * SECOND);
    // No handshake within the connect timeout: closed.
    let mut c = ws(port, base);
    c.answer_pings = true;
    c.recv_text(SECOND).unwrap();
    assert!(matches!(c.recv_text(3 * SECOND), Err(ReadEnd::Closed)));

    // Disconnect from the main namespace: nothing but pings follow.
    let mut c = socketio_connection(port);
    c.send_text("41");
    assert_eq!(c.recv_text(2 * SECOND).unwrap(), "2");
    // Connect then disconnect a custom namespace; the main one still answers.
    let mut c = socketio_connection(port);
    c.send_text("40/custom");
    assert!(next_non_ping(&mut c).starts_with("40/custom,"));
    assert_eq!(next_non_ping(&mut c), r#"42/custom,["auth",{}]"#);
    c.send_text("41/custom");
    c.send_text(r#"42["message","message to main namespace"]"#);
    assert_eq!(
        next_non_ping(&mut c),
        r#"42["message-back","message to main namespace"]"#
    );

    // Messages: plain, binary, with acks.
    let mut c = socketio_connection(port);
    c.send_text(r#"42["message",1,"2",{"3":[true]}]"#);
    assert_eq!(
        next_non_ping(&mut c),
        r#"42["message-back",1,"2",{"3":[true]}]"#
    );
    c.send_text(r#"452-["message",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]"#);
    c.send_binary(&[1, 2, 3]);
    c.send_binary(&[4, 5, 6]);
    assert_eq!(
        next_non_ping(&mut c),
        r#"452-["message-back",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]"#
    );
    assert_eq!(c.recv_frame(SECOND).unwrap().payload, vec![1, 2, 3]);
    assert_eq!(c.recv_frame(SECOND).unwrap().payload, vec![4, 5, 6]);
    c.send_text(r#"42456["message-with-ack",1,"2",{"3":[false]}]"#);
    assert_eq!(next_non_ping(&mut c), r#"43456[1,"2",{"3":[false]}]"#);
    c.send_text(r#"452-789["message-with-ack",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]"#);
    c.send_binary(&[1, 2, 3]);
    c.send_binary(&[4, 5, 6]);
    assert_eq!(
        next_non_ping(&mut c),
        r#"462-789[{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]"#
    );
    assert_eq!(c.recv_frame(SECOND).unwrap().payload, vec![1, 2, 3]);
    assert_eq!(c.recv_frame(SECOND).unwrap().payload, vec![4, 5, 6]);
    // Invalid formats close the connection.
    for bad in [
        "4abc",
        "42{}",
        r#"42abc["message-with-ack",1,"2",{"3":[false]}]"#,
    ] {
        let mut c = socketio_connection(port);
        c.send_text(bad);
        c.expect_closed(2 * SECOND);
    }
}
