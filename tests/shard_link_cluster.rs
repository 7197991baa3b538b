//! A shard's own link to Redis ([`ShardLink`]) against a real Redis Cluster (three masters,
//! with replicas where a failover is tested), each test's shards on glommio executors as
//! the server runs them: rooms on every master published in one batch and received in
//! order by another host; a busy room's slot migrated to another master mid-stream; a
//! batch over two rooms of one master meeting one's half-migrated slot (nothing written
//! twice); and the room's master SIGKILLed mid-stream, its replica promoted (a node no
//! host was given, and the one the sending host was given). In the last two, every
//! send is retried with its `cid` until acked (as a client does after `unavailable`), and
//! the acks must be 1, 2, 3, … with no offset twice and none missing.

mod common_redis;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common_redis::cluster::RedisClusterProcs;
use common_redis::{connect_hosts, fast_opts, msg, next_event, publish_one, start_shard, within};
use corelay::bridge::Bridge;
use corelay::cluster::redis::RedisCluster;
use corelay::cluster::shard_link::ShardLink;
use corelay::cluster::topology::slot_of;
use corelay::cluster::{ClusterEvent, Published, RedisOptions};

/// Options for two hosts of `cluster`, dialling the node that serves the hosts' probe
/// channels (any node would do for the shard links).
fn hosts(cluster: &RedisClusterProcs, bridge: &Bridge) -> [RedisCluster; 2] {
    let base = fast_opts(&cluster.url());
    let probe_master = |i: usize| {
        let host = format!("{}h{i}", base.host_id);
        cluster.master_for_slot(slot_of(format!("corelay:ping:{host}").as_bytes()))
    };
    let mut o: RedisOptions = base.clone();
    o.url = cluster.node_url(probe_master(0));
    let [a, _] = connect_hosts::<2>(&o, bridge);
    o.url = cluster.node_url(probe_master(1));
    let [_, b] = connect_hosts::<2>(&o, bridge);
    [a, b]
}

/// A master of `cluster` other than `from`.
fn other_master(cluster: &RedisClusterProcs, from: usize) -> usize {
    cluster
        .masters()
        .into_iter()
        .find(|&m| m != from)
        .expect("another master")
}

/// The slot of `room`'s keys and channel.
fn room_slot(room: &str) -> u16 {
    slot_of(format!("corelay:{{{room}}}").as_bytes())
}

#[test]
fn rooms_on_every_master_go_in_one_batch_and_arrive_in_order() {
    let cluster = RedisClusterProcs::start(3, 0, &[]);
    let rooms: Vec<String> = (0..12).map(|i| format!("room{i}")).collect();
    let masters: BTreeSet<usize> = rooms
        .iter()
        .map(|r| cluster.master_for_slot(room_slot(r)))
        .collect();
    assert_eq!(masters.len(), 3, "the rooms spread over every master");
    let bridge = Bridge::start().expect("bridge");
    let [a, b] = hosts(&cluster, &bridge);
    within(Duration::from_secs(60), move || {
        common_redis::on_shard_blocking(move || async move {
            let (a0, _a_events) = ShardLink::start(a, 0).await;
            let (b0, mut b_events) = ShardLink::start(b, 0).await;
            assert!(a0.is_cluster() && b0.is_cluster());
            for room in &rooms {
                b0.subscribe(room).await.expect("subscribe");
            }
            for round in 1..=3u64 {
                let batch = rooms
                    .iter()
                    .map(|r| (msg(r, "alice", &format!("m{round}"), None), 0))
                    .collect();
                for (room, result) in rooms.iter().zip(a0.publish_batch(batch).await) {
                    match result {
                        Ok(Published::Stored(m)) => assert_eq!(m.offset, round, "{room}"),
                        other => panic!("{room}: {other:?}"),
                    }
                }
            }
            let mut got: std::collections::HashMap<String, Vec<u64>> = Default::default();
            let deadline = Instant::now() + Duration::from_secs(10);
            while got.values().map(Vec::len).sum::<usize>() < rooms.len() * 3 {
                let left = deadline.saturating_duration_since(Instant::now());
                match next_event(&mut b_events, left).await {
                    Some(ClusterEvent::Message(m)) => got.entry(m.room).or_default().push(m.offset),
                    Some(_) => {}
                    None => panic!("only {got:?} arrived"),
                }
            }
            for room in &rooms {
                assert_eq!(
                    got.get(room).map(Vec::as_slice),
                    Some(&[1, 2, 3][..]),
                    "{room}"
                );
            }
        })
    });
}

/// Sends `count` messages to `room` through a fresh link on `host`, one after another,
/// each retried with its cid until acked (within 30 s); stops early when `stop` is set.
/// The offsets acked, in order, and how many sends failed before their retry succeeded.
async fn send_until_acked(host: RedisCluster, room: &str, count: usize) -> (Vec<u64>, usize) {
    let (link, _events) = ShardLink::start(host, 0).await;
    let mut acked = Vec::with_capacity(count);
    let mut failures = 0;
    for i in 0..count {
        let cid = format!("c{i}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match publish_one(&link, msg(room, "alice", &format!("m{i}"), Some(&cid))).await {
                Ok(p) => {
                    acked.push(p.ack().offset);
                    break;
                }
                Err(e) => {
                    assert!(
                        e.is_transient() || matches!(e, corelay::cluster::ClusterError::Server(_)),
                        "{e:?}"
                    );
                    failures += 1;
                    assert!(Instant::now() < deadline, "send {i} never acked: {e}");
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    (acked, failures)
}

/// A subscriber on `host` for `room` collecting offsets until `last` arrives (or 40 s);
/// also whether a `Reconnected` came.
async fn receive_until(
    host: RedisCluster,
    room: &str,
    last: Arc<AtomicU64>,
    ready: Arc<AtomicBool>,
) -> (Vec<u64>, bool) {
    let (link, mut events) = ShardLink::start(host, 0).await;
    link.subscribe(room).await.expect("subscribe");
    ready.store(true, Ordering::Release);
    let mut got = Vec::new();
    let mut reconnected = false;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let want = last.load(Ordering::Acquire);
        if want > 0 && got.last().is_some_and(|&o| o >= want) {
            return (got, reconnected);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (got, reconnected);
        }
        match next_event(&mut events, left.min(Duration::from_millis(200))).await {
            Some(ClusterEvent::Message(m)) if m.room == room => got.push(m.offset),
            Some(ClusterEvent::Reconnected) => reconnected = true,
            _ => {}
        }
    }
}

/// What both mid-stream tests check: acks 1..=count, and the receiver's offsets strictly
/// increasing, ending with the last, having been told to catch up when it missed some.
fn check_stream(acked: &[u64], count: usize, received: &[u64], reconnected: bool) {
    let want: Vec<u64> = (1..=count as u64).collect();
    assert_eq!(
        acked,
        want.as_slice(),
        "every send acked once, in order, no offset twice"
    );
    assert!(
        received.windows(2).all(|w| w[0] < w[1]),
        "in order, no repeat: {received:?}"
    );
    assert_eq!(
        received.last(),
        Some(&(count as u64)),
        "the last message arrived"
    );
    let missed = count - received.len();
    assert!(
        missed == 0 || reconnected,
        "{missed} missed without a Reconnected to catch up"
    );
}

#[test]
fn a_busy_rooms_slot_migrated_mid_stream_loses_and_repeats_nothing() {
    let cluster = RedisClusterProcs::start(3, 0, &[]);
    let room = "busy";
    let slot = room_slot(room);
    let from = cluster.master_for_slot(slot);
    let to = other_master(&cluster, from);
    let bridge = Bridge::start().expect("bridge");
    let [a, b] = hosts(&cluster, &bridge);
    let mut cluster = cluster;
    let failures = stream_through(a, b, room, 300, &mut cluster, |cluster| {
        cluster.migrate_slot(slot, to);
        assert_eq!(cluster.master_for_slot(slot), to, "the slot moved");
    });
    eprintln!("migration: {failures} sends retried");
}

/// One host (`a`) sends `count` messages to `room`, each retried with its cid until
/// acked, while another (`b`) receives; `disrupt` runs on the cluster 300 ms into the
/// stream. Checks every send acked once at 1..=count and the receiver's stream (see
/// [`check_stream`]); how many sends failed before their retry.
fn stream_through(
    a: RedisCluster,
    b: RedisCluster,
    room: &'static str,
    count: usize,
    cluster: &mut RedisClusterProcs,
    disrupt: impl FnOnce(&mut RedisClusterProcs),
) -> usize {
    let last = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(AtomicBool::new(false));
    let (l, r) = (last.clone(), ready.clone());
    let receiver = start_shard(move || async move { receive_until(b, room, l, r).await });
    while !ready.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let sender = start_shard(move || async move { send_until_acked(a, room, count).await });
    std::thread::sleep(Duration::from_millis(300));
    disrupt(cluster);
    let (acked, failures) = within(Duration::from_secs(90), move || {
        sender.join().expect("sender")
    });
    last.store(count as u64, Ordering::Release);
    let (received, reconnected) = within(Duration::from_secs(60), move || {
        receiver.join().expect("receiver")
    });
    eprintln!("{} of {count} received live", received.len());
    check_stream(&acked, count, &received, reconnected);
    failures
}

#[test]
fn a_master_killed_mid_stream_fails_over_with_no_acked_message_lost() {
    failover_mid_stream(false);
}

#[test]
fn the_master_a_host_was_given_killed_mid_stream_fails_over_too() {
    failover_mid_stream(true);
}

/// A room's master SIGKILLed while one host sends to the room and another receives, its
/// replica promoted; `seed`: the room's master is the node the sending host was given in
/// `redis.url` (else a node no host was given).
fn failover_mid_stream(seed: bool) {
    let mut cluster = RedisClusterProcs::start(3, 1, &[]);
    let bridge = Bridge::start().expect("bridge");
    let [a, b] = hosts(&cluster, &bridge);
    let dialled: Vec<String> = [&a, &b].iter().map(|h| h.options().url.clone()).collect();
    let room: &'static str = (0..)
        .map(|i| format!("failover{i}"))
        .find(|r| {
            let master = cluster.node_url(cluster.master_for_slot(room_slot(r)));
            if seed {
                master == dialled[0]
            } else {
                !dialled.contains(&master)
            }
        })
        .map(|r| &*Box::leak(r.into_boxed_str()))
        .expect("a room");
    let slot = room_slot(room);
    let victim = cluster.master_for_slot(slot);
    let failures = stream_through(a, b, room, 200, &mut cluster, |cluster| {
        cluster.kill_node(victim);
        let promoted = cluster.wait_failover(victim);
        assert_eq!(cluster.master_for_slot(slot), promoted);
    });
    eprintln!("failover (seed: {seed}): {failures} sends retried");
    assert!(failures > 0, "the sends met the failover");
}

/// Node `i`'s port, from its URL.
fn port_of(cluster: &RedisClusterProcs, i: usize) -> u16 {
    let url = cluster.node_url(i);
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("a port in the node's URL")
}

#[test]
fn a_batch_meeting_a_half_migrated_slot_writes_each_room_once() {
    let cluster = RedisClusterProcs::start(3, 0, &[]);
    // Two rooms on one master, on different slots; the first one's slot will move.
    let rooms: Vec<String> = (0..).map(|i| format!("pair{i}")).take(200).collect();
    let (moving, staying) = rooms
        .iter()
        .flat_map(|a| rooms.iter().map(move |b| (a, b)))
        .find(|(a, b)| {
            room_slot(a) != room_slot(b)
                && cluster.master_for_slot(room_slot(a)) == cluster.master_for_slot(room_slot(b))
        })
        .map(|(a, b)| (a.clone(), b.clone()))
        .expect("two rooms on one master");
    let slot = room_slot(&moving);
    let from = cluster.master_for_slot(slot);
    let to = other_master(&cluster, from);
    let bridge = Bridge::start().expect("bridge");
    let [a, _] = hosts(&cluster, &bridge);
    let (m1, s1) = (moving.clone(), staying.clone());
    let (link_ready, half_done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (lr, hd) = (link_ready.clone(), half_done.clone());
    let shard = start_shard(move || async move {
        let (link, _events) = ShardLink::start(a, 0).await;
        let batch = |n: u64| {
            vec![
                (
                    msg(&m1, "alice", &format!("m{n}"), Some(&format!("m{n}"))),
                    0,
                ),
                (
                    msg(&s1, "alice", &format!("s{n}"), Some(&format!("s{n}"))),
                    0,
                ),
            ]
        };
        let offsets = |results: Vec<Result<Published, corelay::cluster::ClusterError>>| {
            results
                .into_iter()
                .map(|r| r.expect("published").ack().offset)
                .collect::<Vec<u64>>()
        };
        assert_eq!(offsets(link.publish_batch(batch(1)).await), [1, 1]);
        lr.store(true, Ordering::Release);
        while !hd.load(Ordering::Acquire) {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        // The moving room's keys are on the target, its slot still MIGRATING: the call over
        // both rooms fails before writing (the script touches every key first), then each
        // room goes alone, the moving one after ASKING, until the slot is moved.
        let second = offsets(link.publish_batch(batch(2)).await);
        second
    });
    while !link_ready.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let slot_s = slot.to_string();
    let ok = |r: Result<redis::Value, String>| r.expect("migration step");
    ok(cluster.cmd(
        to,
        &[
            "CLUSTER",
            "SETSLOT",
            &slot_s,
            "IMPORTING",
            cluster.node_id(from),
        ],
    ));
    ok(cluster.cmd(
        from,
        &[
            "CLUSTER",
            "SETSLOT",
            &slot_s,
            "MIGRATING",
            cluster.node_id(to),
        ],
    ));
    let keys: Vec<String> = redis::from_redis_value(ok(
        cluster.cmd(from, &["CLUSTER", "GETKEYSINSLOT", &slot_s, "100"])
    ))
    .expect("key names");
    assert!(keys.len() >= 2, "the room's counter and stream: {keys:?}");
    let to_port = port_of(&cluster, to).to_string();
    for k in &keys {
        ok(cluster.cmd(from, &["MIGRATE", "127.0.0.1", &to_port, k, "0", "5000"]));
    }
    half_done.store(true, Ordering::Release);
    // The batch meets the half-moved slot (`TRYAGAIN`: a new cid key is missing on both
    // sides) until the move is done, then follows `MOVED`.
    std::thread::sleep(Duration::from_millis(150));
    for node in cluster.masters() {
        ok(cluster.cmd(
            node,
            &["CLUSTER", "SETSLOT", &slot_s, "NODE", cluster.node_id(to)],
        ));
    }
    let second = within(Duration::from_secs(30), move || {
        shard.join().expect("shard")
    });
    assert_eq!(
        second,
        [2, 2],
        "each room written once, the moving one on its new master"
    );
    // The moving room's second message is on the target only; the staying room's on the
    // source, once.
    let len = |node: usize, room: &str| -> i64 {
        redis::from_redis_value(ok(
            cluster.cmd(node, &["XLEN", &format!("corelay:{{{room}}}:stream")])
        ))
        .expect("XLEN")
    };
    assert_eq!(len(to, &moving), 2);
    assert_eq!(len(from, &staying), 2);
}
