//! Host-protecting limits with real clients against the real binary: connections per
//! user (`limits.max_connections_per_user`, counted across shards and transports, freed
//! however a connection ends), new sessions per source address
//! (`limits.connect_rate_per_ip`: HTTP 429), and the per-connection log span that
//! carries `shard`, `sid` and `user` while no credential ever reaches the logs.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{token, PollClient, Server, WsClient, SECRET};
use corelay::auth::Authenticator;
use serde_json::{json, Value};

const SECOND: Duration = Duration::from_secs(1);
const REFUSED: &str = r#"44{"message":"too_many_connections"}"#;

/// Opens a WebSocket session and sends CONNECT with `tok`; returns the client and the
/// server's answer (`40…` or `44…`).
fn try_connect(port: u16, tok: &str) -> (WsClient, String) {
    let (mut c, _) = WsClient::open(port);
    c.send_text(&format!("40{{\"token\":\"{tok}\"}}"));
    let reply = c.recv_text(5 * SECOND).expect("an answer to CONNECT");
    (c, reply)
}

/// Retries a CONNECT until it is admitted (a release travels between shards).
fn connect_eventually(port: u16, tok: &str, within: Duration) -> WsClient {
    let deadline = Instant::now() + within;
    loop {
        let (c, reply) = try_connect(port, tok);
        if reply.starts_with("40{\"sid\":") {
            return c;
        }
        assert_eq!(reply, REFUSED);
        assert!(Instant::now() < deadline, "the user's slot was never freed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_extra_connection_of_a_user_is_refused_across_shards_and_transports() {
    let server = Server::start(&[("CORELAY_LIMITS_MAX_CONNECTIONS_PER_USER", "3")]);
    let alice = token("alice", Some(&["*"]));
    // Three connections: the kernel spreads them over both shards, the count is one.
    let mut held: Vec<WsClient> = (0..3)
        .map(|_| WsClient::connect(server.port, &alice))
        .collect();
    let (mut fourth, reply) = try_connect(server.port, &alice);
    assert_eq!(reply, REFUSED);
    // Refused like an unauthorized CONNECT: the session is not connected (events are
    // ignored) and stays open for another CONNECT for a while.
    fourth.send_text("421[\"join\",{\"room\":\"r\"}]");
    assert!(matches!(
        fourth.recv_text(Duration::from_millis(300)),
        Err(common::ReadEnd::Timeout)
    ));
    // Another user is not affected.
    let mut bob = WsClient::connect(server.port, &token("bob", Some(&["*"])));
    assert_eq!(bob.emit_ack("join", json!({"room": "r"}))["ok"], true);
    // Polling counts the same user too.
    let (poll, _) = PollClient::open(server.port);
    assert_eq!(
        poll.post(&[&format!("40{{\"token\":\"{alice}\"}}")]).status,
        200
    );
    assert!(
        poll.get_packets().iter().any(|p| p == REFUSED),
        "polling CONNECT of a fourth alice is refused"
    );
    assert!(server.metric("corelay_user_limit_refusals_total") >= 2.0);

    // A client close frees a slot: the refused session may CONNECT again and get in.
    drop(held.pop());
    let deadline = Instant::now() + 5 * SECOND;
    loop {
        fourth.send_text(&format!("40{{\"token\":\"{alice}\"}}"));
        let reply = fourth.recv_text(5 * SECOND).unwrap();
        if reply.starts_with("40{\"sid\":") {
            break;
        }
        assert_eq!(reply, REFUSED);
        assert!(Instant::now() < deadline, "slot not freed after a close");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fourth.emit_ack("join", json!({"room": "r"}))["ok"], true);
    held.push(fourth);
    let (_, reply) = try_connect(server.port, &alice);
    assert_eq!(reply, REFUSED, "back at the limit");

    // A Socket.IO disconnect (`41`) frees the slot too, with the transport still open.
    held[0].send_text("41");
    let again = connect_eventually(server.port, &alice, 5 * SECOND);
    // …and a polling session that ends frees it as well.
    drop(again);
    let (poll, _) = PollClient::open(server.port);
    let deadline = Instant::now() + 5 * SECOND;
    loop {
        assert_eq!(
            poll.post(&[&format!("40{{\"token\":\"{alice}\"}}")]).status,
            200
        );
        let packets = poll.get_packets();
        if packets.iter().any(|p| p.starts_with("40{\"sid\":")) {
            break;
        }
        assert!(packets.iter().any(|p| p == REFUSED), "{packets:?}");
        assert!(Instant::now() < deadline, "slot not freed after a drop");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, reply) = try_connect(server.port, &alice);
    assert_eq!(reply, REFUSED, "the polling session holds the slot");
    assert_eq!(poll.post(&["1"]).status, 200); // Engine.IO close
    connect_eventually(server.port, &alice, 5 * SECOND);
}

#[test]
fn a_ping_timeout_and_a_transport_error_free_the_slot_once() {
    let server = Server::start(&[
        ("CORELAY_LIMITS_MAX_CONNECTIONS_PER_USER", "1"),
        ("CORELAY_ENGINEIO_PING_INTERVAL", "1000"),
        ("CORELAY_ENGINEIO_PING_TIMEOUT", "500"),
    ]);
    let alice = token("alice", Some(&["*"]));
    let mut silent = WsClient::connect(server.port, &alice);
    silent.answer_pings = false;
    let started = Instant::now();
    let (_refused, reply) = try_connect(server.port, &alice);
    assert_eq!(reply, REFUSED);
    assert!(
        started.elapsed() < SECOND,
        "refused before any ping was due"
    );
    // The silent client keeps its socket open: only the server's ping timeout (a ping
    // after 1 s, no pong within 0.5 s) can free the slot.
    let mut back = connect_eventually(server.port, &alice, 5 * SECOND);
    assert!(started.elapsed() >= Duration::from_millis(1200));
    // Released once only: the limit holds again.
    let (_refused, reply) = try_connect(server.port, &alice);
    assert_eq!(reply, REFUSED);
    // A transport error (an invalid packet: the server closes with 1002) frees it too.
    back.send_text("zzz");
    assert_eq!(back.expect_closed(2 * SECOND), Some(1002));
    let mut again = connect_eventually(server.port, &alice, 5 * SECOND);
    let (_refused, reply) = try_connect(server.port, &alice);
    assert_eq!(reply, REFUSED);
    // A second CONNECT on a connected session keeps one count, not two and not none.
    again.send_text(&format!("40{{\"token\":\"{alice}\"}}"));
    assert!(again
        .recv_text(5 * SECOND)
        .unwrap()
        .starts_with("40{\"sid\":"));
    let (_refused, reply) = try_connect(server.port, &alice);
    assert_eq!(reply, REFUSED);
    drop(again);
    connect_eventually(server.port, &alice, 5 * SECOND);
    // The server closed the silent connection (after its ping, with 1000).
    let mut saw_ping = false;
    loop {
        match silent.recv_frame(2 * SECOND) {
            Ok(f) if f.opcode == 0x8 => break,
            Ok(f) => saw_ping |= f.text() == "2",
            Err(e) => panic!("silent client was not closed: {e:?}"),
        }
    }
    assert!(saw_ping);
}

/// A WebSocket handshake from `source`; the status line and head, and the body if refused.
#[test]
fn events_sent_right_behind_the_connect_are_handled_once_it_is_admitted() {
    // Whichever shard owns the user's count (half of the users are owned by the other
    // shard, whose answer comes over the mesh), a join sent in the same breath as the
    // CONNECT is answered, after the CONNECT's own answer.
    let server = Server::start(&[]);
    for i in 0..12 {
        let (mut c, _) = WsClient::open(server.port);
        let user = format!("eager{i}");
        c.send_text(&format!(
            "40{}",
            json!({"token": token(&user, Some(&["*"]))})
        ));
        c.send_text(&format!("421{}", json!(["join", {"room": "eager"}])));
        let first = c
            .recv_text(Duration::from_secs(5))
            .expect("the CONNECT answer");
        assert!(first.starts_with("40{\"sid\":"), "{user}: {first}");
        let ack = c.wait_ack(1);
        assert_eq!(ack["ok"], true, "{user}: {ack}");
    }
}

fn handshake_from(source: Ipv4Addr, port: u16) -> (u16, String) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from((source, 0)).into())
        .expect("bind a loopback source address");
    socket
        .connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())
        .unwrap();
    let mut s: TcpStream = socket.into();
    s.set_read_timeout(Some(5 * SECOND)).unwrap();
    write!(
        s,
        "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).unwrap_or(0) == 0 {
            break;
        }
        raw.push(byte[0]);
    }
    let mut text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
    if status != 101 {
        let mut rest = String::new();
        let _ = s.read_to_string(&mut rest);
        text.push_str(&rest);
    }
    (status, text)
}

#[test]
fn one_address_past_its_burst_gets_429_while_another_is_admitted() {
    let server = Server::start(&[
        ("CORELAY_LIMITS_CONNECT_RATE_PER_IP", "1"),
        ("CORELAY_LIMITS_CONNECT_BURST_PER_IP", "3"),
    ]);
    let here = Ipv4Addr::new(127, 0, 0, 1);
    for i in 0..3 {
        assert_eq!(handshake_from(here, server.port).0, 101, "session {i}");
    }
    let (status, answer) = handshake_from(here, server.port);
    assert_eq!(status, 429, "{answer}");
    assert!(answer.contains("\r\nRetry-After: 1\r\n"), "{answer}");
    assert!(answer.contains("Connection: close"), "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["code"], 4, "{body}");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("Too many new connections"));
    // The polling handshake is the same new session: refused too.
    let polling = common::http(
        server.port,
        "GET",
        "/socket.io/?EIO=4&transport=polling",
        &[],
        b"",
    );
    assert_eq!(polling.status, 429);
    assert!(polling.head.contains("Retry-After: "));
    // Other addresses have their own buckets; health and metrics are not sessions.
    assert_eq!(
        handshake_from(Ipv4Addr::new(127, 0, 0, 2), server.port).0,
        101
    );
    assert_eq!(
        handshake_from(Ipv4Addr::new(127, 0, 0, 3), server.port).0,
        101
    );
    assert_eq!(server.get("/healthz").0, 200);
    assert_eq!(server.metric("corelay_connect_rate_limited_total"), 2.0);
    // After Retry-After, one more session from the limited address.
    std::thread::sleep(SECOND);
    assert_eq!(handshake_from(here, server.port).0, 101);
    assert_eq!(handshake_from(here, server.port).0, 429);
}

#[test]
fn the_default_rate_lets_a_fast_client_from_one_address_through() {
    // Tests and the load generator open hundreds of sessions a second from 127.0.0.1.
    let server = Server::start(&[]);
    let here = Ipv4Addr::new(127, 0, 0, 1);
    for _ in 0..300 {
        assert_eq!(handshake_from(here, server.port).0, 101);
    }
    assert_eq!(server.metric("corelay_connect_rate_limited_total"), 0.0);
}

/// Collects the server's output lines until `quiet` passes without one (at most 5 s).
fn drain_output(server: &Server, quiet: Duration) -> Vec<String> {
    let mut lines = Vec::new();
    let deadline = Instant::now() + 5 * SECOND;
    while let Ok(line) = server.output.recv_timeout(quiet) {
        lines.push(line);
        if Instant::now() > deadline {
            break;
        }
    }
    lines
}

/// Runs a connect with a JWT, a join with a room token and API calls with a key against
/// a server logging everything in `format`; returns the log lines and the secrets used.
fn secrets_run(format: &str) -> (Vec<String>, Vec<String>) {
    let api_key = "api-key-SECRET-5f3c9e1a7b";
    let server = Server::start(&[
        ("RUST_LOG", "trace"),
        ("CORELAY_LOG_FORMAT", format),
        ("CORELAY_API_KEY", api_key),
    ]);
    let jwt = token("alice", Some(&["lobby"]));
    let room_token = Authenticator::new(Some(SECRET))
        .mint_room_token("alice", "private", 3600)
        .unwrap();
    let mut c = WsClient::connect(server.port, &jwt);
    let ack = c.emit_ack("join", json!({"room": "private", "token": room_token}));
    assert_eq!(ack["ok"], true, "{ack}");
    // A bad room token is refused (and not logged either).
    let bad_room_token = format!("{room_token}x");
    let ack = c.emit_ack("join", json!({"room": "other", "token": bad_room_token}));
    assert_eq!(ack["error"]["code"], "forbidden", "{ack}");
    let posted = common::http(
        server.port,
        "POST",
        "/api/rooms/private/messages",
        &[
            ("Authorization", &format!("Bearer {api_key}")),
            ("Content-Type", "application/json"),
        ],
        br#"{"text":"from the backend"}"#,
    );
    assert_eq!(posted.status, 201, "{}", posted.text());
    let wrong_key = "wrong-key-SECRET-0d2b";
    let refused = common::http(
        server.port,
        "GET",
        "/api/rooms/private/presence",
        &[("Authorization", &format!("Bearer {wrong_key}"))],
        b"",
    );
    assert_eq!(refused.status, 401);
    // A refused CONNECT with a tampered JWT.
    let (_bad, reply) = try_connect(server.port, &format!("{jwt}x"));
    assert!(
        reply.starts_with("44{\"message\":\"unauthorized\""),
        "{reply}"
    );
    c.send_text("41");
    drop(c);
    let lines = drain_output(&server, Duration::from_millis(700));
    let secrets = [
        jwt.clone(),
        room_token,
        bad_room_token,
        api_key.to_string(),
        wrong_key.to_string(),
        SECRET.to_string(),
    ];
    // A JWT's signature alone is a secret too.
    let mut all: Vec<String> = secrets.to_vec();
    all.push(jwt.rsplit('.').next().unwrap().to_string());
    (lines, all)
}

#[test]
fn json_logs_carry_the_connection_span_and_no_secret() {
    let (lines, secrets) = secrets_run("json");
    assert!(
        lines.len() > 5,
        "trace logging produced {} lines",
        lines.len()
    );
    for line in &lines {
        for secret in &secrets {
            assert!(
                !line.contains(secret.as_str()),
                "a secret is in the log: {line}"
            );
        }
    }
    // The CONNECT's log line carries shard, sid and user from the connection's span.
    let connected: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "connected")
        .collect();
    assert_eq!(connected.len(), 1, "{lines:#?}");
    let span = &connected[0]["span"];
    assert_eq!(span["name"], "conn", "{span}");
    assert_eq!(span["user"], "alice", "{span}");
    assert!(span["shard"].is_u64(), "{span}");
    assert!(
        span["sid"].as_str().is_some_and(|s| s.len() == 20),
        "{span}"
    );
    // So do the lines logged later about that connection, by other code paths.
    let sid = span["sid"].as_str().unwrap();
    let about: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["span"]["sid"] == sid)
        .collect();
    let closed = about
        .iter()
        .find(|v| v["fields"]["message"] == "session closed")
        .unwrap_or_else(|| panic!("no `session closed` line for {sid}: {about:#?}"));
    assert_eq!(closed["span"]["user"], "alice", "{closed}");
    // The first join moved the connection to the home shard of "private", where it ended.
    let home = corelay::chat::mesh::home_of("private", 2);
    assert_eq!(closed["span"]["shard"], home, "{closed}");
}

#[test]
fn text_logs_carry_the_connection_span_and_no_secret() {
    let (lines, secrets) = secrets_run("text");
    for line in &lines {
        for secret in &secrets {
            assert!(
                !line.contains(secret.as_str()),
                "a secret is in the log: {line}"
            );
        }
    }
    let connected = lines
        .iter()
        .find(|l| l.contains(" connected") && l.contains("conn{"))
        .unwrap_or_else(|| panic!("no `connected` line in {lines:#?}"));
    assert!(connected.contains("shard="), "{connected}");
    assert!(connected.contains(" sid="), "{connected}");
    assert!(connected.contains(" user=alice"), "{connected}");
}
