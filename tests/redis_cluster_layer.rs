//! The Redis cluster layer against real `redis-server`s, one per test on a free port (see
//! `common_redis`): the publish script's offsets and dedupe, subscriptions and their order,
//! reconnecting after a restart, a stalled server, AUTH and ACL users, TLS, presence, and
//! `check`. Every test body is bounded in time; every server dies with its test.

mod common_redis;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common_redis::{connect, fast_opts as opts, free_port, within, RedisServer, TlsFiles};
use corelay::bridge::Bridge;
use corelay::cluster::redis::RedisCluster;
use corelay::cluster::{
    check, url_from_vars, Ack, ClusterError, ClusterEvent, NewMessage, PresenceEntry, Published,
};
use corelay::store::{HistoryQuery, HistoryStore, Store, StoreError};
use futures::channel::mpsc::{TryRecvError, UnboundedReceiver};
use futures::executor::block_on;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn msg(room: &str, user: &str, text: &str, cid: Option<&str>) -> NewMessage {
    NewMessage {
        room: room.to_owned(),
        user: user.to_owned(),
        text: text.to_owned(),
        cid: cid.map(str::to_owned),
        ts: corelay::ids::now_ms(),
        id: format!("id{:06}", NEXT_ID.fetch_add(1, Ordering::Relaxed)),
    }
}

fn stored(p: Published) -> corelay::store::StoredMessage {
    match p {
        Published::Stored(m) => m,
        Published::Duplicate(a) => panic!("expected a new message, got the duplicate of {a:?}"),
    }
}

/// The next event within `limit`, or `None`.
fn next_event(rx: &mut UnboundedReceiver<ClusterEvent>, limit: Duration) -> Option<ClusterEvent> {
    let deadline = Instant::now() + limit;
    loop {
        match rx.try_recv() {
            Ok(ev) => return Some(ev),
            Err(TryRecvError::Closed) => return None,
            Err(TryRecvError::Empty) if Instant::now() >= deadline => return None,
            Err(TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Skips events until one matches `want`; panics after `limit`.
fn wait_event(
    rx: &mut UnboundedReceiver<ClusterEvent>,
    limit: Duration,
    what: &str,
    want: impl Fn(&ClusterEvent) -> bool,
) -> ClusterEvent {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_event(rx, left) {
            Some(ev) if want(&ev) => return ev,
            Some(_) => {}
            None => panic!("no {what} within {limit:?}"),
        }
    }
}

/// Polls `cond` until true or `limit` passes.
fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// Runs `fut_gen` on a fresh glommio executor, like a shard.
fn on_shard<G, F, T>(fut_gen: G) -> std::thread::JoinHandle<T>
where
    G: FnOnce() -> F + Send + 'static,
    F: std::future::Future<Output = T> + 'static,
    T: Send + 'static,
{
    let executor = glommio::LocalExecutorBuilder::default()
        .io_memory(512 * 1024)
        .spawn(fut_gen)
        .expect("start a glommio executor");
    std::thread::spawn(move || executor.join().expect("glommio executor"))
}

#[test]
fn offsets_are_contiguous_under_concurrent_publishers() {
    let server = RedisServer::start();
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        // Two "hosts", each driven from its own glommio shard with several tasks.
        let hosts = [
            connect(opts(&server.url()), &bridge),
            connect(opts(&server.url()), &bridge),
        ];
        let (tasks, per_task) = (4u64, 50u64);
        let shards: Vec<_> = hosts
            .iter()
            .enumerate()
            .map(|(h, cluster)| {
                let cluster = cluster.clone();
                on_shard(move || async move {
                    let mut handles = Vec::new();
                    for t in 0..tasks {
                        let cluster = cluster.clone();
                        handles.push(glommio::spawn_local(async move {
                            let mut mine = Vec::new();
                            for i in 0..per_task {
                                let text = format!("h{h} t{t} #{i}");
                                let m = stored(
                                    cluster
                                        .publish(msg("conc", "alice", &text, None))
                                        .await
                                        .expect("publish"),
                                );
                                // Another room interleaved: its own sequence.
                                if i % 5 == 0 {
                                    cluster
                                        .publish(msg("other", "bob", &text, None))
                                        .await
                                        .expect("publish other");
                                }
                                mine.push((m.offset, m.text));
                            }
                            mine
                        }));
                    }
                    let mut all = Vec::new();
                    for h in handles {
                        all.push(h.await);
                    }
                    all
                })
            })
            .collect();
        let mut offsets = Vec::new();
        let mut by_offset = std::collections::HashMap::new();
        for shard in shards {
            for task in shard.join().expect("shard") {
                // One task publishes one at a time: its offsets only go up.
                assert!(task.windows(2).all(|w| w[0].0 < w[1].0), "{task:?}");
                for (offset, text) in task {
                    offsets.push(offset);
                    by_offset.insert(offset, text);
                }
            }
        }
        let n = 2 * tasks * per_task;
        offsets.sort_unstable();
        assert_eq!(
            offsets,
            (1..=n).collect::<Vec<_>>(),
            "contiguous, no gaps, no repeats"
        );

        // The stream holds exactly those messages at those offsets.
        let store = Store::redis(&hosts[0]);
        let read = block_on(store.read("conc", HistoryQuery::After(0), 10_000)).expect("read");
        assert_eq!(read.len() as u64, n);
        for m in &read {
            assert_eq!(Some(&m.text), by_offset.get(&m.offset));
        }
        assert_eq!(block_on(store.latest_offset("conc")).expect("latest"), n);
        let other = block_on(store.latest_offset("other")).expect("latest");
        assert_eq!(other, 2 * tasks * per_task / 5);
        bridge.shutdown();
    });
}

#[test]
fn cid_dedupe_returns_the_first_ack_and_stores_nothing() {
    let server = RedisServer::start();
    within(Duration::from_secs(30), move || {
        let bridge = Bridge::start().expect("bridge");
        let mut o = opts(&server.url());
        o.dedupe_window = Duration::from_millis(700);
        let cluster = connect(o, &bridge);
        let mut events = cluster.subscriber(0);
        block_on(cluster.subscribe(0, "d")).expect("subscribe");

        let first = stored(
            block_on(cluster.publish(msg("d", "alice", "first", Some("c1")))).expect("publish"),
        );
        assert_eq!(first.offset, 1);
        let again = block_on(cluster.publish(msg("d", "alice", "retry, other text", Some("c1"))))
            .expect("publish again");
        assert_eq!(
            again,
            Published::Duplicate(Ack {
                offset: 1,
                id: first.id.clone(),
                ts: first.ts
            }),
            "the first ack, unchanged"
        );
        assert_eq!(again.ack(), Published::Stored(first.clone()).ack());

        // Nothing stored, nothing published by the retry.
        let store = Store::redis(&cluster);
        assert_eq!(block_on(store.latest_offset("d")).expect("latest"), 1);
        assert_eq!(
            block_on(store.read("d", HistoryQuery::Latest, 10)).expect("read"),
            vec![first.clone()]
        );
        let ev = next_event(&mut events, Duration::from_secs(2)).expect("the first message");
        assert_eq!(ev, ClusterEvent::Message(first.clone()));
        assert_eq!(next_event(&mut events, Duration::from_millis(200)), None);
        assert_eq!(
            block_on(store.find_cid("d", "alice", "c1", 0)).expect("find_cid"),
            Some(first.clone())
        );

        // The same cid from another user, or in another room, is another message.
        let bob = stored(block_on(cluster.publish(msg("d", "bob", "x", Some("c1")))).expect("bob"));
        assert_eq!(bob.offset, 2);
        let elsewhere =
            stored(block_on(cluster.publish(msg("d2", "alice", "x", Some("c1")))).expect("d2"));
        assert_eq!(elsewhere.offset, 1);
        // Users whose names would collide in a naive key ("a:b"+"c" vs "a"+"b:c").
        let ab = stored(block_on(cluster.publish(msg("d", "a:b", "x", Some("c")))).expect("a:b"));
        let a = stored(block_on(cluster.publish(msg("d", "a", "x", Some("b:c")))).expect("a"));
        assert_eq!((ab.offset, a.offset), (3, 4));
        // No cid: never deduplicated.
        let n1 = stored(block_on(cluster.publish(msg("d", "alice", "same", None))).expect("n1"));
        let n2 = stored(block_on(cluster.publish(msg("d", "alice", "same", None))).expect("n2"));
        assert_eq!((n1.offset, n2.offset), (5, 6));

        // After the window, the cid is free again.
        std::thread::sleep(Duration::from_millis(900));
        let later = stored(
            block_on(cluster.publish(msg("d", "alice", "later", Some("c1")))).expect("later"),
        );
        assert_eq!(later.offset, 7);
        bridge.shutdown();
    });
}

#[test]
fn a_batch_is_one_publish_after_another_per_room() {
    let server = RedisServer::start();
    within(Duration::from_secs(30), move || {
        let bridge = Bridge::start().expect("bridge");
        let cluster = connect(opts(&server.url()), &bridge);
        let mut events = cluster.subscriber(0);
        block_on(cluster.subscribe(0, "b1")).expect("subscribe b1");
        block_on(cluster.subscribe(0, "b2")).expect("subscribe b2");
        let before =
            stored(block_on(cluster.publish(msg("b1", "u", "zero", Some("c0")))).expect("c0"));
        assert_eq!(before.offset, 1);

        // Two rooms interleaved; a cid repeated inside the batch and one sent before it.
        let batch = [
            msg("b1", "u", "one", Some("c1")),
            msg("b2", "v", "first in b2", None),
            msg("b1", "u", "one again", Some("c1")),
            msg("b1", "u", "zero again", Some("c0")),
            msg("b1", "w", "two", None),
            msg("b2", "v", "second in b2", Some("x")),
        ];
        let results =
            block_on(cluster.publish_batch(batch.iter().map(|m| (m.clone(), 0)).collect()));
        assert_eq!(results.len(), batch.len());
        let one = stored(results[0].clone().expect("one"));
        assert_eq!((one.offset, one.text.as_str()), (2, "one"));
        let b2_first = stored(results[1].clone().expect("b2 first"));
        assert_eq!(b2_first.offset, 1);
        let dup_in_batch = results[2].clone().expect("dup in batch");
        assert_eq!(
            dup_in_batch,
            Published::Duplicate(Published::Stored(one.clone()).ack())
        );
        let dup_before = results[3].clone().expect("dup of an earlier send");
        assert_eq!(
            dup_before,
            Published::Duplicate(Published::Stored(before.clone()).ack())
        );
        let two = stored(results[4].clone().expect("two"));
        assert_eq!((two.offset, two.user.as_str()), (3, "w"));
        let b2_second = stored(results[5].clone().expect("b2 second"));
        assert_eq!(b2_second.offset, 2);

        // Published in offset order per room, each stored message once, duplicates never.
        let mut got: Vec<(String, u64)> = Vec::new();
        while let Some(ev) = next_event(&mut events, Duration::from_millis(500)) {
            if let ClusterEvent::Message(m) = ev {
                got.push((m.room.clone(), m.offset));
            }
        }
        let in_room = |room: &str| -> Vec<u64> {
            got.iter()
                .filter(|(r, _)| r == room)
                .map(|(_, o)| *o)
                .collect()
        };
        assert_eq!(in_room("b1"), vec![1, 2, 3]);
        assert_eq!(in_room("b2"), vec![1, 2]);
        let store = Store::redis(&cluster);
        let texts: Vec<String> = block_on(store.read("b1", HistoryQuery::Latest, 10))
            .expect("read")
            .into_iter()
            .map(|m| m.text)
            .collect();
        assert_eq!(texts, vec!["zero", "one", "two"]);
        // A floor (an offset the caller knows was handed out) lifts the room's counter;
        // the room's highest floor in the batch counts.
        let lifted = block_on(cluster.publish_batch(vec![
            (msg("b2", "v", "after a floor", None), 10),
            (msg("b2", "v", "next", None), 7),
        ]));
        let offsets: Vec<u64> = lifted
            .into_iter()
            .map(|r| stored(r.expect("lifted")).offset)
            .collect();
        assert_eq!(offsets, vec![11, 12]);
        // An empty batch is no call at all.
        assert!(block_on(cluster.publish_batch(Vec::new())).is_empty());
        bridge.shutdown();
    });
}

#[test]
fn subscribers_receive_in_offset_order() {
    let server = RedisServer::start();
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let a = connect(opts(&server.url()), &bridge);
        let b = connect(opts(&server.url()), &bridge);
        let mut b0 = b.subscriber(0);
        let mut b1 = b.subscriber(1);
        let mut a0 = a.subscriber(0);
        block_on(b.subscribe(0, "ordered")).expect("subscribe");
        block_on(b.subscribe(1, "side")).expect("subscribe");
        block_on(a.subscribe(0, "ordered")).expect("subscribe");

        // Host A publishes from three concurrent tasks on a shard.
        let publisher = a.clone();
        let total = on_shard(move || async move {
            let mut handles = Vec::new();
            for t in 0..3 {
                let p = publisher.clone();
                handles.push(glommio::spawn_local(async move {
                    for i in 0..100 {
                        p.publish(msg("ordered", "alice", &format!("{t}/{i}"), None))
                            .await
                            .expect("publish");
                    }
                }));
            }
            for h in handles {
                h.await;
            }
            publisher
                .publish(msg("side", "bob", "side message", None))
                .await
                .expect("publish side");
            300u64
        })
        .join()
        .expect("publisher");

        for (who, rx) in [("host B", &mut b0), ("host A (own echo)", &mut a0)] {
            let mut got = Vec::new();
            while got.len() < total as usize {
                match next_event(rx, Duration::from_secs(5)) {
                    Some(ClusterEvent::Message(m)) => {
                        assert_eq!(m.room, "ordered");
                        got.push(m.offset);
                    }
                    Some(other) => panic!("{who}: unexpected {other:?}"),
                    None => panic!("{who}: only {} of {total} messages", got.len()),
                }
            }
            assert_eq!(
                got,
                (1..=total).collect::<Vec<_>>(),
                "{who}: in offset order"
            );
        }
        // Shard 1 of B subscribed only "side".
        match next_event(&mut b1, Duration::from_secs(2)) {
            Some(ClusterEvent::Message(m)) => assert_eq!((m.room.as_str(), m.offset), ("side", 1)),
            other => panic!("shard 1: {other:?}"),
        }
        assert_eq!(next_event(&mut b1, Duration::from_millis(100)), None);

        // Unsubscribed: nothing more arrives.
        block_on(b.unsubscribe(0, "ordered")).expect("unsubscribe");
        block_on(a.publish(msg("ordered", "alice", "after", None))).expect("publish");
        assert_eq!(next_event(&mut b0, Duration::from_millis(300)), None);
        assert!(matches!(
            next_event(&mut a0, Duration::from_secs(2)),
            Some(ClusterEvent::Message(m)) if m.offset == total + 1
        ));
        // The probe measured a round trip.
        assert!(eventually(Duration::from_secs(2), || a
            .last_roundtrip_ms()
            .is_some()));
        assert!(a.is_connected() && b.is_connected());
        bridge.shutdown();
    });
}

#[test]
fn sharded_pubsub_publishes_and_delivers_in_order() {
    let server = RedisServer::start();
    within(Duration::from_secs(30), move || {
        let bridge = Bridge::start().expect("bridge");
        let mut o = opts(&server.url());
        o.sharded = true;
        let a = connect(o.clone(), &bridge);
        let b = connect(o, &bridge);
        let mut rx = b.subscriber(3);
        block_on(b.subscribe(3, "sh")).expect("ssubscribe");
        for i in 1..=50u64 {
            let m =
                stored(block_on(a.publish(msg("sh", "u", &i.to_string(), None))).expect("publish"));
            assert_eq!(m.offset, i);
        }
        for i in 1..=50u64 {
            match next_event(&mut rx, Duration::from_secs(3)) {
                Some(ClusterEvent::Message(m)) => assert_eq!(m.offset, i),
                other => panic!("{other:?}"),
            }
        }
        // The subscription is a shard channel: SPUBLISH reaches it, PUBLISH does not.
        let channels = server
            .cmd(&server.url(), &["PUBSUB", "SHARDCHANNELS", "corelay:*"])
            .expect("pubsub shardchannels");
        assert!(
            format!("{channels:?}").contains("corelay:{sh}"),
            "{channels:?}"
        );
        assert!(eventually(Duration::from_secs(2), || b
            .last_roundtrip_ms()
            .is_some()));
        // The server drops the pub/sub connections: the link comes back with the shard
        // channel subscribed again.
        server
            .cmd(&server.url(), &["CLIENT", "KILL", "TYPE", "pubsub"])
            .expect("client kill");
        wait_event(&mut rx, Duration::from_secs(5), "Down", |e| {
            matches!(e, ClusterEvent::Down { .. })
        });
        wait_event(&mut rx, Duration::from_secs(5), "Reconnected", |e| {
            *e == ClusterEvent::Reconnected
        });
        let m = stored(block_on(a.publish(msg("sh", "u", "again", None))).expect("publish"));
        assert_eq!(
            wait_event(
                &mut rx,
                Duration::from_secs(3),
                "message after reconnect",
                |e| { matches!(e, ClusterEvent::Message(_)) }
            ),
            ClusterEvent::Message(m)
        );
        block_on(b.unsubscribe(3, "sh")).expect("sunsubscribe");
        block_on(a.publish(msg("sh", "u", "after", None))).expect("publish");
        assert_eq!(next_event(&mut rx, Duration::from_millis(300)), None);
        bridge.shutdown();
    });
}

#[test]
fn reconnects_after_redis_restarts_on_the_same_port() {
    let mut server = RedisServer::start_persistent();
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let cluster = connect(opts(&server.url()), &bridge);
        let mut events = cluster.subscriber(0);
        block_on(cluster.subscribe(0, "r")).expect("subscribe");
        for i in 1..=3 {
            let m = stored(
                block_on(cluster.publish(msg("r", "alice", "before", None))).expect("publish"),
            );
            assert_eq!(m.offset, i);
            assert!(matches!(
                next_event(&mut events, Duration::from_secs(2)),
                Some(ClusterEvent::Message(m)) if m.offset == i
            ));
        }

        server.kill();
        let down = wait_event(&mut events, Duration::from_secs(5), "Down", |e| {
            matches!(e, ClusterEvent::Down { .. })
        });
        println!("{down:?}");
        assert!(!cluster.is_connected());
        assert_eq!(cluster.last_roundtrip_ms(), None);
        // Calls fail fast and clearly while Redis is away.
        let started = Instant::now();
        let err =
            block_on(cluster.publish(msg("r", "alice", "while down", None))).expect_err("down");
        println!("{err}");
        assert!(matches!(err, ClusterError::Unavailable(_)), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        // A room subscribed while down is taken along on reconnect.
        let err = block_on(cluster.subscribe(1, "late")).expect_err("link down");
        assert!(matches!(err, ClusterError::Unavailable(_)), "{err:?}");
        let mut late = cluster.subscriber(1);

        server.restart();
        wait_event(&mut events, Duration::from_secs(10), "Reconnected", |e| {
            *e == ClusterEvent::Reconnected
        });
        assert!(cluster.is_connected());
        assert!(eventually(Duration::from_secs(2), || cluster
            .last_roundtrip_ms()
            .is_some()));
        // Publishing works again; offsets go on (the server kept its AOF), the room was
        // subscribed again and the late room too.
        let after = eventually(Duration::from_secs(3), || {
            block_on(cluster.publish(msg("r", "alice", "after", None))).is_ok()
        });
        assert!(after, "publish works again");
        let got = wait_event(
            &mut events,
            Duration::from_secs(3),
            "the message after",
            |e| matches!(e, ClusterEvent::Message(_)),
        );
        assert!(
            matches!(got, ClusterEvent::Message(m) if m.offset == 4),
            "offsets continue"
        );
        block_on(cluster.publish(msg("late", "bob", "hi", None))).expect("publish late");
        assert!(matches!(
            wait_event(&mut late, Duration::from_secs(3), "late room message", |e| {
                matches!(e, ClusterEvent::Message(_))
            }),
            ClusterEvent::Message(m) if m.room == "late"
        ));
        bridge.shutdown();
    });
}

#[test]
fn a_stalled_redis_fails_calls_in_time_and_recovers() {
    let server = RedisServer::start();
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let cluster = connect(opts(&server.url()), &bridge);
        let store = Store::redis(&cluster);
        let mut events = cluster.subscriber(0);
        block_on(cluster.subscribe(0, "s")).expect("subscribe");
        for _ in 0..2 {
            stored(block_on(cluster.publish(msg("s", "alice", "before", None))).expect("publish"));
        }

        server.pause();
        let started = Instant::now();
        let err = block_on(cluster.publish(msg("s", "alice", "stalled", Some("k"))))
            .expect_err("stalled");
        let took = started.elapsed();
        println!("publish to a stalled redis: {err} after {took:?}");
        assert!(matches!(err, ClusterError::Timeout(_)), "{err:?}");
        assert!(took < Duration::from_secs(3), "bounded: {took:?}");
        let started = Instant::now();
        let err = block_on(store.read("s", HistoryQuery::Latest, 10)).expect_err("stalled read");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
        wait_event(&mut events, Duration::from_secs(5), "Down", |e| {
            matches!(e, ClusterEvent::Down { .. })
        });
        assert!(!cluster.is_connected());
        // Stay stopped well past the publish's deadline.
        std::thread::sleep(Duration::from_millis(1500));

        server.resume();
        wait_event(&mut events, Duration::from_secs(10), "Reconnected", |e| {
            *e == ClusterEvent::Reconnected
        });
        assert!(cluster.is_connected());
        // The timed-out publish ran late in Redis, past its deadline: it stored nothing, so
        // a retry with the same cid is a new message at the next offset.
        let retry = eventually(Duration::from_secs(3), || {
            block_on(cluster.publish(msg("s", "alice", "retry", Some("k")))).is_ok()
        });
        assert!(retry);
        assert_eq!(block_on(store.latest_offset("s")).expect("latest"), 3);
        let texts: Vec<String> = block_on(store.read("s", HistoryQuery::Latest, 10))
            .expect("read")
            .into_iter()
            .map(|m| m.text)
            .collect();
        assert_eq!(texts, ["before", "before", "retry"]);
        bridge.shutdown();
    });
}

#[test]
fn connect_to_a_dead_redis_fails_clearly() {
    within(Duration::from_secs(20), || {
        let bridge = Bridge::start().expect("bridge");
        let port = free_port();
        let started = Instant::now();
        let err = block_on(RedisCluster::connect(
            opts(&format!("redis://127.0.0.1:{port}")),
            bridge.clone(),
        ))
        .expect_err("nothing listens");
        println!("{err}");
        assert!(matches!(err, ClusterError::Unavailable(_)), "{err:?}");
        assert!(err.to_string().contains("connection refused"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
        let err = block_on(RedisCluster::connect(
            opts("redis://127.0.0.1:notaport"),
            bridge.clone(),
        ))
        .expect_err("bad url");
        assert!(matches!(err, ClusterError::Config(_)), "{err:?}");
        bridge.shutdown();
    });
}

#[test]
fn connect_or_retry_waits_for_a_redis_that_is_not_up_yet() {
    let mut server = RedisServer::start_with(&["--requirepass", "pw"]);
    server.kill();
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let url = server.url_with(":pw", 0);
        // Refreshed every 10 s: presence shows within the test only if written on reconnect.
        let mut o = opts(&url);
        o.presence_ttl = Duration::from_secs(30);
        let started = Instant::now();
        let (cluster, down) = block_on(RedisCluster::connect_or_retry(o, bridge.clone()))
            .expect("an unreachable redis is not an error");
        assert!(started.elapsed() < Duration::from_secs(3));
        let down = down.expect("the reason it is down");
        println!("{down}");
        assert!(down.is_transient(), "{down:?}");
        assert!(!cluster.is_connected());
        let mut events = cluster.subscriber(0);
        // Registered while down: subscribed once the link is up.
        let err = block_on(cluster.subscribe(0, "r")).expect_err("link down");
        assert!(matches!(err, ClusterError::Unavailable(_)), "{err:?}");
        block_on(cluster.presence_join("r", "alice", None)).expect_err("no redis yet");
        let err = block_on(cluster.publish(msg("r", "alice", "early", None))).expect_err("down");
        assert!(matches!(err, ClusterError::Unavailable(_)), "{err:?}");

        server.restart();
        wait_event(&mut events, Duration::from_secs(10), "Reconnected", |e| {
            *e == ClusterEvent::Reconnected
        });
        assert!(cluster.is_connected());
        // The presence kept locally is written on reconnect, without waiting for a refresh.
        let present = eventually(Duration::from_secs(3), || {
            block_on(cluster.presence_list("r")).is_ok_and(|l| l.len() == 1)
        });
        assert!(present, "alice's presence was not written on reconnect");
        let m = stored(block_on(cluster.publish(msg("r", "alice", "hi", None))).expect("publish"));
        assert_eq!(
            wait_event(&mut events, Duration::from_secs(3), "the message", |e| {
                matches!(e, ClusterEvent::Message(_))
            }),
            ClusterEvent::Message(m)
        );

        // What no retry can fix is still an error.
        let err = block_on(RedisCluster::connect_or_retry(
            opts(&server.url_with(":wrong", 0)),
            bridge.clone(),
        ))
        .map(|_| ())
        .expect_err("wrong password");
        assert!(matches!(err, ClusterError::Auth(_)), "{err:?}");
        let err = block_on(RedisCluster::connect_or_retry(
            opts("redis://127.0.0.1:notaport"),
            bridge.clone(),
        ))
        .map(|_| ())
        .expect_err("bad url");
        assert!(matches!(err, ClusterError::Config(_)), "{err:?}");
        bridge.shutdown();
    });
}

#[test]
fn auth_with_a_password_and_with_an_acl_user() {
    let server = RedisServer::start_with(&["--requirepass", "s3cret p@ss"]);
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let port = server.port.to_string();
        // The seed's variables, database 2.
        let url = url_from_vars(|k| match k {
            "REDIS_HOST" => Some("127.0.0.1".into()),
            "REDIS_PORT" => Some(port.clone()),
            "REDIS_PASSWORD" => Some("s3cret p@ss".into()),
            "REDIS_DB" => Some("2".into()),
            _ => None,
        })
        .expect("url")
        .expect("some url");
        let cluster = connect(opts(&url), &bridge);
        let mut rx = cluster.subscriber(0);
        block_on(cluster.subscribe(0, "a")).expect("subscribe");
        let m = stored(block_on(cluster.publish(msg("a", "alice", "hi", None))).expect("publish"));
        assert!(matches!(
            next_event(&mut rx, Duration::from_secs(2)),
            Some(ClusterEvent::Message(_))
        ));
        // It went to database 2.
        let admin_db2 = server.url_with(":s3cret%20p%40ss", 2);
        let admin_db0 = server.url_with(":s3cret%20p%40ss", 0);
        assert_eq!(
            server.cmd(&admin_db2, &["GET", "corelay:{a}:offset"]),
            Ok(redis::Value::BulkString(m.offset.to_string().into_bytes()))
        );
        assert_eq!(
            server.cmd(&admin_db0, &["GET", "corelay:{a}:offset"]),
            Ok(redis::Value::Nil)
        );

        // Wrong password, and none at all: clear errors.
        for bad in [server.url_with(":wrong", 0), server.url()] {
            let err =
                block_on(RedisCluster::connect(opts(&bad), bridge.clone())).expect_err("refused");
            println!("{err}");
            assert!(matches!(err, ClusterError::Auth(_)), "{err:?}");
            assert!(err.to_string().contains("refused the credentials"), "{err}");
            assert!(
                !err.to_string().contains("wrong"),
                "no password in messages: {err}"
            );
        }

        // An ACL user limited to corelay's keys and channels and the commands it needs.
        server.add_corelay_user(&admin_db0, "corelay", "user-pw");
        let acl_url = server.url_with("corelay:user-pw", 0);
        let user = connect(opts(&acl_url), &bridge);
        let mut urx = user.subscriber(0);
        block_on(user.subscribe(0, "acl")).expect("subscribe as ACL user");
        stored(
            block_on(user.publish(msg("acl", "alice", "hi", Some("c"))))
                .expect("publish as ACL user"),
        );
        assert!(matches!(
            next_event(&mut urx, Duration::from_secs(2)),
            Some(ClusterEvent::Message(_))
        ));
        assert!(block_on(user.presence_join("acl", "alice", None)).expect("presence"));
        let store = Store::redis(&user);
        assert_eq!(block_on(store.latest_offset("acl")).expect("latest"), 1);
        let report = block_on(check(&opts(&acl_url), &bridge));
        println!("{report}");
        assert!(report.ok(), "{report}");

        // Wrong ACL password; and a user without the channels: refused with the reason.
        let err = block_on(RedisCluster::connect(
            opts(&server.url_with("corelay:nope", 0)),
            bridge.clone(),
        ))
        .expect_err("wrong ACL password");
        assert!(matches!(err, ClusterError::Auth(_)), "{err:?}");
        server
            .cmd(
                &admin_db0,
                &[
                    "ACL",
                    "SETUSER",
                    "nochan",
                    "on",
                    ">pw",
                    "~corelay:*",
                    "resetchannels",
                    "&corelay:ping:*",
                    "+@all",
                ],
            )
            .expect("acl setuser");
        let limited = connect(opts(&server.url_with("nochan:pw", 0)), &bridge);
        let err = block_on(limited.subscribe(0, "room")).expect_err("no channel permission");
        println!("{err}");
        assert!(matches!(err, ClusterError::Auth(_)), "{err:?}");
        let err = block_on(limited.publish(msg("room", "u", "x", None))).expect_err("no channel");
        println!("{err}");
        assert!(
            matches!(err, ClusterError::Auth(_) | ClusterError::Server(_)),
            "{err:?}"
        );
        bridge.shutdown();
    });
}

#[test]
fn tls_with_a_private_ca() {
    let tls = match TlsFiles::generate() {
        Ok(t) => t,
        Err(e) => panic!("cannot make test certificates (apt-get install openssl): {e}"),
    };
    let server = RedisServer::start_tls(&tls, &[]);
    let mtls = RedisServer::start_tls(&tls, &["--tls-auth-clients", "yes"]);
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let mut o = opts(&server.url());
        o.tls_ca_file = Some(tls.ca_cert.clone());
        let cluster = connect(o.clone(), &bridge);
        let mut rx = cluster.subscriber(0);
        block_on(cluster.subscribe(0, "t")).expect("subscribe over TLS");
        let m = stored(
            block_on(cluster.publish(msg("t", "alice", "secret", None))).expect("publish over TLS"),
        );
        assert_eq!(
            next_event(&mut rx, Duration::from_secs(2)),
            Some(ClusterEvent::Message(m))
        );
        assert!(eventually(Duration::from_secs(2), || cluster
            .last_roundtrip_ms()
            .is_some()));
        let report = block_on(check(&o, &bridge));
        println!("{report}");
        assert!(report.ok(), "{report}");

        // Not trusting the CA (system roots only): refused, saying it is about TLS.
        let err = block_on(RedisCluster::connect(opts(&server.url()), bridge.clone()))
            .expect_err("unknown CA");
        println!("{err}");
        assert!(matches!(err, ClusterError::Tls(_)), "{err:?}");
        // Plain text to a TLS port: no answer that makes sense, a clear failure in time.
        let started = Instant::now();
        let plain = format!("redis://127.0.0.1:{}", server.port);
        let err = block_on(RedisCluster::connect(opts(&plain), bridge.clone()))
            .expect_err("plain to TLS");
        println!("{err}");
        assert!(started.elapsed() < Duration::from_secs(4));

        // A server that wants a client certificate.
        let mut m_opts = opts(&mtls.url());
        m_opts.tls_ca_file = Some(tls.ca_cert.clone());
        let err = block_on(RedisCluster::connect(m_opts.clone(), bridge.clone()))
            .expect_err("no client certificate");
        println!("{err}");
        m_opts.tls_cert_file = Some(tls.client_cert.clone());
        m_opts.tls_key_file = Some(tls.client_key.clone());
        let client = connect(m_opts, &bridge);
        stored(block_on(client.publish(msg("t", "bob", "mtls", None))).expect("publish with mTLS"));
        drop(tls);
        bridge.shutdown();
    });
}

#[test]
fn presence_across_hosts_expires_with_a_dead_host() {
    let server = RedisServer::start();
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let a = connect(opts(&server.url()), &bridge);
        let b = connect(opts(&server.url()), &bridge);
        let mut ra = a.subscriber(0);
        let mut rb = b.subscriber(0);
        block_on(a.subscribe(0, "p")).expect("subscribe");
        block_on(b.subscribe(0, "p")).expect("subscribe");
        let entry = |user: &str, name: Option<&str>| PresenceEntry {
            user: user.into(),
            name: name.map(str::to_owned),
        };

        assert!(block_on(a.presence_join("p", "alice", Some("Alice"))).expect("join"));
        for rx in [&mut ra, &mut rb] {
            assert_eq!(
                next_event(rx, Duration::from_secs(2)),
                Some(ClusterEvent::Presence {
                    room: "p".into(),
                    user: "alice".into(),
                    name: Some("Alice".into()),
                    online: true,
                    host: a.host_id().to_owned(),
                })
            );
        }
        // Already online through A: no second announcement.
        assert!(!block_on(b.presence_join("p", "alice", Some("Alice"))).expect("join"));
        assert!(block_on(b.presence_join("p", "bob", None)).expect("join"));
        assert!(block_on(a.presence_join("p", "carol", None)).expect("join"));
        assert_eq!(
            block_on(a.presence_list("p")).expect("list"),
            vec![
                entry("alice", Some("Alice")),
                entry("bob", None),
                entry("carol", None)
            ]
        );
        assert_eq!(block_on(b.presence_list("empty")).expect("list"), vec![]);

        // Alice leaves A but is still on B; then leaves B: offline.
        assert!(!block_on(a.presence_leave("p", "alice")).expect("leave"));
        assert!(block_on(b.presence_leave("p", "alice")).expect("leave"));
        let off = wait_event(&mut ra, Duration::from_secs(2), "offline event", |e| {
            matches!(e, ClusterEvent::Presence { online: false, .. })
        });
        assert!(matches!(off, ClusterEvent::Presence { ref user, .. } if user == "alice"));
        assert!(!block_on(b.presence_leave("p", "nobody")).expect("leave"));

        // Refreshed presence outlives the ttl (1.5 s) …
        std::thread::sleep(Duration::from_millis(2500));
        assert_eq!(
            block_on(b.presence_list("p")).expect("list"),
            vec![entry("bob", None), entry("carol", None)]
        );
        // … and comes back after Redis lost it.
        server.cmd(&server.url(), &["FLUSHALL"]).expect("flushall");
        assert!(eventually(Duration::from_secs(3), || {
            block_on(b.presence_list("p")).expect("list").len() == 2
        }));
        // A host that stops refreshing (dead) stops counting within the ttl.
        a.close();
        let gone = eventually(Duration::from_secs(4), || {
            block_on(b.presence_list("p")).expect("list") == vec![entry("bob", None)]
        });
        assert!(gone, "carol (on the dead host) expired");
        assert!(matches!(
            block_on(a.presence_list("p")),
            Err(ClusterError::Closed)
        ));
        bridge.shutdown();
    });
}

/// The presence events of `rx` within `limit`: (user, online, host), other events skipped.
fn presence_events(
    rx: &mut UnboundedReceiver<ClusterEvent>,
    limit: Duration,
) -> Vec<(String, bool, String)> {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    while let Some(ev) = next_event(rx, deadline.saturating_duration_since(Instant::now())) {
        if let ClusterEvent::Presence {
            user, online, host, ..
        } = ev
        {
            out.push((user, online, host));
        }
    }
    out
}

#[test]
fn a_dead_hosts_users_are_announced_offline_once() {
    let server = RedisServer::start();
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let [a, b, c] = [(); 3].map(|_| connect(opts(&server.url()), &bridge));
        let mut rb = b.subscriber(0);
        let mut rc = c.subscriber(0);
        block_on(b.subscribe(0, "r")).expect("subscribe");
        block_on(c.subscribe(0, "r")).expect("subscribe");
        block_on(a.presence_join("r", "carol", Some("Carol"))).expect("join");
        block_on(a.presence_join("r", "dave", None)).expect("join");
        block_on(b.presence_join("r", "dave", None)).expect("join");
        block_on(b.presence_join("r", "bob", None)).expect("join");
        block_on(c.presence_join("r", "cid", None)).expect("join");
        for rx in [&mut rb, &mut rc] {
            let online = presence_events(rx, Duration::from_millis(300));
            assert_eq!(online.len(), 4, "{online:?}");
        }

        // A dies (stops refreshing). B and C keep refreshing: whichever reaps A first
        // publishes carol's offline event, once; dave stays online through B.
        let died = Instant::now();
        a.close();
        let first = wait_event(&mut rb, Duration::from_secs(5), "carol offline", |e| {
            matches!(e, ClusterEvent::Presence { .. })
        });
        let took = died.elapsed();
        assert_eq!(
            first,
            ClusterEvent::Presence {
                room: "r".into(),
                user: "carol".into(),
                name: None,
                online: false,
                host: a.host_id().to_owned(),
            }
        );
        // Within ttl (1.5 s) + a refresh interval (0.5 s) + a probe tick (0.1 s), and slack.
        assert!(took < Duration::from_millis(3000), "{took:?}");
        eprintln!("offline event {took:?} after the host died (ttl 1.5 s)");
        let want = vec![("carol".to_owned(), false, a.host_id().to_owned())];
        assert_eq!(presence_events(&mut rc, Duration::from_millis(500)), want);
        assert_eq!(presence_events(&mut rb, Duration::from_millis(10)), vec![]);
        let users: Vec<String> = block_on(c.presence_list("r"))
            .expect("list")
            .into_iter()
            .map(|p| p.user)
            .collect();
        assert_eq!(users, ["bob", "cid", "dave"]);
        // Nothing more, however long: the dead host was reaped once.
        assert_eq!(presence_events(&mut rc, Duration::from_secs(2)), vec![]);

        // B is only cut off for longer than the ttl (its expiry is forced into the past):
        // C's refresh reaps it (bob and dave offline), and B's next refresh announces them
        // online again, as B (whose own members never heard they were gone).
        server
            .cmd(
                &server.url(),
                &["ZADD", "corelay:{r}:presence:hosts", "1", b.host_id()],
            )
            .expect("zadd");
        let mut got = presence_events(&mut rc, Duration::from_secs(3));
        got.sort();
        let bh = b.host_id().to_owned();
        assert_eq!(
            got,
            vec![
                ("bob".to_owned(), false, bh.clone()),
                ("bob".to_owned(), true, bh.clone()),
                ("dave".to_owned(), false, bh.clone()),
                ("dave".to_owned(), true, bh.clone()),
            ]
        );
        // B's user leaving now is an ordinary offline event; nothing is left to re-announce.
        assert!(block_on(b.presence_leave("r", "bob")).expect("leave"));
        assert_eq!(
            presence_events(&mut rc, Duration::from_secs(2)),
            vec![("bob".to_owned(), false, bh)]
        );
        let reaped: Vec<String> = match server
            .cmd(&server.url(), &["KEYS", "corelay:{r}:reaped:*"])
            .expect("keys")
        {
            redis::Value::Array(v) => v.into_iter().map(|k| format!("{k:?}")).collect(),
            other => panic!("{other:?}"),
        };
        // A's set stays (A never comes back); B's was cleared by its refresh.
        assert_eq!(reaped.len(), 1, "{reaped:?}");
        assert!(reaped[0].contains(a.host_id()), "{reaped:?}");
        bridge.shutdown();
    });
}

#[test]
fn check_against_live_stalled_and_dead_redis() {
    let server = RedisServer::start_with(&["--requirepass", "pw"]);
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let live = opts(&server.url_with(":pw", 0));
        let report = block_on(check(&live, &bridge));
        println!("{report}");
        assert!(report.ok(), "{report}");
        assert!(
            report.ping.verdict.contains("Redis 7"),
            "{}",
            report.ping.verdict
        );
        assert!(
            report.pubsub.verdict.contains("came back"),
            "{}",
            report.pubsub.verdict
        );
        assert!(report.ping.elapsed.is_some() && report.pubsub.elapsed.is_some());
        let mut sharded = live.clone();
        sharded.sharded = true;
        let report = block_on(check(&sharded, &bridge));
        assert!(report.ok(), "{report}");
        assert!(report.pubsub.verdict.contains("sharded"), "{report}");

        let report = block_on(check(&opts(&server.url_with(":bad", 0)), &bridge));
        println!("{report}");
        assert!(!report.ok());
        assert!(
            report.ping.verdict.contains("refused the credentials"),
            "{report}"
        );
        assert!(report.to_string().contains("FAILED"));

        server.pause();
        let started = Instant::now();
        let report = block_on(check(&live, &bridge));
        println!("{report}");
        assert!(!report.ping.ok, "{report}");
        assert!(report.ping.verdict.contains("did not answer"), "{report}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        server.resume();

        let dead = opts(&format!("redis://127.0.0.1:{}", free_port()));
        let report = block_on(check(&dead, &bridge));
        println!("{report}");
        assert!(!report.ok());
        assert!(
            report.ping.verdict.contains("connection refused"),
            "{report}"
        );
        assert!(report.pubsub.verdict.starts_with("skipped"), "{report}");
        bridge.shutdown();
    });
}

#[test]
fn history_is_trimmed_by_count_and_age() {
    let server = RedisServer::start();
    within(Duration::from_secs(30), move || {
        let bridge = Bridge::start().expect("bridge");
        let mut o = opts(&server.url());
        o.history_max_len = 100;
        o.history_max_age = Some(Duration::from_millis(500));
        let cluster = connect(o, &bridge);
        let store = Store::redis(&cluster);
        for i in 0..1000 {
            block_on(cluster.publish(msg("trim", "u", &i.to_string(), None))).expect("publish");
        }
        let kept = block_on(store.read("trim", HistoryQuery::After(0), 10_000)).expect("read");
        // MAXLEN ~ keeps at least 100 and trims whole nodes: well under 1000.
        assert!(kept.len() >= 100 && kept.len() < 300, "{}", kept.len());
        assert_eq!(kept.last().map(|m| m.offset), Some(1000));
        assert_eq!(block_on(store.latest_offset("trim")).expect("latest"), 1000);
        // Past the age limit, the next publish drops the old ones.
        std::thread::sleep(Duration::from_millis(700));
        let m =
            stored(block_on(cluster.publish(msg("trim", "u", "fresh", None))).expect("publish"));
        assert_eq!(m.offset, 1001);
        let kept = block_on(store.read("trim", HistoryQuery::After(0), 10_000)).expect("read");
        assert_eq!(kept.iter().map(|m| m.offset).collect::<Vec<_>>(), [1001]);
        let ids: HashSet<_> = kept.iter().map(|m| m.id.clone()).collect();
        assert!(ids.contains(&m.id));
        bridge.shutdown();
    });
}

#[test]
fn append_is_idempotent_for_script_published_messages() {
    let server = RedisServer::start();
    within(Duration::from_secs(30), move || {
        let bridge = Bridge::start().expect("bridge");
        let cluster = connect(opts(&server.url()), &bridge);
        let store = Store::redis(&cluster);
        let m1 = stored(
            block_on(cluster.publish(msg("i", "alice", "one", Some("c")))).expect("publish"),
        );
        let m2 = stored(block_on(cluster.publish(msg("i", "bob", "two", None))).expect("publish"));
        // Re-appending what the script wrote is a no-op; a different message at a taken
        // offset is a conflict; the next offsets append normally.
        block_on(store.append(vec![m1.clone(), m2.clone()])).expect("idempotent");
        let mut other = m2.clone();
        other.text = "not the same".into();
        assert!(matches!(
            block_on(store.append(vec![other])),
            Err(StoreError::OffsetConflict {
                offset: 2,
                latest: 2,
                ..
            })
        ));
        let mut m3 = m2.clone();
        m3.offset = 3;
        m3.id = "appended".into();
        block_on(store.append(vec![m2.clone(), m3.clone()])).expect("append after");
        assert_eq!(
            block_on(store.read("i", HistoryQuery::Latest, 10)).expect("read"),
            vec![m1, m2, m3]
        );
        // The script goes on after the appended offset.
        let m4 =
            stored(block_on(cluster.publish(msg("i", "alice", "four", None))).expect("publish"));
        assert_eq!(m4.offset, 4);
        bridge.shutdown();
    });
}

#[test]
fn a_lost_or_reset_counter_never_reuses_an_offset() {
    let server = RedisServer::start();
    within(Duration::from_secs(30), move || {
        let bridge = Bridge::start().expect("bridge");
        let cluster = connect(opts(&server.url()), &bridge);
        let publish = |text: &str| {
            stored(block_on(cluster.publish(msg("c", "alice", text, None))).expect("publish"))
                .offset
        };
        assert_eq!((publish("1"), publish("2"), publish("3")), (1, 2, 3));
        // The counter is lost while the stream survives: the next offset follows the stream.
        server
            .cmd(&server.url(), &["DEL", "corelay:{c}:offset"])
            .expect("DEL");
        assert_eq!(publish("4"), 4);
        // Set back below the stream: the same.
        server
            .cmd(&server.url(), &["SET", "corelay:{c}:offset", "1"])
            .expect("SET");
        assert_eq!(publish("5"), 5);
        // Even when trimming emptied the stream, its last id still counts.
        server
            .cmd(
                &server.url(),
                &["XTRIM", "corelay:{c}:stream", "MAXLEN", "0"],
            )
            .expect("XTRIM");
        server
            .cmd(&server.url(), &["DEL", "corelay:{c}:offset"])
            .expect("DEL");
        assert_eq!(publish("6"), 6);
        assert_eq!(publish("7"), 7, "and the counter follows");
        bridge.shutdown();
    });
}
