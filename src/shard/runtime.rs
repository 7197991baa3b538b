//! Starting the process: check the kernel, bind the port once per shard
//! (SO_REUSEPORT, so the kernel spreads accepts), start one pinned glommio executor
//! per shard, join them in a channel mesh, and report when all are accepting.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};
use glommio::channels::local_channel::{self, LocalSender};
use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};
use thiserror::Error;

use super::{Shard, ShardParts};
use crate::chat::emits::{EmitFanout, EmitReceiver};
use crate::chat::handler::ChatHandler;
use crate::chat::home::{Home, HomeLimits, HomeParts, Sequencer};
use crate::chat::mesh::{home_of, ShardMsg};
use crate::cluster::redis::RedisCluster;
use crate::cluster::shard_link::ShardLink;
use crate::cluster::ClusterEvent;
use crate::conformance::Conformance;
use crate::context::Context;
use crate::feed::{ClusterLedger, Feed, Ledger};
use crate::hooks::{Backend, Hooks};
use crate::ids::MessageIds;
use crate::store::Store;
use crate::transport::budget::ShardBudget;
use crate::transport::engine::EngineHandler;

/// Capacity of each shard-to-shard channel; a full one is backpressure on the sender.
const MESH_CHANNEL: usize = 4096;

/// Why the server could not start; each says what to do.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("io_uring is not available ({0}): corelay needs Linux 5.8+ with io_uring enabled (check kernel.io_uring_disabled and seccomp/container policy)")]
    NoIoUring(String),
    #[error("cannot listen on {addr}: port already in use")]
    PortInUse { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start shard {shard}: {message} (is the locked-memory limit `ulimit -l` large enough for 3 × {shards} shards × server.io_memory?)")]
    Executor {
        shard: usize,
        shards: usize,
        message: String,
    },
    #[error("shard {shard} failed: {message}")]
    Shard { shard: usize, message: String },
}

/// Checks that io_uring can be set up, so that glommio does not panic with a
/// misleading "kernel too old" later.
pub fn check_io_uring() -> Result<(), StartError> {
    let mut params = [0u8; 120]; // struct io_uring_params
                                 // SAFETY: io_uring_setup reads and writes `params`, which is large enough.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(StartError::NoIoUring(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    // SAFETY: the fd was just returned to us.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

/// Binds `count` listening sockets to one address with SO_REUSEPORT. Port 0 is
/// resolved once, so every shard listens on the same port.
pub fn bind_listeners(
    addr: SocketAddr,
    count: usize,
) -> Result<(SocketAddr, Vec<RawFd>), StartError> {
    use socket2::{Domain, Socket, Type};
    let bind_err = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            StartError::PortInUse { addr }
        } else {
            StartError::Bind { addr, source }
        }
    };
    // A plain bind first: SO_REUSEPORT alone would let us share a port another process holds.
    let probe = std::net::TcpListener::bind(addr).map_err(bind_err)?;
    let actual = probe.local_addr().map_err(bind_err)?;
    drop(probe);
    let mut fds = Vec::with_capacity(count);
    for _ in 0..count {
        let socket =
            Socket::new(Domain::for_address(actual), Type::STREAM, None).map_err(bind_err)?;
        socket.set_reuse_address(true).map_err(bind_err)?;
        socket.set_reuse_port(true).map_err(bind_err)?;
        socket.bind(&actual.into()).map_err(bind_err)?;
        socket.listen(4096).map_err(bind_err)?;
        fds.push(socket.into_raw_fd());
    }
    Ok((actual, fds))
}

/// The application's backend as the shards reach it: the hooks' and the feed's endpoints
/// (each `None` when off). Each shard makes its own clients of them.
#[derive(Clone, Default)]
pub struct Backends {
    /// `hooks.url`, when a hook is on.
    pub hooks: Option<Arc<Backend>>,
    /// `feed.url`, when the feed is on.
    pub feed: Option<Arc<Backend>>,
}

/// Runs the shards until they stop. `on_ready` is called once every shard accepts.
pub fn run_shards(
    ctx: Arc<Context>,
    store: Store,
    cluster: Option<RedisCluster>,
    backends: Backends,
    fds: Vec<RawFd>,
    on_ready: impl FnOnce(),
) -> Result<(), StartError> {
    let count = fds.len();
    let cores: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let mesh: MeshBuilder<ShardMsg, _> = MeshBuilder::full(count, MESH_CHANNEL);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<usize, StartError>>();
    let mut emit_queues = emit_queues(&ctx, cluster.as_ref(), count);
    let mut handles = Vec::with_capacity(count);
    for (shard, fd) in fds.into_iter().enumerate() {
        // Pin only when the shards are one per CPU this process may use: with fewer, the
        // choice of cores would be arbitrary, and two such processes on one host would
        // share the first cores while the others idle.
        let placement = if ctx.config.server.pin_shards && count == cores.len() {
            Placement::Fixed(cores[shard])
        } else {
            Placement::Unbound
        };
        let ctx = ctx.clone();
        let store = store.clone();
        let cluster = cluster.clone();
        let backends = backends.clone();
        let mesh = mesh.clone();
        let ready = ready_tx.clone();
        let emits = emit_queues.get_mut(shard).and_then(Option::take);
        let builder = LocalExecutorBuilder::new(placement)
            .name(&format!("corelay-shard-{shard}"))
            .io_memory(ctx.config.server.io_memory)
            .ring_depth(256)
            .preempt_timer(Duration::from_millis(10));
        let handle = builder
            .spawn(move || async move {
                if let Err(e) = shard_main(
                    shard,
                    count,
                    ctx,
                    (store, cluster, backends),
                    emits,
                    mesh,
                    fd,
                    &ready,
                )
                .await
                {
                    let _ = ready.send(Err(e));
                }
            })
            .map_err(|e| StartError::Executor {
                shard,
                shards: count,
                message: e.to_string(),
            })?;
        handles.push(handle);
    }
    drop(ready_tx);
    let mut ready = 0;
    while ready < count {
        match ready_rx.recv() {
            Ok(Ok(_)) => ready += 1,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(StartError::Shard {
                    shard: ready,
                    message: "stopped during start-up".into(),
                })
            }
        }
    }
    on_ready();
    for (shard, h) in handles.into_iter().enumerate() {
        h.join().map_err(|e| StartError::Shard {
            shard,
            message: e.to_string(),
        })?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn shard_main(
    id: usize,
    count: usize,
    ctx: Arc<Context>,
    (store, cluster, backends): (Store, Option<RedisCluster>, Backends),
    emits: Option<EmitReceiver>,
    mesh: MeshBuilder<ShardMsg, Full>,
    fd: RawFd,
    ready: &std::sync::mpsc::Sender<Result<usize, StartError>>,
) -> Result<(), StartError> {
    let (senders, mut receivers) = join_mesh(id, mesh).await?;
    // SAFETY: the fd is a bound, listening socket created for this shard alone.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    let outboxes = spawn_outboxes(id, count, senders);
    // The feed's ledger: in Redis on a cluster, else the store's.
    let ledger = match &cluster {
        Some(c) => Ledger::Cluster(ClusterLedger::new(c.clone(), id, count)),
        None => Ledger::Local,
    };
    // Cluster mode: this shard's link and subscription stream, before any room is subscribed.
    let (link, cluster_events) = match cluster {
        Some(c) => {
            let (link, events) = ShardLink::start(c, id).await;
            (Some(link), Some(events))
        }
        None => (None, None),
    };
    let hooks = backends
        .hooks
        .map(|backend| Rc::new(Hooks::new(backend, ctx.metrics.clone(), id)));
    // The feed of the rooms this shard is home of, through its own client of feed.url.
    let feed = backends.feed.map(|backend| {
        let client: Rc<dyn crate::feed::Deliver> =
            Rc::new(Hooks::new(backend, ctx.metrics.clone(), id));
        Feed::new(
            id,
            Box::new(move |room: &str| home_of(room, count) == id),
            ledger,
            store.clone(),
            client,
            ctx.metrics.clone(),
        )
    });
    if let Some(feed) = &feed {
        glommio::spawn_local(feed.clone().run()).detach();
    }
    let shard = build_shard(id, count, ctx, (store, hooks, feed), link, outboxes);
    spawn_tasks(&shard, cluster_events, emits, &mut receivers);
    glommio::spawn_local(accept_loop(shard.clone(), listener)).detach();
    let _ = ready.send(Ok(id));
    shard.run_drain(fd).await;
    Ok(())
}

/// With `emitter.enabled` (cluster mode): one bounded queue of emits per shard, in shard
/// order, fed by the process's Redis link (which encodes each emit once); else none.
fn emit_queues(
    ctx: &Context,
    cluster: Option<&RedisCluster>,
    count: usize,
) -> Vec<Option<EmitReceiver>> {
    match cluster {
        Some(c) if ctx.config.emitter.enabled => {
            // A shard's emits may hold a quarter of its part of the memory budget.
            let bound = ctx.config.limits.memory_budget / count.max(1) / 4;
            let (fanout, queues) = EmitFanout::new(count, ctx.metrics.clone(), bound);
            c.on_emit(fanout.into_sink());
            queues.into_iter().map(Some).collect()
        }
        _ => (0..count).map(|_| None).collect(),
    }
}

/// Joins the channel mesh with the other shards: this shard's senders toward them and
/// its receivers from them.
async fn join_mesh(
    id: usize,
    mesh: MeshBuilder<ShardMsg, Full>,
) -> Result<(Senders<ShardMsg>, Receivers<ShardMsg>), StartError> {
    // glommio can park an executor whose mesh connection is still pending and miss the
    // peer's arrival (seen here: ~1 start in 6 under load hung forever). A ticking timer
    // bounds every park, so the pending connection is polled again.
    let joined = Rc::new(std::cell::Cell::new(false));
    let ticking = joined.clone();
    glommio::spawn_local(async move {
        while !ticking.get() {
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
    })
    .detach();
    let joining = mesh.join().await;
    joined.set(true);
    joining.map_err(|e| StartError::Shard {
        shard: id,
        message: format!("mesh join failed: {e}"),
    })
}

/// One outbox per shard (`None` for shard `id` itself): an unbounded local queue, drained
/// by a task of its own into the mesh channel toward that peer.
fn spawn_outboxes(
    id: usize,
    count: usize,
    senders: Senders<ShardMsg>,
) -> Vec<Option<LocalSender<ShardMsg>>> {
    let senders = Rc::new(senders);
    let mut outboxes = Vec::with_capacity(count);
    for peer in 0..count {
        if peer == id {
            outboxes.push(None);
            continue;
        }
        let (tx, rx) = local_channel::new_unbounded::<ShardMsg>();
        let senders = senders.clone();
        glommio::spawn_local(async move {
            while let Some(msg) = rx.recv().await {
                if senders.send_to(peer, msg).await.is_err() {
                    break;
                }
            }
        })
        .detach();
        outboxes.push(Some(tx));
    }
    outboxes
}

/// Shard `id`: its home (sequencing through `link` in cluster mode), its handler (chat,
/// or the conformance server's), its outboxes toward the other shards, and its client of
/// the application's backend (when a hook is on).
fn build_shard(
    id: usize,
    count: usize,
    ctx: Arc<Context>,
    (store, hooks, feed): (Store, Option<Rc<Hooks>>, Option<Rc<Feed>>),
    link: Option<ShardLink>,
    outboxes: Vec<Option<LocalSender<ShardMsg>>>,
) -> Rc<Shard> {
    let share = ctx.config.limits.memory_budget / count.max(1);
    let budget = ShardBudget::for_shard(share, &ctx.metrics, id);
    let home = Home::new(HomeParts {
        shard: id,
        count,
        store: store.clone(),
        metrics: ctx.metrics.clone(),
        ids: MessageIds::new(ctx.id_prefix, id),
        limits: HomeLimits::from_config(&ctx.config),
        sequencer: Sequencer::new(link),
        feed,
        budget: Rc::new(budget),
    });
    let handler: Rc<dyn EngineHandler<Shard>> = if ctx.config.server.conformance {
        Rc::new(Conformance::default())
    } else {
        Rc::new(ChatHandler)
    };
    let parts = ShardParts {
        id,
        count,
        ctx,
        store,
        home,
        handler,
        outboxes,
        hooks,
    };
    Rc::new_cyclic(|me| Shard::new(parts, me.clone()))
}

/// The shard's tasks besides accepting: its cluster events (in cluster mode), the emits
/// from `@socket.io/redis-emitter` (`emitter.enabled`) and the other shards' messages
/// handed to it, its home's run loop, its sweeper.
fn spawn_tasks(
    shard: &Rc<Shard>,
    cluster_events: Option<mpsc::UnboundedReceiver<ClusterEvent>>,
    emits: Option<EmitReceiver>,
    receivers: &mut Receivers<ShardMsg>,
) {
    if let Some(mut emits) = emits {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            let queued = shard.ctx.metrics.emit_bytes[shard.id].clone();
            while let Some(emit) = emits.recv().await {
                // Taken: out of the emit queue's count (its frames count where they go).
                queued.taken(emit.frame.len());
                shard.chat.deliver_emit(&emit);
            }
        })
        .detach();
    }
    if let Some(mut events) = cluster_events {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            use futures::StreamExt as _;
            while let Some(event) = events.next().await {
                shard.chat.home.enqueue_cluster(event);
            }
        })
        .detach();
    }

    for (peer, rx) in receivers.streams() {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            let sent = shard.ctx.metrics.mesh_bytes[peer].clone();
            while let Some(msg) = rx.recv().await {
                // Taken: out of the sender's budget (what it leads to counts here).
                sent.taken(msg.weight());
                shard.handle(msg);
            }
        })
        .detach();
    }
    glommio::spawn_local(shard.chat.home.clone().run(shard.clone())).detach();
    glommio::spawn_local(shard.clone().run_sweeper()).detach();
    glommio::spawn_local(shard.clone().run_shedder()).detach();
}

/// Accepts connections until the shard drains, each served by a task of its own.
async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                glommio::spawn_local(crate::transport::connection::serve(shard.clone(), stream))
                    .detach();
            }
            Err(_)
                if shard
                    .ctx
                    .draining
                    .load(std::sync::atomic::Ordering::Relaxed) =>
            {
                break;
            }
            Err(e) => {
                tracing::warn!(shard = shard.id, error = %e, "accept failed");
                // Out of descriptors or memory: give connections a moment to close.
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
