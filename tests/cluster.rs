//! Cluster mode end to end: a real `redis-server` per test (see `common_redis`) and two or
//! three `corelay serve --redis … --store redis` processes, with real WebSocket clients.
//! Cross-host delivery, typing and presence (a killed host's users go offline once for
//! every survivor member), concurrent senders on three hosts (one contiguous offset
//! sequence everywhere), Redis killed and restarted mid-traffic or SIGSTOPped past its
//! timeouts (no acked message lost), a host started before its Redis (degraded, then
//! joining the cluster), AUTH, ACL users and TLS through `serve`, the start-up refusals,
//! and `corelay check`. Every test body is bounded in time.

mod common;
mod common_redis;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{token, Server, WsClient};
use common_redis::{within, RedisServer};
use serde_json::{json, Value};

/// Short timeouts so that a lost link shows (and heals) quickly.
const ENV: &[(&str, &str)] = &[
    ("CORELAY_REDIS_PING_INTERVAL", "200ms"),
    ("CORELAY_REDIS_COMMAND_TIMEOUT", "1s"),
    ("CORELAY_REDIS_CONNECT_TIMEOUT", "1s"),
    ("CORELAY_LIMITS_SEND_RATE", "10000"),
    ("CORELAY_LIMITS_SEND_BURST", "10000"),
    ("CORELAY_HISTORY_MAX_REPLAY", "100000"),
];

fn host(redis: &RedisServer) -> Server {
    host_at(&redis.url(), &[])
}

/// A host against Redis at `url`, with extra environment (TLS files).
fn host_at(url: &str, env: &[(&str, &str)]) -> Server {
    let mut all = ENV.to_vec();
    all.extend_from_slice(env);
    Server::start_with(&all, &["--redis", url, "--store", "redis"], true)
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `limit`.
fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "{what} (waited {limit:?})");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every offset in the room's history, read with `history {after}` pages.
fn history_offsets(c: &mut WsClient, room: &str) -> Vec<u64> {
    let mut out = Vec::new();
    loop {
        let after = out.last().copied().unwrap_or(0);
        let h = c.emit_ack(
            "history",
            json!({"room": room, "after": after, "limit": 100}),
        );
        assert_eq!(h["ok"], true, "{h}");
        let page: Vec<u64> = h["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["offset"].as_u64().expect("offset"))
            .collect();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

/// Sends `text` to `room` as one message on each host's client in turn and checks that
/// every other client receives it live.
fn crosses_hosts(clients: &mut [WsClient], room: &str) {
    for from in 0..clients.len() {
        let text = format!("from {from}");
        let ack = clients[from].emit_ack("message", json!({"room": room, "text": text}));
        assert_eq!(ack["ok"], true, "{ack}");
        for (i, c) in clients.iter_mut().enumerate() {
            if i == from {
                continue;
            }
            let m = next_message(c, Duration::from_secs(10))
                .unwrap_or_else(|| panic!("client {i} did not get the message of {from}"));
            assert_eq!(m["offset"], ack["offset"], "{m}");
            assert_eq!(m["text"], text.as_str(), "{m}");
        }
    }
}

/// A sender thread per port, user `s<i>`, joined to `room` and sending as fast as acks
/// come until `stop`: each returns the offsets acked and how many sends were refused (only
/// `unavailable` is allowed; a refused send waits 20 ms).
fn spawn_senders(
    ports: &[u16],
    room: &'static str,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<(Vec<u64>, u32)>> {
    ports
        .iter()
        .copied()
        .enumerate()
        .map(|(i, port)| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut c = WsClient::connect(port, &token(&format!("s{i}"), Some(&["*"])));
                join(&mut c, room);
                let (mut acked, mut refused, mut n) = (Vec::new(), 0u32, 0u32);
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let ack =
                        c.emit_ack("message", json!({"room": room, "text": format!("{i}:{n}")}));
                    if ack["ok"] == true {
                        acked.push(ack["offset"].as_u64().expect("offset"));
                    } else {
                        assert_eq!(ack["error"]["code"], "unavailable", "{ack}");
                        refused += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                (acked, refused)
            })
        })
        .collect()
}

fn client(server: &Server, user: &str) -> WsClient {
    WsClient::connect(server.port, &token(user, Some(&["*"])))
}

fn join(c: &mut WsClient, room: &str) -> Value {
    let ack = c.emit_ack("join", json!({ "room": room }));
    assert_eq!(ack["ok"], true, "{ack}");
    ack
}

/// The next `message` event's payload, skipping other events; `None` after `timeout`.
fn next_message(c: &mut WsClient, timeout: Duration) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        match c.next_event(left) {
            Ok(ev) if ev[0] == "message" => return Some(ev[1].clone()),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

/// The next `presence` event's payload, skipping other events.
fn next_presence(c: &mut WsClient, timeout: Duration) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        match c.next_event(left) {
            Ok(ev) if ev[0] == "presence" => return Some(ev[1].clone()),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

#[test]
fn a_message_reaches_the_other_hosts_and_not_the_sender() {
    within(Duration::from_secs(60), || {
        let redis = RedisServer::start();
        let (a, b, c) = (host(&redis), host(&redis), host(&redis));
        let health = a.health();
        assert_eq!(health["status"], "ok", "{health}");
        assert_eq!(health["redis"]["connected"], true, "{health}");
        assert_eq!(a.metric("corelay_redis_connected"), 1.0);

        let mut ca = client(&a, "alice");
        let mut cb = client(&b, "bob");
        let mut cc = client(&c, "carol");
        assert_eq!(join(&mut ca, "lobby")["offset"], 0);
        join(&mut cb, "lobby");
        // Presence is cluster-wide: alice (host A) hears bob (host B) come online.
        let p = next_presence(&mut ca, Duration::from_secs(5)).expect("presence of bob");
        assert_eq!(p, json!({"room": "lobby", "user": "bob", "online": true}));
        join(&mut cc, "lobby");

        let ack = ca.emit_ack(
            "message",
            json!({"room": "lobby", "text": "hi", "cid": "c1"}),
        );
        assert_eq!(ack["ok"], true, "{ack}");
        assert_eq!(ack["offset"], 1, "{ack}");
        for (name, cl) in [("bob", &mut cb), ("carol", &mut cc)] {
            let m = next_message(cl, Duration::from_secs(5))
                .unwrap_or_else(|| panic!("{name} got no message"));
            assert_eq!(m["offset"], 1, "{m}");
            assert_eq!(m["text"], "hi");
            assert_eq!(m["user"], "alice");
            assert_eq!(m["cid"], "c1");
            assert_eq!(m["id"], ack["id"]);
        }
        // A retry with the same cid from another host gets the first ack; nothing new.
        let mut ca2 = client(&b, "alice");
        join(&mut ca2, "lobby");
        let again = ca2.emit_ack(
            "message",
            json!({"room": "lobby", "text": "hi", "cid": "c1"}),
        );
        assert_eq!(again, ack);
        // The sender's own socket does not get its message back; nobody gets the retry.
        assert!(next_message(&mut ca, Duration::from_millis(500)).is_none());
        assert!(next_message(&mut cb, Duration::from_millis(300)).is_none());

        // Presence lists every host's users; history is shared.
        let pr = cc.emit_ack("presence", json!({"room": "lobby"}));
        let users: Vec<&str> = pr["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["user"].as_str().unwrap())
            .collect();
        assert_eq!(users, ["alice", "bob", "carol"], "{pr}");
        let h = cc.emit_ack("history", json!({"room": "lobby"}));
        assert_eq!(h["messages"].as_array().unwrap().len(), 1, "{h}");

        // Bob's only connection leaves: the others hear it, cluster-wide.
        drop(cb);
        let p = next_presence(&mut cc, Duration::from_secs(5)).expect("bob offline");
        assert_eq!(p, json!({"room": "lobby", "user": "bob", "online": false}));
    });
}

#[test]
fn concurrent_senders_on_three_hosts_give_one_contiguous_sequence() {
    within(Duration::from_secs(120), || {
        const EACH: u64 = 50;
        let redis = RedisServer::start();
        let hosts = [host(&redis), host(&redis), host(&redis)];
        let mut receivers: Vec<WsClient> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let mut c = client(h, &format!("reader{i}"));
                join(&mut c, "busy");
                c
            })
            .collect();
        let ports: Vec<u16> = hosts.iter().map(|h| h.port).collect();
        let senders: Vec<_> = ports
            .into_iter()
            .enumerate()
            .map(|(i, port)| {
                std::thread::spawn(move || {
                    let mut c =
                        WsClient::connect(port, &token(&format!("writer{i}"), Some(&["*"])));
                    join(&mut c, "busy");
                    let mut offsets = Vec::new();
                    for n in 0..EACH {
                        let ack = c.emit_ack(
                            "message",
                            json!({"room": "busy", "text": format!("{i}:{n}")}),
                        );
                        assert_eq!(ack["ok"], true, "{ack}");
                        offsets.push(ack["offset"].as_u64().unwrap());
                    }
                    offsets
                })
            })
            .collect();
        let mut acked = BTreeSet::new();
        for s in senders {
            let offsets = s.join().expect("sender");
            // One connection's messages are accepted in the order it sent them.
            assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
            acked.extend(offsets);
        }
        let total = 3 * EACH;
        assert_eq!(acked, (1..=total).collect::<BTreeSet<u64>>());
        for (i, r) in receivers.iter_mut().enumerate() {
            let mut seen = Vec::new();
            let mut texts = vec![Vec::new(); 3];
            while (seen.len() as u64) < total {
                let m = next_message(r, Duration::from_secs(10))
                    .unwrap_or_else(|| panic!("reader{i} stalled after {}", seen.len()));
                let text = m["text"].as_str().unwrap().to_owned();
                let (who, n) = text.split_once(':').unwrap();
                texts[who.parse::<usize>().unwrap()].push(n.parse::<u64>().unwrap());
                seen.push(m["offset"].as_u64().unwrap());
            }
            assert_eq!(seen, (1..=total).collect::<Vec<u64>>(), "reader{i}");
            for t in texts {
                assert_eq!(
                    t,
                    (0..EACH).collect::<Vec<u64>>(),
                    "reader{i}: per-sender order"
                );
            }
            assert!(
                next_message(r, Duration::from_millis(300)).is_none(),
                "reader{i}: extra"
            );
        }
    });
}

#[test]
fn redis_restart_mid_traffic_loses_no_acked_message() {
    within(Duration::from_secs(120), || {
        let mut redis = RedisServer::start_persistent();
        let (a, b) = (host(&redis), host(&redis));
        let mut reader = client(&b, "reader");
        join(&mut reader, "r");
        let mut reader_a = client(&a, "reader-a");
        join(&mut reader_a, "r");

        // A sender on each host, sending as fast as acks come, through the outage.
        let stop = Arc::new(AtomicBool::new(false));
        let senders = spawn_senders(&[a.port, b.port], "r", &stop);
        std::thread::sleep(Duration::from_millis(500));
        redis.kill();
        // While Redis is down: still serving (degraded), sends refused, nothing stored.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let h = b.health();
            if h["redis"]["connected"] == false {
                assert_eq!(h["status"], "degraded", "{h}");
                assert_eq!(h["redis"]["pubsub_roundtrip_ms"], Value::Null, "{h}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "healthz never saw redis down: {h}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        redis.restart();
        let deadline = Instant::now() + Duration::from_secs(30);
        while a.health()["status"] != "ok" || b.health()["status"] != "ok" {
            assert!(Instant::now() < deadline, "redis link never came back");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(1000));
        stop.store(true, Ordering::Relaxed);
        let mut want: BTreeSet<u64> = BTreeSet::new();
        let mut refused = 0;
        for s in senders {
            let (acked, r) = s.join().expect("sender");
            assert!(acked.windows(2).all(|w| w[0] < w[1]), "{acked:?}");
            want.extend(acked);
            refused += r;
        }
        assert!(refused > 0, "no send was refused while redis was down");
        let max = *want.iter().max().unwrap();
        eprintln!(
            "acked {} messages (max offset {max}), {refused} refused",
            want.len()
        );

        // Every acked message reaches both readers live, in order, once (or at the
        // least through `join {since}`, checked below).
        for (name, r) in [("reader", &mut reader), ("reader-a", &mut reader_a)] {
            let mut got: BTreeSet<u64> = BTreeSet::new();
            let mut last = 0;
            while last < max {
                match next_message(r, Duration::from_secs(5)) {
                    Some(m) => {
                        let off = m["offset"].as_u64().unwrap();
                        assert!(off > last, "{name}: {off} after {last}");
                        last = off;
                        got.insert(off);
                    }
                    None => break,
                }
            }
            // Every acked message reaches every member live: what the lost link missed is
            // caught up from the store (and `join {since}` recovers it too, checked below).
            let missing: Vec<&u64> = want.difference(&got).collect();
            if !missing.is_empty() {
                eprintln!(
                    "{name} missed {} acked messages live (recovered below)",
                    missing.len()
                );
            }
        }
        let mut late = client(&b, "late");
        let ack = late.emit_ack("join", json!({"room": "r", "since": 0}));
        assert_eq!(ack["ok"], true, "{ack}");
        let recovered: BTreeSet<u64> = ack["missed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["offset"].as_u64().unwrap())
            .collect();
        let lost: Vec<&u64> = want.difference(&recovered).collect();
        assert!(lost.is_empty(), "acked but not in history: {lost:?}");
        assert_eq!(ack["truncated"], false, "{}", ack["truncated"]);
    });
}

#[test]
fn lost_pubsub_links_are_caught_up_from_the_store() {
    within(Duration::from_secs(120), || {
        let redis = RedisServer::start();
        let (a, b) = (host(&redis), host(&redis));
        let mut readers = [client(&a, "ra"), client(&b, "rb")];
        for r in readers.iter_mut() {
            join(r, "gap");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let port = a.port;
        let flag = stop.clone();
        let sender = std::thread::spawn(move || {
            let mut c = WsClient::connect(port, &token("s", Some(&["*"])));
            join(&mut c, "gap");
            let mut acked = Vec::new();
            let mut n = 0;
            while !flag.load(Ordering::Relaxed) {
                n += 1;
                let ack = c.emit_ack("message", json!({"room": "gap", "text": format!("{n}")}));
                if ack["ok"] == true {
                    acked.push(ack["offset"].as_u64().unwrap());
                } else {
                    assert_eq!(ack["error"]["code"], "unavailable", "{ack}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            acked
        });
        // Cut every host's pub/sub connection a few times while the sender keeps going
        // (its command connection stays up): whatever is published meanwhile never
        // reaches the subscribers and must come from the store.
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(300));
            redis
                .cmd(&redis.url(), &["CLIENT", "KILL", "TYPE", "pubsub"])
                .expect("client kill");
        }
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
        let acked = sender.join().expect("sender");
        assert!(!acked.is_empty());
        let max = *acked.iter().max().unwrap();
        for (i, r) in readers.iter_mut().enumerate() {
            let mut seen = Vec::new();
            while seen.last().copied().unwrap_or(0) < max {
                match next_message(r, Duration::from_secs(10)) {
                    Some(m) => seen.push(m["offset"].as_u64().unwrap()),
                    None => break,
                }
            }
            assert_eq!(seen, (1..=max).collect::<Vec<u64>>(), "reader {i}");
        }
    });
}

/// Every event `[name, payload]` a client receives within `window`.
fn events_within(c: &mut WsClient, window: Duration) -> Vec<Value> {
    let deadline = Instant::now() + window;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return out;
        }
        match c.next_event(left) {
            Ok(ev) => out.push(ev),
            Err(_) => return out,
        }
    }
}

/// The payloads of the events named `name` among `events`.
fn named(events: &[Value], name: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e[0] == name)
        .map(|e| e[1].clone())
        .collect()
}

/// The users of a room's `presence` ack.
fn present(c: &mut WsClient, room: &str) -> Vec<String> {
    let pr = c.emit_ack("presence", json!({ "room": room }));
    assert_eq!(pr["ok"], true, "{pr}");
    pr["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|u| u["user"].as_str().expect("user").to_owned())
        .collect()
}

#[test]
fn typing_crosses_hosts_and_not_to_the_sender() {
    within(Duration::from_secs(60), || {
        let mut redis = RedisServer::start();
        let (a, b, c) = (host(&redis), host(&redis), host(&redis));
        let mut alice = client(&a, "alice");
        let mut alice2 = client(&a, "alice");
        let mut andy = client(&a, "andy");
        let mut bob = client(&b, "bob");
        let mut carol = client(&c, "carol");
        for cl in [&mut alice, &mut alice2, &mut andy, &mut bob, &mut carol] {
            join(cl, "t");
        }
        std::thread::sleep(Duration::from_millis(300));
        for cl in [&mut alice, &mut alice2, &mut andy, &mut bob, &mut carol] {
            events_within(cl, Duration::from_millis(100));
        }

        let ack = alice.emit_ack("typing", json!({"room": "t"}));
        assert_eq!(ack, json!({"ok": true}));
        let want = json!({"room": "t", "user": "alice"});
        // Every other connection, on every host (alice's second one included), once.
        for (name, cl) in [
            ("alice2", &mut alice2),
            ("andy", &mut andy),
            ("bob", &mut bob),
            ("carol", &mut carol),
        ] {
            let got = named(&events_within(cl, Duration::from_millis(1500)), "typing");
            assert_eq!(got, vec![want.clone()], "{name}");
        }
        let own = named(
            &events_within(&mut alice, Duration::from_millis(300)),
            "typing",
        );
        assert!(own.is_empty(), "the typer got its own notice: {own:?}");

        // The other way round, without an ack: typing needs none.
        carol.send_text(r#"42["typing",{"room":"t"}]"#);
        for cl in [&mut alice, &mut bob] {
            let got = named(&events_within(cl, Duration::from_millis(1500)), "typing");
            assert_eq!(got, vec![json!({"room": "t", "user": "carol"})]);
        }
        // Typing is not a message: no offset was used.
        let m = bob.emit_ack("message", json!({"room": "t", "text": "x"}));
        assert_eq!(m["offset"], 1, "{m}");

        // Redis down: local typing still works, remote notices are dropped silently.
        redis.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while a.health()["redis"]["connected"] != false {
            assert!(Instant::now() < deadline, "healthz never saw redis down");
            std::thread::sleep(Duration::from_millis(50));
        }
        for cl in [&mut alice, &mut andy, &mut bob] {
            events_within(cl, Duration::from_millis(100));
        }
        let ack = alice.emit_ack("typing", json!({"room": "t"}));
        assert_eq!(ack, json!({"ok": true}));
        let got = named(
            &events_within(&mut andy, Duration::from_millis(1000)),
            "typing",
        );
        assert_eq!(got, vec![want.clone()], "local typing with redis down");
        let got = named(
            &events_within(&mut bob, Duration::from_millis(500)),
            "typing",
        );
        assert!(got.is_empty(), "{got:?}");
    });
}

#[test]
fn a_killed_hosts_user_goes_offline_once_for_every_survivor_member() {
    within(Duration::from_secs(90), || {
        const TTL: Duration = Duration::from_secs(2);
        let redis = RedisServer::start();
        let url = redis.url();
        let mut env = ENV.to_vec();
        env.push(("CORELAY_PRESENCE_TTL", "2s"));
        let start = || Server::start_with(&env, &["--redis", &url, "--store", "redis"], true);
        let (a, b, c) = (start(), start(), start());
        // Bob is only on B; dave is on B and on C.
        let mut bob = client(&b, "bob");
        let mut dave_b = client(&b, "dave");
        let mut survivors: Vec<(&str, WsClient)> = vec![
            ("alice", client(&a, "alice")),
            ("amy", client(&a, "amy")),
            ("carol", client(&c, "carol")),
            ("cid", client(&c, "cid")),
            ("dave", client(&c, "dave")),
        ];
        join(&mut bob, "room");
        join(&mut dave_b, "room");
        for (_, cl) in survivors.iter_mut() {
            join(cl, "room");
        }
        assert_eq!(
            present(&mut survivors[0].1, "room"),
            ["alice", "amy", "bob", "carol", "cid", "dave"]
        );
        std::thread::sleep(Duration::from_millis(300));
        for (_, cl) in survivors.iter_mut() {
            events_within(cl, Duration::from_millis(100));
        }

        let killed = Instant::now();
        b.signal(libc::SIGKILL);
        drop((bob, dave_b));
        // Within ttl + a refresh interval (ttl/3) + a probe tick, and slack.
        let bound = TTL + TTL / 3 + Duration::from_millis(1500);
        let mut slowest = Duration::ZERO;
        for (name, cl) in survivors.iter_mut() {
            let p = next_presence(cl, bound.saturating_sub(killed.elapsed()))
                .unwrap_or_else(|| panic!("{name}: no offline event within {bound:?}"));
            assert_eq!(
                p,
                json!({"room": "room", "user": "bob", "online": false}),
                "{name}"
            );
            slowest = slowest.max(killed.elapsed());
        }
        eprintln!("every survivor member had bob's offline event {slowest:?} after the kill (ttl {TTL:?})");
        // Exactly one each, and none for dave (still connected through C).
        std::thread::sleep(TTL);
        for (name, cl) in survivors.iter_mut() {
            let more = named(&events_within(cl, Duration::from_millis(200)), "presence");
            assert!(more.is_empty(), "{name}: more presence events: {more:?}");
        }
        assert_eq!(
            present(&mut survivors[2].1, "room"),
            ["alice", "amy", "carol", "cid", "dave"]
        );
        // The others keep going.
        let ack = survivors[0]
            .1
            .emit_ack("message", json!({"room": "room", "text": "still here"}));
        assert_eq!(ack["ok"], true, "{ack}");
        let m = next_message(&mut survivors[2].1, Duration::from_secs(5)).expect("carol gets it");
        assert_eq!(m["offset"], ack["offset"]);
        drop(b);
    });
}

fn corelay(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_corelay"))
        .args(args)
        .env("CORELAY_JWT_SECRET", common::SECRET)
        .env_remove("CORELAY_REDIS_URL")
        .env_remove("REDIS_HOST")
        .output()
        .expect("run corelay");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn check_against_a_live_and_a_dead_redis() {
    within(Duration::from_secs(60), || {
        let mut redis = RedisServer::start();
        let url = redis.url();
        let (ok, text) = corelay(&["check", "--redis", &url, "--store", "redis"]);
        assert!(ok, "{text}");
        assert!(text.contains("PING: ok"), "{text}");
        assert!(text.contains("pub/sub: ok"), "{text}");
        assert!(text.contains("all checks passed"), "{text}");
        redis.kill();
        let (ok, text) = corelay(&["check", "--redis", &url, "--store", "redis"]);
        assert!(!ok, "{text}");
        assert!(text.contains("FAILED"), "{text}");
        assert!(text.contains("check failed: redis"), "{text}");
    });
}

#[test]
fn serve_refuses_local_stores_and_a_bad_redis_url() {
    within(Duration::from_secs(60), || {
        let redis = RedisServer::start();
        let url = redis.url();
        let listen = format!("127.0.0.1:{}", common::free_port());
        let (ok, text) = corelay(&["serve", "--listen", &listen, "--redis", &url]);
        assert!(!ok, "{text}");
        assert!(
            text.contains("embedded store is local to one host"),
            "{text}"
        );
        let (ok, text) = corelay(&[
            "serve", "--listen", &listen, "--redis", &url, "--store", "memory",
        ]);
        assert!(!ok, "{text}");
        assert!(text.contains("store.kind = \"redis\""), "{text}");
        // A bad URL is a configuration error: refused. (An unreachable Redis is not: see
        // `a_host_started_without_redis_serves_degraded_then_joins_the_cluster`.)
        let (ok, text) = corelay(&[
            "serve",
            "--listen",
            &listen,
            "--redis",
            "redis://127.0.0.1:notaport",
            "--store",
            "redis",
        ]);
        assert!(!ok, "{text}");
        assert!(text.contains("cannot use Redis"), "{text}");
        assert_eq!(
            text.matches("bad redis.url").count(),
            1,
            "said once: {text}"
        );
        assert!(text.contains("bad redis.url"), "{text}");
        let (ok, text) = corelay(&["serve", "--listen", &listen, "--store", "redis"]);
        assert!(!ok, "{text}");
        assert!(text.contains("set redis.url"), "{text}");
    });
}

#[test]
fn a_host_started_without_redis_serves_degraded_then_joins_the_cluster() {
    within(Duration::from_secs(120), || {
        // The room has history (offsets 1..=3) in a Redis that keeps its data; then Redis
        // stops and host A starts with nothing listening on Redis's port.
        let mut redis = RedisServer::start_with(&[
            "--requirepass",
            "hunter2",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ]);
        let url = redis.url_with(":hunter2", 0);
        {
            let early = host_at(&url, &[]);
            let mut c = client(&early, "early");
            join(&mut c, "up");
            for n in 1..=3 {
                let ack = c.emit_ack("message", json!({"room": "up", "text": format!("{n}")}));
                assert_eq!(ack["offset"], n, "{ack}");
            }
        }
        redis.kill();
        let a = host_at(&url, &[]);
        // Ready, with a warning that names the URL without its password.
        let warning = a.startup.join("\n");
        assert!(
            warning.contains("cannot reach redis") && warning.contains("serving degraded"),
            "{warning}"
        );
        assert!(
            warning.contains(&format!("redis://:***@127.0.0.1:{}", redis.port)),
            "{warning}"
        );
        assert!(!warning.contains("hunter2"), "{warning}");
        let h = a.health();
        assert_eq!(h["status"], "degraded", "{h}");
        assert_eq!(h["redis"]["connected"], false, "{h}");
        assert_eq!(a.metric("corelay_redis_connected"), 0.0);

        // Joins, typing and leaves work on this host; sends and history need Redis.
        let mut alice = client(&a, "alice");
        let mut ann = client(&a, "ann");
        // Its offset is unknown here: 0, and live delivery resumes at the real offsets.
        assert_eq!(join(&mut alice, "up")["offset"], 0);
        join(&mut ann, "up");
        let mut leaver = client(&a, "leaver");
        join(&mut leaver, "up");
        let left = leaver.emit_ack("leave", json!({"room": "up"}));
        assert_eq!(left["ok"], true, "{left}");
        alice.send_text("42[\"typing\",{\"room\":\"up\"}]");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = ann.next_event(left).expect("typing reaches ann");
            if ev[0] == "typing" {
                assert_eq!(ev[1], json!({"room": "up", "user": "alice"}));
                break;
            }
        }
        let ack = alice.emit_ack("message", json!({"room": "up", "text": "early"}));
        assert_eq!(ack["error"]["code"], "unavailable", "{ack}");
        let ack = ann.emit_ack("join", json!({"room": "other", "since": 0}));
        assert_eq!(ack["error"]["code"], "unavailable", "{ack}");

        // Redis comes up on that port: the host connects, subscribes and serves fully.
        redis.restart();
        let started = Instant::now();
        wait_until(Duration::from_secs(20), "host A never saw redis", || {
            a.health()["status"] == "ok"
        });
        let b = host_at(&url, &[]);
        let mut bob = client(&b, "bob");
        join(&mut bob, "up");
        // Retried with one cid, as a client should: a retry is never stored twice.
        let ack = loop {
            let ack = alice.emit_ack(
                "message",
                json!({"room": "up", "text": "hello", "cid": "hello-1"}),
            );
            if ack["ok"] == true {
                break ack;
            }
            assert_eq!(ack["error"]["code"], "unavailable", "{ack}");
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "sends still refused: {ack}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        eprintln!(
            "first send accepted {:?} after redis started",
            started.elapsed()
        );
        assert_eq!(ack["offset"], 4, "{ack}");
        // The members who joined while Redis was down get the new message, not the old
        // history (they read that with `history` if they want it).
        for (name, c) in [("bob", &mut bob), ("ann", &mut ann)] {
            let m = next_message(c, Duration::from_secs(10))
                .unwrap_or_else(|| panic!("{name} did not get alice's message"));
            assert_eq!(m["offset"], 4, "{name}: {m}");
            assert_eq!(m["text"], "hello", "{name}: {m}");
        }
        // And the other way: A subscribed its rooms.
        let back = bob.emit_ack("message", json!({"room": "up", "text": "hi alice"}));
        assert_eq!(back["ok"], true, "{back}");
        for (name, c) in [("alice", &mut alice), ("ann", &mut ann)] {
            let m = next_message(c, Duration::from_secs(10))
                .unwrap_or_else(|| panic!("{name} did not get bob's message"));
            assert_eq!(m["offset"], 5, "{name}: {m}");
        }
        // A's presence (joined while Redis was down) was written once it came up (the
        // killed early host still counts until its presence expires).
        wait_until(Duration::from_secs(5), "alice never present", || {
            let pr = bob.emit_ack("presence", json!({"room": "up"}));
            let users: Vec<&str> = pr["users"]
                .as_array()
                .map(|u| u.iter().filter_map(|u| u["user"].as_str()).collect())
                .unwrap_or_default();
            ["alice", "ann", "bob"].iter().all(|u| users.contains(u))
        });
        assert_eq!(history_offsets(&mut bob, "up"), [1, 2, 3, 4, 5]);
        assert_eq!(history_offsets(&mut ann, "up"), [1, 2, 3, 4, 5]);
    });
}

#[test]
fn a_redis_paused_past_its_timeouts_loses_no_acked_message() {
    within(Duration::from_secs(180), || {
        let redis = RedisServer::start();
        let hosts = [host(&redis), host(&redis), host(&redis)];
        let mut readers: Vec<WsClient> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let mut c = client(h, &format!("reader{i}"));
                join(&mut c, "p");
                c
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let ports: Vec<u16> = hosts.iter().map(|h| h.port).collect();
        let senders = spawn_senders(&ports, "p", &stop);
        std::thread::sleep(Duration::from_millis(500));
        // Stalled past the command timeout and the probe: every host sees the link down.
        redis.pause();
        let paused = Instant::now();
        for (i, h) in hosts.iter().enumerate() {
            wait_until(
                Duration::from_secs(15),
                &format!("host {i} never degraded"),
                || {
                    let hl = h.health();
                    hl["status"] == "degraded" && hl["redis"]["connected"] == false
                },
            );
        }
        // Stay stopped a while longer, so that commands queue up in Redis's sockets.
        std::thread::sleep(Duration::from_secs(3).saturating_sub(paused.elapsed()));
        redis.resume();
        for (i, h) in hosts.iter().enumerate() {
            wait_until(
                Duration::from_secs(30),
                &format!("host {i} never ok again"),
                || h.health()["status"] == "ok",
            );
        }
        std::thread::sleep(Duration::from_millis(1000));
        stop.store(true, Ordering::Relaxed);
        let mut acked: BTreeSet<u64> = BTreeSet::new();
        let mut refused = 0;
        for s in senders {
            let (a, r) = s.join().expect("sender");
            assert!(a.windows(2).all(|w| w[0] < w[1]), "{a:?}");
            acked.extend(a);
            refused += r;
        }
        assert!(refused > 0, "no send was refused while redis was stopped");
        let max = *acked.iter().max().expect("some acked");
        eprintln!(
            "acked {} messages (max offset {max}), {refused} refused",
            acked.len()
        );

        // A new message after the resume reaches everyone.
        let mut late = client(&hosts[1], "late");
        join(&mut late, "p");
        let last = late.emit_ack("message", json!({"room": "p", "text": "after"}));
        assert_eq!(last["ok"], true, "{last}");
        let last_offset = last["offset"].as_u64().expect("offset");
        acked.insert(last_offset);

        // The room's history is one contiguous run of offsets holding every acked message.
        let history = history_offsets(&mut readers[0], "p");
        assert_eq!(
            history,
            (1..=history.len() as u64).collect::<Vec<u64>>(),
            "history has gaps"
        );
        let stored: BTreeSet<u64> = history.iter().copied().collect();
        let missing: Vec<&u64> = acked.difference(&stored).collect();
        assert!(missing.is_empty(), "acked but not in history: {missing:?}");

        for (i, r) in readers.iter_mut().enumerate() {
            let mut live: Vec<u64> = Vec::new();
            while live.last().copied().unwrap_or(0) < last_offset {
                match next_message(r, Duration::from_secs(10)) {
                    Some(m) => live.push(m["offset"].as_u64().expect("offset")),
                    None => break,
                }
            }
            assert_eq!(
                live.last(),
                Some(&last_offset),
                "reader{i}: the message after"
            );
            assert!(
                live.windows(2).all(|w| w[0] < w[1]),
                "reader{i}: out of order or twice: {live:?}"
            );
            // What was not delivered live, the member reads back with `join {since}`.
            let got: BTreeSet<u64> = live.iter().copied().collect();
            let missed_live: Vec<u64> = acked.difference(&got).copied().collect();
            if let Some(&first) = missed_live.first() {
                eprintln!("reader{i} missed {} acked messages live", missed_live.len());
                let mut again = client(&hosts[i], &format!("reader{i}"));
                let ack = again.emit_ack("join", json!({"room": "p", "since": first - 1}));
                assert_eq!(ack["ok"], true, "{ack}");
                assert_eq!(ack["truncated"], false, "{ack}");
                let recovered: BTreeSet<u64> = ack["missed"]
                    .as_array()
                    .expect("missed")
                    .iter()
                    .map(|m| m["offset"].as_u64().expect("offset"))
                    .collect();
                let lost: Vec<&u64> = missed_live
                    .iter()
                    .filter(|o| !recovered.contains(o))
                    .collect();
                assert!(lost.is_empty(), "reader{i} cannot recover {lost:?}");
            }
        }
    });
}

#[test]
fn serve_with_a_password_and_with_an_acl_user() {
    within(Duration::from_secs(120), || {
        let redis = RedisServer::start_with(&["--requirepass", "s3cret p@ss"]);
        let admin = redis.url_with(":s3cret%20p%40ss", 0);
        let hosts = [host_at(&admin, &[]), host_at(&admin, &[])];
        let mut clients: Vec<WsClient> = hosts.iter().map(|h| client(h, "u")).collect();
        for c in clients.iter_mut() {
            join(c, "pw");
        }
        crosses_hosts(&mut clients, "pw");
        drop(clients);
        drop(hosts);

        redis.add_corelay_user(&admin, "corelay", "user-pw");
        let acl = redis.url_with("corelay:user-pw", 0);
        let hosts = [host_at(&acl, &[]), host_at(&acl, &[])];
        let mut clients: Vec<WsClient> = hosts.iter().map(|h| client(h, "v")).collect();
        for c in clients.iter_mut() {
            join(c, "acl");
        }
        crosses_hosts(&mut clients, "acl");
        let pr = clients[0].emit_ack("presence", json!({"room": "acl"}));
        assert_eq!(pr["users"][0]["user"], "v", "{pr}");
        assert_eq!(pr["users"].as_array().map(Vec::len), Some(1), "{pr}");

        // Refused credentials are a configuration error: `serve` refuses to start, saying
        // so, without the password.
        let listen = format!("127.0.0.1:{}", common::free_port());
        for bad in [
            redis.url_with(":wrong-pw", 0),
            redis.url_with("corelay:wrong-pw", 0),
        ] {
            let (ok, text) = corelay(&[
                "serve", "--listen", &listen, "--redis", &bad, "--store", "redis",
            ]);
            assert!(!ok, "{text}");
            assert!(text.contains("refused the credentials"), "{text}");
            assert!(!text.contains("wrong-pw"), "{text}");
        }
    });
}

#[test]
fn serve_over_tls_with_a_private_ca() {
    within(Duration::from_secs(120), || {
        let tls = common_redis::TlsFiles::generate()
            .unwrap_or_else(|e| panic!("cannot make test certificates: {e}"));
        let redis = RedisServer::start_tls(&tls, &[]);
        let url = redis.url();
        assert!(url.starts_with("rediss://"), "{url}");
        let ca = tls.ca_cert.display().to_string();
        let env = [("CORELAY_REDIS_TLS_CA_FILE", ca.as_str())];
        let hosts = [host_at(&url, &env), host_at(&url, &env)];
        let mut clients: Vec<WsClient> = hosts.iter().map(|h| client(h, "t")).collect();
        for c in clients.iter_mut() {
            join(c, "tls");
        }
        crosses_hosts(&mut clients, "tls");
        let h = hosts[1].health();
        assert_eq!(h["status"], "ok", "{h}");

        // A CA the server's certificate does not chain to (system roots only) is a
        // configuration error: refused at start, saying it is about TLS.
        let listen = format!("127.0.0.1:{}", common::free_port());
        let (ok, text) = corelay(&[
            "serve", "--listen", &listen, "--redis", &url, "--store", "redis",
        ]);
        assert!(!ok, "{text}");
        assert!(text.contains("TLS"), "{text}");
        // An unreadable CA file: refused, naming it.
        let out = Command::new(env!("CARGO_BIN_EXE_corelay"))
            .args([
                "serve", "--listen", &listen, "--redis", &url, "--store", "redis",
            ])
            .env("CORELAY_JWT_SECRET", common::SECRET)
            .env("CORELAY_REDIS_TLS_CA_FILE", "/nonexistent/ca.pem")
            .output()
            .expect("run corelay");
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}");
        assert!(text.contains("/nonexistent/ca.pem"), "{text}");
    });
}

/// Runs a command on `con`, panicking with its error.
fn admin(con: &mut redis::Connection, args: &[&str]) -> redis::Value {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(con).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// The `CLIENT LIST` lines of the connections whose name ends with `suffix`.
fn named_clients(con: &mut redis::Connection, suffix: &str) -> Vec<String> {
    let list = match admin(con, &["CLIENT", "LIST"]) {
        redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        redis::Value::VerbatimString { text, .. } => text,
        other => panic!("CLIENT LIST: {other:?}"),
    };
    list.lines()
        .filter(|l| {
            l.split(' ')
                .any(|f| f.strip_prefix("name=").is_some_and(|n| n.ends_with(suffix)))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_shards_own_redis_link_counts_in_health_and_comes_back() {
    within(Duration::from_secs(60), || {
        let redis = RedisServer::start();
        let a = host(&redis);
        // One connection of the test's own, kept: new ones will be refused below.
        let mut con = redis::Client::open(redis.url())
            .and_then(|c| c.get_connection())
            .expect("admin connection");
        // Each of the two shards publishes and subscribes over connections of its own,
        // named for `CLIENT LIST`.
        let deadline = Instant::now() + Duration::from_secs(10);
        while named_clients(&mut con, ":pubsub").len() < 2
            || named_clients(&mut con, ":commands").len() < 2
        {
            // Both open at start; a few messages through every shard's rooms on top.
            let mut c = client(&a, "warm");
            for room in ["w0", "w1", "w2", "w3"] {
                join(&mut c, room);
                let ack = c.emit_ack("message", json!({"room": room, "text": "hi"}));
                assert_eq!(ack["ok"], true, "{ack}");
            }
            assert!(
                Instant::now() < deadline,
                "{:?}",
                named_clients(&mut con, "")
            );
        }
        assert_eq!(a.health()["status"], "ok");

        // No room for new clients, and the shards' subscriber connections cut: the shards
        // cannot reconnect while the process's own probe link stays up.
        admin(&mut con, &["CONFIG", "SET", "maxclients", "1"]);
        for line in named_clients(&mut con, ":pubsub") {
            let id = line
                .split(' ')
                .find_map(|f| f.strip_prefix("id="))
                .expect("id");
            admin(&mut con, &["CLIENT", "KILL", "ID", id]);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let h = a.health();
            if h["redis"]["shard_links_down"] == 2 {
                assert_eq!(h["status"], "degraded", "{h}");
                assert_eq!(h["redis"]["connected"], true, "the probe link is fine: {h}");
                break;
            }
            assert!(Instant::now() < deadline, "no shard link seen down: {h}");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(a.metric("corelay_redis_link_down"), 2.0);

        // Room again: both shards reconnect and say so.
        admin(&mut con, &["CONFIG", "SET", "maxclients", "10000"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while a.health()["status"] != "ok" {
            assert!(Instant::now() < deadline, "{}", a.health());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(a.health()["redis"]["shard_links_down"], 0);
        assert_eq!(a.metric("corelay_redis_link_down"), 0.0);
        assert_eq!(named_clients(&mut con, ":pubsub").len(), 2);
    });
}
