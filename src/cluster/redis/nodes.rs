//! Standalone Redis or Redis Cluster, and on a cluster its slot map and nodes.
//!
//! [`detect_mode`] asks the URL's server with `HELLO 2` (its `mode` field: `standalone`
//! or `cluster`; allowed to any user, as a `@connection` command) on the first command
//! connection; the answer is kept for the life of the process ([`Mode`]). On a cluster,
//! sharded pub/sub is the default (`redis.sharded` is set).
//!
//! On a cluster the supervisor reads the topology every [`TOPOLOGY_EVERY`]
//! ([`Shared::refresh_topology`]): `CLUSTER SLOTS` (the slot map: where the probe channel
//! lives, which master a room's presence refresh goes to) and `CLUSTER NODES` (every
//! node, those that serve no slot included), then PINGs each node on a small connection of
//! its own. `/healthz` reads the result ([`RedisCluster::nodes`]) without any I/O. The
//! nodes seen are also the seeds of a new cluster connection, so that one can be made
//! while the URL's node is down.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, ConnectionAddr, ErrorKind, Value};

use super::{build_client_at, lock, RedisCluster, Shared};
use crate::cluster::topology::{parse_nodes, ClusterNode, NodeAddr, SlotMap};
use crate::cluster::wire::bytes;
use crate::cluster::{ClusterError, RedisOptions};

/// How often the supervisor reads a cluster's topology and PINGs its nodes.
pub(super) const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);

/// What the server behind `redis.url` is.
pub(super) enum Mode {
    /// A standalone Redis (or one that HELLO does not tell apart: Redis < 6).
    Standalone,
    /// A Redis Cluster node: commands are routed by slot, pub/sub is sharded.
    Cluster {
        /// The options in force: the configured ones with `sharded` set.
        opts: Box<RedisOptions>,
    },
}

/// A node's role, as the cluster announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    /// Serves slots (or did: a failed master keeps its role until a replica takes over).
    Master,
    /// Copies a master, and takes over when it fails.
    Replica,
}

impl NodeRole {
    /// `"master"` or `"replica"`, as `/healthz` says it.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Master => "master",
            NodeRole::Replica => "replica",
        }
    }
}

/// One node of a Redis Cluster as the supervisor last saw it: for `/healthz`, which must
/// not do I/O to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// Its client address, as the cluster announces it.
    pub addr: NodeAddr,
    /// Master or replica.
    pub role: NodeRole,
    /// A replica's master, when the cluster lists it.
    pub master: Option<NodeAddr>,
    /// How many slots it serves (0 for a replica).
    pub slots: u32,
    /// It answered this host's last PING within `command_timeout`, and the cluster does not
    /// flag it failing.
    pub up: bool,
}

/// What the supervisor last read of a cluster's topology.
#[derive(Default)]
pub(super) struct Topology {
    /// The slot map (`CLUSTER SLOTS`), once read.
    pub map: Option<Arc<SlotMap>>,
    /// Every node, masters first, each sorted by address.
    pub nodes: Arc<Vec<NodeStatus>>,
    /// The supervisor's connections for PINGing each node.
    pings: HashMap<NodeAddr, MultiplexedConnection>,
}

impl Topology {
    /// Closes the supervisor's PING connections (the supervisor is stopping).
    pub(super) fn close(&mut self) {
        self.pings.clear();
    }
}

impl RedisCluster {
    /// Whether the server is a Redis Cluster: then commands go to the master of their key's
    /// slot, pub/sub is sharded ([`RedisOptions::sharded`] is set in
    /// [`options`](RedisCluster::options)), and `/healthz` lists the nodes. Known once Redis
    /// has been reached: always after [`RedisCluster::connect`]; after
    /// [`RedisCluster::connect_or_retry`] with Redis down, `false` until it is reached.
    pub fn is_cluster(&self) -> bool {
        self.inner.shared.is_cluster()
    }

    /// On a Redis Cluster, its nodes as the supervisor last saw them (every
    /// `TOPOLOGY_EVERY`, 1 s): role, slots, and whether this host reaches them. Empty on a
    /// standalone Redis and before the first look. No I/O: for `/healthz`.
    pub fn nodes(&self) -> Arc<Vec<NodeStatus>> {
        lock(&self.inner.shared.topology).nodes.clone()
    }

    /// Whether the server is a Redis Cluster, once Redis has been reached (`None` before):
    /// so that a shard need not ask the server again.
    pub(crate) fn cluster_mode(&self) -> Option<bool> {
        self.inner
            .shared
            .mode
            .get()
            .map(|m| matches!(m, Mode::Cluster { .. }))
    }

    /// On a Redis Cluster, the slot map the supervisor last read; `None` on a standalone
    /// Redis and before the first look. No I/O.
    pub fn slot_map(&self) -> Option<Arc<SlotMap>> {
        lock(&self.inner.shared.topology).map.clone()
    }
}

/// Whether the server on `conn` is a Redis Cluster node (`HELLO 2` answers `mode`
/// `cluster`). A server that refuses HELLO (Redis < 6, an ACL without it) counts as
/// standalone; a lost connection or a timeout is an error.
pub(crate) async fn is_cluster_node(
    conn: &mut impl ConnectionLike,
) -> Result<bool, redis::RedisError> {
    match redis::cmd("HELLO").arg(2).query_async::<Value>(conn).await {
        Ok(reply) => Ok(hello_mode(reply).as_deref() == Some("cluster")),
        Err(e) if matches!(e.kind(), ErrorKind::Server(_) | ErrorKind::Extension) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The `mode` field of a HELLO reply (a flat list in RESP2, a map in RESP3).
fn hello_mode(reply: Value) -> Option<String> {
    let pairs: Vec<(Value, Value)> = match reply {
        Value::Map(pairs) => pairs,
        Value::Array(flat) => {
            let mut it = flat.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        _ => return None,
    };
    pairs
        .into_iter()
        .find(|(k, _)| bytes(k.clone()).as_deref() == Some(b"mode"))
        .and_then(|(_, v)| bytes(v))
        .and_then(|v| String::from_utf8(v).ok())
}

/// What the server on `conn` (the URL's) is, within `command_timeout`.
pub(super) async fn detect_mode(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
) -> Result<Mode, ClusterError> {
    if shared.bounded("HELLO", is_cluster_node(conn)).await? {
        let mut opts = shared.opts.clone();
        opts.sharded = true;
        Ok(Mode::Cluster {
            opts: Box::new(opts),
        })
    } else {
        Ok(Mode::Standalone)
    }
}

impl Shared {
    /// Whether the server is known to be a Redis Cluster.
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.mode.get(), Some(Mode::Cluster { .. }))
    }

    /// What the server is: known after the first command connection, made here if needed.
    pub(super) async fn mode(&self) -> Result<&Mode, ClusterError> {
        if let Some(mode) = self.mode.get() {
            return Ok(mode);
        }
        self.cmd_conn().await?;
        self.mode.get().ok_or_else(|| {
            ClusterError::Unavailable(format!("redis at {}: mode unknown", self.target))
        })
    }

    /// The host of the URL, for the nodes a cluster announces without one.
    fn seed_host(&self) -> String {
        match self.cmd_client.get_connection_info().addr() {
            ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => host.clone(),
            _ => String::new(),
        }
    }

    /// Every node seen so far (seeds for a new cluster connection).
    pub(super) fn known_nodes(&self) -> Vec<NodeAddr> {
        lock(&self.topology)
            .nodes
            .iter()
            .map(|n| n.addr.clone())
            .collect()
    }

    /// The slot map, read now with `CLUSTER SLOTS` through the command connection (and
    /// kept for the others).
    pub(super) async fn read_slot_map(&self) -> Result<Arc<SlotMap>, ClusterError> {
        let reply = self
            .with_conn("CLUSTER SLOTS", |mut c| async move {
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async::<Value>(&mut c)
                    .await
            })
            .await?;
        let map = Arc::new(SlotMap::parse(reply, &self.seed_host())?);
        lock(&self.topology).map = Some(map.clone());
        Ok(map)
    }

    /// Reads the slot map and the node list, and PINGs every node, each on its own
    /// connection (made when missing, dropped when it fails), all at once, each within
    /// `connect_timeout + command_timeout`. When the cluster cannot be asked, the nodes seen
    /// last are PINGed.
    pub(super) async fn refresh_topology(self: &Arc<Self>) {
        if let Err(e) = self.read_slot_map().await {
            tracing::debug!(error = %e, "redis cluster: cannot read the slot map");
        }
        let listed = self
            .with_conn("CLUSTER NODES", |mut c| async move {
                redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async::<String>(&mut c)
                    .await
            })
            .await;
        let nodes: Vec<ClusterNode> = match listed {
            Ok(text) => parse_nodes(&text, &self.seed_host()),
            Err(e) => {
                tracing::debug!(error = %e, "redis cluster: cannot list the nodes");
                lock(&self.topology)
                    .nodes
                    .iter()
                    .map(|n| ClusterNode {
                        id: n.addr.to_string(),
                        addr: n.addr.clone(),
                        master: n.role == NodeRole::Master,
                        master_id: n.master.as_ref().map(|m| m.to_string()),
                        failing: false,
                        slots: n.slots,
                    })
                    .collect()
            }
        };
        let pings = nodes.iter().map(|n| {
            let s = self.clone();
            let addr = n.addr.clone();
            async move { s.ping_node(&addr).await }
        });
        let answered = futures::future::join_all(pings).await;
        let by_id: HashMap<&str, &NodeAddr> =
            nodes.iter().map(|n| (n.id.as_str(), &n.addr)).collect();
        let mut statuses: Vec<NodeStatus> = nodes
            .iter()
            .zip(&answered)
            .map(|(n, &ok)| NodeStatus {
                addr: n.addr.clone(),
                role: if n.master {
                    NodeRole::Master
                } else {
                    NodeRole::Replica
                },
                master: n
                    .master_id
                    .as_deref()
                    .and_then(|id| by_id.get(id).map(|a| (*a).clone())),
                slots: n.slots,
                up: ok && !n.failing,
            })
            .collect();
        statuses.sort_by(|a, b| {
            (a.role != NodeRole::Master, &a.addr).cmp(&(b.role != NodeRole::Master, &b.addr))
        });
        let listed: HashSet<&NodeAddr> = statuses.iter().map(|n| &n.addr).collect();
        let mut topology = lock(&self.topology);
        topology.pings.retain(|addr, _| listed.contains(addr));
        topology.nodes = Arc::new(statuses);
    }

    /// PINGs `node` on the supervisor's connection to it: whether it answered in time.
    async fn ping_node(&self, node: &NodeAddr) -> bool {
        let limit = self.opts.connect_timeout + self.opts.command_timeout;
        let ping = async {
            let existing = lock(&self.topology).pings.get(node).cloned();
            let mut conn = match existing {
                Some(c) => c,
                None => {
                    let client = build_client_at(&self.opts, false, Some(node)).ok()?;
                    let config = AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(self.opts.connect_timeout))
                        .set_response_timeout(Some(self.opts.command_timeout));
                    let c = client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                        .ok()?;
                    lock(&self.topology).pings.insert(node.clone(), c.clone());
                    c
                }
            };
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .ok()
        };
        let ok = matches!(tokio::time::timeout(limit, ping).await, Ok(Some(_)));
        if !ok {
            lock(&self.topology).pings.remove(node);
        }
        ok
    }
}

/// The supervisor's topology watch: every [`TOPOLOGY_EVERY`], once the server is known to
/// be a cluster, [`Shared::refresh_topology`]. Runs until aborted (the supervisor aborts it
/// when it stops).
pub(super) async fn watch_topology(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(TOPOLOGY_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        if shared.is_cluster() {
            shared.refresh_topology().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn hello_tells_a_cluster_from_a_standalone_redis() {
        let resp2 = Value::Array(vec![
            bulk("server"),
            bulk("redis"),
            bulk("proto"),
            Value::Int(2),
            bulk("mode"),
            bulk("cluster"),
        ]);
        assert_eq!(hello_mode(resp2).as_deref(), Some("cluster"));
        let resp3 = Value::Map(vec![(bulk("mode"), bulk("standalone"))]);
        assert_eq!(hello_mode(resp3).as_deref(), Some("standalone"));
        assert_eq!(hello_mode(Value::Int(1)), None);
    }
}
