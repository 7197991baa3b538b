//! [`Router`]: which node serves each room, the shard's [`NodeLink`]s, and the topology
//! task that keeps the slot map current and moves subscriptions when slots move.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use futures::StreamExt as _;
use redis::Value;

use super::node::{connect, NodeLink, NodeParts};
use super::{first_of, Requests};
use crate::cluster::keys;
use crate::cluster::redis::{backoff, RedisCluster, ShardTarget};
use crate::cluster::topology::{slot_of, NodeAddr, SlotMap};
use crate::cluster::{ClusterError, ClusterEvent};

/// How often the slot map is read again when nothing asked for it.
const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// How often while a node is down (a failover promotes a replica within a few seconds).
const REFRESH_WHILE_DOWN: Duration = Duration::from_millis(500);

/// The shard's view of Redis: a standalone server or a cluster's masters, and where each
/// wanted room is subscribed.
pub(super) struct Router {
    pub(super) cluster: RedisCluster,
    shard: usize,
    events: mpsc::UnboundedSender<ClusterEvent>,
    /// The server `redis.url` names.
    seed: ShardTarget,
    pub(super) state: RefCell<State>,
    /// What the nodes ask of the topology task.
    requests: Rc<Requests>,
    /// Every wanted room and the node it is wanted on (`None` before Redis was reached).
    rooms: RefCell<HashMap<String, Option<NodeKey>>>,
    /// One map refresh at a time.
    refreshing: futures::lock::Mutex<()>,
    /// When the map was last read.
    refreshed_at: Cell<Option<Instant>>,
}

/// What the router knows of Redis.
pub(super) enum State {
    /// Not reached yet: whether it is a cluster is not known.
    Unknown,
    /// A standalone server: every room on its one node.
    Standalone(Rc<NodeLink>),
    /// A Redis Cluster: its map, and the links to the masters this shard talks to.
    Cluster {
        map: SlotMap,
        nodes: HashMap<NodeAddr, Rc<NodeLink>>,
    },
}

/// A node's key in [`Router::rooms`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum NodeKey {
    /// The standalone server.
    Standalone,
    /// A cluster master.
    Node(NodeAddr),
}

impl Router {
    /// Finds out what Redis is and starts the links and the topology task; see
    /// [`super::ShardLink::start`].
    pub(super) async fn start(
        cluster: RedisCluster,
        shard: usize,
        events: mpsc::UnboundedSender<ClusterEvent>,
    ) -> Rc<Router> {
        let (wake, woken) = mpsc::channel(1);
        let router = Rc::new(Router {
            seed: cluster.shard_target().clone(),
            cluster,
            shard,
            events,
            state: RefCell::new(State::Unknown),
            requests: Rc::new(Requests::new(wake)),
            rooms: RefCell::new(HashMap::new()),
            refreshing: futures::lock::Mutex::new(()),
            refreshed_at: Cell::new(None),
        });
        // What the process's link found out already spares each shard a connection.
        let known = match (router.cluster.cluster_mode(), router.cluster.slot_map()) {
            (Some(false), _) => Ok(None),
            (Some(true), Some(map)) => Ok(Some(SlotMap::clone(&map))),
            _ => Box::pin(router.detect()).await,
        };
        match known {
            Ok(found) => router.install(found, false).await,
            Err(e) => {
                tracing::warn!(shard, error = %e, "redis link of a shard is down at start; retrying");
                router.send(ClusterEvent::Down {
                    reason: e.to_string(),
                });
            }
        }
        glommio::spawn_local(router.clone().run_topology(woken)).detach();
        router
    }

    /// Whether Redis turned out to be a Redis Cluster.
    pub(super) fn is_cluster(&self) -> bool {
        matches!(&*self.state.borrow(), State::Cluster { .. })
    }

    /// Whether Redis was not reached yet, or a node's subscriber link is down.
    pub(super) fn is_down(&self) -> bool {
        match &*self.state.borrow() {
            State::Unknown => true,
            State::Standalone(node) => node.down.get(),
            State::Cluster { nodes, .. } => nodes.values().any(|n| n.down.get()),
        }
    }

    fn send(&self, event: ClusterEvent) {
        let _ = self.events.unbounded_send(event);
    }

    /// The node serving `room` now (creating its link on a cluster), or `None` while Redis
    /// was not reached or no master serves the room's slot.
    pub(super) fn node_for(&self, room: &str) -> Option<(NodeKey, Rc<NodeLink>)> {
        let slot = slot_of(keys::channel(room).as_bytes());
        let master = match &*self.state.borrow() {
            State::Unknown => return None,
            State::Standalone(node) => return Some((NodeKey::Standalone, node.clone())),
            State::Cluster { map, .. } => map.master_of(slot)?.clone(),
        };
        let node = self.cluster_node(&master, false)?;
        Some((NodeKey::Node(master), node))
    }

    /// The link to cluster master `addr`, created (and its tasks started) when new.
    /// `announce`: whether its first connection is a [`ClusterEvent::Reconnected`].
    pub(super) fn cluster_node(&self, addr: &NodeAddr, announce: bool) -> Option<Rc<NodeLink>> {
        let (node, new) = self.cluster_link(addr)?;
        if new {
            node.owed_reconnect.set(announce);
            glommio::spawn_local(node.clone().run_subscriber(None)).detach();
        }
        Some(node)
    }

    /// The link to cluster master `addr` (not started when new), and whether it is new.
    fn cluster_link(&self, addr: &NodeAddr) -> Option<(Rc<NodeLink>, bool)> {
        let mut state = self.state.borrow_mut();
        let State::Cluster { map, nodes } = &mut *state else {
            return None;
        };
        if let Some(node) = nodes.get(addr) {
            return Some((node.clone(), false));
        }
        let node = Rc::new(NodeLink::new(NodeParts {
            cluster: self.cluster.clone(),
            shard: self.shard,
            target: self.seed.at_node(addr),
            name: addr.to_string(),
            sharded: true,
            replicas: map.replicas_of(addr).len(),
            events: self.events.clone(),
            requests: Some(self.requests.clone()),
        }));
        nodes.insert(addr.clone(), node.clone());
        Some((node, true))
    }

    /// The node link a room is wanted on now.
    fn node_at(&self, key: &NodeKey) -> Option<Rc<NodeLink>> {
        match (&*self.state.borrow(), key) {
            (State::Standalone(node), NodeKey::Standalone) => Some(node.clone()),
            (State::Cluster { nodes, .. }, NodeKey::Node(addr)) => nodes.get(addr).cloned(),
            _ => None,
        }
    }

    /// Subscribes `room` on the node serving it (see [`super::ShardLink::subscribe`]).
    pub(super) async fn subscribe(&self, room: &str) -> Result<(), ClusterError> {
        match self.node_for(room) {
            None => {
                self.rooms.borrow_mut().insert(room.to_owned(), None);
                Err(ClusterError::Unavailable(format!(
                    "redis at {} is not reachable; {room:?} will be subscribed when it is",
                    self.cluster.target()
                )))
            }
            Some((key, node)) => {
                self.rooms.borrow_mut().insert(room.to_owned(), Some(key));
                let result = node.subscribe(room).await;
                if matches!(&result, Err(e) if !e.is_transient()) {
                    self.rooms.borrow_mut().remove(room);
                }
                result
            }
        }
    }

    /// Unsubscribes `room` from the node it was wanted on.
    pub(super) async fn unsubscribe(&self, room: &str) -> Result<(), ClusterError> {
        let Some(at) = self.rooms.borrow_mut().remove(room) else {
            return Ok(());
        };
        match at.and_then(|key| self.node_at(&key)) {
            Some(node) => node.unsubscribe(room).await,
            None => Ok(()),
        }
    }

    /// What the server `redis.url` names is: `Some(map)` for a cluster, `None` for a
    /// standalone server (which refuses `CLUSTER SLOTS`).
    async fn detect(&self) -> Result<Option<SlotMap>, ClusterError> {
        let name = self.cluster.target().to_owned();
        let mut conn = connect(
            &self.cluster,
            self.shard,
            &self.seed,
            &name,
            "connect",
            "topology",
        )
        .await?;
        let slots = redis::cmd("CLUSTER").arg("SLOTS").clone();
        let ask = conn.call(&slots);
        let limit = self.cluster.options().command_timeout;
        let reply = super::within(limit, ask).await.ok_or_else(|| {
            ClusterError::Timeout(format!("redis at {name} did not answer CLUSTER SLOTS"))
        })?;
        match reply {
            Ok(value) => self.parse_map(value).map(Some),
            Err(e) => {
                let text = e.to_string().to_ascii_lowercase();
                if text.contains("cluster support disabled") {
                    Ok(None)
                } else if text.contains("noperm") && self.cluster.is_cluster() {
                    Err(ClusterError::Auth(format!(
                        "redis at {name} is a cluster, but the redis user may not read its slot \
                         map: grant +cluster|slots (see deploy/redis.md)"
                    )))
                } else if text.contains("noperm") {
                    // An ACL without CLUSTER on a standalone server (HELLO said so).
                    Ok(None)
                } else {
                    Err(crate::cluster::redis::classify(
                        &e,
                        &name,
                        "CLUSTER SLOTS",
                        limit,
                    ))
                }
            }
        }
    }

    fn parse_map(&self, value: Value) -> Result<SlotMap, ClusterError> {
        let seed_host = match &self.seed.addr {
            crate::cluster::redis::ShardAddr::Tcp { host, .. } => host.as_str(),
            crate::cluster::redis::ShardAddr::Unix(_) => "127.0.0.1",
        };
        SlotMap::parse(value, seed_host)
    }

    /// Sets up the links for what [`Router::detect`] found, connecting every node's
    /// subscriber, and subscribes the rooms wanted meanwhile. `after_down`: the stream
    /// said [`ClusterEvent::Down`]; each node's first connection announces
    /// [`ClusterEvent::Reconnected`].
    async fn install(&self, found: Option<SlotMap>, after_down: bool) {
        let first_nodes: Vec<Rc<NodeLink>> = match found {
            None => {
                let node = Rc::new(NodeLink::new(NodeParts {
                    cluster: self.cluster.clone(),
                    shard: self.shard,
                    target: self.seed.clone(),
                    name: self.cluster.target().to_owned(),
                    sharded: self.cluster.options().sharded,
                    replicas: 0,
                    events: self.events.clone(),
                    requests: None,
                }));
                *self.state.borrow_mut() = State::Standalone(node.clone());
                vec![node]
            }
            Some(map) => {
                tracing::info!(
                    shard = self.shard,
                    masters = map.masters().len(),
                    "redis is a cluster: sharded pub/sub, one link per master"
                );
                let masters: Vec<NodeAddr> = map.masters().into_iter().cloned().collect();
                *self.state.borrow_mut() = State::Cluster {
                    map,
                    nodes: HashMap::new(),
                };
                self.refreshed_at.set(Some(Instant::now()));
                let nodes: Vec<Rc<NodeLink>> = masters
                    .iter()
                    .filter_map(|addr| self.cluster_link(addr).map(|(node, _)| node))
                    .collect();
                nodes
            }
        };
        // Place the rooms wanted while Redis was not reached.
        let waiting: Vec<String> = self.rooms.borrow().keys().cloned().collect();
        for room in waiting {
            if let Some((key, node)) = self.node_for(&room) {
                node.sub.borrow_mut().rooms.insert(room.clone());
                self.rooms.borrow_mut().insert(room, Some(key));
            }
        }
        let starts = first_nodes.into_iter().map(|node| async move {
            node.owed_reconnect.set(after_down);
            node.start().await;
        });
        futures::future::join_all(starts).await;
    }

    /// The topology task: finds out what Redis is when it was not reachable at start, then
    /// (on a cluster) reads the map again when asked and every few seconds. Ends when the
    /// client is closed.
    async fn run_topology(self: Rc<Self>, mut woken: mpsc::Receiver<()>) {
        let mut failures: u32 = 0;
        loop {
            let every = match &*self.state.borrow() {
                State::Unknown => backoff(self.cluster.options(), failures.max(1)),
                State::Standalone(_) => REFRESH_EVERY,
                State::Cluster { .. } if self.is_down() => REFRESH_WHILE_DOWN,
                State::Cluster { .. } => REFRESH_EVERY,
            };
            first_of(
                async {
                    woken.next().await;
                },
                glommio::timer::sleep(every),
            )
            .await;
            if self.cluster.is_closed() {
                return;
            }
            let unknown = matches!(&*self.state.borrow(), State::Unknown);
            if unknown {
                match self.detect().await {
                    Ok(found) => {
                        failures = 0;
                        self.install(found, true).await;
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        tracing::debug!(shard = self.shard, error = %e, "redis still unreachable");
                    }
                }
                continue;
            }
            if self.is_cluster() {
                if let Err(e) = Box::pin(self.refresh()).await {
                    tracing::debug!(shard = self.shard, error = %e, "reading the cluster's slot map failed");
                }
            } else {
                self.requests.take();
            }
        }
    }

    /// Reads the cluster's slot map again (from the first master that answers, else the
    /// seed), moves the subscriptions of rooms whose master changed (and of rooms a node
    /// dropped) to their master now, retires links to nodes that serve nothing, and
    /// announces [`ClusterEvent::Reconnected`] when rooms moved, so that the home catches up
    /// what they may have missed meanwhile.
    pub(super) async fn refresh(&self) -> Result<(), ClusterError> {
        let started = Instant::now();
        let _one = self.refreshing.lock().await;
        if self.refreshed_at.get().is_some_and(|at| at > started) {
            return Ok(()); // Another caller read it while this one waited.
        }
        // Bounded as a whole (each node it asks is bounded too): a publish waits for it.
        let limit = self.cluster.options().command_timeout;
        let map = super::within(limit, Box::pin(self.read_map()))
            .await
            .unwrap_or_else(|| {
                Err(ClusterError::Timeout(format!(
                    "no redis node answered CLUSTER SLOTS within {limit:?}"
                )))
            })?;
        self.refreshed_at.set(Some(Instant::now()));
        // Taken only now: a failed read leaves them for the next one.
        let (_, orphans) = self.requests.take();
        let moved = self.apply_map(map, orphans);
        if moved.is_empty() {
            return Ok(());
        }
        tracing::info!(
            shard = self.shard,
            rooms = moved.len(),
            "redis cluster slots moved: rooms subscribed on their new masters"
        );
        let subscribes = moved.iter().filter_map(|room| {
            let (key, node) = self.node_for(room)?;
            self.rooms.borrow_mut().insert(room.clone(), Some(key));
            Some(async move {
                if let Err(e) = node.subscribe(room).await {
                    tracing::debug!(%room, error = %e, "subscribing a moved room failed; it stays wanted");
                }
            })
        });
        futures::future::join_all(subscribes.collect::<Vec<_>>()).await;
        self.send(ClusterEvent::Reconnected);
        Ok(())
    }

    /// The map from the first master link that answers, else from the seed.
    async fn read_map(&self) -> Result<SlotMap, ClusterError> {
        let nodes: Vec<Rc<NodeLink>> = match &*self.state.borrow() {
            State::Cluster { nodes, .. } => nodes
                .values()
                .filter(|n| !n.down.get() && !n.retired.get())
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        let mut last = None;
        for node in nodes {
            match node.call(redis::cmd("CLUSTER").arg("SLOTS")).await {
                Ok(value) => return self.parse_map(value),
                Err(e) => last = Some(e),
            }
        }
        match Box::pin(self.detect()).await {
            Ok(Some(map)) => Ok(map),
            Ok(None) => Err(ClusterError::Config(format!(
                "redis at {} is no longer a cluster",
                self.cluster.target()
            ))),
            Err(e) => Err(last.unwrap_or(e)),
        }
    }

    /// Installs `map`; returns the rooms to subscribe on their (new) master, having taken
    /// them off the node they were on.
    fn apply_map(&self, map: SlotMap, orphans: Vec<String>) -> Vec<String> {
        let mut moved = Vec::new();
        let mut state = self.state.borrow_mut();
        let State::Cluster {
            map: current,
            nodes,
        } = &mut *state
        else {
            return moved;
        };
        for room in orphans {
            if let Some(Some(NodeKey::Node(at))) = self.rooms.borrow().get(&room) {
                if let Some(node) = nodes.get(at) {
                    node.forget(&room);
                }
                moved.push(room);
            }
        }
        for (room, at) in self.rooms.borrow().iter() {
            let want = map.master_of(slot_of(keys::channel(room).as_bytes()));
            let Some(NodeKey::Node(at)) = at else {
                continue;
            };
            if want != Some(at) && !moved.contains(room) {
                if let Some(node) = nodes.get(at) {
                    node.forget(room);
                }
                moved.push(room.clone());
            }
        }
        for (addr, node) in nodes.iter() {
            node.replicas.set(map.replicas_of(addr).len());
        }
        let masters: Vec<&NodeAddr> = map.masters();
        nodes.retain(|addr, node| {
            let keep = masters.contains(&addr) || !node.sub.borrow().rooms.is_empty();
            if !keep {
                node.retire();
            }
            keep
        });
        *current = map;
        moved
    }
}
