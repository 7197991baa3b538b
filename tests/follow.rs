//! A WebSocket connection moves to the home shard of the first room it joins
//! (`server.follow_rooms`, on by default), and everything it carried keeps working there:
//! its identity, its user's connection count, its ping timers, the frames it sent right
//! behind the join, rooms it joins later on other shards.

mod common;

use std::time::{Duration, Instant};

use common::{token, ReadEnd, Server, WsClient};
use corelay::chat::mesh::home_of;
use serde_json::{json, Value};

const SECOND: Duration = Duration::from_secs(1);
const MOVED: &str = "corelay_connections_moved_total";

/// A room name whose home is `shard` (of two).
fn room_on(shard: usize, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|r| home_of(r, 2) == shard)
        .unwrap()
}

/// Opens WebSocket sessions until one lands on `shard` (the kernel spreads accepts);
/// the ones that landed elsewhere are closed once it has.
fn open_on(server: &Server, shard: usize) -> WsClient {
    let mut elsewhere = Vec::new();
    for _ in 0..64 {
        let before = server.connections_per_shard();
        let (c, _) = WsClient::open(server.port);
        if server.connections_per_shard()[shard] > before[shard] {
            return c;
        }
        elsewhere.push(c);
    }
    panic!("no connection landed on shard {shard} in 64 tries");
}

/// `n` connected clients, users `u0`, `u1`, … (each may join any room).
fn connect_users(server: &Server, n: usize) -> Vec<WsClient> {
    (0..n)
        .map(|i| WsClient::connect(server.port, &token(&format!("u{i}"), Some(&["*"]))))
        .collect()
}

/// Sends the Socket.IO CONNECT for `user`; returns the server's answer.
fn connect_as(c: &mut WsClient, user: &str) -> String {
    c.send_text(&format!(
        "40{{\"token\":\"{}\"}}",
        token(user, Some(&["*"]))
    ));
    c.recv_text(5 * SECOND).expect("an answer to CONNECT")
}

/// The next `message` event's payload, skipping other events.
fn next_message(c: &mut WsClient) -> Value {
    next_message_in(c, None)
}

/// The next `message` event's payload in `room` (any room if `None`), skipping others.
fn next_message_in(c: &mut WsClient, room: Option<&str>) -> Value {
    let deadline = Instant::now() + 5 * SECOND;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = c.next_event(left).expect("a message event");
        if ev[0] == "message" && room.is_none_or(|r| ev[1]["room"] == r) {
            return ev[1].clone();
        }
    }
}

/// Waits until the per-shard connection counts are `want` (a move is asynchronous).
fn wait_for_counts(server: &Server, want: &[u64]) {
    let deadline = Instant::now() + 5 * SECOND;
    loop {
        let got = server.connections_per_shard();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "connections per shard {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn connections_gather_on_the_home_shard_of_their_room_and_the_room_works() {
    let server = Server::start(&[]);
    let room = room_on(1, "gather");
    let mut clients = connect_users(&server, 16);
    let before = server.connections_per_shard();
    assert_eq!(before.iter().sum::<u64>(), 16);
    for c in &mut clients {
        assert_eq!(c.emit_ack("join", json!({"room": room}))["ok"], true);
    }
    wait_for_counts(&server, &[0, 16]);
    assert_eq!(
        server.metric(MOVED),
        before[0] as f64,
        "one move per connection on shard 0"
    );

    // Two senders, three messages each: every other member gets all six, each sender's
    // in order, with the sender's identity.
    for k in 0..3 {
        for (s, sender) in clients.iter_mut().enumerate().take(2) {
            let ack = sender.emit_ack("message", json!({"room": room, "text": format!("{s}.{k}")}));
            assert_eq!(ack["ok"], true, "{ack}");
        }
    }
    for c in clients.iter_mut().skip(2) {
        let got: Vec<(String, String)> = (0..6)
            .map(|_| {
                let m = next_message(c);
                (
                    m["user"].as_str().unwrap().to_string(),
                    m["text"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        for s in 0..2 {
            let texts: Vec<&str> = got
                .iter()
                .filter(|(u, _)| *u == format!("u{s}"))
                .map(|(_, t)| t.as_str())
                .collect();
            assert_eq!(texts, [0, 1, 2].map(|k| format!("{s}.{k}")), "{got:?}");
        }
    }

    // Later rooms do not move it: a member of a room homed on shard 0 stays on shard 1
    // and still sends to and hears from that room.
    let other = room_on(0, "other");
    assert_eq!(
        clients[0].emit_ack("join", json!({"room": other}))["ok"],
        true
    );
    let mut newcomer = WsClient::connect(server.port, &token("newcomer", Some(&["*"])));
    assert_eq!(
        newcomer.emit_ack("join", json!({"room": other}))["ok"],
        true
    );
    wait_for_counts(&server, &[1, 16]);
    let ack = clients[0].emit_ack("message", json!({"room": other, "text": "across"}));
    assert_eq!(ack["ok"], true, "{ack}");
    assert_eq!(next_message(&mut newcomer)["text"], "across");
    let ack = newcomer.emit_ack("message", json!({"room": other, "text": "back"}));
    assert_eq!(ack["ok"], true, "{ack}");
    assert_eq!(
        next_message_in(&mut clients[0], Some(&other))["text"],
        "back"
    );

    // Leaving the first room works where the connection now lives.
    assert_eq!(
        clients[0].emit_ack("leave", json!({"room": room}))["ok"],
        true
    );
    let ack = clients[0].emit_ack("message", json!({"room": room, "text": "gone"}));
    assert_eq!(ack["error"]["code"], "not_joined", "{ack}");

    // It moves at its first join only: in no room again, a join to a room homed on the
    // other shard leaves it where it is.
    assert_eq!(
        clients[0].emit_ack("leave", json!({"room": other}))["ok"],
        true
    );
    let moved = server.metric(MOVED);
    let third = room_on(0, "third");
    assert_eq!(
        clients[0].emit_ack("join", json!({"room": third}))["ok"],
        true
    );
    assert_eq!(server.metric(MOVED), moved);
    assert_eq!(server.connections_per_shard(), [1, 16]);
}

#[test]
fn with_follow_rooms_off_connections_stay_where_they_were_accepted() {
    let server = Server::start(&[("CORELAY_SERVER_FOLLOW_ROOMS", "false")]);
    let room = room_on(1, "stay");
    let mut clients = connect_users(&server, 16);
    let before = server.connections_per_shard();
    for c in &mut clients {
        assert_eq!(c.emit_ack("join", json!({"room": room}))["ok"], true);
    }
    assert_eq!(server.connections_per_shard(), before);
    assert_eq!(server.metric(MOVED), 0.0);
    let ack = clients[0].emit_ack("message", json!({"room": room, "text": "hi"}));
    assert_eq!(ack["ok"], true, "{ack}");
    for c in clients.iter_mut().skip(1) {
        assert_eq!(next_message(c)["text"], "hi");
    }
}

#[test]
fn frames_sent_right_behind_the_join_travel_with_the_connection() {
    let server = Server::start(&[]);
    let room = room_on(1, "behind");
    let later = room_on(0, "later");
    let mut c = open_on(&server, 0);
    assert!(connect_as(&mut c, "mover").starts_with("40{\"sid\":"));
    let mut listener = WsClient::connect(server.port, &token("listener", Some(&["*"])));
    assert_eq!(listener.emit_ack("join", json!({"room": room}))["ok"], true);
    let moved_before = server.metric(MOVED);

    // One write: the join (which moves the connection), a second join, an unknown event
    // and the first half of a leave, all in the server's read buffer when the move
    // happens; the leave's second half comes later, to the shard the connection moved to.
    let mut burst = Vec::new();
    for (id, event, payload) in [
        (1, "join", json!({"room": room})),
        (2, "join", json!({"room": later})),
        (3, "nope", json!({})),
        (4, "leave", json!({"room": "never-joined"})),
    ] {
        let packet = format!("42{id}{}", json!([event, payload]));
        burst.extend(corelay::transport::websocket::client_frame(
            tungstenite::protocol::frame::coding::OpCode::Data(
                tungstenite::protocol::frame::coding::Data::Text,
            ),
            true,
            packet.as_bytes(),
            [1, 2, 3, 4],
        ));
    }
    let split = burst.len() - 10;
    c.send_raw(&burst[..split]);
    assert_eq!(c.wait_ack(1)["ok"], true);
    assert_eq!(c.wait_ack(2)["ok"], true);
    assert_eq!(c.wait_ack(3)["error"]["code"], "bad_request");
    std::thread::sleep(Duration::from_millis(100));
    c.send_raw(&burst[split..]);
    assert_eq!(c.wait_ack(4)["ok"], true);
    let ack = c.emit_ack("message", json!({"room": room, "text": "right behind"}));
    assert_eq!(ack["ok"], true, "{ack}");
    assert_eq!(next_message(&mut listener)["text"], "right behind");
    assert_eq!(server.metric(MOVED), moved_before + 1.0);
    wait_for_counts(&server, &[0, 2]);
}

#[test]
fn a_moved_connection_keeps_its_user_count_and_its_pings() {
    let server = Server::start(&[
        ("CORELAY_LIMITS_MAX_CONNECTIONS_PER_USER", "1"),
        ("CORELAY_ENGINEIO_PING_INTERVAL", "200"),
        ("CORELAY_ENGINEIO_PING_TIMEOUT", "300"),
    ]);
    let room = room_on(1, "count");
    let mut alice = open_on(&server, 0);
    assert!(connect_as(&mut alice, "alice").starts_with("40{\"sid\":"));
    assert_eq!(alice.emit_ack("join", json!({"room": room}))["ok"], true);
    assert!(server.metric(MOVED) >= 1.0);

    // The count moved with the connection: a second alice is refused…
    let (mut second, _) = WsClient::open(server.port);
    assert_eq!(
        connect_as(&mut second, "alice"),
        r#"44{"message":"too_many_connections"}"#
    );
    // …and the moved connection still gets pinged: answering keeps it open past several
    // ping intervals plus the timeout.
    assert_eq!(alice.recv_text(SECOND), Err(ReadEnd::Timeout));
    let ack = alice.emit_ack("message", json!({"room": room, "text": "alive"}));
    assert_eq!(ack["ok"], true, "{ack}");
    // Not answering closes it, and its slot is released by the shard it moved to.
    alice.answer_pings = false;
    alice.expect_closed(3 * SECOND);
    let deadline = Instant::now() + 5 * SECOND;
    loop {
        let (mut again, _) = WsClient::open(server.port);
        if connect_as(&mut again, "alice").starts_with("40{\"sid\":") {
            break;
        }
        assert!(Instant::now() < deadline, "alice's slot was never released");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn one_busy_room_does_not_pull_every_connection_onto_its_shard() {
    let server = Server::start(&[]);
    let room = room_on(1, "busy");
    let mut clients = connect_users(&server, 200);
    for c in &mut clients {
        assert_eq!(c.emit_ack("join", json!({"room": room}))["ok"], true);
    }
    // Connections follow the room until its home holds a quarter more than the other
    // shard plus 64 (the last move may land just past that); the rest stay.
    let counts = server.connections_per_shard();
    assert_eq!(counts.iter().sum::<u64>(), 200);
    assert!(counts[0] > 0, "every connection moved: {counts:?}");
    assert!(
        counts[1] <= counts[0] + counts[0] / 4 + 65,
        "the home shard took too many: {counts:?}"
    );
    assert!(server.metric(MOVED) > 0.0, "nothing moved: {counts:?}");
    // Members on both shards hear the room.
    let ack = clients[0].emit_ack("message", json!({"room": room, "text": "all"}));
    assert_eq!(ack["ok"], true, "{ack}");
    for c in clients.iter_mut().skip(1) {
        assert_eq!(next_message(c)["text"], "all");
    }
}
