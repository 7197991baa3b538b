//! The backend's feed (PROTOCOL.md, "Feed"), against the real binary and a real HTTP
//! backend started by the test: every acked message reaches it, per room in offset order,
//! signed; through the backend being down for a while; and through a SIGKILL of corelay
//! in the middle of the feed (the embedded store's ledger resumes it after the restart).

mod common;
mod common_hooks;
mod common_redis;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{token, Server, WsClient};
use common_hooks::{Backend, Reply};
use common_redis::RedisServer;
use serde_json::json;

const FEED_SECRET: &str = "feed-secret-for-tests";

/// What the feed's backend took, and how it behaves.
#[derive(Default)]
struct FeedLog {
    /// Every `(room, offset)` of the batches it answered 2xx, in arrival order.
    taken: Mutex<Vec<(String, u64)>>,
    /// While set, it answers 503.
    down: AtomicBool,
    /// Requests whose signature did not check.
    unsigned: AtomicUsize,
    /// How long it takes to answer a batch it takes.
    slow: Mutex<Duration>,
}

impl FeedLog {
    /// The rooms' offsets as the backend took them, in order, per room.
    fn per_room(&self) -> BTreeMap<String, Vec<u64>> {
        let mut rooms: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (room, offset) in self.taken.lock().unwrap().iter() {
            rooms.entry(room.clone()).or_default().push(*offset);
        }
        rooms
    }
}

/// The feed's backend: takes batches (or refuses them while down), checking signatures.
fn feed_backend(log: Arc<FeedLog>) -> Backend {
    Backend::start(move |seen| {
        if !seen.signed_with(FEED_SECRET) {
            log.unsigned.fetch_add(1, Ordering::SeqCst);
        }
        if log.down.load(Ordering::SeqCst) {
            return Reply::Raw(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_vec(),
            );
        }
        {
            let mut taken = log.taken.lock().unwrap();
            for e in seen.body["events"].as_array().into_iter().flatten() {
                assert_eq!(e["type"], "message", "{e}");
                taken.push((
                    e["room"].as_str().unwrap_or("").to_owned(),
                    e["offset"].as_u64().unwrap_or(0),
                ));
            }
        }
        // Slow to answer: taken (as a backend that stored them), the 2xx comes later.
        let slow = *log.slow.lock().unwrap();
        Reply::After(slow, Box::new(Reply::Json(json!({}))))
    })
}

/// The env that turns the feed on toward `backend`.
fn feed_env(backend: &Backend) -> Vec<(&'static str, String)> {
    vec![
        (
            "CORELAY_FEED_URL",
            format!("http://127.0.0.1:{}/feed", backend.port),
        ),
        ("CORELAY_HOOKS_SECRET", FEED_SECRET.to_owned()),
        ("CORELAY_LIMITS_SEND_RATE", "100000".to_owned()),
        ("CORELAY_LIMITS_SEND_BURST", "100000".to_owned()),
    ]
}

fn start(backend: &Backend, args: &[&str]) -> Server {
    let env = feed_env(backend);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start_with(&env, args, true)
}

/// A host of a cluster on `redis` (the `redis` store) with the feed on.
fn cluster_host(backend: &Backend, redis: &RedisServer) -> Server {
    let url = redis.url();
    let env = feed_env(backend);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start_sharded(
        1,
        &env,
        &["--redis", url.as_str(), "--store", "redis"],
        true,
    )
}

/// Sends `n` messages to each of `rooms` (one client per room, in the room), and returns
/// the acked offsets per room.
fn send(port: u16, rooms: &[&str], n: usize) -> BTreeMap<String, Vec<u64>> {
    send_as(port, rooms, n, "u")
}

/// [`send`] with users named after `who`.
fn send_as(port: u16, rooms: &[&str], n: usize, who: &str) -> BTreeMap<String, Vec<u64>> {
    let threads: Vec<_> = rooms
        .iter()
        .map(|room| {
            let room = room.to_string();
            let user = format!("{who}-{room}");
            std::thread::spawn(move || {
                let mut c = WsClient::connect(port, &token(&user, Some(&["*"])));
                assert_eq!(c.emit_ack("join", json!({"room": room}))["ok"], true);
                let offsets: Vec<u64> = (0..n)
                    .map(|i| {
                        let ack =
                            c.emit_ack("message", json!({"room": room, "text": format!("m{i}")}));
                        assert_eq!(ack["ok"], true, "{ack}");
                        ack["offset"].as_u64().unwrap()
                    })
                    .collect();
                (room, offsets)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Waits until the backend took every acked offset (or panics after `limit`).
fn wait_taken(log: &FeedLog, acked: &BTreeMap<String, Vec<u64>>, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let taken = log.per_room();
        let missing: usize = acked
            .iter()
            .map(|(room, offsets)| {
                let got: BTreeSet<u64> = taken.get(room).into_iter().flatten().copied().collect();
                offsets.iter().filter(|o| !got.contains(o)).count()
            })
            .sum();
        if missing == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} acked messages never reached the feed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Per room, the backend's offsets are in order: each new offset is the next one (no gap,
/// nothing out of order); going back is a redelivery, allowed only when `redelivery`.
fn assert_in_order(log: &FeedLog, redelivery: bool) {
    for (room, offsets) in log.per_room() {
        let mut top = 0;
        for o in offsets {
            if o > top {
                assert_eq!(
                    o,
                    top + 1,
                    "room {room}: {o} came after {top} (a gap or reorder)"
                );
                top = o;
            } else {
                assert!(redelivery, "room {room}: {o} came again after {top}");
            }
        }
    }
}

#[test]
fn every_acked_message_reaches_the_feed_signed_and_in_order() {
    let log = Arc::new(FeedLog::default());
    let backend = feed_backend(log.clone());
    let server = start(&backend, &["--store", "memory"]);
    let acked = send(server.port, &["alpha", "beta", "gamma", "delta"], 60);
    wait_taken(&log, &acked, Duration::from_secs(10));
    assert_in_order(&log, false);
    assert_eq!(log.taken.lock().unwrap().len(), 4 * 60, "each exactly once");
    assert_eq!(log.unsigned.load(Ordering::SeqCst), 0);
    assert!(backend.seen().iter().all(|s| s.path == "/feed"));
    assert_eq!(server.metric("corelay_feed_events_total"), 240.0);
    assert_eq!(server.metric("corelay_feed_lag_seconds"), 0.0);
}

#[test]
fn a_backend_down_for_a_while_gets_everything_after() {
    let log = Arc::new(FeedLog::default());
    log.down.store(true, Ordering::SeqCst);
    let backend = feed_backend(log.clone());
    let server = start(&backend, &["--store", "memory"]);
    let acked = send(server.port, &["one", "two"], 30);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(log.taken.lock().unwrap().is_empty());
    // Down: retried with backoff, and the lag shows how late it is.
    assert!(server.metric("corelay_feed_retries_total") >= 2.0);
    assert!(server.metric("corelay_feed_lag_seconds") >= 1.0);
    assert!(server.metric("corelay_feed_owed_rooms") >= 2.0);
    log.down.store(false, Ordering::SeqCst);
    // The backoff doubles from 100 ms: the next try is within a few seconds.
    wait_taken(&log, &acked, Duration::from_secs(15));
    assert_in_order(&log, false);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.metric("corelay_feed_owed_rooms") > 0.0 {
        assert!(Instant::now() < deadline, "rooms still owed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.metric("corelay_feed_lag_seconds"), 0.0);
}

#[test]
fn a_sigkill_mid_feed_loses_nothing_acked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let args = ["--store", "embedded", "--data-dir", data];
    let log = Arc::new(FeedLog::default());
    // A slow backend: the feed falls behind the sends, so the kill finds it mid-way.
    *log.slow.lock().unwrap() = Duration::from_millis(400);
    let backend = feed_backend(log.clone());
    let mut server = start(&backend, &args);
    let rooms = ["north", "south", "east"];
    let acked = send(server.port, &rooms, 80);
    let before = log.taken.lock().unwrap().len();
    assert!(
        before < 3 * 80,
        "the feed should still be behind ({before} taken)"
    );
    server.signal(libc::SIGKILL);
    server.wait_exit(Duration::from_secs(5));
    *log.slow.lock().unwrap() = Duration::ZERO;

    // Restarted on the same data: the ledger says what is still owed.
    let server = start(&backend, &args);
    wait_taken(&log, &acked, Duration::from_secs(15));
    assert_in_order(&log, true);
    let restarted_from: usize = log.taken.lock().unwrap().len() - before;
    assert!(restarted_from > 0);
    // Nothing new is owed once it caught up.
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.metric("corelay_feed_owed_rooms") > 0.0 {
        assert!(Instant::now() < deadline, "rooms still owed");
        std::thread::sleep(Duration::from_millis(50));
    }
    // And after a clean restart (SIGTERM: drained, the store closed), nothing is sent again.
    let mut server = server;
    server.signal(libc::SIGTERM);
    server.wait_exit(Duration::from_secs(10));
    let taken = log.taken.lock().unwrap().len();
    let _server = start(&backend, &args);
    std::thread::sleep(Duration::from_millis(500));
    let again: Vec<(String, u64)> = log.taken.lock().unwrap()[taken..].to_vec();
    assert!(
        again.is_empty(),
        "a clean restart owes nothing, sent {again:?}"
    );
}

#[test]
fn a_cluster_feeds_every_acked_message_through_the_loss_of_a_host() {
    let redis = RedisServer::start();
    let log = Arc::new(FeedLog::default());
    let backend = feed_backend(log.clone());
    let mut a = cluster_host(&backend, &redis);
    let b = cluster_host(&backend, &redis);
    let rooms = ["r1", "r2", "r3", "r4", "r5", "r6"];
    // Both hosts send into every room: one offset sequence per room, fed in order.
    let mut acked = send_as(a.port, &rooms, 10, "a");
    for (room, offsets) in send_as(b.port, &rooms, 10, "b") {
        acked.entry(room).or_default().extend(offsets);
    }
    wait_taken(&log, &acked, Duration::from_secs(15));
    assert_in_order(&log, false);

    // The backend goes down: the feed owes what is acked now. Host A dies with its leases.
    log.down.store(true, Ordering::SeqCst);
    for (room, offsets) in send_as(a.port, &rooms, 15, "a") {
        acked.entry(room).or_default().extend(offsets);
    }
    for (room, offsets) in send_as(b.port, &rooms, 15, "b") {
        acked.entry(room).or_default().extend(offsets);
    }
    // Both hosts hold leases (so A's death leaves partitions for B to take over).
    let holders = |redis: &RedisServer| -> BTreeSet<String> {
        (0..64)
            .filter_map(|p| {
                match common_redis::query(
                    &redis.url(),
                    &["GET", &format!("corelay:feed:{{p{p}}}:lease")],
                ) {
                    Ok(redis::Value::BulkString(b)) => {
                        Some(String::from_utf8_lossy(&b).into_owned())
                    }
                    _ => None,
                }
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while holders(&redis).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the leases never spread over both hosts"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    a.signal(libc::SIGKILL);
    a.wait_exit(Duration::from_secs(5));
    log.down.store(false, Ordering::SeqCst);
    // Host B takes A's partitions once their leases expire (6 s) and resumes them.
    wait_taken(&log, &acked, Duration::from_secs(30));
    assert_eq!(holders(&redis).len(), 1, "B holds every lease");
    assert_in_order(&log, true);
    assert_eq!(log.unsigned.load(Ordering::SeqCst), 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.metric("corelay_feed_owed_rooms") > 0.0 {
        assert!(Instant::now() < deadline, "rooms still owed");
        std::thread::sleep(Duration::from_millis(50));
    }
}
