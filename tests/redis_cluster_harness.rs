//! The Redis Cluster test harness itself (`common_redis::cluster`), against real
//! `redis-server` nodes: a cluster forms with masters and replicas in sync, a key lives on
//! its slot's master (others answer `MOVED` to it), a migrated slot's keys end up on the
//! new owner, a killed master's replica takes over its slots with its data, and a password
//! cluster refuses commands without the password. What the tests of corelay on a Redis
//! Cluster rely on; corelay itself is not started here.

mod common_redis;

use std::time::{Duration, Instant};

use common_redis::cluster::RedisClusterProcs;
use common_redis::{query, within};
use redis::Value;

/// A bulk string reply.
fn bulk(s: &str) -> Value {
    Value::BulkString(s.as_bytes().to_vec())
}

/// Whether `err` (a command's error text) is a `MOVED` redirection to `slot_and_node`
/// (`"<slot> <ip>:<port>"`).
fn is_moved(err: &str, slot_and_node: &str) -> bool {
    err.to_uppercase().starts_with("MOVED") && err.contains(slot_and_node)
}

#[test]
fn a_cluster_forms_routes_keys_migrates_a_slot_and_fails_over() {
    let started = Instant::now();
    let mut c = RedisClusterProcs::start(3, 1, &[]);
    println!("formed in {:?}", started.elapsed());
    within(Duration::from_secs(60), move || {
        assert_eq!(c.nodes.len(), 6);
        assert_eq!(c.urls().len(), 6);
        assert!(
            c.nodes.iter().all(|n| n.port <= 55535),
            "bus ports are valid"
        );
        for n in &c.nodes {
            assert!(
                n.dir.path().join("nodes.conf").exists(),
                "nodes.conf in its dir"
            );
        }
        let masters = c.masters();
        assert_eq!(masters.len(), 3, "{masters:?}");
        for &m in &masters {
            assert_eq!(c.replicas_of(m).len(), 1, "master {m}'s replicas");
        }

        // A room's keys share its slot (hash tag); only the slot's master serves them.
        let key = "corelay:{harness}:offset";
        let slot = c.slot_of(key);
        assert_eq!(slot, c.slot_of("harness"));
        let owner = c.master_for_slot(slot);
        assert!(masters.contains(&owner));
        assert_eq!(c.cmd(owner, &["SET", key, "7"]), Ok(Value::Okay));
        for n in 0..25 {
            let k = format!("corelay:{{harness}}:cid:{n}");
            assert_eq!(c.cmd(owner, &["SET", k.as_str(), "x"]), Ok(Value::Okay));
        }
        let other = *masters
            .iter()
            .find(|&&m| m != owner)
            .expect("another master");
        let moved = c.cmd(other, &["GET", key]).expect_err("not its slot");
        let to_owner = format!("{slot} 127.0.0.1:{}", c.nodes[owner].port);
        assert!(is_moved(&moved, &to_owner), "{moved}");
        assert_eq!(c.cmd(owner, &["GET", key]), Ok(bulk("7")));

        // A live migration (three MIGRATE batches) moves the slot and all its keys.
        let t = Instant::now();
        c.migrate_slot(slot, other);
        println!("slot {slot} migrated in {:?}", t.elapsed());
        assert_eq!(c.master_for_slot(slot), other);
        let s = slot.to_string();
        let count = |i: usize| c.cmd(i, &["CLUSTER", "COUNTKEYSINSLOT", s.as_str()]);
        assert_eq!(count(other), Ok(Value::Int(26)));
        assert_eq!(count(owner), Ok(Value::Int(0)));
        assert_eq!(c.cmd(other, &["GET", key]), Ok(bulk("7")));
        let moved = c.cmd(owner, &["GET", key]).expect_err("moved away");
        let to_other = format!("{slot} 127.0.0.1:{}", c.nodes[other].port);
        assert!(is_moved(&moved, &to_other), "{moved}");

        // The new owner dies: its replica (which has the keys: migrate_slot waits until
        // the replicas are in sync) takes its slots over.
        let replica = c.replicas_of(other)[0];
        c.kill_node(other);
        let t = Instant::now();
        let promoted = c.wait_failover(other);
        println!("failover in {:?}", t.elapsed());
        assert_eq!(promoted, replica);
        assert!(!c.is_alive(other));
        assert_eq!(c.master_for_slot(slot), promoted);
        assert_eq!(c.cmd(promoted, &["GET", key]), Ok(bulk("7")));
        let mut now = c.masters();
        now.sort_unstable();
        let mut want: Vec<usize> = masters
            .iter()
            .map(|&m| if m == other { promoted } else { m })
            .collect();
        want.sort_unstable();
        assert_eq!(now, want);
    });
    println!("whole test: {:?}", started.elapsed());
}

#[test]
fn a_password_cluster_refuses_commands_without_the_password() {
    let started = Instant::now();
    // With replicas: they sync only if the nodes got the password as masterauth too.
    let c = RedisClusterProcs::start(3, 1, &["--requirepass", "s3cret p@ss"]);
    println!("formed in {:?}", started.elapsed());
    within(Duration::from_secs(60), move || {
        assert_eq!(c.password(), Some("s3cret p@ss"));
        let refused = query(&c.url(), &["GET", "x"]).expect_err("no password");
        assert!(refused.contains("NOAUTH"), "{refused}");
        let wrong = query(&c.url_with(":wrong"), &["GET", "x"]).expect_err("wrong password");
        assert!(
            wrong.to_lowercase().contains("authentication failed"),
            "{wrong}"
        );
        let good = c.url_with(":s3cret%20p%40ss");
        assert_eq!(
            query(&good, &["PING"]),
            Ok(Value::SimpleString("PONG".into()))
        );
        for i in 0..c.nodes.len() {
            let url = c.node_url_with(i, ":s3cret%20p%40ss");
            assert_eq!(
                query(&url, &["PING"]),
                Ok(Value::SimpleString("PONG".into()))
            );
        }

        // The helpers authenticate, MIGRATE included.
        let key = "corelay:{pw}:offset";
        let slot = c.slot_of(key);
        let owner = c.master_for_slot(slot);
        assert_eq!(c.cmd(owner, &["SET", key, "3"]), Ok(Value::Okay));
        let to = *c
            .masters()
            .iter()
            .find(|&&m| m != owner)
            .expect("another master");
        c.migrate_slot(slot, to);
        assert_eq!(c.cmd(to, &["GET", key]), Ok(bulk("3")));
    });
    println!("whole test: {:?}", started.elapsed());
}
