//! The cluster layer against real `redis-server`s, one per test on a free port (see
//! `common_redis`), publishing as the server does: through [`ShardLink`]s on glommio
//! executors. The publish script's offsets (contiguous under concurrent publishers, lifted
//! by a floor, never reused after a lost counter) and dedupe, batches, history trimming and
//! appends; what publishes deliver to shards (in offset order, plain and sharded pub/sub);
//! the process's link to Redis ([`RedisCluster`], on the bridge) going down and back up
//! when Redis restarts or stalls, and calls failing fast and clearly meanwhile; `connect`
//! and `connect_or_retry`; AUTH and ACL users, TLS with a private CA; presence across hosts
//! and a dead host's users announced offline once; and `check`. What a [`ShardLink`]'s own
//! connections do (reconnecting, timeouts, transports) is in `shard_link.rs`. Every test
//! body is bounded in time; every server dies with its test.

mod common_redis;

use std::collections::HashSet;
use std::rc::Rc;
use std::time::{Duration, Instant};

use common_redis::{
    connect, connect_hosts, eventually, fast_opts as opts, free_port, msg, next_event, offsets,
    on_shard_blocking as on_shard, publish_one, start_shard, stored, wait_down, wait_event,
    wait_message, wait_reconnected, within, RedisServer, TlsFiles,
};
use corelay::bridge::Bridge;
use corelay::cluster::redis::RedisCluster;
use corelay::cluster::shard_link::ShardLink;
use corelay::cluster::{
    check, url_from_vars, Ack, ClusterError, ClusterEvent, NewMessage, PresenceEntry, Published,
};
use corelay::store::{HistoryQuery, HistoryStore, Store, StoreError, StoredMessage};
use futures::channel::mpsc::UnboundedReceiver;
use futures::executor::block_on;

/// On a shard of its own: subscribes a [`ShardLink`] of `cluster` to `m`'s room, publishes
/// `m` through that link and returns what was stored, once the link delivered exactly
/// that. `what` names the case in failures.
fn publish_and_receive(cluster: &RedisCluster, m: NewMessage, what: &'static str) -> StoredMessage {
    let cluster = cluster.clone();
    on_shard(move || async move {
        let (link, mut events) = ShardLink::start(cluster, 0).await;
        link.subscribe(&m.room)
            .await
            .unwrap_or_else(|e| panic!("{what}: subscribe: {e}"));
        let sent = stored(
            publish_one(&link, m)
                .await
                .unwrap_or_else(|e| panic!("{what}: publish: {e}")),
        );
        assert_eq!(
            next_event(&mut events, Duration::from_secs(2)).await,
            Some(ClusterEvent::Message(sent.clone())),
            "{what}"
        );
        sent
    })
}

/// Waits up to 3 s for the bridge's own link to go up (connected, a round trip measured)
/// or down (neither); panics if it does not.
async fn bridge_link_goes(cluster: &RedisCluster, up: bool) {
    let reached = eventually(Duration::from_secs(3), async || {
        cluster.is_connected() == up && cluster.last_roundtrip_ms().is_some() == up
    })
    .await;
    let state = if up { "up" } else { "down" };
    assert!(reached, "the bridge's link did not go {state}");
}

#[test]
fn offsets_are_contiguous_under_concurrent_publishers() {
    let server = RedisServer::start();
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        // Two "hosts" with two glommio shards each, every shard's link shared by several
        // tasks: four command connections racing in Redis, and tasks taking turns on each.
        let hosts: [_; 2] = connect_hosts(&opts(&server.url()), &bridge);
        let (shards_per_host, tasks, per_task) = (2usize, 2u64, 50u64);
        let shards: Vec<_> = hosts
            .iter()
            .enumerate()
            .flat_map(|(h, cluster)| (0..shards_per_host).map(move |s| (h, s, cluster.clone())))
            .map(|(h, s, cluster)| {
                start_shard(move || async move {
                    let (link, _events) = ShardLink::start(cluster, s).await;
                    let link = Rc::new(link);
                    let mut handles = Vec::new();
                    for t in 0..tasks {
                        let link = link.clone();
                        handles.push(glommio::spawn_local(async move {
                            let mut mine = Vec::new();
                            for i in 0..per_task {
                                let text = format!("h{h} s{s} t{t} #{i}");
                                let m = stored(
                                    publish_one(&link, msg("conc", "alice", &text, None))
                                        .await
                                        .expect("publish"),
                                );
                                // Another room interleaved: its own sequence.
                                if i % 5 == 0 {
                                    publish_one(&link, msg("other", "bob", &text, None))
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
        let n = hosts.len() as u64 * shards_per_host as u64 * tasks * per_task;
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
        assert_eq!(other, n / 5);
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
        on_shard(move || async move {
            let (link, mut events) = ShardLink::start(cluster.clone(), 0).await;
            link.subscribe("d").await.expect("subscribe");

            let first = stored(
                publish_one(&link, msg("d", "alice", "first", Some("c1")))
                    .await
                    .expect("publish"),
            );
            assert_eq!(first.offset, 1);
            let again = publish_one(&link, msg("d", "alice", "retry, other text", Some("c1")))
                .await
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
            assert_eq!(store.latest_offset("d").await.expect("latest"), 1);
            assert_eq!(
                store
                    .read("d", HistoryQuery::Latest, 10)
                    .await
                    .expect("read"),
                vec![first.clone()]
            );
            let ev = next_event(&mut events, Duration::from_secs(2))
                .await
                .expect("the first message");
            assert_eq!(ev, ClusterEvent::Message(first.clone()));
            assert_eq!(
                next_event(&mut events, Duration::from_millis(200)).await,
                None
            );
            assert_eq!(
                store
                    .find_cid("d", "alice", "c1", 0)
                    .await
                    .expect("find_cid"),
                Some(first.clone())
            );

            // The same cid from another user, or in another room, is another message.
            let publish = async |room: &str, user: &str, cid: Option<&str>| {
                stored(
                    publish_one(&link, msg(room, user, "x", cid))
                        .await
                        .expect("publish"),
                )
                .offset
            };
            assert_eq!(publish("d", "bob", Some("c1")).await, 2);
            assert_eq!(publish("d2", "alice", Some("c1")).await, 1);
            // Users whose names would collide in a naive key ("a:b"+"c" vs "a"+"b:c").
            assert_eq!(publish("d", "a:b", Some("c")).await, 3);
            assert_eq!(publish("d", "a", Some("b:c")).await, 4);
            // No cid: never deduplicated.
            assert_eq!(publish("d", "alice", None).await, 5);
            assert_eq!(publish("d", "alice", None).await, 6);

            // After the window (no event says so: wait it out), the cid is free again.
            glommio::timer::sleep(Duration::from_millis(900)).await;
            assert_eq!(publish("d", "alice", Some("c1")).await, 7);
        });
        bridge.shutdown();
    });
}

#[test]
fn a_batch_is_one_publish_after_another_per_room() {
    let server = RedisServer::start();
    within(Duration::from_secs(30), move || {
        let bridge = Bridge::start().expect("bridge");
        let cluster = connect(opts(&server.url()), &bridge);
        on_shard(move || async move {
            let (link, mut events) = ShardLink::start(cluster.clone(), 0).await;
            link.subscribe("b1").await.expect("subscribe b1");
            link.subscribe("b2").await.expect("subscribe b2");
            let before = stored(
                publish_one(&link, msg("b1", "u", "zero", Some("c0")))
                    .await
                    .expect("c0"),
            );
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
            let results = link
                .publish_batch(batch.iter().map(|m| (m.clone(), 0)).collect())
                .await;
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
            while let Some(ev) = next_event(&mut events, Duration::from_millis(500)).await {
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
            let texts: Vec<String> = store
                .read("b1", HistoryQuery::Latest, 10)
                .await
                .expect("read")
                .into_iter()
                .map(|m| m.text)
                .collect();
            assert_eq!(texts, vec!["zero", "one", "two"]);
            // A floor (an offset the caller knows was handed out) lifts the room's counter;
            // the room's highest floor in the batch counts.
            let lifted = link
                .publish_batch(vec![
                    (msg("b2", "v", "after a floor", None), 10),
                    (msg("b2", "v", "next", None), 7),
                ])
                .await;
            let offsets: Vec<u64> = lifted
                .into_iter()
                .map(|r| stored(r.expect("lifted")).offset)
                .collect();
            assert_eq!(offsets, vec![11, 12]);
            // An empty batch is no call at all.
            assert!(link.publish_batch(Vec::new()).await.is_empty());
        });
        bridge.shutdown();
    });
}

#[test]
fn subscribers_receive_in_offset_order() {
    let server = RedisServer::start();
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let [a, b] = connect_hosts(&opts(&server.url()), &bridge);
        on_shard(move || async move {
            // Host B's shards 0 and 1, host A's shard 0.
            let (b0_link, mut b0_events) = ShardLink::start(b.clone(), 0).await;
            let (b1_link, mut b1_events) = ShardLink::start(b.clone(), 1).await;
            let (a0_link, mut a0_events) = ShardLink::start(a.clone(), 0).await;
            b0_link.subscribe("ordered").await.expect("subscribe");
            b1_link.subscribe("side").await.expect("subscribe");
            a0_link.subscribe("ordered").await.expect("subscribe");

            // Host A's shard publishes from three concurrent tasks sharing its link.
            let a0_link = Rc::new(a0_link);
            let tasks: Vec<_> = (0..3)
                .map(|t| {
                    let publisher = a0_link.clone();
                    glommio::spawn_local(async move {
                        for i in 0..100 {
                            let m = msg("ordered", "alice", &format!("{t}/{i}"), None);
                            publish_one(&publisher, m).await.expect("publish");
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await;
            }
            publish_one(&a0_link, msg("side", "bob", "side message", None))
                .await
                .expect("publish side");
            let all: Vec<u64> = (1..=300).collect();
            for (who, rx) in [
                ("host B", &mut b0_events),
                ("host A (own echo)", &mut a0_events),
            ] {
                let got = offsets(rx, "ordered", all.len()).await;
                assert_eq!(got, all, "{who}: in offset order");
            }
            // Shard 1 of B subscribed only "side".
            assert_eq!(offsets(&mut b1_events, "side", 1).await, [1]);
            assert_eq!(
                next_event(&mut b1_events, Duration::from_millis(100)).await,
                None
            );
            // Unsubscribing (nothing more arrives; the other host still hears the room) is
            // proven in shard_link.rs:
            // two_hosts_publish_and_receive_on_their_shards_own_connections.

            // Both links are up, and the probe measured a round trip.
            bridge_link_goes(&a, true).await;
            bridge_link_goes(&b, true).await;
        });
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
        let [a, b] = connect_hosts(&o, &bridge);
        on_shard(move || async move {
            let (a0_link, _a0_events) = ShardLink::start(a, 0).await;
            let (b3_link, mut events) = ShardLink::start(b.clone(), 3).await;
            b3_link.subscribe("sh").await.expect("ssubscribe");
            for i in 1..=50u64 {
                let m = stored(
                    publish_one(&a0_link, msg("sh", "u", &i.to_string(), None))
                        .await
                        .expect("publish"),
                );
                assert_eq!(m.offset, i);
            }
            let all: Vec<u64> = (1..=50).collect();
            assert_eq!(offsets(&mut events, "sh", all.len()).await, all);
            // The subscription is a shard channel: SPUBLISH reaches it, PUBLISH does not.
            let channels = server
                .cmd(&server.url(), &["PUBSUB", "SHARDCHANNELS", "corelay:*"])
                .expect("pubsub shardchannels");
            assert!(
                format!("{channels:?}").contains("corelay:{sh}"),
                "{channels:?}"
            );
            bridge_link_goes(&b, true).await;
            // The server drops the pub/sub connections: the link comes back with the shard
            // channel subscribed again.
            server
                .cmd(&server.url(), &["CLIENT", "KILL", "TYPE", "pubsub"])
                .expect("client kill");
            wait_down(&mut events).await;
            wait_reconnected(&mut events).await;
            let m = stored(
                publish_one(&a0_link, msg("sh", "u", "again", None))
                    .await
                    .expect("publish"),
            );
            assert_eq!(
                wait_message(&mut events, "sh").await,
                m,
                "after reconnecting"
            );
            // SUNSUBSCRIBE (nothing more arrives) is proven in shard_link.rs,
            // the_same_with_sharded_pubsub.
        });
        bridge.shutdown();
    });
}

#[test]
fn reconnects_after_redis_restarts_on_the_same_port() {
    let server = RedisServer::start_persistent();
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let cluster = connect(opts(&server.url()), &bridge);
        let mut server = server;
        on_shard(move || async move {
            let (link, mut events) = ShardLink::start(cluster.clone(), 0).await;
            link.subscribe("r").await.expect("subscribe");
            for i in 1..=3 {
                let m = stored(
                    publish_one(&link, msg("r", "alice", "before", None))
                        .await
                        .expect("publish"),
                );
                assert_eq!(m.offset, i);
                assert_eq!(offsets(&mut events, "r", 1).await, [i]);
            }

            server.kill();
            let down = wait_down(&mut events).await;
            println!("{down:?}");
            // The bridge's own link notices too.
            bridge_link_goes(&cluster, false).await;
            // Calls fail fast and clearly while Redis is away.
            let started = Instant::now();
            let err = publish_one(&link, msg("r", "alice", "while down", None))
                .await
                .expect_err("down");
            println!("{err}");
            assert!(matches!(err, ClusterError::Unavailable(_)), "{err:?}");
            assert!(
                started.elapsed() < Duration::from_millis(1500),
                "{:?}",
                started.elapsed()
            );
            // A room subscribed while down is taken along on reconnect: proven in
            // shard_link.rs, a_restarted_redis_gives_down_then_reconnected_with_every_room.

            server.restart();
            wait_reconnected(&mut events).await;
            bridge_link_goes(&cluster, true).await;
            // Publishing works again; offsets go on (the server kept its AOF), the room was
            // subscribed again.
            let after = eventually(Duration::from_secs(3), async || {
                publish_one(&link, msg("r", "alice", "after", None))
                    .await
                    .is_ok()
            })
            .await;
            assert!(after, "publish works again");
            let got = wait_message(&mut events, "r").await;
            assert_eq!(got.offset, 4, "offsets continue");
        });
        bridge.shutdown();
    });
}

#[test]
fn a_stalled_redis_fails_calls_in_time_and_recovers() {
    let server = RedisServer::start();
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let cluster = connect(opts(&server.url()), &bridge);
        on_shard(move || async move {
            let store = Store::redis(&cluster);
            let (link, mut events) = ShardLink::start(cluster.clone(), 0).await;
            link.subscribe("s").await.expect("subscribe");
            for _ in 0..2 {
                stored(
                    publish_one(&link, msg("s", "alice", "before", None))
                        .await
                        .expect("publish"),
                );
            }

            server.pause();
            let started = Instant::now();
            let err = publish_one(&link, msg("s", "alice", "stalled", Some("k")))
                .await
                .expect_err("stalled");
            let took = started.elapsed();
            println!("publish to a stalled redis: {err} after {took:?}");
            assert!(matches!(err, ClusterError::Timeout(_)), "{err:?}");
            assert!(took < Duration::from_secs(3), "bounded: {took:?}");
            let started = Instant::now();
            let err = store
                .read("s", HistoryQuery::Latest, 10)
                .await
                .expect_err("stalled read");
            assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
            assert!(started.elapsed() < Duration::from_secs(3));
            wait_down(&mut events).await;
            bridge_link_goes(&cluster, false).await;
            // Stay stopped well past the publish's deadline (nothing to wait for: time).
            glommio::timer::sleep(Duration::from_millis(1500)).await;

            server.resume();
            wait_reconnected(&mut events).await;
            bridge_link_goes(&cluster, true).await;
            // The timed-out publish ran late in Redis, past its deadline: it stored nothing,
            // so a retry with the same cid is a new message at the next offset.
            let retry = eventually(Duration::from_secs(3), async || {
                publish_one(&link, msg("s", "alice", "retry", Some("k")))
                    .await
                    .is_ok()
            })
            .await;
            assert!(retry);
            assert_eq!(store.latest_offset("s").await.expect("latest"), 3);
            let texts: Vec<String> = store
                .read("s", HistoryQuery::Latest, 10)
                .await
                .expect("read")
                .into_iter()
                .map(|m| m.text)
                .collect();
            assert_eq!(texts, ["before", "before", "retry"]);
        });
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
        let wrong_password = server.url_with(":wrong", 0);
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
        let mut server = server;
        let shard_bridge = bridge.clone();
        on_shard(move || async move {
            let bridge = shard_bridge;
            let (link, mut events) = ShardLink::start(cluster.clone(), 0).await;
            // Registered while down: subscribed once the link is up.
            let err = link.subscribe("r").await.expect_err("link down");
            assert!(matches!(err, ClusterError::Unavailable(_)), "{err:?}");
            cluster
                .presence_join("r", "alice", None)
                .await
                .expect_err("no redis yet");
            let err = publish_one(&link, msg("r", "alice", "early", None))
                .await
                .expect_err("down");
            assert!(matches!(err, ClusterError::Unavailable(_)), "{err:?}");

            // Restarted from this thread, the server dies with it (see `common_redis`):
            // every check that needs it is made here.
            server.restart();
            wait_reconnected(&mut events).await;
            bridge_link_goes(&cluster, true).await;
            // The presence kept locally is written on reconnect, without waiting for a refresh.
            let present = eventually(Duration::from_secs(3), async || {
                cluster.presence_list("r").await.is_ok_and(|l| l.len() == 1)
            })
            .await;
            assert!(present, "alice's presence was not written on reconnect");
            let m = stored(
                publish_one(&link, msg("r", "alice", "hi", None))
                    .await
                    .expect("publish"),
            );
            assert_eq!(wait_message(&mut events, "r").await, m);

            // What no retry can fix is still an error.
            let err = RedisCluster::connect_or_retry(opts(&wrong_password), bridge.clone())
                .await
                .map(|_| ())
                .expect_err("wrong password");
            assert!(matches!(err, ClusterError::Auth(_)), "{err:?}");
            let err = RedisCluster::connect_or_retry(opts("redis://127.0.0.1:notaport"), bridge)
                .await
                .map(|_| ())
                .expect_err("bad url");
            assert!(matches!(err, ClusterError::Config(_)), "{err:?}");
        });
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
        let m = publish_and_receive(&cluster, msg("a", "alice", "hi", None), "password");
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
        // The bridge's connection selected database 2 as well.
        let latest = block_on(Store::redis(&cluster).latest_offset("a")).expect("latest");
        assert_eq!(latest, m.offset);

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
        publish_and_receive(&user, msg("acl", "alice", "hi", Some("c")), "ACL user");
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
        // Its subscribing refused (ClusterError::Auth) is proven in shard_link.rs,
        // a_channel_the_acl_forbids_is_refused_and_forgotten.
        let err = on_shard(move || async move {
            let (link, _events) = ShardLink::start(limited, 0).await;
            publish_one(&link, msg("room", "u", "x", None))
                .await
                .expect_err("no channel")
        });
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
        // A shard publishes and receives over its own connections, TLS trusting the CA.
        publish_and_receive(&cluster, msg("t", "alice", "secret", None), "over TLS");
        // The probe measured a round trip over TLS.
        let probed = cluster.clone();
        on_shard(move || async move { bridge_link_goes(&probed, true).await });
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
        let sent = publish_and_receive(&client, msg("t", "bob", "mtls", None), "with mTLS");
        // The bridge reads over mTLS too.
        let latest = block_on(Store::redis(&client).latest_offset("t")).expect("latest over mTLS");
        assert_eq!(latest, sent.offset);
        drop(tls);
        bridge.shutdown();
    });
}

#[test]
fn presence_across_hosts_expires_with_a_dead_host() {
    let server = RedisServer::start();
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let [a, b] = connect_hosts(&opts(&server.url()), &bridge);
        on_shard(move || async move {
            let (a_link, mut ra) = ShardLink::start(a.clone(), 0).await;
            let (b_link, mut rb) = ShardLink::start(b.clone(), 0).await;
            a_link.subscribe("p").await.expect("subscribe");
            b_link.subscribe("p").await.expect("subscribe");
            let entry = |user: &str, name: Option<&str>| PresenceEntry {
                user: user.into(),
                name: name.map(str::to_owned),
            };

            assert!(a
                .presence_join("p", "alice", Some("Alice"))
                .await
                .expect("join"));
            for rx in [&mut ra, &mut rb] {
                assert_eq!(
                    next_event(rx, Duration::from_secs(2)).await,
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
            assert!(!b
                .presence_join("p", "alice", Some("Alice"))
                .await
                .expect("join"));
            assert!(b.presence_join("p", "bob", None).await.expect("join"));
            assert!(a.presence_join("p", "carol", None).await.expect("join"));
            assert_eq!(
                a.presence_list("p").await.expect("list"),
                vec![
                    entry("alice", Some("Alice")),
                    entry("bob", None),
                    entry("carol", None)
                ]
            );
            assert_eq!(b.presence_list("empty").await.expect("list"), vec![]);

            // Alice leaves A but is still on B; then leaves B: offline.
            assert!(!a.presence_leave("p", "alice").await.expect("leave"));
            assert!(b.presence_leave("p", "alice").await.expect("leave"));
            let off = wait_event(&mut ra, Duration::from_secs(2), "offline event", |e| {
                matches!(e, ClusterEvent::Presence { online: false, .. })
            })
            .await;
            assert!(matches!(off, ClusterEvent::Presence { ref user, .. } if user == "alice"));
            assert!(!b.presence_leave("p", "nobody").await.expect("leave"));

            // Refreshed presence outlives the ttl (1.5 s; nothing to wait for but time) …
            glommio::timer::sleep(Duration::from_millis(2500)).await;
            assert_eq!(
                b.presence_list("p").await.expect("list"),
                vec![entry("bob", None), entry("carol", None)]
            );
            // … and comes back after Redis lost it.
            server.cmd(&server.url(), &["FLUSHALL"]).expect("flushall");
            let back = eventually(Duration::from_secs(3), async || {
                b.presence_list("p").await.expect("list").len() == 2
            })
            .await;
            assert!(back, "presence written again after FLUSHALL");
            // A host that stops refreshing (dead) stops counting within the ttl.
            a.close();
            let gone = eventually(Duration::from_secs(4), async || {
                b.presence_list("p").await.expect("list") == vec![entry("bob", None)]
            })
            .await;
            assert!(gone, "carol (on the dead host) expired");
            assert!(matches!(
                a.presence_list("p").await,
                Err(ClusterError::Closed)
            ));
        });
        bridge.shutdown();
    });
}

/// The presence events of `rx` within `limit`: (user, online, host), other events skipped.
async fn presence_events(
    rx: &mut UnboundedReceiver<ClusterEvent>,
    limit: Duration,
) -> Vec<(String, bool, String)> {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    while let Some(ev) = next_event(rx, deadline.saturating_duration_since(Instant::now())).await {
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
        let [a, b, c] = connect_hosts(&opts(&server.url()), &bridge);
        on_shard(move || async move {
            let (b_link, mut rb) = ShardLink::start(b.clone(), 0).await;
            let (c_link, mut rc) = ShardLink::start(c.clone(), 0).await;
            b_link.subscribe("r").await.expect("subscribe");
            c_link.subscribe("r").await.expect("subscribe");
            for (host, user, name) in [
                (&a, "carol", Some("Carol")),
                (&a, "dave", None),
                (&b, "dave", None),
                (&b, "bob", None),
                (&c, "cid", None),
            ] {
                host.presence_join("r", user, name).await.expect("join");
            }
            for rx in [&mut rb, &mut rc] {
                let online = presence_events(rx, Duration::from_millis(300)).await;
                assert_eq!(online.len(), 4, "{online:?}");
            }

            // A dies (stops refreshing). B and C keep refreshing: whichever reaps A first
            // publishes carol's offline event, once; dave stays online through B.
            let died = Instant::now();
            a.close();
            let first = wait_event(&mut rb, Duration::from_secs(5), "carol offline", |e| {
                matches!(e, ClusterEvent::Presence { .. })
            })
            .await;
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
            assert_eq!(
                presence_events(&mut rc, Duration::from_millis(500)).await,
                want
            );
            assert_eq!(
                presence_events(&mut rb, Duration::from_millis(10)).await,
                vec![]
            );
            let users: Vec<String> = c
                .presence_list("r")
                .await
                .expect("list")
                .into_iter()
                .map(|p| p.user)
                .collect();
            assert_eq!(users, ["bob", "cid", "dave"]);
            // Nothing more, however long: the dead host was reaped once.
            assert_eq!(
                presence_events(&mut rc, Duration::from_secs(2)).await,
                vec![]
            );

            // B is only cut off for longer than the ttl (its expiry is forced into the
            // past): C's refresh reaps it (bob and dave offline), and B's next refresh
            // announces them online again, as B (whose own members never heard they were
            // gone).
            server
                .cmd(
                    &server.url(),
                    &["ZADD", "corelay:{r}:presence:hosts", "1", b.host_id()],
                )
                .expect("zadd");
            let mut got = presence_events(&mut rc, Duration::from_secs(3)).await;
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
            // B's user leaving now is an ordinary offline event; nothing is left to
            // re-announce.
            assert!(b.presence_leave("r", "bob").await.expect("leave"));
            assert_eq!(
                presence_events(&mut rc, Duration::from_secs(2)).await,
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
        });
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
        on_shard(move || async move {
            let (link, _events) = ShardLink::start(cluster, 0).await;
            for i in 0..1000 {
                publish_one(&link, msg("trim", "u", &i.to_string(), None))
                    .await
                    .expect("publish");
            }
            let read_all = async || {
                store
                    .read("trim", HistoryQuery::After(0), 10_000)
                    .await
                    .expect("read")
            };
            let kept = read_all().await;
            // MAXLEN ~ keeps at least 100 and trims whole nodes: well under 1000.
            assert!(kept.len() >= 100 && kept.len() < 300, "{}", kept.len());
            assert_eq!(kept.last().map(|m| m.offset), Some(1000));
            assert_eq!(store.latest_offset("trim").await.expect("latest"), 1000);
            // Past the age limit (nothing to wait for but time), the next publish drops the
            // old ones.
            glommio::timer::sleep(Duration::from_millis(700)).await;
            let m = stored(
                publish_one(&link, msg("trim", "u", "fresh", None))
                    .await
                    .expect("publish"),
            );
            assert_eq!(m.offset, 1001);
            let kept = read_all().await;
            assert_eq!(kept.iter().map(|m| m.offset).collect::<Vec<_>>(), [1001]);
            let ids: HashSet<_> = kept.iter().map(|m| m.id.clone()).collect();
            assert!(ids.contains(&m.id));
        });
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
        on_shard(move || async move {
            let (link, _events) = ShardLink::start(cluster, 0).await;
            let publish =
                async |m: NewMessage| stored(publish_one(&link, m).await.expect("publish"));
            let m1 = publish(msg("i", "alice", "one", Some("c"))).await;
            let m2 = publish(msg("i", "bob", "two", None)).await;
            // Re-appending what the script wrote is a no-op; a different message at a taken
            // offset is a conflict; the next offsets append normally.
            store
                .append(vec![m1.clone(), m2.clone()])
                .await
                .expect("idempotent");
            let mut other = m2.clone();
            other.text = "not the same".into();
            assert!(matches!(
                store.append(vec![other]).await,
                Err(StoreError::OffsetConflict {
                    offset: 2,
                    latest: 2,
                    ..
                })
            ));
            let mut m3 = m2.clone();
            m3.offset = 3;
            m3.id = "appended".into();
            store
                .append(vec![m2.clone(), m3.clone()])
                .await
                .expect("append after");
            assert_eq!(
                store
                    .read("i", HistoryQuery::Latest, 10)
                    .await
                    .expect("read"),
                vec![m1, m2, m3]
            );
            // The script goes on after the appended offset.
            let m4 = publish(msg("i", "alice", "four", None)).await;
            assert_eq!(m4.offset, 4);
        });
        bridge.shutdown();
    });
}

#[test]
fn a_lost_or_reset_counter_never_reuses_an_offset() {
    let server = RedisServer::start();
    within(Duration::from_secs(30), move || {
        let bridge = Bridge::start().expect("bridge");
        let cluster = connect(opts(&server.url()), &bridge);
        on_shard(move || async move {
            let (link, _events) = ShardLink::start(cluster, 0).await;
            let publish = async |text: &str| {
                let m = msg("c", "alice", text, None);
                stored(publish_one(&link, m).await.expect("publish")).offset
            };
            let first = (publish("1").await, publish("2").await, publish("3").await);
            assert_eq!(first, (1, 2, 3));
            // The counter is lost while the stream survives: the next offset follows the
            // stream.
            let url = server.url();
            server
                .cmd(&url, &["DEL", "corelay:{c}:offset"])
                .expect("DEL");
            assert_eq!(publish("4").await, 4);
            // Set back below the stream: the same.
            server
                .cmd(&url, &["SET", "corelay:{c}:offset", "1"])
                .expect("SET");
            assert_eq!(publish("5").await, 5);
            // Even when trimming emptied the stream, its last id still counts.
            server
                .cmd(&url, &["XTRIM", "corelay:{c}:stream", "MAXLEN", "0"])
                .expect("XTRIM");
            server
                .cmd(&url, &["DEL", "corelay:{c}:offset"])
                .expect("DEL");
            assert_eq!(publish("6").await, 6);
            assert_eq!(publish("7").await, 7, "and the counter follows");
        });
        bridge.shutdown();
    });
}
