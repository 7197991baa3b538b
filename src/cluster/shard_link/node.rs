//! [`NodeLink`]: a shard's two connections to one Redis server (the standalone server, or
//! one master of a Redis Cluster) and their state. `commands` runs the publish script on
//! the command connection, `subscribe` sends (un)subscribe commands and waits for Redis to
//! confirm them, and `reader` is the subscriber task.

use std::cell::{Cell, RefCell};
use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Instant;

use futures::channel::{mpsc, oneshot};
use futures::lock::Mutex;

use super::{within, Requests};
use crate::cluster::redis::{classify, RedisCluster, ShardAddr, ShardTarget};
use crate::cluster::resp::{Endpoint, RespConn, RespWriter};
use crate::cluster::{options, ClusterError, ClusterEvent, RedisOptions};

/// One shard's connections to one Redis server; see the module docs.
pub(super) struct NodeLink {
    pub(super) cluster: RedisCluster,
    pub(super) shard: usize,
    /// Where the connections go (credentials and TLS included).
    target: ShardTarget,
    /// The server, for messages: `host:port` of a cluster node, or the URL without its
    /// password.
    pub(super) name: String,
    /// Sharded pub/sub (SSUBSCRIBE, SPUBLISH): always on a cluster, else `redis.sharded`.
    pub(super) sharded: bool,
    /// Replicas the node has: the publish script is followed by `WAIT 1` when it has one,
    /// so that an acked message survives the master's loss (a failover).
    pub(super) replicas: Cell<usize>,
    /// The shard's event stream.
    pub(super) events: mpsc::UnboundedSender<ClusterEvent>,
    /// What the node asks of its shard's topology task (a cluster's only).
    pub(super) requests: Option<Rc<Requests>>,
    /// The command connection; locked for the whole of a batch.
    pub(super) commands: Mutex<Commands>,
    /// Shared with the stray-unsubscribe tasks.
    pub(super) sub: Rc<RefCell<Subscriber>>,
    /// The node left the cluster's map: its subscriber task ends.
    pub(super) retired: Cell<bool>,
    /// The subscriber link is down (announced with [`ClusterEvent::Down`]).
    pub(super) down: Cell<bool>,
    /// A subscribe was put off because the link was not up yet: the link's next
    /// (re)subscription announces [`ClusterEvent::Reconnected`], so that the home catches
    /// up what the room missed meanwhile.
    pub(super) owed_reconnect: Cell<bool>,
}

/// The command connection and its reconnect state.
#[derive(Default)]
pub(super) struct Commands {
    pub(super) conn: Option<RespConn>,
    pub(super) failures: u32,
    /// While in backoff after a failed connect: when to try again, and the error till then.
    pub(super) retry: Option<(Instant, ClusterError)>,
}

/// The subscriber connection's shared state (its reader is owned by its task).
#[derive(Default)]
pub(super) struct Subscriber {
    /// The rooms the shard wants from this node, subscribed whenever the link is up.
    pub(super) rooms: HashSet<String>,
    /// The live connection's writing half, while the link is up.
    pub(super) writer: Option<Rc<Mutex<RespWriter>>>,
    /// (Un)subscribe commands sent and not confirmed yet, oldest first.
    pub(super) waiting: VecDeque<Waiter>,
    /// Channels being unsubscribed because they delivered for no wanted room.
    pub(super) strays: HashSet<String>,
    /// When the unanswered PING was sent.
    pub(super) ping_sent: Option<Instant>,
}

/// A caller waiting for Redis to confirm its (un)subscribe command.
pub(super) struct Waiter {
    pub(super) subscribe: bool,
    pub(super) channel: String,
    pub(super) done: oneshot::Sender<Result<(), ClusterError>>,
}

/// What a [`NodeLink`] is made of, besides its state.
pub(super) struct NodeParts {
    pub cluster: RedisCluster,
    pub shard: usize,
    pub target: ShardTarget,
    pub name: String,
    pub sharded: bool,
    pub replicas: usize,
    pub events: mpsc::UnboundedSender<ClusterEvent>,
    pub requests: Option<Rc<Requests>>,
}

impl NodeLink {
    /// A node link with no connection yet.
    pub(super) fn new(parts: NodeParts) -> NodeLink {
        NodeLink {
            cluster: parts.cluster,
            shard: parts.shard,
            target: parts.target,
            name: parts.name,
            sharded: parts.sharded,
            replicas: Cell::new(parts.replicas),
            events: parts.events,
            requests: parts.requests,
            commands: Mutex::new(Commands::default()),
            sub: Rc::new(RefCell::new(Subscriber::default())),
            retired: Cell::new(false),
            down: Cell::new(false),
            owed_reconnect: Cell::new(false),
        }
    }

    /// Connects the subscriber (bounded by `connect_timeout`) and starts its task; when
    /// the node cannot be reached, announces [`ClusterEvent::Down`] (unless it is down
    /// already) and the task keeps trying.
    pub(super) async fn start(self: &Rc<Self>) {
        let first = match self.connect("connect (pub/sub)", "pubsub").await {
            Ok(conn) => Some(self.install(conn)),
            Err(e) => {
                tracing::warn!(shard = self.shard, node = %self.name, error = %e, "redis pub/sub link of a shard is down at start; retrying");
                if !self.down.replace(true) {
                    self.send(ClusterEvent::Down {
                        reason: e.to_string(),
                    });
                }
                None
            }
        };
        if first.is_some() {
            // The first publish need not wait for a connection (and a refused one shows at
            // start, in the log).
            glommio::spawn_local(self.clone().warm_commands()).detach();
        }
        glommio::spawn_local(self.clone().run_subscriber(first)).detach();
    }

    /// Takes `room` off this node (its slot moved): no longer subscribed here after a
    /// reconnect; an UNSUBSCRIBE goes out if the link is up (harmless when Redis dropped
    /// the subscription already).
    pub(super) fn forget(&self, room: &str) {
        if self.sub.borrow_mut().rooms.remove(room) {
            self.drop_stray(room);
        }
    }

    /// The node left the cluster's map: its subscriber task ends, its connections close.
    pub(super) fn retire(&self) {
        self.retired.set(true);
        self.sub.borrow_mut().rooms.clear();
        if let Some(writer) = self.sub.borrow().writer.clone() {
            let limit = self.opts().command_timeout;
            glommio::spawn_local(async move {
                let _ = within(limit, async { writer.lock().await.close().await }).await;
            })
            .detach();
        }
        if let Some(mut commands) = self.commands.try_lock() {
            commands.conn = None;
        }
    }

    pub(super) fn opts(&self) -> &RedisOptions {
        self.cluster.options()
    }

    /// Whether the node's tasks should end: the client was closed, or the node left the
    /// cluster's map.
    pub(super) fn is_stopped(&self) -> bool {
        self.cluster.is_closed() || self.retired.get()
    }

    /// SUBSCRIBE / UNSUBSCRIBE, or their sharded forms.
    pub(super) fn subscribe_command(&self, subscribe: bool) -> &'static str {
        options::subscribe_command(self.sharded, subscribe)
    }

    /// PUBLISH or SPUBLISH.
    pub(super) fn publish_command(&self) -> &'static str {
        options::publish_command(self.sharded)
    }

    pub(super) fn link_down(&self, room: &str) -> ClusterError {
        ClusterError::Unavailable(format!(
            "the pub/sub link to {} is down; {room:?} will be subscribed when it is back",
            self.name
        ))
    }

    pub(super) fn timed_out(&self, what: &str) -> ClusterError {
        ClusterError::Timeout(format!(
            "redis at {} did not answer {what} within {:?}",
            self.name,
            self.opts().command_timeout
        ))
    }

    /// A [`ClusterError`] for `e` that says what went wrong with `what` at this node.
    pub(super) fn classify(&self, e: &redis::RedisError, what: &str) -> ClusterError {
        classify(e, &self.name, what, self.opts().command_timeout)
    }

    /// A new connection named `corelay:<host>:shard<N>:<role>`, within `connect_timeout`
    /// (AUTH and SELECT included).
    pub(super) async fn connect(&self, what: &str, role: &str) -> Result<RespConn, ClusterError> {
        connect(
            &self.cluster,
            self.shard,
            &self.target,
            &self.name,
            what,
            role,
        )
        .await
    }

    pub(super) fn send(&self, event: ClusterEvent) {
        let _ = self.events.unbounded_send(event);
    }

    /// Asks the shard's topology task to read the cluster's map again (a cluster's only);
    /// `orphan`: a room this node stopped serving, to subscribe again wherever it is now.
    pub(super) fn ask_refresh(&self, orphan: Option<&str>) {
        if let Some(requests) = &self.requests {
            requests.ask(orphan);
        }
    }
}

/// A new connection to `target` named `corelay:<host>:shard<N>:<role>`, within
/// `connect_timeout` (AUTH and SELECT included); `name` says where for messages.
pub(super) async fn connect(
    cluster: &RedisCluster,
    shard: usize,
    target: &ShardTarget,
    name: &str,
    what: &str,
    role: &str,
) -> Result<RespConn, ClusterError> {
    let timeout = cluster.options().command_timeout;
    let conn_name = format!(
        "corelay:{}:shard{shard}:{role}",
        cluster
            .host_id()
            .replace(|c: char| !c.is_ascii_graphic(), "_"),
    );
    let attempt = async {
        let (addrs, tls) = match &target.addr {
            ShardAddr::Unix(path) => {
                return RespConn::connect(Endpoint::Unix(path), &target.info, &conn_name)
                    .await
                    .map_err(|e| classify(&e, name, what, timeout));
            }
            ShardAddr::Tcp { host, port, tls } => match host.parse::<IpAddr>() {
                Ok(ip) => (vec![SocketAddr::new(ip, *port)], tls.as_ref()),
                Err(_) => (cluster.resolve(host.clone(), *port).await?, tls.as_ref()),
            },
        };
        let mut last = None;
        for addr in addrs {
            let to = Endpoint::Tcp { addr, tls };
            match RespConn::connect(to, &target.info, &conn_name).await {
                Ok(conn) => return Ok(conn),
                Err(e) => last = Some(classify(&e, name, what, timeout)),
            }
        }
        Err(last.unwrap_or_else(|| {
            ClusterError::Unavailable(format!("redis at {name} resolves to no address"))
        }))
    };
    let limit = cluster.options().connect_timeout;
    within(limit, attempt).await.unwrap_or_else(|| {
        Err(ClusterError::Timeout(format!(
            "connecting to redis at {name} took longer than {limit:?}"
        )))
    })
}
