//! Redis Cluster's slot map: which master serves each of the 16,384 hash slots, and the
//! slot of a key or channel.
//!
//! Every key and channel of a room carries the `{room}` hash tag ([`super::keys`]), so a
//! room lives on one slot, and so on one master. [`SlotMap::parse`] reads the answer of
//! `CLUSTER SLOTS` (Redis ≥ 3; still served by Redis 7 next to `CLUSTER SHARDS`, and the
//! same shape on every managed service); [`slot_of`] is Redis's own hash (CRC16/XMODEM
//! of the hash tag, modulo 16,384).
//!
//! [`parse_nodes`] reads `CLUSTER NODES`, which also lists the nodes that serve no slot
//! (replicas, failed masters), for `/healthz` and `corelay check`.
//!
//! Written here rather than taken from `redis`'s `cluster` feature: its routing table
//! is private to its tokio-driven cluster connection, and the shards need the map on
//! their own executors ([`super::shard_link`]).

use std::collections::BTreeSet;
use std::fmt;

use redis::Value;

use super::ClusterError;

/// How many hash slots a Redis Cluster has.
pub const SLOTS: u16 = 16_384;

/// A cluster node's address, as the cluster announces it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeAddr {
    /// Host name or IP address.
    pub host: String,
    /// Client port.
    pub port: u16,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl NodeAddr {
    /// Parses `host:port` as found in a `MOVED` or `ASK` error.
    pub fn parse(s: &str) -> Option<NodeAddr> {
        let (host, port) = s.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Some(NodeAddr {
            host: host.to_owned(),
            port: port.parse().ok()?,
        })
    }
}

/// One range of slots and the nodes that serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRange {
    /// First slot (inclusive).
    pub start: u16,
    /// Last slot (inclusive).
    pub end: u16,
    /// The master: every write and sharded publish of these slots goes there.
    pub master: NodeAddr,
    /// Its replicas.
    pub replicas: Vec<NodeAddr>,
}

/// The cluster's slot map, as one node saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SlotMap {
    /// Sorted by `start`, not overlapping.
    ranges: Vec<SlotRange>,
}

impl SlotMap {
    /// The map in a `CLUSTER SLOTS` reply. A node announced with an empty host (Redis does
    /// so for the node answering, when it does not know its own address) gets `seed_host`,
    /// the host the caller dialled.
    pub fn parse(reply: Value, seed_host: &str) -> Result<SlotMap, ClusterError> {
        let bad = |what: &str| ClusterError::Protocol(format!("CLUSTER SLOTS: {what}"));
        let Value::Array(entries) = reply else {
            return Err(bad("not an array"));
        };
        let mut ranges = Vec::with_capacity(entries.len());
        for entry in entries {
            let Value::Array(fields) = entry else {
                return Err(bad("an entry is not an array"));
            };
            let mut fields = fields.into_iter();
            let start = slot_number(fields.next()).ok_or_else(|| bad("bad start slot"))?;
            let end = slot_number(fields.next()).ok_or_else(|| bad("bad end slot"))?;
            if start > end {
                return Err(bad("a range ends before it starts"));
            }
            let mut nodes = fields.map(|n| node_addr(n, seed_host));
            let master = nodes
                .next()
                .flatten()
                .ok_or_else(|| bad("a range without a master"))?;
            let replicas = nodes.flatten().collect();
            ranges.push(SlotRange {
                start,
                end,
                master,
                replicas,
            });
        }
        ranges.sort_by_key(|r| r.start);
        if ranges.windows(2).any(|w| w[0].end >= w[1].start) {
            return Err(bad("overlapping ranges"));
        }
        Ok(SlotMap { ranges })
    }

    /// The master serving `slot`, if any.
    pub fn master_of(&self, slot: u16) -> Option<&NodeAddr> {
        let i = self.ranges.partition_point(|r| r.end < slot);
        self.ranges
            .get(i)
            .filter(|r| r.start <= slot)
            .map(|r| &r.master)
    }

    /// Every master, once each, sorted.
    pub fn masters(&self) -> Vec<&NodeAddr> {
        let set: BTreeSet<&NodeAddr> = self.ranges.iter().map(|r| &r.master).collect();
        set.into_iter().collect()
    }

    /// The replicas of `master` (of its first range).
    pub fn replicas_of(&self, master: &NodeAddr) -> &[NodeAddr] {
        self.ranges
            .iter()
            .find(|r| &r.master == master)
            .map_or(&[], |r| r.replicas.as_slice())
    }

    /// How many slots no master serves (0 for a healthy cluster).
    pub fn uncovered(&self) -> u32 {
        let covered: u32 = self
            .ranges
            .iter()
            .map(|r| u32::from(r.end) - u32::from(r.start) + 1)
            .sum();
        u32::from(SLOTS).saturating_sub(covered)
    }

    /// The slot ranges, sorted.
    pub fn ranges(&self) -> &[SlotRange] {
        &self.ranges
    }

    /// How many slots `master` serves.
    pub fn slots_of(&self, master: &NodeAddr) -> u32 {
        self.ranges
            .iter()
            .filter(|r| &r.master == master)
            .map(|r| u32::from(r.end) - u32::from(r.start) + 1)
            .sum()
    }

    /// The ranges of slots no master serves (first, last; inclusive), sorted: what
    /// `corelay check` names when the map has holes.
    pub fn holes(&self) -> Vec<(u16, u16)> {
        let mut holes = Vec::new();
        let mut next: u32 = 0;
        for r in &self.ranges {
            if u32::from(r.start) > next {
                holes.push((next as u16, r.start - 1));
            }
            next = u32::from(r.end) + 1;
        }
        if next < u32::from(SLOTS) {
            holes.push((next as u16, SLOTS - 1));
        }
        holes
    }
}

/// One line of `CLUSTER NODES`: a node as the answering node sees it. Unlike `CLUSTER
/// SLOTS`, it lists the nodes that serve no slot too: replicas of a failed master, a failed
/// master itself, a node without slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    /// The node's id (40 hex characters).
    pub id: String,
    /// Its client address.
    pub addr: NodeAddr,
    /// A master (else a replica).
    pub master: bool,
    /// A replica's master id.
    pub master_id: Option<String>,
    /// Flagged `fail` or `fail?` by the answering node.
    pub failing: bool,
    /// How many slots it serves (a master).
    pub slots: u32,
}

/// The nodes in a `CLUSTER NODES` reply, in its order. Nodes without an address yet
/// (`noaddr`, a handshake in progress) are left out, as is any line that does not parse.
/// `seed_host` stands in for an empty host, as in [`SlotMap::parse`].
pub fn parse_nodes(text: &str, seed_host: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|l| parse_node(l, seed_host))
        .collect()
}

/// `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>…`
fn parse_node(line: &str, seed_host: &str) -> Option<ClusterNode> {
    let mut f = line.split_whitespace();
    let id = f.next()?.to_owned();
    let addr = f.next()?;
    let addr = addr.split(['@', ',']).next()?;
    let mut addr = NodeAddr::parse(addr)?;
    let flags: Vec<&str> = f.next()?.split(',').collect();
    if addr.port == 0 || flags.iter().any(|&x| x == "noaddr" || x == "handshake") {
        return None;
    }
    if addr.host.is_empty() {
        addr.host = seed_host.to_owned();
    }
    let master_id = f.next().filter(|m| *m != "-").map(str::to_owned);
    // ping-sent, pong-recv, config-epoch, link-state; then slots.
    let mut slots = 0u32;
    for s in f.skip(4) {
        // "[slot->-node]" / "[slot-<-node]": a migration in progress, not a served slot.
        if s.starts_with('[') {
            continue;
        }
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
            slots += b.saturating_sub(a) + 1;
        }
    }
    Some(ClusterNode {
        id,
        addr,
        master: flags.contains(&"master"),
        master_id,
        failing: flags.iter().any(|&x| x == "fail" || x == "fail?"),
        slots,
    })
}

fn slot_number(v: Option<Value>) -> Option<u16> {
    match v? {
        Value::Int(n) => u16::try_from(n).ok().filter(|&s| s < SLOTS),
        _ => None,
    }
}

/// `[host, port, id, …]` of a `CLUSTER SLOTS` entry; `None` for a node without a port.
fn node_addr(v: Value, seed_host: &str) -> Option<NodeAddr> {
    let Value::Array(parts) = v else { return None };
    let mut parts = parts.into_iter();
    let host = match parts.next()? {
        Value::BulkString(b) => String::from_utf8(b).ok()?,
        Value::SimpleString(s) => s,
        Value::Nil => String::new(),
        _ => return None,
    };
    let port = match parts.next()? {
        Value::Int(p) => u16::try_from(p).ok()?,
        _ => return None,
    };
    // "?" is what Redis 7 announces when it only knows a host name it may not give out.
    let host = if host.is_empty() || host == "?" {
        seed_host.to_owned()
    } else {
        host
    };
    Some(NodeAddr { host, port })
}

/// The hash slot of a key or sharded channel: CRC16 of its hash tag (the part between
/// the first `{` and the next `}`, when not empty), else of the whole name.
pub fn slot_of(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) % SLOTS
}

fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// CRC16/XMODEM (polynomial 0x1021, initial 0), as Redis Cluster uses.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// What a refused command says about where its slot is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    /// `MOVED <slot> <node>`: the slot lives there now; the map is out of date.
    Moved(u16, NodeAddr),
    /// `ASK <slot> <node>`: the slot is being migrated there and this key moved already;
    /// send the command there once, after `ASKING`.
    Ask(u16, NodeAddr),
    /// `TRYAGAIN`: a multi-key command's keys are split by a migration in progress.
    TryAgain,
    /// `CLUSTERDOWN`: the cluster cannot serve the slot now (a failover in progress).
    Down,
    /// A script touched an undeclared key this node does not serve (its slot moved, or is
    /// moving): the call's rooms go again one by one, with their keys declared.
    NotLocal,
}

impl Redirect {
    /// The redirect in a server error's code and detail, if it is one.
    pub fn of(code: &str, detail: &str) -> Option<Redirect> {
        let mut words = detail.split_whitespace();
        let mut slot_and_node = || {
            let slot = words.next()?.parse().ok()?;
            Some((slot, NodeAddr::parse(words.next()?)?))
        };
        match code {
            "MOVED" => slot_and_node().map(|(s, n)| Redirect::Moved(s, n)),
            "ASK" => slot_and_node().map(|(s, n)| Redirect::Ask(s, n)),
            "TRYAGAIN" => Some(Redirect::TryAgain),
            "CLUSTERDOWN" => Some(Redirect::Down),
            _ => None,
        }
    }

    /// The redirect a [`redis::RedisError`] carries, if any.
    pub fn of_error(e: &redis::RedisError) -> Option<Redirect> {
        let code = e.code()?;
        let detail = e.detail().unwrap_or("");
        Redirect::of(code, detail).or_else(|| {
            // Redis 7's words when a script touches a key of another node's slot.
            let text = e.to_string();
            if text.contains("while the cluster is down") {
                Some(Redirect::Down)
            } else {
                (text.contains("non local key") || text.contains("do not hash to the same slot"))
                    .then_some(Redirect::NotLocal)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    #[test]
    fn slots_are_redis_own() {
        // Values from Redis's CLUSTER KEYSLOT.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"bar"), 5061);
        assert_eq!(slot_of(b"123456789"), 0x31C3 % SLOTS);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"corelay:{r1}:offset"), slot_of(b"corelay:{r1}"));
        // An empty tag hashes the whole key.
        assert_eq!(slot_of(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
    }

    #[test]
    fn the_map_finds_each_slot_master() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node("10.0.0.2", 7001),
                node("10.0.0.5", 7004),
            ]),
            Value::Array(vec![Value::Int(0), Value::Int(5460), node("", 7000)]),
            Value::Array(vec![
                Value::Int(10923),
                Value::Int(16383),
                node("10.0.0.3", 7002),
            ]),
        ]);
        let map = SlotMap::parse(reply, "seed").expect("parses");
        assert_eq!(map.uncovered(), 0);
        assert_eq!(
            map.master_of(0).map(|n| n.to_string()),
            Some("seed:7000".into())
        );
        assert_eq!(map.master_of(5461).map(|n| n.port), Some(7001));
        assert_eq!(map.master_of(16383).map(|n| n.port), Some(7002));
        assert_eq!(map.masters().len(), 3);
        let m = NodeAddr::parse("10.0.0.2:7001").expect("addr");
        assert_eq!(map.replicas_of(&m).len(), 1);
    }

    #[test]
    fn a_hole_in_the_map_is_counted() {
        let reply = Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(99),
            node("h", 1),
        ])]);
        let map = SlotMap::parse(reply, "seed").expect("parses");
        assert_eq!(map.uncovered(), 16_384 - 100);
        assert_eq!(map.master_of(100), None);
        assert_eq!(map.holes(), vec![(100, 16_383)]);
        assert_eq!(map.slots_of(&NodeAddr::parse("h:1").expect("addr")), 100);
        assert!(SlotMap::parse(Value::Int(1), "s").is_err());
    }

    #[test]
    fn holes_are_named_at_both_ends_and_between() {
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(10), Value::Int(99), node("h", 1)]),
            Value::Array(vec![Value::Int(200), Value::Int(16_000), node("h", 2)]),
        ]);
        let map = SlotMap::parse(reply, "seed").expect("parses");
        assert_eq!(map.holes(), vec![(0, 9), (100, 199), (16_001, 16_383)]);
        assert_eq!(SlotMap::default().holes(), vec![(0, 16_383)]);
    }

    #[test]
    fn cluster_nodes_lines_are_read() {
        let text = "\
07c3 127.0.0.1:30004@40004 slave e6f8 0 1700 3 connected
e6f8 127.0.0.1:30003@40003,node-3 myself,master - 0 0 3 connected 10923-16383
9569 127.0.0.1:30002@40002 master,fail - 1700 1700 2 disconnected
74fd :30001@40001 master - 0 1700 1 connected 0-5460 5461 [5462->-9569]
aaaa :0@0 master,noaddr - 0 0 0 disconnected
";
        let nodes = parse_nodes(text, "seed");
        assert_eq!(nodes.len(), 4, "{nodes:?}");
        assert!(!nodes[0].master);
        assert_eq!(nodes[0].master_id.as_deref(), Some("e6f8"));
        assert_eq!(nodes[1].addr.to_string(), "127.0.0.1:30003");
        assert_eq!((nodes[1].master, nodes[1].slots), (true, 5461));
        assert!(nodes[2].failing && nodes[2].master && nodes[2].slots == 0);
        assert_eq!(nodes[3].addr.to_string(), "seed:30001");
        assert_eq!(nodes[3].slots, 5462);
    }

    #[test]
    fn redirects_are_read_from_errors() {
        assert_eq!(
            Redirect::of("MOVED", "3999 127.0.0.1:6381"),
            Some(Redirect::Moved(
                3999,
                NodeAddr::parse("127.0.0.1:6381").expect("addr")
            ))
        );
        assert_eq!(
            Redirect::of("ASK", "3999 [::1]:6381").map(|r| match r {
                Redirect::Ask(_, n) => n.to_string(),
                _ => String::new(),
            }),
            Some("[::1]:6381".into())
        );
        assert_eq!(
            Redirect::of("TRYAGAIN", "Multiple keys"),
            Some(Redirect::TryAgain)
        );
        assert_eq!(Redirect::of("ERR", "x"), None);
    }
}
