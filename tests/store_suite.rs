//! The history store suite: one generic suite every backend must pass, run against the
//! memory and embedded stores (and, where a node exists, ScyllaDB:
//! `CORELAY_TEST_SCYLLA=host:port`, plus ScyllaDB's cluster-mode path and the composed
//! Redis + ScyllaDB store), plus the embedded store's own cases (reopen, locking,
//! unwritable paths, disk full).
//!
//! Everything runs inside a glommio executor, like a shard, with `io_memory` kept at
//! 512 KiB (the locked-memory limit here is 8 MiB).

mod common_redis;

use std::path::{Path, PathBuf};
use std::rc::Rc;

use std::time::Duration;

use corelay::bridge::Bridge;
use corelay::config::{HumanDuration, ScyllaConfig};
use corelay::store::{
    scylla, Durability, HistoryQuery, HistoryStore, Store, StoreError, StoredMessage,
};
use glommio::LocalExecutorBuilder;

/// Runs a future to completion on a fresh glommio executor thread, like a shard would.
fn on_shard<G, F, T>(fut_gen: G) -> T
where
    G: FnOnce() -> F + Send + 'static,
    F: std::future::Future<Output = T> + 'static,
    T: Send + 'static,
{
    LocalExecutorBuilder::default()
        .io_memory(512 * 1024)
        .spawn(fut_gen)
        .expect("start a glommio executor")
        .join()
        .expect("glommio executor thread")
}

fn msg(room: &str, offset: u64, user: &str, ts: u64, cid: Option<&str>) -> StoredMessage {
    StoredMessage {
        room: room.to_owned(),
        offset,
        id: format!("id-{room}-{offset}"),
        user: user.to_owned(),
        text: format!("message {offset} in {room} ✓"),
        ts,
        cid: cid.map(str::to_owned),
    }
}

fn run(room: &str, offsets: std::ops::RangeInclusive<u64>) -> Vec<StoredMessage> {
    offsets
        .map(|o| msg(room, o, "alice", 1_000 + o, None))
        .collect()
}

fn offsets(msgs: &[StoredMessage]) -> Vec<u64> {
    msgs.iter().map(|m| m.offset).collect()
}

async fn read<S: HistoryStore>(s: &S, room: &str, q: HistoryQuery, limit: usize) -> Vec<u64> {
    offsets(&s.read(room, q, limit).await.expect("read"))
}

/// The suite every backend passes. `p` prefixes every room name, so it can run on a store
/// that already holds data (e.g. a shared ScyllaDB keyspace).
async fn suite<S: HistoryStore + Clone + 'static>(store: S, p: &str) {
    use HistoryQuery::{After, Before, Latest};
    let room = |name: &str| format!("{p}{name}");

    // Empty room.
    let empty = room("empty");
    assert_eq!(store.latest_offset(&empty).await.expect("latest"), 0);
    for q in [Latest, Before(10), Before(u64::MAX), After(0), After(5)] {
        assert!(
            store.read(&empty, q, 50).await.expect("read").is_empty(),
            "{q:?}"
        );
    }
    assert_eq!(
        store
            .find_cid(&empty, "alice", "c", 0)
            .await
            .expect("find_cid"),
        None
    );
    store
        .append(Vec::new())
        .await
        .expect("empty batch is a no-op");

    // Append, then Latest / Before / After with limits and edge offsets.
    let r = room("r");
    let first = run(&r, 1..=10);
    store
        .append(first[..4].to_vec())
        .await
        .expect("append 1..4");
    store
        .append(first[4..].to_vec())
        .await
        .expect("append 5..10");
    assert_eq!(store.latest_offset(&r).await.expect("latest"), 10);
    assert_eq!(
        store.read(&r, Latest, 100).await.expect("read"),
        first,
        "exact round trip"
    );
    assert_eq!(read(&store, &r, Latest, 3).await, [8, 9, 10]);
    assert_eq!(
        read(&store, &r, Latest, 10).await,
        (1..=10).collect::<Vec<_>>()
    );
    assert!(read(&store, &r, Latest, 0).await.is_empty());
    assert_eq!(read(&store, &r, Before(5), 2).await, [3, 4]);
    assert_eq!(read(&store, &r, Before(5), 100).await, [1, 2, 3, 4]);
    assert_eq!(read(&store, &r, Before(2), 5).await, [1]);
    assert!(read(&store, &r, Before(1), 5).await.is_empty());
    assert!(read(&store, &r, Before(0), 5).await.is_empty());
    assert_eq!(read(&store, &r, Before(11), 3).await, [8, 9, 10]);
    assert_eq!(read(&store, &r, Before(u64::MAX), 2).await, [9, 10]);
    assert!(read(&store, &r, Before(5), 0).await.is_empty());
    assert_eq!(read(&store, &r, After(0), 3).await, [1, 2, 3]);
    assert_eq!(read(&store, &r, After(8), 5).await, [9, 10]);
    assert_eq!(read(&store, &r, After(4), 2).await, [5, 6]);
    assert!(read(&store, &r, After(10), 5).await.is_empty());
    assert!(read(&store, &r, After(u64::MAX), 5).await.is_empty());
    assert!(read(&store, &r, After(0), 0).await.is_empty());

    // Offsets never go backwards: a conflicting append is refused whole.
    let other = room("untouched");
    let conflict = vec![msg(&other, 1, "bob", 1, None), msg(&r, 10, "bob", 1, None)];
    match store.append(conflict).await {
        Err(StoreError::OffsetConflict {
            offset: 10,
            latest: 10,
            ..
        }) => {}
        other => panic!("expected OffsetConflict, got {other:?}"),
    }
    assert_eq!(
        store.latest_offset(&other).await.expect("latest"),
        0,
        "all or nothing"
    );
    let unordered = vec![
        msg(&other, 2, "bob", 1, None),
        msg(&other, 1, "bob", 1, None),
    ];
    assert!(matches!(
        store.append(unordered).await,
        Err(StoreError::OffsetConflict { .. })
    ));
    assert_eq!(store.latest_offset(&other).await.expect("latest"), 0);
    assert_eq!(
        store.read(&r, Latest, 100).await.expect("read"),
        first,
        "r unchanged"
    );

    // Gaps in a room's offsets (the protocol has none, but a store must not invent or
    // lose messages around one).
    let g = room("gaps");
    let gappy: Vec<_> = [1, 2, 5, 9, 10]
        .into_iter()
        .map(|o| msg(&g, o, "alice", o, None))
        .collect();
    store.append(gappy[..3].to_vec()).await.expect("gaps 1");
    store.append(gappy[3..].to_vec()).await.expect("gaps 2");
    assert_eq!(store.latest_offset(&g).await.expect("latest"), 10);
    assert_eq!(read(&store, &g, Latest, 3).await, [5, 9, 10]);
    assert_eq!(read(&store, &g, Latest, 50).await, [1, 2, 5, 9, 10]);
    assert_eq!(read(&store, &g, Before(9), 2).await, [2, 5]);
    assert_eq!(read(&store, &g, Before(9), 10).await, [1, 2, 5]);
    assert_eq!(read(&store, &g, Before(5), 1).await, [2]);
    assert_eq!(read(&store, &g, After(2), 2).await, [5, 9]);
    assert_eq!(read(&store, &g, After(5), 1).await, [9]);

    // Several rooms in one batch, interleaved, kept apart.
    let (x, y, z) = (room("x"), room("y"), room("z"));
    let mut mixed = Vec::new();
    for o in 1..=5 {
        mixed.push(msg(&x, o, "alice", o, None));
        if o <= 3 {
            mixed.push(msg(&y, o, "bob", o, None));
        }
    }
    mixed.push(msg(&z, 1, "carol", 1, None));
    store.append(mixed).await.expect("mixed batch");
    for (name, n) in [(&x, 5), (&y, 3), (&z, 1)] {
        assert_eq!(store.latest_offset(name).await.expect("latest"), n);
        let got = store.read(name, After(0), 100).await.expect("read");
        assert_eq!(offsets(&got), (1..=n).collect::<Vec<_>>());
        assert!(
            got.iter().all(|m| &m.room == name),
            "room {name} holds only its own"
        );
    }

    // Rooms whose names are prefixes of each other.
    let (a, ab, abc) = (room("a"), room("ab"), room("a\u{0}b"));
    store.append(run(&a, 1..=3)).await.expect("a");
    store.append(run(&ab, 1..=5)).await.expect("ab");
    store.append(run(&abc, 1..=2)).await.expect("a\\0b");
    assert_eq!(store.latest_offset(&a).await.expect("latest"), 3);
    assert_eq!(store.latest_offset(&ab).await.expect("latest"), 5);
    assert_eq!(store.latest_offset(&abc).await.expect("latest"), 2);
    assert_eq!(
        store.read(&a, Latest, 50).await.expect("read"),
        run(&a, 1..=3)
    );
    assert_eq!(
        store.read(&ab, Latest, 50).await.expect("read"),
        run(&ab, 1..=5)
    );
    assert_eq!(
        store.read(&abc, Latest, 50).await.expect("read"),
        run(&abc, 1..=2)
    );
    assert_eq!(read(&store, &a, Before(u64::MAX), 50).await, [1, 2, 3]);
    assert_eq!(read(&store, &a, After(2), 50).await, [3]);

    // find_cid: hit, miss, outside the window, another user, another room, reuse.
    let c = room("cids");
    store
        .append(vec![
            msg(&c, 1, "alice", 1_000, Some("c1")),
            msg(&c, 2, "bob", 1_500, Some("c2")),
            msg(&c, 3, "alice", 2_000, None),
        ])
        .await
        .expect("append with cids");
    let hit = store
        .find_cid(&c, "alice", "c1", 0)
        .await
        .expect("find_cid");
    assert_eq!(hit, Some(msg(&c, 1, "alice", 1_000, Some("c1"))));
    let at_edge = store
        .find_cid(&c, "alice", "c1", 1_000)
        .await
        .expect("find_cid");
    assert_eq!(
        at_edge.map(|m| m.offset),
        Some(1),
        "ts == not_before is inside"
    );
    assert_eq!(
        store
            .find_cid(&c, "alice", "c1", 1_001)
            .await
            .expect("find_cid"),
        None
    );
    assert_eq!(
        store
            .find_cid(&c, "alice", "nope", 0)
            .await
            .expect("find_cid"),
        None
    );
    assert_eq!(
        store.find_cid(&c, "bob", "c1", 0).await.expect("find_cid"),
        None
    );
    assert_eq!(
        store
            .find_cid(&c, "alice", "c2", 0)
            .await
            .expect("find_cid"),
        None
    );
    assert_eq!(
        store
            .find_cid(&r, "alice", "c1", 0)
            .await
            .expect("find_cid"),
        None
    );
    let bob = store.find_cid(&c, "bob", "c2", 0).await.expect("find_cid");
    assert_eq!(bob.map(|m| (m.offset, m.user)), Some((2, "bob".to_owned())));
    // The same cid reused after the window: the newest message counts.
    store
        .append(vec![msg(&c, 4, "alice", 900_000, Some("c1"))])
        .await
        .expect("reuse cid");
    let newest = store
        .find_cid(&c, "alice", "c1", 800_000)
        .await
        .expect("find_cid");
    assert_eq!(newest.map(|m| m.offset), Some(4));

    // A large batch.
    let big = room("big");
    store
        .append(run(&big, 1..=10_000))
        .await
        .expect("10k batch");
    assert_eq!(store.latest_offset(&big).await.expect("latest"), 10_000);
    assert_eq!(
        read(&store, &big, Latest, 50).await,
        (9_951..=10_000).collect::<Vec<_>>()
    );
    assert_eq!(
        read(&store, &big, After(5_000), 100).await,
        (5_001..=5_100).collect::<Vec<_>>()
    );
    assert_eq!(
        read(&store, &big, Before(5_000), 100).await,
        (4_900..5_000).collect::<Vec<_>>()
    );
    assert_eq!(
        store
            .read(&big, After(0), 20_000)
            .await
            .expect("read")
            .len(),
        10_000
    );

    // Concurrent appends from many tasks (one room each, as home shards do), each
    // appending one message at a time: all acked, all readable.
    let tasks = 32u64;
    let per_task = 25u64;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        let name = room(&format!("conc{t}"));
        handles.push(glommio::spawn_local(async move {
            for o in 1..=per_task {
                store
                    .append(vec![msg(&name, o, "alice", o, Some(&format!("k{o}")))])
                    .await
                    .expect("concurrent append");
            }
            name
        }));
    }
    for h in handles {
        let name = h.await;
        assert_eq!(store.latest_offset(&name).await.expect("latest"), per_task);
        assert_eq!(
            read(&store, &name, After(0), 100).await,
            (1..=per_task).collect::<Vec<_>>()
        );
        let found = store
            .find_cid(&name, "alice", "k7", 0)
            .await
            .expect("find_cid");
        assert_eq!(found.map(|m| m.offset), Some(7));
    }

    // Text survives byte for byte (empty, multi-byte, long).
    let t = room("text");
    let mut odd = vec![
        msg(&t, 1, "ü", 1, Some("")),
        msg(&t, 2, "u", 2, Some("ç")),
        msg(&t, 3, "u", 3, None),
    ];
    odd[0].text = String::new();
    odd[1].text = "日本語 🎉 \"quotes\" \\ \n newline".to_owned();
    odd[2].text = "x".repeat(4096);
    store.append(odd.clone()).await.expect("odd texts");
    assert_eq!(store.read(&t, Latest, 10).await.expect("read"), odd);
}

/// `Store` is opened once on the main thread and a clone moved into each shard.
#[test]
fn store_is_clone_send_sync() {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    shareable::<Store>();
}

/// A fresh temporary data directory.
fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn memory_store_passes_suite() {
    on_shard(|| async {
        let store = Store::memory();
        suite(store.clone(), "").await;
        store.close().await.expect("close");
        assert!(matches!(
            store.latest_offset("r").await,
            Err(StoreError::Closed)
        ));
    });
}

#[test]
fn embedded_store_passes_suite() {
    let dir = tempdir();
    let path = dir.path().to_path_buf();
    on_shard(move || async move {
        let store = Store::open_embedded(&path, Durability::Fsync).expect("open");
        suite(store.clone(), "").await;
        store.health().expect("healthy");
        store.flush().await.expect("flush");
        store.close().await.expect("close");
    });
}

#[test]
fn embedded_store_buffered_passes_suite() {
    let dir = tempdir();
    let path = dir.path().to_path_buf();
    on_shard(move || async move {
        let store = Store::open_embedded(&path, Durability::Buffered).expect("open");
        suite(store.clone(), "").await;
        store.close().await.expect("close");
    });
}

/// The suite against ScyllaDB, when `CORELAY_TEST_SCYLLA=host:port` names a live node: a
/// fresh keyspace with a random name (schema applied with replication factor 1, a tiny
/// bucket size so every read crosses bucket boundaries), dropped afterwards, pass or fail.
#[test]
fn scylla_store_passes_suite() {
    let Ok(node) = std::env::var("CORELAY_TEST_SCYLLA") else {
        println!(
            "skipped: set CORELAY_TEST_SCYLLA=host:port to run the store suite against ScyllaDB"
        );
        return;
    };
    let bridge = Bridge::global().expect("bridge");
    let cfg = test_keyspace_config(&node);
    let keyspace = cfg.keyspace.clone();

    // A keyspace that does not exist yet: a clear error naming the fix.
    let err = Store::open_scylla(&cfg).expect_err("no schema yet");
    println!("{err}");
    assert!(matches!(err, StoreError::Open(_)), "{err:?}");
    assert!(err.to_string().contains("corelay schema apply"), "{err}");

    let _drop = DropKeyspace {
        bridge: bridge.clone(),
        node,
        keyspace: keyspace.clone(),
    };
    let applied = futures::executor::block_on(scylla::apply_schema(&cfg, Some(1), bridge.clone()))
        .expect("apply the schema");
    assert_eq!(applied.len(), 5);
    // Applying it again is harmless.
    futures::executor::block_on(scylla::apply_schema(&cfg, Some(1), bridge.clone()))
        .expect("apply the schema again");

    let store = Store::open_scylla(&cfg).expect("open");
    let s = store.clone();
    on_shard(move || async move {
        suite(s.clone(), "").await;
        s.health().expect("healthy");
        s.flush().await.expect("flush");
    });

    // Reopened, the data is there; another bucket size is refused.
    let again = Store::open_scylla(&cfg).expect("reopen");
    on_shard(move || async move {
        assert_eq!(again.latest_offset("big").await.expect("latest"), 10_000);
        assert_eq!(
            read(&again, "r", HistoryQuery::After(0), 100).await,
            (1..=10).collect::<Vec<_>>()
        );
        again.close().await.expect("close");
        assert!(matches!(
            again.latest_offset("r").await,
            Err(StoreError::Closed)
        ));
    });
    let other = ScyllaConfig {
        bucket_size: 1000,
        ..cfg.clone()
    };
    let err = Store::open_scylla(&other).expect_err("bucket size mismatch");
    println!("{err}");
    assert!(err.to_string().contains("bucket_size 8"), "{err}");
    futures::executor::block_on(store.close()).expect("close");
}

/// Settings for a keyspace of a random name on the live node, with a tiny bucket size so
/// reads cross buckets (the keyspace is not created here).
fn test_keyspace_config(node: &str) -> ScyllaConfig {
    let mut suffix = [0u8; 6];
    corelay::ids::random_bytes(&mut suffix);
    let keyspace = format!(
        "corelay_test_{}",
        suffix
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    ScyllaConfig {
        nodes: vec![node.to_owned()],
        keyspace,
        request_timeout: HumanDuration(Duration::from_secs(10)),
        bucket_size: 8,
        ..ScyllaConfig::default()
    }
}

/// A fresh keyspace on the live node (random name, schema applied with replication factor
/// 1, a tiny bucket size so reads cross buckets), dropped when the guard goes.
fn fresh_keyspace(node: &str) -> (ScyllaConfig, DropKeyspace) {
    let bridge = Bridge::global().expect("bridge");
    let cfg = test_keyspace_config(node);
    let keyspace = cfg.keyspace.clone();
    let guard = DropKeyspace {
        bridge: bridge.clone(),
        node: node.to_owned(),
        keyspace,
    };
    futures::executor::block_on(scylla::apply_schema(&cfg, Some(1), bridge))
        .expect("apply the schema");
    (cfg, guard)
}

/// Cluster mode against ScyllaDB, when `CORELAY_TEST_SCYLLA=host:port` names a live node:
/// two stores (two hosts) write one room's offsets concurrently and out of order through
/// the cluster append path; a rewrite of a stored offset is the same row; `room_latest`
/// never goes back (a host committing 40 after another committed 80 leaves 80: that is
/// ScyllaDB's `USING TIMESTAMP` resolution, which only a real node can show). Then the
/// composed store with a real `redis-server`: reads within the stream's window and below
/// it, and a Redis counter behind ScyllaDB raised. Skipped (and says so) without a node.
#[test]
fn scylla_cluster_mode_passes() {
    use corelay::cluster::shard_link::ShardLink;
    use corelay::cluster::{NewMessage, Published};
    let Ok(node) = std::env::var("CORELAY_TEST_SCYLLA") else {
        println!(
            "skipped: set CORELAY_TEST_SCYLLA=host:port to run the cluster-mode ScyllaDB checks"
        );
        return;
    };
    let (cfg, _drop) = fresh_keyspace(&node);
    let open = || match Store::open_scylla(&cfg).expect("open") {
        Store::Scylla(s) => s,
        other => panic!("expected a ScyllaDB store, got {other:?}"),
    };
    let (host_a, host_b) = (open(), open());

    // Host A writes the odd offsets from the top down, host B the even ones from the
    // bottom up, at the same time.
    let writer = |store: scylla::ScyllaStore, offs: Vec<u64>| {
        std::thread::spawn(move || {
            on_shard(move || async move {
                for o in offs {
                    store
                        .append_cluster(vec![msg("c", o, "alice", 1_000 + o, None)])
                        .await
                        .expect("cluster append");
                }
            })
        })
    };
    let a = writer(
        host_a.clone(),
        (1..=80).filter(|o| o % 2 == 1).rev().collect(),
    );
    let b = writer(host_b.clone(), (1..=80).filter(|o| o % 2 == 0).collect());
    a.join().expect("host a");
    b.join().expect("host b");
    let (sa, sb) = (host_a.clone(), host_b.clone());
    on_shard(move || async move {
        assert_eq!(sa.latest_offset("c").await.expect("latest"), 80);
        assert_eq!(
            read(&sb, "c", HistoryQuery::After(0), 1000).await,
            (1..=80).collect::<Vec<_>>()
        );
        // A late, lower commit: room_latest stays.
        sb.append_cluster(vec![msg("c", 40, "alice", 1_040, None)])
            .await
            .expect("rewrite 40");
        assert_eq!(sa.latest_offset("c").await.expect("latest"), 80);
        assert_eq!(
            sa.read("c", HistoryQuery::Before(41), 1)
                .await
                .expect("read"),
            [msg("c", 40, "alice", 1_040, None)],
            "a rewrite is the same row"
        );
        assert!(matches!(
            sa.append_cluster(vec![msg("c", 0, "alice", 1, None)]).await,
            Err(StoreError::Invalid(_))
        ));
    });

    // The composed store: a real redis-server for the window, ScyllaDB for the rest.
    let server = common_redis::RedisServer::start();
    let url = server.url();
    let bridge = Bridge::start().expect("bridge");
    let mut opts = corelay::cluster::RedisOptions::new(url.clone());
    opts.history_max_len = 0;
    let cluster = futures::executor::block_on(corelay::cluster::redis::RedisCluster::connect(
        opts,
        bridge.clone(),
    ))
    .expect("connect to redis");
    let store = Store::cluster(&cluster, host_a);
    let (c, s) = (cluster.clone(), store.clone());
    on_shard(move || async move {
        // Room c: ScyllaDB has 1..=80, Redis nothing: the counter is raised first.
        assert_eq!(s.latest_offset("c").await.expect("latest"), 80);
        let (link, _events) = ShardLink::start(c, 0).await;
        let mut published = Vec::new();
        for i in 0..20u64 {
            let m = NewMessage {
                room: "c".into(),
                user: "bob".into(),
                text: format!("live {i}"),
                cid: None,
                ts: 2_000 + i,
                id: format!("live-{i}"),
            };
            match common_redis::publish_one(&link, m).await.expect("publish") {
                Published::Stored(m) => published.push(m),
                other => panic!("expected Stored, got {other:?}"),
            }
        }
        assert_eq!(offsets(&published), (81..=100).collect::<Vec<_>>());
        s.persist_published(published).await.expect("persist");
    });
    server
        .cmd(&url, &["XTRIM", "corelay:{c}:stream", "MAXLEN", "5"])
        .expect("trim");
    let s = store.clone();
    on_shard(move || async move {
        use HistoryQuery::{After, Before, Latest};
        assert_eq!(read(&s, "c", Latest, 3).await, [98, 99, 100]);
        assert_eq!(
            read(&s, "c", Latest, 10).await,
            (91..=100).collect::<Vec<_>>()
        );
        assert_eq!(read(&s, "c", Before(97), 4).await, [93, 94, 95, 96]);
        assert_eq!(
            read(&s, "c", After(75), 10).await,
            (76..=85).collect::<Vec<_>>()
        );
        assert_eq!(
            read(&s, "c", After(94), 100).await,
            (95..=100).collect::<Vec<_>>()
        );
        assert_eq!(s.latest_offset("c").await.expect("latest"), 100);
        s.close().await.expect("close");
    });
    cluster.close();
    bridge.shutdown();
    drop(server);
    futures::executor::block_on(host_b.close()).expect("close");
}

/// Drops a test keyspace when the test ends, also when it fails.
struct DropKeyspace {
    bridge: Bridge,
    node: String,
    keyspace: String,
}

impl Drop for DropKeyspace {
    fn drop(&mut self) {
        let node = self.node.clone();
        let keyspace = self.keyspace.clone();
        let dropped = self.bridge.block_on(async move {
            let session = ::scylla::client::session_builder::SessionBuilder::new()
                .known_node(&node)
                .build()
                .await
                .map_err(|e| e.to_string())?;
            let mut drop = ::scylla::statement::unprepared::Statement::new(format!(
                "DROP KEYSPACE IF EXISTS {keyspace}"
            ));
            drop.set_request_timeout(Some(Duration::from_secs(60)));
            session
                .query_unpaged(drop, ())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        match dropped {
            Ok(Ok(())) => println!("dropped keyspace {}", self.keyspace),
            Ok(Err(e)) => eprintln!("cannot drop test keyspace {}: {e}", self.keyspace),
            Err(e) => eprintln!("cannot drop test keyspace {}: {e}", self.keyspace),
        }
    }
}

#[test]
fn embedded_reopen_keeps_data_and_offsets() {
    let dir = tempdir();
    let path = dir.path().to_path_buf();
    on_shard(move || async move {
        let store = Store::open_embedded(&path, Durability::Fsync).expect("open");
        let mut batch = run("keep", 1..=120);
        batch.extend(run("other", 1..=7));
        batch.push(msg("keep", 121, "bob", 5_000, Some("dedupe-me")));
        store.append(batch).await.expect("append");
        let before = store
            .read("keep", HistoryQuery::Latest, 50)
            .await
            .expect("read");
        store.close().await.expect("close");
        assert!(matches!(
            store.append(run("keep", 122..=122)).await,
            Err(StoreError::Closed)
        ));

        let store = Store::open_embedded(&path, Durability::Fsync).expect("reopen");
        assert_eq!(store.latest_offset("keep").await.expect("latest"), 121);
        assert_eq!(store.latest_offset("other").await.expect("latest"), 7);
        assert_eq!(store.latest_offset("never").await.expect("latest"), 0);
        let after = store
            .read("keep", HistoryQuery::Latest, 50)
            .await
            .expect("read");
        assert_eq!(before, after);
        let found = store
            .find_cid("keep", "bob", "dedupe-me", 0)
            .await
            .expect("cid");
        assert_eq!(found.map(|m| m.offset), Some(121));
        // The stream goes on where it stopped, and the old offsets stay protected.
        assert!(matches!(
            store.append(run("keep", 100..=100)).await,
            Err(StoreError::OffsetConflict { latest: 121, .. })
        ));
        store
            .append(run("keep", 122..=123))
            .await
            .expect("append more");
        assert_eq!(
            read(&store, "keep", HistoryQuery::After(120), 10).await,
            [121, 122, 123]
        );
        store.close().await.expect("close");
    });
}

#[test]
fn embedded_second_open_fails_in_use() {
    let dir = tempdir();
    let first = Store::open_embedded(dir.path(), Durability::Fsync).expect("first open");
    let err = Store::open_embedded(dir.path(), Durability::Fsync).expect_err("second open");
    assert!(matches!(err, StoreError::InUse(_)), "{err:?}");
    let text = err.to_string();
    assert_eq!(
        text,
        format!(
            "data dir {} is in use by another corelay process",
            dir.path().display()
        )
    );
    futures::executor::block_on(first.close()).expect("close");
    let again = Store::open_embedded(dir.path(), Durability::Fsync).expect("open after close");
    futures::executor::block_on(again.close()).expect("close");
}

#[test]
fn embedded_open_under_unwritable_path_fails_clearly() {
    let dir = tempdir();
    // A regular file where a directory should be: fails for every user, root included.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("write file");
    let data = file.join("data");
    let err = Store::open_embedded(&data, Durability::Fsync).expect_err("must fail");
    let text = err.to_string();
    println!("{text}");
    assert!(matches!(err, StoreError::Open(_)), "{err:?}");
    assert!(text.contains(&data.display().to_string()), "{text}");
    assert!(
        text.starts_with("cannot open store: cannot create data dir"),
        "{text}"
    );

    // A read-only directory: root ignores permission bits, so use a read-only mount when
    // we are root (and may mount), else a mode 0555 directory.
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).expect("mkdir");
    let _mount = if is_root() {
        match Mount::tmpfs(&ro, "size=1m,ro") {
            Some(m) => Some(m),
            None => {
                println!("skipped read-only case: cannot mount a read-only tmpfs here");
                return;
            }
        }
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).expect("chmod");
        None
    };
    for target in [ro.clone(), ro.join("nested")] {
        let err = Store::open_embedded(&target, Durability::Fsync).expect_err("read-only");
        let text = err.to_string();
        println!("{text}");
        assert!(matches!(err, StoreError::Open(_)), "{err:?}");
        assert!(text.contains(&ro.display().to_string()), "{text}");
        assert!(
            text.contains("not writable") || text.contains("cannot create data dir"),
            "{text}"
        );
    }
}

#[test]
fn embedded_clones_on_many_shards_share_one_store() {
    let dir = tempdir();
    let store = Store::open_embedded(dir.path(), Durability::Fsync).expect("open");
    let shards: Vec<_> = (0..2)
        .map(|shard| {
            let store = store.clone();
            LocalExecutorBuilder::default()
                .io_memory(512 * 1024)
                .spawn(move || async move {
                    let store = Rc::new(store);
                    let mut tasks = Vec::new();
                    for t in 0..8 {
                        let store = store.clone();
                        tasks.push(glommio::spawn_local(async move {
                            let room = format!("s{shard}-t{t}");
                            for o in (1..=40).step_by(4) {
                                store.append(run(&room, o..=o + 3)).await.expect("append");
                            }
                        }));
                    }
                    for t in tasks {
                        t.await;
                    }
                })
                .expect("spawn shard")
        })
        .collect();
    for s in shards {
        s.join().expect("shard");
    }
    on_shard(move || async move {
        for shard in 0..2 {
            for t in 0..8 {
                let room = format!("s{shard}-t{t}");
                assert_eq!(store.latest_offset(&room).await.expect("latest"), 40);
                let got = store
                    .read(&room, HistoryQuery::After(0), 100)
                    .await
                    .expect("read");
                assert_eq!(got, run(&room, 1..=40));
            }
        }
        store.close().await.expect("close");
    });
}

/// Disk full at runtime: the append is `Unavailable`, nothing half-stored is visible,
/// reads keep working, and `health` says why. Needs a small filesystem, so it mounts a
/// 4 MiB tmpfs when run as root, and is skipped otherwise.
#[test]
fn embedded_disk_full_is_unavailable_and_reads_keep_working() {
    let dir = tempdir();
    let data = dir.path().join("small");
    std::fs::create_dir(&data).expect("mkdir");
    let mount = if is_root() {
        Mount::tmpfs(&data, "size=4m")
    } else {
        None
    };
    let Some(_mount) = mount else {
        println!("skipped: needs root to mount a small tmpfs");
        return;
    };
    let path = data.clone();
    on_shard(move || async move {
        let store = Store::open_embedded(&path, Durability::Fsync).expect("open");
        store
            .append(run("full", 1..=10))
            .await
            .expect("first append");
        let mut acked = 10;
        let err = loop {
            let o = acked + 1;
            let mut m = msg("full", o, "alice", o, Some(&format!("c{o}")));
            m.text = incompressible(64 * 1024, o);
            match store.append(vec![m]).await {
                Ok(()) => acked = o,
                Err(e) => break e,
            }
            assert!(acked < 1_000, "a 4 MiB filesystem cannot hold 64 MiB");
        };
        println!("disk full after {acked} acked appends: {err}");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(store.health().is_err(), "health reports the failure");
        // Later appends fail fast, reads still work and see exactly what was acked.
        let again = store.append(run("other", 1..=1)).await;
        assert!(
            matches!(again, Err(StoreError::Unavailable(_))),
            "{again:?}"
        );
        assert_eq!(store.latest_offset("full").await.expect("latest"), acked);
        assert_eq!(
            read(&store, "full", HistoryQuery::Latest, 3).await.last(),
            Some(&acked)
        );
        assert_eq!(
            read(&store, "full", HistoryQuery::After(0), 5).await,
            [1, 2, 3, 4, 5]
        );
        let _ = store.close().await; // the final sync may fail too: the disk is full
    });
}

/// Text that compression cannot shrink much (fjall compresses its journal and tables).
fn incompressible(len: usize, seed: u64) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
                    [(x % 64) as usize],
            )
        })
        .collect()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A tmpfs mounted for one test, unmounted (lazily) when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, options: &str) -> Option<Mount> {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| Mount(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The suite against a real `redis-server` (started on a free port, killed at the end): the
/// Redis store over the streams the cluster's publish script writes.
#[test]
fn redis_store_passes_suite() {
    let server = common_redis::RedisServer::start();
    common_redis::within(Duration::from_secs(180), move || {
        let bridge = Bridge::start().expect("bridge");
        let mut opts = corelay::cluster::RedisOptions::new(server.url());
        // The suite appends 10 000 messages to one room and reads them all back.
        opts.history_max_len = 0;
        let cluster = futures::executor::block_on(corelay::cluster::redis::RedisCluster::connect(
            opts,
            bridge.clone(),
        ))
        .expect("connect to redis");
        let store = Store::redis(&cluster);
        let s = store.clone();
        on_shard(move || async move {
            suite(s.clone(), "").await;
            s.health().expect("healthy");
            s.flush().await.expect("flush");
            s.close().await.expect("close");
            assert!(matches!(
                s.latest_offset("r").await,
                Err(StoreError::Closed)
            ));
        });
        cluster.close();
        bridge.shutdown();
        drop(server);
    });
}

/// The feed's ledger: what a store with the feed on owes the backend, and how deliveries
/// settle it. `pending` is sorted by room here.
async fn feed_ledger(store: &Store) {
    let pending = |store: Store| async move {
        let mut p = store.feed_pending().await.expect("pending");
        p.sort_by(|a, b| a.room.cmp(&b.room));
        p.into_iter()
            .map(|p| (p.room, p.delivered, p.latest))
            .collect::<Vec<_>>()
    };
    // Appended before the feed was on: owed nothing.
    store.append(run("before", 1..=3)).await.expect("append");
    store.enable_feed().expect("feed on");
    assert_eq!(pending(store.clone()).await, []);
    let mut batch = run("a", 1..=5);
    batch.extend(run("b", 1..=2));
    store.append(batch).await.expect("append");
    store.append(run("before", 4..=4)).await.expect("append");
    assert_eq!(
        pending(store.clone()).await,
        [
            ("a".into(), 0, 5),
            ("b".into(), 0, 2),
            ("before".into(), 0, 4)
        ]
    );
    // Part of a room delivered: still owed; all of it: settled.
    store
        .feed_delivered(vec![("a".into(), 3), ("b".into(), 2), ("before".into(), 4)])
        .await
        .expect("delivered");
    assert_eq!(pending(store.clone()).await, [("a".into(), 3, 5)]);
    // A settled room is owed again by its next append, from its cursor.
    store.append(run("b", 3..=3)).await.expect("append");
    assert_eq!(
        pending(store.clone()).await,
        [("a".into(), 3, 5), ("b".into(), 2, 3)]
    );
}

#[test]
fn memory_store_keeps_the_feed_ledger() {
    on_shard(|| async {
        feed_ledger(&Store::memory()).await;
    });
}

#[test]
fn embedded_store_keeps_the_feed_ledger_across_a_reopen() {
    let dir = tempdir();
    let path = dir.path().to_path_buf();
    on_shard(move || async move {
        let store = Store::open_embedded(&path, Durability::Fsync).expect("open");
        feed_ledger(&store).await;
        store.close().await.expect("close");
        // Reopened: the marks and cursors are still there (the feed is off until enabled,
        // but what was owed is still owed).
        let store = Store::open_embedded(&path, Durability::Fsync).expect("reopen");
        let mut owed: Vec<(String, u64, u64)> = store
            .feed_pending()
            .await
            .expect("pending")
            .into_iter()
            .map(|p| (p.room, p.delivered, p.latest))
            .collect();
        owed.sort();
        assert_eq!(owed, [("a".into(), 3, 5), ("b".into(), 2, 3)]);
        store.close().await.expect("close");
    });
}
