//! The process-wide memory budget (`limits.memory_budget`) with real clients against the
//! real binary: consumers that never read fill the queues of a busy room; the server stays
//! within the budget, cuts those readers (the largest queues) first, refuses sends with
//! `unavailable` while under pressure and accepts them again after, while a fast reader
//! gets every acked message in order and a cut reader gets them all back with `since`.
//! Publishes held by a stalled Redis count too (the home's queue), and push senders back;
//! every queue's count goes back to zero once traffic stops (nothing counted twice or
//! forgotten: the mesh between shards, held packets, polling bodies).

mod common;
mod common_redis;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{token, PollClient, Server, WsClient};
use common_redis::RedisServer;
use serde_json::{json, Value};

const BUDGET: u64 = 2 << 20;
const SLOW_READERS: usize = 8;
const MESSAGES: u64 = 300;
/// Large messages, so that the kernel's socket buffers (a few MiB per connection on
/// loopback, whatever the client's receive buffer) fill in a few hundred messages.
const TEXT_BYTES: usize = 30_000;

/// A member of `room` that shrinks its receive buffer and never reads again: what the
/// server sends it piles up in its outbound queue.
fn slow_reader(port: u16, i: usize, room: &str) -> WsClient {
    let mut c = WsClient::connect(port, &token(&format!("slow-{i}"), Some(&["*"])));
    assert_eq!(c.emit_ack("join", json!({"room": room}))["ok"], true);
    let small: libc::c_int = 4096;
    // SAFETY: setsockopt on a socket this client owns, with a valid int option.
    unsafe {
        libc::setsockopt(
            c.stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&small as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    c
}

/// Samples the largest `corelay_queued_bytes` seen until `stop`.
fn watch_queued(port: u16, stop: Arc<AtomicBool>, peak: Arc<AtomicU64>) {
    while !stop.load(Relaxed) {
        let (_, body) = common::http_get(port, "/metrics");
        let queued: u64 = body
            .lines()
            .filter(|l| l.starts_with("corelay_queued_bytes{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        peak.fetch_max(queued, Relaxed);
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The offsets of the `message` events a fast reader gets, until `count` or a quiet spell.
fn read_offsets(mut c: WsClient, count: u64) -> (WsClient, Vec<u64>) {
    let mut offsets = Vec::new();
    while (offsets.len() as u64) < count {
        match c.next_event(Duration::from_secs(10)) {
            Ok(ev) if ev[0] == "message" => offsets.push(ev[1]["offset"].as_u64().unwrap()),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    (c, offsets)
}

#[test]
fn past_the_budget_slow_readers_are_cut_first_and_senders_pushed_back_losing_nothing() {
    let server = Server::start_sharded(
        1,
        &[
            ("CORELAY_LIMITS_MEMORY_BUDGET", &BUDGET.to_string()),
            ("CORELAY_LIMITS_SEND_RATE", "100000"),
            ("CORELAY_LIMITS_SEND_BURST", "100000"),
            ("CORELAY_LIMITS_MAX_TEXT_BYTES", "32768"),
        ],
        &["--store", "memory"],
        true,
    );
    let room = "busy";
    let health = server.health();
    assert_eq!(health["memory"]["budget_bytes"], BUDGET);
    assert_eq!(server.metric("corelay_memory_budget_bytes"), BUDGET as f64);

    let mut fast = WsClient::connect(server.port, &token("fast", Some(&["*"])));
    assert_eq!(fast.emit_ack("join", json!({"room": room}))["ok"], true);
    let fast = std::thread::spawn(move || read_offsets(fast, MESSAGES));
    let slow: Vec<WsClient> = (0..SLOW_READERS)
        .map(|i| slow_reader(server.port, i, room))
        .collect();
    let mut sender = WsClient::connect(server.port, &token("sender", Some(&["*"])));
    assert_eq!(sender.emit_ack("join", json!({"room": room}))["ok"], true);

    let (stop, peak) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let watcher = {
        let (stop, peak, port) = (stop.clone(), peak.clone(), server.port);
        std::thread::spawn(move || watch_queued(port, stop, peak))
    };

    // Each message until it is acked: a refusal (`unavailable`) is retried with its cid.
    let text = "x".repeat(TEXT_BYTES);
    let (mut acked, mut refused, mut acked_after_refusal) = (Vec::new(), 0u64, false);
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in 0..MESSAGES {
        loop {
            assert!(Instant::now() < deadline, "sends never went through again");
            let ack: Value = sender.emit_ack(
                "message",
                json!({"room": room, "text": text, "cid": format!("m{n}")}),
            );
            if ack["ok"] == true {
                acked.push(ack["offset"].as_u64().unwrap());
                acked_after_refusal |= refused > 0;
                break;
            }
            assert_eq!(ack["error"]["code"], "unavailable", "{ack}");
            refused += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    stop.store(true, Relaxed);
    watcher.join().unwrap();

    eprintln!(
        "refused {refused}, peak queued {}, budget closes {}, slow-consumer closes {}",
        peak.load(Relaxed),
        server.metric("corelay_budget_closes_total"),
        server.metric("corelay_slow_consumer_closes_total")
    );
    // Pushed back, then served again.
    assert!(refused > 0, "no send was refused for memory");
    assert!(acked_after_refusal, "no send succeeded after a refusal");
    assert!(server.metric("corelay_budget_refusals_total") >= refused as f64);
    // Within the budget, as /metrics saw it, and the slow readers cut.
    let peak = peak.load(Relaxed);
    assert!(peak > 0 && peak <= BUDGET, "peak queued {peak} > {BUDGET}");
    // Every slow reader was cut, and only they: the fast reader and the sender remain.
    assert_eq!(
        server.metric("corelay_budget_closes_total"),
        SLOW_READERS as f64
    );
    assert_eq!(server.health()["connections"], 2);
    drop(slow);
    // The fast reader got every acked message, in order, and was never cut.
    let (mut fast, offsets) = fast.join().unwrap();
    assert_eq!(
        offsets, acked,
        "the fast reader missed or reordered messages"
    );
    assert_eq!(acked, (1..=MESSAGES).collect::<Vec<_>>());
    assert_eq!(fast.emit_ack("presence", json!({"room": room}))["ok"], true);

    // A cut reader gets everything back, page by page: nothing acked was lost.
    let mut back = WsClient::connect(server.port, &token("slow-0", Some(&["*"])));
    let join = back.emit_ack("join", json!({"room": room}));
    assert_eq!(join["offset"], MESSAGES, "{join}");
    let mut stored = Vec::new();
    loop {
        let after = stored.last().copied().unwrap_or(0);
        let page = back.emit_ack(
            "history",
            json!({"room": room, "after": after, "limit": 10}),
        );
        let messages = page["messages"].as_array().unwrap();
        if messages.is_empty() {
            break;
        }
        stored.extend(messages.iter().map(|m| m["offset"].as_u64().unwrap()));
    }
    assert_eq!(stored, acked);

    // The pressure is gone: /healthz says ok, queues are (nearly) empty.
    std::thread::sleep(Duration::from_millis(50));
    let health = server.health();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["memory"]["pressured_shards"], 0);
    assert!(
        server.rss_kib() < 200 * 1024,
        "RSS {} KiB",
        server.rss_kib()
    );
}

/// `/healthz`'s bytes per queue.
fn queue_bytes(server: &Server) -> Value {
    server.health()["memory"]["queues"].clone()
}

/// Waits up to `within` for every queue of every shard to be back at zero.
fn wait_all_queues_empty(server: &Server, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let queues = queue_bytes(server);
        let total: u64 = queues
            .as_object()
            .expect("memory.queues is an object")
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        if total == 0 || Instant::now() > deadline {
            return queues;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn publishes_held_by_a_stalled_redis_count_and_push_senders_back_losing_nothing() {
    const STALLED: u64 = 60;
    let redis = RedisServer::start();
    let url = redis.url();
    let server = Server::start_sharded(
        1,
        &[
            ("CORELAY_LIMITS_MEMORY_BUDGET", &(1u64 << 20).to_string()),
            ("CORELAY_LIMITS_SEND_RATE", "100000"),
            ("CORELAY_LIMITS_SEND_BURST", "100000"),
            ("CORELAY_LIMITS_MAX_TEXT_BYTES", "32768"),
        ],
        &["--redis", &url, "--store", "redis"],
        true,
    );
    let room = "stalled";
    let mut reader = WsClient::connect(server.port, &token("reader", Some(&["*"])));
    assert_eq!(reader.emit_ack("join", json!({"room": room}))["ok"], true);
    // It reads all along: a reader that waited would be cut as the slowest consumer.
    let reader = std::thread::spawn(move || read_offsets(reader, STALLED));
    let mut sender = WsClient::connect(server.port, &token("sender", Some(&["*"])));
    assert_eq!(sender.emit_ack("join", json!({"room": room}))["ok"], true);

    // Redis stalls; the sender sends without waiting: the home holds the publishes.
    let text = "y".repeat(20_000);
    redis.pause();
    let mut ids = Vec::new();
    for n in 0..STALLED {
        let payload = json!({"room": room, "text": text, "cid": format!("s{n}")});
        ids.push((n, sender.emit("message", payload)));
    }
    // The home's queue holds them, counted: the sends past half the 1 MiB budget (~26 of
    // them) are refused, by the sender's shard or by the home itself (those it holds
    // count against it until they are answered). It never holds more than the budget.
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut home_peak = 0;
    while Instant::now() < deadline {
        let home = server.health()["memory"]["queues"]["home"]
            .as_u64()
            .unwrap();
        home_peak = home_peak.max(home);
        std::thread::sleep(Duration::from_millis(10));
    }
    redis.resume();
    eprintln!("while Redis was stalled the home's queue held up to {home_peak} bytes");
    assert!(
        home_peak > 300_000 && home_peak < 1 << 20,
        "the home's queue counted {home_peak} bytes"
    );

    // Every send is answered: acked, or refused (`unavailable`, retried with its cid).
    let mut refused = Vec::new();
    for (n, id) in ids {
        let ack = sender.wait_ack(id);
        if ack["ok"] != true {
            assert_eq!(ack["error"]["code"], "unavailable", "{ack}");
            refused.push(n);
        }
    }
    eprintln!("refused while under pressure: {}", refused.len());
    assert!(!refused.is_empty(), "no send was pushed back");
    assert!(server.metric("corelay_budget_refusals_total") >= refused.len() as f64);
    for n in refused {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ack = sender.emit_ack(
                "message",
                json!({"room": room, "text": text, "cid": format!("s{n}")}),
            );
            if ack["ok"] == true {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "retry of s{n} never acked: {ack}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // The reader got every message once, in offset order.
    let (_, offsets) = reader.join().unwrap();
    assert_eq!(offsets, (1..=STALLED).collect::<Vec<_>>());
    let queues = wait_all_queues_empty(&server, Duration::from_secs(2));
    assert_eq!(queues["home"], 0, "{queues}");
}

#[test]
fn every_queue_is_back_to_zero_once_traffic_stops() {
    let server = Server::start_sharded(
        2,
        &[
            ("CORELAY_LIMITS_SEND_RATE", "100000"),
            ("CORELAY_LIMITS_SEND_BURST", "100000"),
        ],
        &["--store", "memory"],
        true,
    );
    // Rooms whose homes are on both shards, members on both (a connection moves to the
    // home of the first room it joins, and each starts with another room): sends and
    // deliveries cross the mesh both ways.
    let rooms: Vec<String> = (0..6).map(|i| format!("zero-{i}")).collect();
    let mut clients: Vec<WsClient> = (0..8)
        .map(|i| {
            let mut c = WsClient::connect(server.port, &token(&format!("z{i}"), Some(&["*"])));
            for k in 0..rooms.len() {
                let room = &rooms[(i + k) % rooms.len()];
                assert_eq!(c.emit_ack("join", json!({"room": room}))["ok"], true);
            }
            c
        })
        .collect();
    assert!(
        server.connections_per_shard().iter().all(|&n| n > 0),
        "{:?}",
        server.connections_per_shard()
    );
    // A polling client posts too (its request bodies count while handled).
    let (poll, _) = PollClient::open(server.port);
    assert_eq!(
        poll.post(&[&format!(
            "40{{\"token\":\"{}\"}}",
            token("poller", Some(&["*"]))
        )])
        .status,
        200
    );
    let connected = poll.get_packets();
    assert!(connected[0].starts_with("40"), "{connected:?}");
    let text = "z".repeat(2_000);
    for round in 0..20 {
        for (i, c) in clients.iter_mut().enumerate() {
            let room = &rooms[(i + round) % rooms.len()];
            let ack = c.emit_ack("message", json!({"room": room, "text": text}));
            assert_eq!(ack["ok"], true, "{ack}");
        }
        // No ack asked and no room joined: nothing for it to GET, only the body to handle.
        let packet = format!(
            "42{}",
            json!(["message", {"room": rooms[round % rooms.len()], "text": text}])
        );
        assert_eq!(poll.post(&[&packet, &packet]).status, 200);
    }
    let queues = wait_all_queues_empty(&server, Duration::from_secs(3));
    for (name, bytes) in queues.as_object().unwrap() {
        assert_eq!(bytes, 0, "queue {name} still counts bytes: {queues}");
    }
    assert_eq!(queues.as_object().unwrap().len(), 6, "{queues}");
    let metrics = server.get("/metrics").1;
    let lines = metrics
        .lines()
        .filter(|l| l.starts_with("corelay_queue_bytes{"))
        .count();
    assert_eq!(lines, 2 * 6, "one gauge per shard and queue");
    drop(clients);
}

#[test]
fn a_capped_socket_send_buffer_keeps_a_slow_readers_backlog_where_the_budget_sees_it() {
    const SENT: usize = 40;
    let server = Server::start_sharded(
        1,
        &[
            ("CORELAY_LIMITS_SOCKET_SEND_BUFFER", "65536"),
            ("CORELAY_LIMITS_SEND_RATE", "100000"),
            ("CORELAY_LIMITS_SEND_BURST", "100000"),
            ("CORELAY_LIMITS_MAX_TEXT_BYTES", "32768"),
        ],
        &["--store", "memory"],
        true,
    );
    let room = "capped";
    let slow = slow_reader(server.port, 0, room);
    let mut sender = WsClient::connect(server.port, &token("sender", Some(&["*"])));
    assert_eq!(sender.emit_ack("join", json!({"room": room}))["ok"], true);
    let text = "c".repeat(30_000);
    for n in 0..SENT {
        let ack = sender.emit_ack(
            "message",
            json!({"room": room, "text": text, "cid": format!("c{n}")}),
        );
        assert_eq!(ack["ok"], true, "{ack}");
    }
    // ~1.2 MB for a reader that reads nothing: the kernel holds at most its capped send
    // buffer (the kernel doubles the 64 KiB asked) and the reader's 4 KiB receive buffer;
    // the rest waits in the reader's outbound queue, counted by the budget.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut outbound = 0;
    while Instant::now() < deadline {
        outbound = queue_bytes(&server)["outbound"].as_u64().unwrap();
        if outbound > 900_000 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        outbound > 900_000,
        "only {outbound} bytes in the outbound queues: the kernel holds the rest"
    );
    drop(slow);
}
