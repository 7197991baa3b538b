//! The process's link to Redis ([`RedisCluster`], on the bridge) against a real Redis
//! Cluster: `redis-server --cluster-enabled yes` nodes on free loopback ports, joined with
//! `redis-cli --cluster create` (see [`RedisClusterProcs`]); every node dies with its test.
//!
//! Connecting through any node finds the cluster out (sharded pub/sub on); presence,
//! typing notices and the Redis history store reach each room's master, on all three;
//! `corelay check` reports the slot coverage and each master, and names a hole in the slot
//! map or a dead master; `/healthz`'s `redis.nodes` lists the nodes and whether they are
//! up; calls follow a slot migration (ASK, then MOVED); a master SIGKILLed while its
//! replica takes over makes its rooms' calls fail as `Unavailable` or `Timeout` for a
//! while, then succeed again on the same `RedisCluster`, probe link included; and all of
//! it with AUTH (requirepass, masterauth). The shards' own links (`ShardLink`) are not
//! here. Every test body is bounded in time.

mod common_redis;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common_redis::cluster::RedisClusterProcs;
use common_redis::{connect, connect_hosts, fast_opts as opts, within, RedisServer, TlsFiles};
use corelay::bridge::Bridge;
use corelay::cluster::redis::{NodeRole, RedisCluster};
use corelay::cluster::topology::slot_of;
use corelay::cluster::{check, ClusterError, PresenceEntry};
use corelay::metrics::Metrics;
use corelay::store::redis::RedisStore;
use corelay::store::{HistoryQuery, HistoryStore, StoreError, StoredMessage};
use futures::executor::block_on;

/// A raw RESP connection SSUBSCRIBEd to one channel on one node: what another host's shard
/// would see.
struct Subscriber {
    stream: TcpStream,
    seen: Vec<u8>,
}

impl Subscriber {
    /// Connects to `port`, AUTHs with `password` if any, and SSUBSCRIBEs `channel`.
    fn ssubscribe(port: u16, password: Option<&str>, channel: &str) -> Subscriber {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let mut sub = Subscriber {
            stream,
            seen: Vec::new(),
        };
        if let Some(pw) = password {
            sub.send(&["AUTH", pw]);
            sub.wait_for("+OK", Duration::from_secs(2));
        }
        sub.send(&["SSUBSCRIBE", channel]);
        sub.wait_for("ssubscribe", Duration::from_secs(2));
        sub
    }

    /// Writes one command as a RESP array: the subscriber speaks RESP by hand so that the
    /// test sees the raw push frames, with no client library in between.
    fn send(&mut self, args: &[&str]) {
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.stream.write_all(out.as_bytes()).expect("write");
    }

    /// Reads until `needle` appears in what came since the last match; panics after `limit`.
    fn wait_for(&mut self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&self.seen).into_owned();
            if let Some(at) = text.find(needle) {
                self.seen.drain(..at + needle.len());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} within {limit:?}; got {text:?}"
            );
            if let Ok(n) = self.stream.read(&mut buf) {
                self.seen.extend_from_slice(&buf[..n]);
            }
        }
    }
}

/// Polls `cond` every 50 ms until it holds or `limit` passes; whether it held.
fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// Message `offset` of `room`.
fn message(room: &str, offset: u64) -> StoredMessage {
    StoredMessage {
        room: room.to_owned(),
        offset,
        id: format!("{room}-{offset}"),
        user: "alice".into(),
        text: format!("hello {offset}"),
        ts: corelay::ids::now_ms(),
        cid: None,
    }
}

/// A presence entry of `user` (display name `name`), to compare presence lists with.
fn entry(user: &str, name: Option<&str>) -> PresenceEntry {
    PresenceEntry {
        user: user.into(),
        name: name.map(str::to_owned),
    }
}

/// `/healthz`'s `redis` for `cluster`.
fn healthz_redis(cluster: &RedisCluster) -> serde_json::Value {
    let metrics = Metrics::new(1);
    let _ = metrics.redis.set(cluster.clone());
    metrics.redis_json()
}

/// Waits until `/healthz` lists `n` nodes that `want` accepts; returns the list.
fn wait_nodes(
    cluster: &RedisCluster,
    limit: Duration,
    what: &str,
    want: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let mut last = Vec::new();
    let held = eventually(limit, || {
        last = healthz_redis(cluster)["nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        want(&last)
    });
    assert!(held, "/healthz nodes never {what}: {last:#?}");
    last
}

/// Through `c`, for a room on every master of `cluster` (named from `prefix`): `user`
/// joins presence (the first there), `more` checks what else it likes, and the Redis
/// store appends a message and reads it back.
fn serves_every_master(
    c: &RedisCluster,
    cluster: &RedisClusterProcs,
    prefix: &str,
    user: &str,
    mut more: impl FnMut(usize, &str),
) {
    let store = RedisStore::new(c);
    for (master, room) in cluster.room_per_master(prefix) {
        assert_eq!(block_on(c.presence_join(&room, user, None)), Ok(true));
        more(master, &room);
        block_on(store.append(vec![message(&room, 1)])).expect("append");
        assert_eq!(
            block_on(store.read(&room, HistoryQuery::Latest, 10))
                .expect("read")
                .len(),
            1
        );
    }
}

/// `/healthz` through `c` lists `nodes` nodes, all up, and `corelay check` with `o`
/// passes.
fn all_up_and_checked(
    c: &RedisCluster,
    o: &corelay::cluster::RedisOptions,
    bridge: &Bridge,
    nodes: usize,
) {
    wait_nodes(c, Duration::from_secs(5), "all up", |n| {
        n.len() == nodes && n.iter().all(|x| x["up"] == true)
    });
    let report = block_on(check(o, bridge));
    println!("{report}");
    assert!(report.ok(), "{report}");
}

/// Whether `cluster`'s probe link is up and has measured a round trip: what says the
/// link works, beyond a connect that succeeded.
fn link_up(cluster: &RedisCluster) -> bool {
    cluster.is_connected() && cluster.last_roundtrip_ms().is_some()
}

#[test]
fn a_standalone_redis_is_not_a_cluster() {
    let server = RedisServer::start();
    within(Duration::from_secs(20), move || {
        let bridge = Bridge::start().expect("bridge");
        let c = connect(opts(&server.url()), &bridge);
        assert!(!c.is_cluster());
        assert!(!c.options().sharded);
        assert!(c.nodes().is_empty() && c.slot_map().is_none());
        let redis = healthz_redis(&c);
        assert_eq!(redis["cluster"], false, "{redis}");
        assert!(redis.get("nodes").is_none(), "{redis}");
        let report = block_on(check(&opts(&server.url()), &bridge));
        assert!(report.ok() && report.cluster.is_none(), "{report}");
        c.close();
        bridge.shutdown();
    });
}

#[test]
fn a_cluster_is_served_through_any_node() {
    let cluster = RedisClusterProcs::start(3, 0, &[]);
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let rooms = cluster.room_per_master("room");
        assert_eq!(rooms.len(), 3);
        // Through the last node, whichever master that is.
        let o = opts(&cluster.admin_url(2));
        let [a, b] = connect_hosts::<2>(&o, &bridge);
        assert!(a.is_cluster() && a.options().sharded, "{a:?}");
        assert!(eventually(Duration::from_secs(3), || link_up(&a)));

        for (master, room) in &rooms {
            assert_eq!(
                block_on(a.presence_join(room, "alice", Some("Alice"))),
                Ok(true)
            );
            assert_eq!(block_on(b.presence_join(room, "bob", None)), Ok(true));
            assert_eq!(
                block_on(b.presence_list(room)),
                Ok(vec![entry("alice", Some("Alice")), entry("bob", None)]),
                "{room}"
            );
            assert!(
                cluster.holds(*master, &format!("corelay:{{{room}}}:presence:hosts")),
                "{room}'s presence is not on its master"
            );
            assert_eq!(block_on(b.presence_leave(room, "bob")), Ok(true));
            assert_eq!(
                block_on(a.presence_list(room)),
                Ok(vec![entry("alice", Some("Alice"))])
            );

            // A typing notice reaches a subscriber of the room's channel on its master.
            let channel = format!("corelay:{{{room}}}");
            let mut sub = Subscriber::ssubscribe(cluster.nodes[*master].port, None, &channel);
            assert!(a.publish_typing(room, "alice"));
            sub.wait_for("smessage", Duration::from_secs(3));
            sub.wait_for("\"alice\"", Duration::from_secs(1));
        }

        let store = RedisStore::new(&a);
        for (master, room) in &rooms {
            let batch: Vec<StoredMessage> = (1..=3).map(|o| message(room, o)).collect();
            block_on(store.append(batch.clone())).expect("append");
            assert_eq!(
                block_on(store.read(room, HistoryQuery::Latest, 10)).expect("read"),
                batch
            );
            assert_eq!(block_on(store.latest_offset(room)).expect("offset"), 3);
            assert_eq!(
                block_on(store.read(room, HistoryQuery::After(1), 10))
                    .expect("read")
                    .len(),
                2
            );
            assert!(cluster.holds(*master, &format!("corelay:{{{room}}}:stream")));
        }

        let report = block_on(check(&o, &bridge));
        println!("{report}");
        assert!(report.ok(), "{report}");
        let c = report.cluster.as_ref().expect("a cluster report");
        assert!(c.slots.verdict.contains("all 16384 slots"), "{report}");
        assert_eq!(c.masters.len(), 3, "{report}");
        assert_eq!(c.masters.iter().map(|m| m.slots).sum::<u32>(), 16_384);
        assert!(report.pubsub.verdict.contains("all 3 masters"), "{report}");

        let nodes = wait_nodes(&a, Duration::from_secs(5), "all up", |n| {
            n.len() == 3 && n.iter().all(|x| x["up"] == true)
        });
        assert!(nodes
            .iter()
            .all(|n| n["role"] == "master" && n["slots"] != 0));
        assert_eq!(healthz_redis(&a)["cluster"], true);
        assert_eq!(a.slot_map().map(|m| m.uncovered()), Some(0));
        for c in [a, b] {
            c.close();
        }
        bridge.shutdown();
    });
}

#[test]
fn check_names_a_hole_in_the_slot_map_and_a_dead_master() {
    let mut cluster = RedisClusterProcs::start(3, 0, &[]);
    let bridge = Bridge::start().expect("bridge");
    // Node 0 forgets slots 100-199 of its own: in its map nobody serves them.
    let (own, _) = *cluster.slots_of(0).first().expect("node 0 is a master");
    let (from, to) = ((own + 100).to_string(), (own + 199).to_string());
    cluster
        .cmd(0, &["CLUSTER", "DELSLOTSRANGE", &from, &to])
        .expect("DELSLOTSRANGE");
    let report = within(Duration::from_secs(20), {
        let o = opts(&cluster.admin_url(0));
        let bridge = bridge.clone();
        move || block_on(check(&o, &bridge))
    });
    println!("{report}");
    assert!(!report.ok());
    let slots = &report.cluster.as_ref().expect("cluster").slots;
    assert!(!slots.ok, "{report}");
    assert!(
        slots.verdict.contains("100 of 16384 slots have no master")
            && slots.verdict.contains(&format!("{from}-{to}")),
        "{report}"
    );

    // Node 1, a master, dies: node 2 still maps its slots to it.
    cluster.kill_node(1);
    let report = within(Duration::from_secs(20), {
        let o = opts(&cluster.admin_url(2));
        let bridge = bridge.clone();
        move || block_on(check(&o, &bridge))
    });
    println!("{report}");
    assert!(!report.ok());
    let c = report.cluster.as_ref().expect("cluster");
    let dead = c
        .masters
        .iter()
        .find(|m| m.node.to_string() == cluster.addr(1))
        .expect("the dead master is listed");
    assert!(
        !dead.ping.ok && dead.ping.verdict.contains("connection refused"),
        "{report}"
    );
    assert!(!report.pubsub.ok && report.pubsub.verdict.contains(&cluster.addr(1)));
    assert_eq!(c.masters.iter().filter(|m| m.ok()).count(), 2, "{report}");
    bridge.shutdown();
}

#[test]
fn calls_follow_a_slot_migration() {
    let cluster = RedisClusterProcs::start(3, 0, &[]);
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let rooms = cluster.room_per_master("mig");
        let (from, room) = rooms[0].clone();
        let to = rooms[1].0;
        let c = connect(opts(&cluster.admin_url(to)), &bridge);
        let store = RedisStore::new(&c);
        assert_eq!(block_on(c.presence_join(&room, "alice", None)), Ok(true));
        block_on(store.append(vec![message(&room, 1)])).expect("append");

        // Migrate the room's slot by hand: keys first (ASK while it is half done), then
        // the slot (MOVED).
        let slot = slot_of(room.as_bytes()).to_string();
        let (from_id, to_id) = (cluster.node_id(from), cluster.node_id(to));
        cluster
            .cmd(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", from_id])
            .expect("importing");
        cluster
            .cmd(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", to_id])
            .expect("migrating");
        let keys = match cluster.cmd(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"]) {
            Ok(redis::Value::Array(keys)) => keys,
            other => panic!("GETKEYSINSLOT: {other:?}"),
        };
        assert!(keys.len() >= 3, "{keys:?}");
        let port = cluster.nodes[to].port.to_string();
        let mut migrate = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
        let names: Vec<String> = keys
            .into_iter()
            .map(|k| match k {
                redis::Value::BulkString(b) => String::from_utf8(b).expect("key"),
                other => panic!("key {other:?}"),
            })
            .collect();
        migrate.extend(names.iter().map(String::as_str));
        cluster.cmd(from, &migrate).expect("MIGRATE");

        // Every key moved, the slot not yet: the old master answers ASK.
        assert_eq!(
            block_on(c.presence_list(&room)),
            Ok(vec![entry("alice", None)])
        );
        assert_eq!(
            block_on(store.read(&room, HistoryQuery::Latest, 10))
                .expect("read")
                .len(),
            1
        );
        // A script with a key neither side holds yet (bob's reaped set) gets TRYAGAIN from
        // the importing master until the slot is handed over: waited out a few times, then
        // `Unavailable` (the migration of one slot takes well under that in practice).
        match block_on(c.presence_join(&room, "bob", None)) {
            Ok(joined) => assert!(joined),
            Err(e) => assert!(
                matches!(e, ClusterError::Unavailable(ref t) if t.contains("TryAgain")),
                "{e:?}"
            ),
        }

        for i in [from, to, rooms[2].0] {
            cluster
                .cmd(i, &["CLUSTER", "SETSLOT", &slot, "NODE", to_id])
                .expect("node");
        }
        // The slot moved: MOVED, and the map is read again.
        block_on(c.presence_join(&room, "bob", None)).expect("join after the move");
        assert_eq!(
            block_on(c.presence_list(&room)),
            Ok(vec![entry("alice", None), entry("bob", None)])
        );
        block_on(store.append(vec![message(&room, 2)])).expect("append after the move");
        assert_eq!(
            block_on(store.read(&room, HistoryQuery::Latest, 10))
                .expect("read")
                .len(),
            2
        );
        assert!(cluster.holds(to, &format!("corelay:{{{room}}}:stream")));
        assert!(!cluster.holds(from, &format!("corelay:{{{room}}}:stream")));
        c.close();
        bridge.shutdown();
    });
}

#[test]
fn a_master_failover_is_ridden_through() {
    let mut cluster = RedisClusterProcs::start(3, 1, &[]);
    let bridge = Bridge::start().expect("bridge");
    let rooms = cluster.room_per_master("fo");
    let (victim, room) = rooms[0].clone();
    let (_, other_room) = rooms[1].clone();
    // Connected through the master that dies, to make it harder.
    let c = connect(opts(&cluster.admin_url(victim)), &bridge);
    let store = RedisStore::new(&c);
    let up = within(Duration::from_secs(10), {
        let (c, store, room) = (c.clone(), store.clone(), room.clone());
        move || {
            assert_eq!(block_on(c.presence_join(&room, "alice", None)), Ok(true));
            block_on(store.append(vec![message(&room, 1)])).expect("append");
            wait_nodes(&c, Duration::from_secs(5), "all up", |n| {
                n.len() == 6 && n.iter().all(|x| x["up"] == true)
            })
        }
    });
    assert_eq!(up.iter().filter(|n| n["role"] == "replica").count(), 3);
    let victim_addr = cluster.addr(victim);

    // The append was acked without WAIT: let it reach the replica that will take over.
    cluster.wait_replicated(victim);
    cluster.kill_node(victim);
    let killed = Instant::now();
    let (c2, store2, room2) = (c.clone(), store.clone(), room.clone());
    let (errors, recovered) = within(Duration::from_secs(45), move || {
        // Its rooms' calls fail, each within its bound, until a replica takes over; then
        // they succeed again on the same client.
        let mut errors: Vec<String> = Vec::new();
        let recovered = loop {
            let call = Instant::now();
            let listed = block_on(c2.presence_list(&room2));
            assert!(
                call.elapsed() < Duration::from_millis(1500),
                "{:?}",
                call.elapsed()
            );
            match listed {
                // (Alice may be missing at first: the failover took longer than the
                // presence TTL of these options, 1.5 s; the refresh puts her back, below.)
                Ok(_) if !errors.is_empty() => break killed.elapsed(),
                Ok(_) => {}
                Err(e) => {
                    assert!(
                        matches!(e, ClusterError::Unavailable(_) | ClusterError::Timeout(_)),
                        "{e:?}"
                    );
                    errors.push(e.to_string());
                }
            }
            match block_on(store2.read(&room2, HistoryQuery::Latest, 10)) {
                Ok(_) | Err(StoreError::Unavailable(_)) => {}
                Err(e) => panic!("the store failed otherwise: {e:?}"),
            }
            assert!(
                killed.elapsed() < Duration::from_secs(30),
                "no failover: {errors:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        (errors, recovered)
    });
    println!(
        "{} failed calls, back after {recovered:?}: {:?}",
        errors.len(),
        errors.first()
    );
    assert!(
        !errors.is_empty(),
        "no call failed while the master was down"
    );

    // Generous: with the other tests' clusters on two cores, the cluster client's map and
    // the presence refresh (every 0.5 s) can lag the failover by seconds.
    within(Duration::from_secs(40), move || {
        assert!(
            eventually(Duration::from_secs(20), || {
                block_on(c.presence_list(&room)) == Ok(vec![entry("alice", None)])
            }),
            "the presence refresh did not write alice back"
        );
        assert_eq!(
            block_on(store.read(&room, HistoryQuery::Latest, 10))
                .expect("read")
                .len(),
            1,
            "the replica had the stream"
        );
        block_on(store.append(vec![message(&room, 2)])).expect("append after the failover");
        assert_eq!(block_on(c.presence_join(&room, "bob", None)), Ok(true));
        assert_eq!(
            block_on(c.presence_join(&other_room, "carol", None)),
            Ok(true)
        );
        assert!(
            eventually(Duration::from_secs(10), || link_up(&c)),
            "the probe link did not come back"
        );
        let nodes = wait_nodes(&c, Duration::from_secs(10), "show the failover", |n| {
            let dead = n.iter().find(|x| x["addr"] == victim_addr.as_str());
            let masters_up = n
                .iter()
                .filter(|x| x["role"] == "master" && x["up"] == true && x["slots"] != 0)
                .count();
            dead.is_some_and(|d| d["up"] == false) && masters_up == 3
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&nodes).unwrap_or_default()
        );
        assert!(c
            .nodes()
            .iter()
            .any(|n| n.role == NodeRole::Master && n.up && n.addr.to_string() != victim_addr));
        c.close();
        bridge.shutdown();
    });
}

#[test]
fn a_cluster_with_a_password() {
    let cluster = RedisClusterProcs::start(3, 1, &["--requirepass", "s3cret"]);
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let o = opts(&cluster.admin_url(1));
        let c = connect(o.clone(), &bridge);
        assert!(c.is_cluster());
        assert!(eventually(Duration::from_secs(3), || link_up(&c)));
        serves_every_master(&c, &cluster, "auth", "alice", |master, room| {
            let mut sub = Subscriber::ssubscribe(
                cluster.nodes[master].port,
                Some("s3cret"),
                &format!("corelay:{{{room}}}"),
            );
            assert!(c.publish_typing(room, "alice"));
            sub.wait_for("smessage", Duration::from_secs(3));
        });
        all_up_and_checked(&c, &o, &bridge, 6);

        // The ACL user of deploy/redis.md, with the two cluster commands it adds for a
        // Redis Cluster (users are per node: set on each).
        for i in 0..cluster.nodes.len() {
            cluster
                .cmd(
                    i,
                    &[
                        "ACL",
                        "SETUSER",
                        "corelay",
                        "reset",
                        "on",
                        ">pw2",
                        "resetchannels",
                        "~corelay:*",
                        "&corelay:*",
                        "-@all",
                        "+@connection",
                        "+@read",
                        "+@write",
                        "+@pubsub",
                        "+@scripting",
                        "-@dangerous",
                        "+info",
                        "+time",
                        "+cluster|slots",
                        "+cluster|nodes",
                    ],
                )
                .expect("ACL SETUSER");
        }
        let acl = opts(&cluster.node_url_with(0, "corelay:pw2"));
        let user = connect(acl.clone(), &bridge);
        assert!(user.is_cluster());
        assert!(eventually(Duration::from_secs(3), || link_up(&user)));
        serves_every_master(&user, &cluster, "acl", "dave", |_, _| {});
        all_up_and_checked(&user, &acl, &bridge, 6);
        user.close();

        let wrong = opts(&cluster.admin_url(1).replace("s3cret", "wrong"));
        let refused = block_on(RedisCluster::connect(wrong.clone(), bridge.clone()));
        assert!(matches!(refused, Err(ClusterError::Auth(_))), "{refused:?}");
        let report = block_on(check(&wrong, &bridge));
        assert!(
            !report.ok() && report.ping.verdict.contains("refused the credentials"),
            "{report}"
        );
        c.close();
        bridge.shutdown();
    });
}

#[test]
fn a_cluster_over_tls() {
    // rustls needs a process-wide crypto provider before the test's own TLS client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = TlsFiles::generate().expect("test certificates (apt-get install openssl)");
    let cluster = RedisClusterProcs::start_tls(3, 0, &tls);
    let mut o = opts(&cluster.admin_url(1));
    o.tls_ca_file = Some(tls.ca_cert.clone());
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let c = connect(o.clone(), &bridge);
        assert!(c.is_cluster());
        assert!(eventually(Duration::from_secs(3), || link_up(&c)));
        serves_every_master(&c, &cluster, "tls", "alice", |_, _| {});
        all_up_and_checked(&c, &o, &bridge, 3);
        c.close();
        bridge.shutdown();
    });
}
