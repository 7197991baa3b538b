//! A shard's own link to Redis ([`ShardLink`]) against real `redis-server`s, each test's
//! shards on glommio executors as the server runs them: two hosts publishing batches and
//! receiving them in offset order on the shards' own connections (plain and sharded
//! pub/sub), a batch over two rooms, a repeated `cid`, unsubscribing, the script loaded
//! again after `SCRIPT FLUSH`; a restarted Redis (`Down`, fast failures, `Reconnected`,
//! rooms wanted while down subscribed again, rooms given up not); a stalled Redis (calls
//! bounded by the timeout, then recovery); a channel the ACL forbids (refused, with AUTH
//! and SELECT on the shard's connections); TLS with a client certificate; and a Unix
//! socket. The publish script's offsets and dedupe in depth (published through shard links
//! there too), and what the bridge itself does (presence, history reads, its own link,
//! `check`), are in `redis_cluster_layer.rs`; the helpers both share are in `common_redis`.

mod common_redis;

use std::time::{Duration, Instant};

use common_redis::{
    connect, connect_hosts, eventually, fast_opts as opts, msg, next_event, offset, offsets,
    on_shard_blocking as on_shard, publish_one, wait_down, wait_message, wait_reconnected, within,
    RedisServer, TlsFiles,
};
use corelay::bridge::Bridge;
use corelay::cluster::redis::RedisCluster;
use corelay::cluster::shard_link::ShardLink;
use corelay::cluster::{ClusterError, ClusterEvent, Published};
use futures::channel::mpsc::UnboundedReceiver;

/// A shard link's event stream.
type Events = UnboundedReceiver<ClusterEvent>;

/// Names of the clients connected to `server` (CLIENT LIST), minus the caller.
fn clients(server: &RedisServer) -> String {
    match server.cmd(&server.url(), &["CLIENT", "LIST"]) {
        Ok(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
        Ok(redis::Value::VerbatimString { text, .. }) => text,
        other => panic!("CLIENT LIST: {other:?}"),
    }
}

/// One shard link per host, both subscribed to `room`; they publish three messages in turn
/// (A, B, A), and both receive offsets 1, 2, 3. The links and their event streams.
async fn exchange(
    a: RedisCluster,
    b: RedisCluster,
    room: &str,
) -> (ShardLink, Events, ShardLink, Events) {
    let (a0, mut a_events) = ShardLink::start(a, 0).await;
    let (b0, mut b_events) = ShardLink::start(b, 0).await;
    a0.subscribe(room).await.expect("subscribe on A");
    b0.subscribe(room).await.expect("subscribe on B");
    for (next, link) in (1..).zip([&a0, &b0, &a0]) {
        let r = publish_one(link, msg(room, "alice", &format!("m{next}"), None)).await;
        assert_eq!(offset(r), next);
    }
    assert_eq!(offsets(&mut a_events, room, 3).await, [1, 2, 3], "host A");
    assert_eq!(offsets(&mut b_events, room, 3).await, [1, 2, 3], "host B");
    (a0, a_events, b0, b_events)
}

#[test]
fn two_hosts_publish_and_receive_on_their_shards_own_connections() {
    two_hosts(false);
}

#[test]
fn the_same_with_sharded_pubsub() {
    two_hosts(true);
}

fn two_hosts(sharded: bool) {
    let server = RedisServer::start();
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let mut o = opts(&server.url());
        o.sharded = sharded;
        let [a, b] = connect_hosts(&o, &bridge);
        let before = clients(&server).lines().count();
        let url = server.url();
        let server = std::sync::Arc::new(server);
        let watcher = server.clone();
        on_shard(move || async move {
            let (a0, mut a_events) = ShardLink::start(a, 0).await;
            let (b0, mut b_events) = ShardLink::start(b, 0).await;
            a0.subscribe("r").await.expect("subscribe on A");
            b0.subscribe("r").await.expect("subscribe on B");
            b0.subscribe("side").await.expect("subscribe side");
            // Both hosts publish batches into one room: one contiguous sequence, and each
            // host's messages keep their order within a batch.
            let mut next = 1;
            for round in 0..5 {
                for (who, link) in [("a", &a0), ("b", &b0)] {
                    let batch = (0..4)
                        .map(|i| (msg("r", "alice", &format!("{who}{round}.{i}"), None), 0))
                        .collect();
                    for r in link.publish_batch(batch).await {
                        assert_eq!(offset(r), next);
                        next += 1;
                    }
                }
            }
            let all: Vec<u64> = (1..next).collect();
            assert_eq!(offsets(&mut a_events, "r", all.len()).await, all, "host A");
            assert_eq!(offsets(&mut b_events, "r", all.len()).await, all, "host B");

            // The shards' own connections: two each (commands, subscriber).
            let listed = watcher_clients(&watcher);
            assert!(listed >= before + 4, "{listed} clients, {before} before");

            // A batch over two rooms, with a dedupe key: one round trip, per-room offsets.
            let batch = vec![
                (msg("side", "alice", "s1", Some("c1")), 0),
                (msg("r", "alice", "r-next", None), 0),
                (msg("side", "alice", "s2", None), 0),
            ];
            let got: Vec<u64> = b0
                .publish_batch(batch)
                .await
                .into_iter()
                .map(offset)
                .collect();
            assert_eq!(got, [1, next, 2]);
            assert_eq!(offsets(&mut b_events, "side", 1).await, [1]);
            // The same cid again: the first ack, nothing new published.
            let dup = b0
                .publish_batch(vec![(msg("side", "alice", "s1 again", Some("c1")), 0)])
                .await;
            assert!(
                matches!(&dup[0], Ok(Published::Duplicate(ack)) if ack.offset == 1),
                "{dup:?}"
            );

            // Within one call: a cid twice (the second gets the first's ack), a message
            // without a cid between them, and a cid already known.
            let mixed = b0
                .publish_batch(vec![
                    (msg("side", "alice", "s3", Some("c3")), 0),
                    (msg("side", "alice", "s4", None), 0),
                    (msg("side", "alice", "s3 again", Some("c3")), 0),
                    (msg("side", "alice", "s1 once more", Some("c1")), 0),
                ])
                .await;
            assert!(
                matches!(
                    &mixed[..],
                    [
                        Ok(Published::Stored(a)),
                        Ok(Published::Stored(b)),
                        Ok(Published::Duplicate(c)),
                        Ok(Published::Duplicate(d)),
                    ] if a.offset == 3 && b.offset == 4 && c.offset == 3 && d.offset == 1
                ),
                "{mixed:?}"
            );
            // What B heard of the room since offset 1: each new message once, in order.
            let mut heard = Vec::new();
            while let Some(ev) = next_event(&mut b_events, Duration::from_millis(300)).await {
                match ev {
                    ClusterEvent::Message(m) if m.room == "side" => heard.push(m.offset),
                    ClusterEvent::Message(m) if m.room == "r" => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!(heard, [2, 3, 4]);

            // Redis forgot its scripts: the shard loads the script again by itself.
            watcher
                .cmd(&url, &["SCRIPT", "FLUSH"])
                .expect("SCRIPT FLUSH");
            let after = publish_one(&a0, msg("r", "alice", "after flush", None)).await;
            assert_eq!(offset(after), next + 1);

            // Unsubscribed: B's shard hears nothing more of the room; A still does.
            b0.unsubscribe("r").await.expect("unsubscribe");
            while let Some(ev) = next_event(&mut b_events, Duration::from_millis(200)).await {
                assert!(matches!(ev, ClusterEvent::Message(_)), "{ev:?}");
            }
            a0.publish_batch(vec![(msg("r", "alice", "unheard", None), 0)])
                .await;
            assert_eq!(
                next_event(&mut b_events, Duration::from_millis(300)).await,
                None
            );
            let tail = offsets(&mut a_events, "r", 3).await;
            assert_eq!(tail, [next, next + 1, next + 2]);
        });
        bridge.shutdown();
    });
}

/// The number of clients connected to the watched server.
fn watcher_clients(server: &RedisServer) -> usize {
    clients(server).lines().count()
}

#[test]
fn a_unix_socket_carries_the_shards_links_too() {
    let server = RedisServer::start_persistent();
    // Database 2 of a Unix socket URL: the shards' connections SELECT it themselves.
    let url = format!("{}?db=2", server.unix_url());
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let [a, b] = connect_hosts(&opts(&url), &bridge);
        let mut server = server;
        on_shard(move || async move {
            let (_a0, mut a_events, b0, _b_events) = exchange(a, b, "u").await;
            // Every shard connection (two per host) is on the socket, in database 2.
            let listed = clients(&server);
            let shard_conns: Vec<&str> =
                listed.lines().filter(|l| l.contains(":shard0:")).collect();
            assert_eq!(shard_conns.len(), 4, "{listed}");
            for line in &shard_conns {
                assert!(
                    line.contains("redis.sock") && line.contains(" db=2 "),
                    "{line}"
                );
            }

            // Redis restarts on the same socket: Down, then Reconnected, offsets go on.
            server.kill();
            wait_down(&mut a_events).await;
            server.restart();
            wait_reconnected(&mut a_events).await;
            let r = publish_one(&b0, msg("u", "alice", "after", None)).await;
            assert_eq!(offset(r), 4);
            assert_eq!(wait_message(&mut a_events, "u").await.offset, 4);
        });
        bridge.shutdown();
    });
}

#[test]
fn the_command_connection_opens_before_the_first_publish() {
    let server = RedisServer::start();
    within(Duration::from_secs(30), move || {
        let bridge = Bridge::start().expect("bridge");
        let cluster = connect(opts(&server.url()), &bridge);
        on_shard(move || async move {
            let (_link, _events) = ShardLink::start(cluster, 0).await;
            let opened = eventually(Duration::from_secs(3), async || {
                clients(&server).contains(":shard0:commands")
            })
            .await;
            assert!(opened, "no command connection: {}", clients(&server));
        });
        bridge.shutdown();
    });
}

#[test]
fn a_restarted_redis_gives_down_then_reconnected_with_every_room() {
    let server = RedisServer::start_persistent();
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let cluster = connect(opts(&server.url()), &bridge);
        let mut server = server;
        on_shard(move || async move {
            let (link, mut events) = ShardLink::start(cluster, 0).await;
            link.subscribe("r").await.expect("subscribe");
            for i in 1..=3 {
                let r = publish_one(&link, msg("r", "alice", &format!("before{i}"), None)).await;
                assert_eq!(offset(r), i);
            }
            assert_eq!(offsets(&mut events, "r", 3).await, [1, 2, 3]);

            server.kill();
            wait_down(&mut events).await;
            // Calls fail fast and clearly while Redis is away.
            for _ in 0..2 {
                let started = Instant::now();
                let r = publish_one(&link, msg("r", "alice", "while down", None)).await;
                let err = r.expect_err("down");
                assert!(matches!(err, ClusterError::Unavailable(_)), "{err:?}");
                assert!(started.elapsed() < Duration::from_millis(1500));
            }
            // A room wanted while down is subscribed on reconnect.
            let err = link.subscribe("late").await.expect_err("link down");
            assert!(matches!(err, ClusterError::Unavailable(_)), "{err:?}");
            // And one given up while down is not.
            link.subscribe("gone").await.expect_err("link down");
            link.unsubscribe("gone")
                .await
                .expect("unsubscribe while down");

            server.restart();
            wait_reconnected(&mut events).await;
            // The command connection comes back with the link.
            let r = publish_one(&link, msg("r", "alice", "after", None)).await;
            assert_eq!(offset(r), 4, "offsets go on");
            assert_eq!(offsets(&mut events, "r", 1).await, [4]);
            let r = link
                .publish_batch(vec![
                    (msg("late", "alice", "hi", None), 0),
                    (msg("gone", "alice", "x", None), 0),
                ])
                .await;
            assert_eq!(r.len(), 2);
            assert_eq!(offsets(&mut events, "late", 1).await, [1]);
            assert_eq!(
                next_event(&mut events, Duration::from_millis(300)).await,
                None
            );
        });
        bridge.shutdown();
    });
}

#[test]
fn a_stalled_redis_bounds_every_call_and_the_link_recovers() {
    let server = RedisServer::start();
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let cluster = connect(opts(&server.url()), &bridge);
        let server = std::sync::Arc::new(server);
        let stalled = server.clone();
        on_shard(move || async move {
            let server = stalled;
            let (link, mut events) = ShardLink::start(cluster, 0).await;
            link.subscribe("s").await.expect("subscribe");
            for _ in 0..2 {
                link.publish_batch(vec![(msg("s", "alice", "before", None), 0)])
                    .await;
            }
            assert_eq!(offsets(&mut events, "s", 2).await, [1, 2]);

            server.pause();
            let started = Instant::now();
            let r = publish_one(&link, msg("s", "alice", "stalled", Some("k"))).await;
            let err = r.expect_err("stalled");
            let took = started.elapsed();
            assert!(matches!(err, ClusterError::Timeout(_)), "{err:?}");
            assert!(took < Duration::from_secs(3), "bounded: {took:?}");
            let started = Instant::now();
            let err = link.subscribe("t").await.expect_err("stalled subscribe");
            assert!(err.is_transient(), "{err:?}");
            assert!(started.elapsed() < Duration::from_secs(3));
            wait_down(&mut events).await;
            // Stay stopped well past the publish's deadline.
            glommio::timer::sleep(Duration::from_millis(1500)).await;

            server.resume();
            wait_reconnected(&mut events).await;
            // The timed-out publish ran late, past its deadline, and stored nothing: the
            // retry with the same cid is a new message at the next offset.
            let deadline = Instant::now() + Duration::from_secs(3);
            let retried = loop {
                let r = publish_one(&link, msg("s", "alice", "retry", Some("k"))).await;
                match r {
                    Ok(p) => break p,
                    Err(e) if Instant::now() > deadline => panic!("retry: {e}"),
                    Err(_) => glommio::timer::sleep(Duration::from_millis(100)).await,
                }
            };
            assert!(
                matches!(retried, Published::Stored(ref m) if m.offset == 3),
                "{retried:?}"
            );
            // "t" was wanted while stalled: subscribed again with the rest.
            link.publish_batch(vec![(msg("t", "alice", "hello", None), 0)])
                .await;
            assert_eq!(wait_message(&mut events, "t").await.offset, 1);
        });
        drop(server);
        bridge.shutdown();
    });
}

#[test]
fn a_channel_the_acl_forbids_is_refused_and_forgotten() {
    let server = RedisServer::start();
    let admin = server.url();
    server.add_corelay_user(&admin, "narrow", "pw-narrow");
    // This user may use only the channels of rooms starting with "ok" (and the probe's).
    server
        .cmd(
            &admin,
            &[
                "ACL",
                "SETUSER",
                "narrow",
                "resetchannels",
                "&corelay:{ok*",
                "&corelay:ping:*",
            ],
        )
        .expect("narrow the channels");
    // Database 3: the shard's connections AUTH and SELECT by themselves.
    let url = server.url_with("narrow:pw-narrow", 3);
    within(Duration::from_secs(30), move || {
        let bridge = Bridge::start().expect("bridge");
        let cluster = connect(opts(&url), &bridge);
        on_shard(move || async move {
            let (link, mut events) = ShardLink::start(cluster, 0).await;
            link.subscribe("ok-room").await.expect("allowed channel");
            let err = link
                .subscribe("secret")
                .await
                .expect_err("forbidden channel");
            assert!(matches!(err, ClusterError::Auth(_)), "{err:?}");
            println!("{err}");
            // Refused for good (not pending a reconnect), and the link is still fine.
            link.publish_batch(vec![(msg("ok-room", "alice", "hi", None), 0)])
                .await;
            assert_eq!(offsets(&mut events, "ok-room", 1).await, [1]);
        });
        bridge.shutdown();
        drop(server);
    });
}

#[test]
fn tls_with_a_client_certificate_on_the_shards_own_connections() {
    let tls = match TlsFiles::generate() {
        Ok(t) => t,
        Err(e) => panic!("cannot make test certificates (apt-get install openssl): {e}"),
    };
    // The server wants a client certificate: a connection without the right one fails.
    let server = RedisServer::start_tls(&tls, &["--tls-auth-clients", "yes"]);
    let mut o = opts(&server.url());
    o.tls_ca_file = Some(tls.ca_cert.clone());
    o.tls_cert_file = Some(tls.client_cert.clone());
    o.tls_key_file = Some(tls.client_key.clone());
    within(Duration::from_secs(60), move || {
        let bridge = Bridge::start().expect("bridge");
        let [a, b] = connect_hosts(&o, &bridge);
        let server = std::sync::Arc::new(server);
        let stalled = server.clone();
        on_shard(move || async move {
            let (a0, mut a_events, _b0, _b_events) = exchange(a, b, "t").await;

            // A stalled server: calls end in time, the link goes down and comes back (a
            // TLS close waits on nothing).
            stalled.pause();
            let started = Instant::now();
            let r = publish_one(&a0, msg("t", "alice", "stalled", None)).await;
            let err = r.expect_err("stalled");
            assert!(matches!(err, ClusterError::Timeout(_)), "{err:?}");
            assert!(started.elapsed() < Duration::from_secs(3));
            wait_down(&mut a_events).await;
            stalled.resume();
            wait_reconnected(&mut a_events).await;
            let r = publish_one(&a0, msg("t", "alice", "after", None)).await;
            assert_eq!(offset(r), 4);
        });
        bridge.shutdown();
        drop(server);
        drop(tls);
    });
}
