//! A room's home shard: the one place that knows a room's state (next offset, members
//! per shard, who is present, recent `cid`s). It assigns offsets, stores messages in
//! group commits and fans each one out, encoded once, to the shards with members.
//!
//! [`Home`] owns what it needs (its shard's id and count, the store, the limits it reads,
//! its shard's metrics, message ids) and reaches other shards only through [`Mesh`], which
//! the shard layer implements and hands to [`Home::run`]. How a room's messages get their
//! offsets is its [`Sequencer`]:
//!
//! - **Local** (one host, `local.rs`): the home assigns offsets, dedupes by `cid` itself and
//!   appends to the store in group commits. Acks and deliveries go out only after the
//!   batch is durable.
//! - **Cluster** (`redis.url` set, `cluster.rs`, `echo.rs`): the writer runs Redis's
//!   publish script per message, in order (it dedupes by `cid`, assigns the offset,
//!   appends to the room's stream and publishes), and acks with its answer. With
//!   `store = "scylla"` the messages of a batch are written to ScyllaDB first (one group
//!   write; a retry's first send again), and acked only once that succeeded; a failed
//!   write answers `unavailable` and is retried in the background until ScyllaDB has it.
//!   Delivery comes only from the room's subscription, this host's own publishes included,
//!   strictly by offset: a gap is read from the store, and after a lost link
//!   (`Reconnected`) every loaded room catches up from the store. Presence goes through
//!   Redis (`presence_join/leave/list`), and so does typing (a volatile `t` notice on the
//!   room's channel, outside the offset order); a host ignores its own presence and typing
//!   echoes. The offline events of a dead host's users come from whichever host's presence
//!   script reaps it, and are told to every host's members. A room is subscribed while
//!   loaded, i.e. while it has members here or publishes in flight; the service task does
//!   every subscribe and unsubscribe, in order. A join while Redis is down loads the room
//!   without its offset (`RoomState::synced`), so members can join, type and leave;
//!   delivery resumes at the room's real offsets once the store answers again.
//!
//! Two tasks per home ([`Home::run`]): the *service* handles commands and store results
//! one at a time (so a room's joins and deliveries are strictly ordered), and the *writer*
//! takes every publish queued since its last write and hands it to the sequencer as one
//! batch.

mod cluster;
mod echo;
mod local;
mod room;
#[cfg(test)]
mod tests;

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};

use super::events::{error_ack_json, ChatError, ErrorCode};
use super::member::ConnRef;
use super::mesh::{HomeCmd, MemberMsg, ReplyTo, ShardMsg};
use crate::cluster::shard_link::ShardLink;
use crate::cluster::{ClusterError, ClusterEvent, Published};
use crate::ids::MessageIds;
use crate::metrics::{Metrics, ShardMetrics};
use crate::protocol::socketio::encode_ack;
use crate::store::{StoreError, StoredMessage};
use crate::transport::budget::{Charge, Pressure, Queue, ShardBudget};
use crate::transport::websocket::text_frame;

pub use cluster::ClusterSequencer;
use room::RoomState;

/// How a home reaches the shards: the shard layer implements it (a home never names a
/// shard type), tests record what a home sends.
pub trait Mesh {
    /// Sends `msg` to shard `to`. A message to the home's own shard must be handled in
    /// place, before this returns, so that it keeps its order with what the home sends next.
    fn send(&self, to: usize, msg: ShardMsg);
    /// Whether the queue toward shard `to` is full for new work: a publish is then refused
    /// rather than queued behind a slow shard.
    fn congested(&self, to: usize) -> bool;
}

/// The parts of the configuration a home reads.
#[derive(Debug, Clone, Copy)]
pub struct HomeLimits {
    /// Most missed messages a join with `since` gets back (`history.max_replay`).
    pub max_replay: usize,
    /// How long one host remembers a `(user, cid)` to answer retries with the first ack
    /// (`limits.dedupe_window`).
    pub dedupe_window: Duration,
    /// Most publishes waiting for the writer (`limits.mesh_outbox`): past it, while the
    /// store or Redis is slow, a publish is refused (`unavailable`) rather than held.
    pub max_pending: usize,
}

impl HomeLimits {
    /// The limits `config` sets.
    pub fn from_config(config: &crate::config::Config) -> HomeLimits {
        HomeLimits {
            max_replay: config.history.max_replay,
            dedupe_window: config.limits.dedupe_window.0,
            max_pending: config.limits.mesh_outbox,
        }
    }
}

/// How a home assigns offsets and delivers a room's messages.
pub enum Sequencer {
    /// One host: the home assigns offsets, dedupes `cid`s, appends group commits to the
    /// store and delivers once a batch is durable.
    Local,
    /// A cluster: Redis's publish script assigns offsets and dedupes `cid`s; delivery comes
    /// back, in offset order, through the room's subscription.
    Cluster(ClusterSequencer),
}

impl Sequencer {
    /// The sequencer for a shard: through Redis when it has a link, else local.
    pub fn new(link: Option<ShardLink>) -> Sequencer {
        match link {
            Some(link) => Sequencer::Cluster(ClusterSequencer::new(link)),
            None => Sequencer::Local,
        }
    }

    /// The most publishes handed to one write.
    fn max_batch(&self) -> usize {
        match self {
            Sequencer::Local => local::MAX_BATCH,
            Sequencer::Cluster(_) => cluster::MAX_CLUSTER_BATCH,
        }
    }
}

/// What a home is made of; the shard layer builds it.
pub struct HomeParts {
    /// The shard this home lives on.
    pub shard: usize,
    /// How many shards the process has (members may be on any of them).
    pub count: usize,
    /// The history store.
    pub store: crate::store::Store,
    /// The process's metrics; the home counts into `shards[shard]`.
    pub metrics: Arc<Metrics>,
    /// Ids for the messages this home sequences.
    pub ids: MessageIds,
    /// What it reads from the configuration.
    pub limits: HomeLimits,
    /// Local or through Redis.
    pub sequencer: Sequencer,
    /// The backend's feed of this shard's rooms, when on: told of each durable message.
    pub feed: Option<Rc<crate::feed::Feed>>,
    /// The shard's part of `limits.memory_budget`: the home counts what it holds.
    pub budget: Rc<ShardBudget>,
}

/// A publish waiting for the writer.
struct Pending {
    room: Arc<str>,
    user: Arc<str>,
    text: String,
    cid: Option<String>,
    to: ReplyTo,
    /// Its bytes in the shard's budget, until it is answered.
    charge: Charge,
}

impl Pending {
    /// What must be answered once the sequencer settled it (the text goes to the store).
    fn split(self) -> (Settled, String) {
        let Pending {
            room,
            user,
            text,
            cid,
            to,
            charge,
        } = self;
        (
            Settled {
                room,
                user,
                cid,
                to,
                _charge: charge,
            },
            text,
        )
    }
}

/// What a settled publish must answer.
struct Settled {
    room: Arc<str>,
    user: Arc<str>,
    cid: Option<String>,
    to: ReplyTo,
    /// The publish's bytes in the shard's budget (its text is in the store's or Redis's
    /// batch meanwhile), given back once it is answered.
    _charge: Charge,
}

/// Input to the service task, in the order it must be handled.
enum HomeEvent {
    /// A command, and its bytes in the shard's budget while it waits.
    Cmd(HomeCmd, Charge),
    Written(Vec<(Settled, StoredMessage)>),
    Failed(Vec<Settled>, StoreError),
    /// Cluster mode: the publish script answered (or failed) for one message, and the
    /// store made it durable (or failed to).
    Published(Settled, Result<Published, cluster::PublishError>),
    /// Cluster mode: an event of this shard's Redis subscription, and its bytes in the
    /// shard's budget while it waits.
    Cluster(ClusterEvent, Charge),
}

/// The home-shard state of one shard: its loaded rooms and the publishes in flight.
pub struct Home {
    shard: usize,
    count: usize,
    store: crate::store::Store,
    metrics: Arc<Metrics>,
    ids: MessageIds,
    limits: HomeLimits,
    sequencer: Sequencer,
    feed: Option<Rc<crate::feed::Feed>>,
    /// The shard's part of the memory budget (shared with its connections' queues).
    budget: Rc<ShardBudget>,
    rooms: RefCell<HashMap<Arc<str>, RoomState>>,
    /// Publishes accepted and not yet settled, over all rooms.
    inflight: Cell<usize>,
    pending: RefCell<VecDeque<Pending>>,
    writer_waker: RefCell<Option<Waker>>,
    events: LocalSender<HomeEvent>,
    /// The service task's input, until [`Home::run`] takes it.
    receiver: RefCell<Option<LocalReceiver<HomeEvent>>>,
    /// The shards, given by [`Home::run`]; weak, since the shard owns its home.
    mesh: OnceCell<Weak<dyn Mesh>>,
    /// This home's own `Rc`, for the tasks it spawns.
    me: Weak<Home>,
}

impl Home {
    /// A home with no rooms loaded. It does nothing until [`Home::run`].
    pub fn new(parts: HomeParts) -> Rc<Home> {
        let HomeParts {
            shard,
            count,
            store,
            metrics,
            ids,
            limits,
            sequencer,
            feed,
            budget,
        } = parts;
        let (events, receiver) = local_channel::new_unbounded();
        Rc::new_cyclic(|me| Home {
            shard,
            count,
            store,
            metrics,
            ids,
            limits,
            sequencer,
            feed,
            budget,
            rooms: RefCell::new(HashMap::new()),
            inflight: Cell::new(0),
            pending: RefCell::new(VecDeque::new()),
            writer_waker: RefCell::new(None),
            events,
            receiver: RefCell::new(Some(receiver)),
            mesh: OnceCell::new(),
            me: me.clone(),
        })
    }

    /// Queues an event of this shard's Redis subscription for the service task.
    pub fn enqueue_cluster(&self, event: ClusterEvent) {
        let charge = self.budget.charge(Queue::Home, event.weight());
        let _ = self.events.try_send(HomeEvent::Cluster(event, charge));
    }

    /// Queues a command for the service task (from this shard or another).
    pub fn enqueue(&self, cmd: HomeCmd) {
        // The receiver lives as long as the home; an unbounded local send cannot fail otherwise.
        let charge = self.budget.charge(Queue::Home, cmd.weight());
        let _ = self.events.try_send(HomeEvent::Cmd(cmd, charge));
    }

    /// The shard's part of the memory budget; the home counts what it holds there.
    pub fn budget(&self) -> &Rc<ShardBudget> {
        &self.budget
    }

    /// Commands and events waiting for the service task.
    pub fn queued(&self) -> usize {
        self.events.len()
    }

    /// Whether every accepted publish has been settled (acked or refused), and no failed
    /// durable write is waiting for its background retry (a drain waits for those too, up
    /// to its deadline).
    pub fn is_idle(&self) -> bool {
        let retrying = match &self.sequencer {
            Sequencer::Local => false,
            Sequencer::Cluster(c) => c.persist_retrying.get(),
        };
        self.inflight.get() == 0 && !retrying
    }

    /// Loaded rooms.
    pub fn room_count(&self) -> usize {
        self.rooms.borrow().len()
    }

    /// Runs the home's two tasks, the service and the writer, on the current executor;
    /// answers and deliveries go through `mesh`. Returns at once if it already runs.
    pub async fn run(self: Rc<Self>, mesh: Rc<dyn Mesh>) {
        let Some(events) = self.receiver.borrow_mut().take() else {
            tracing::error!(shard = self.shard, "home started twice");
            return;
        };
        let _ = self.mesh.set(Rc::downgrade(&mesh));
        glommio::spawn_local(self.clone().run_writer()).detach();
        // The service task holds the mesh alive while it runs.
        self.run_service(events).await;
        drop(mesh);
    }

    /// The service task: handles commands and store results in arrival order.
    async fn run_service(self: Rc<Self>, events: LocalReceiver<HomeEvent>) {
        while let Some(event) = events.recv().await {
            match event {
                HomeEvent::Cmd(cmd, charge) => self.handle_cmd(cmd, charge).await,
                HomeEvent::Written(done) => self.deliver(done),
                HomeEvent::Failed(failed, err) => self.fail(failed, &err),
                HomeEvent::Published(settled, result) => self.settle_published(settled, result),
                HomeEvent::Cluster(event, _charge) => {
                    if let Sequencer::Cluster(c) = &self.sequencer {
                        self.on_cluster_event(c, event).await;
                    }
                }
            }
            if let Sequencer::Cluster(c) = &self.sequencer {
                self.drop_subscriptions(c).await;
            }
        }
    }

    /// The writer task: takes what was published since its last write (up to the
    /// sequencer's batch size) and hands it to the sequencer as one batch.
    async fn run_writer(self: Rc<Self>) {
        let mut last_sent: Option<Instant> = None;
        loop {
            poll_fn(|cx| {
                if self.pending.borrow().is_empty() {
                    *self.writer_waker.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            if let Sequencer::Cluster(c) = &self.sequencer {
                // Busy: wait out the batch window, so that one script call carries more.
                let window = c.link.redis().options().batch_window;
                if let Some(wait) = last_sent.and_then(|at| window.checked_sub(at.elapsed())) {
                    if self.pending.borrow().len() < self.sequencer.max_batch() {
                        glommio::timer::sleep(wait).await;
                    }
                }
                last_sent = Some(Instant::now());
            }
            let batch: Vec<Pending> = {
                let mut pending = self.pending.borrow_mut();
                let n = pending.len().min(self.sequencer.max_batch());
                pending.drain(..n).collect()
            };
            match &self.sequencer {
                Sequencer::Local => self.write_batch(batch).await,
                Sequencer::Cluster(c) => self.publish_to_cluster(c, batch).await,
            }
        }
    }

    /// A publish: refused while a queue toward another shard is full, too many wait for
    /// the writer, or the shard is past half its part of the memory budget; else handed to
    /// the writer once its room is loaded (one host: unless its `cid` answers it first).
    async fn publish(&self, p: Pending) {
        let pressured = self.budget.state() == Pressure::Pressured;
        if pressured {
            ShardMetrics::inc(&self.metrics().budget_refusals);
        }
        if pressured
            || self.any_mesh_congested()
            || self.pending.borrow().len() >= self.limits.max_pending
        {
            self.reply_error(p.to, &super::handler::overloaded());
            return;
        }
        if let Err(e) = self.load_room(&p.room, false).await {
            self.reply_error(p.to, &e);
            return;
        }
        match &self.sequencer {
            // Redis dedupes by cid (the publish script) and assigns the offset.
            Sequencer::Cluster(_) => self.queue_publish(p),
            Sequencer::Local => {
                if let Some(p) = self.dedupe(p).await {
                    self.queue_publish(p);
                }
            }
        }
    }

    /// Hands a publish to the writer task.
    fn queue_publish(&self, p: Pending) {
        {
            let mut rooms = self.rooms.borrow_mut();
            let Some(r) = rooms.get_mut(&p.room) else {
                return;
            };
            r.inflight += 1;
        }
        self.inflight.set(self.inflight.get() + 1);
        self.pending.borrow_mut().push_back(p);
        if let Some(w) = self.writer_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// This shard's counters.
    fn metrics(&self) -> &ShardMetrics {
        &self.metrics.shards[self.shard]
    }

    /// Sends through the mesh (nothing before [`Home::run`], or once the shard is gone).
    fn send(&self, to: usize, msg: ShardMsg) {
        if let Some(mesh) = self.mesh.get().and_then(Weak::upgrade) {
            mesh.send(to, msg);
        }
    }

    /// Whether any queue toward another shard is full for new work (a home refuses a
    /// publish then: its deliveries would pile up behind a slow shard).
    fn any_mesh_congested(&self) -> bool {
        let Some(mesh) = self.mesh.get().and_then(Weak::upgrade) else {
            return false;
        };
        (0..self.count).any(|to| to != self.shard && mesh.congested(to))
    }

    /// Sends an ack body to whoever asked.
    fn reply(&self, to: ReplyTo, json: &[u8]) {
        match to {
            ReplyTo::Conn {
                conn,
                ack_id: Some(id),
            } => self.send(
                conn.shard,
                ShardMsg::Member(MemberMsg::Reply {
                    conn: conn.id,
                    frame: ack_frame(id, json),
                }),
            ),
            ReplyTo::Conn { ack_id: None, .. } => {}
            ReplyTo::Api(tx) => {
                let _ = tx.send(Bytes::copy_from_slice(json));
            }
        }
    }

    fn reply_error(&self, to: ReplyTo, err: &ChatError) {
        self.reply(to, &error_ack_json(err));
    }

    /// Sends a room event to every shard with members.
    fn broadcast(
        &self,
        room: &Arc<str>,
        per_shard: &[u32],
        frame: Bytes,
        except: Option<ConnRef>,
        volatile: bool,
    ) {
        let sent_at = Instant::now();
        for (shard, _) in per_shard.iter().enumerate().filter(|(_, n)| **n > 0) {
            self.send(
                shard,
                ShardMsg::Member(MemberMsg::Deliver {
                    room: room.clone(),
                    frame: frame.clone(),
                    except,
                    volatile,
                    sent_at,
                }),
            );
        }
    }

    /// Sends a room event to every shard with members of `room`, if it is loaded.
    fn broadcast_to_room(&self, room: &Arc<str>, frame: Bytes, except: Option<ConnRef>) {
        if let Some(r) = self.rooms.borrow().get(room) {
            self.broadcast(room, &r.per_shard, frame, except, false);
        }
    }
}

fn ack_frame(ack_id: u64, json: &[u8]) -> Bytes {
    text_frame(&encode_ack(ack_id, json))
}

fn error_frame(ack_id: u64, err: &ChatError) -> Bytes {
    ack_frame(ack_id, &error_ack_json(err))
}

/// The `42["message",{…}]` frame of a stored message, the same for every recipient.
fn message_frame(payload: &mut Vec<u8>, m: &StoredMessage) -> Bytes {
    payload.clear();
    payload.extend_from_slice(b"42[\"message\",");
    super::events::write_message_json(payload, m);
    payload.push(b']');
    text_frame(payload)
}

fn unavailable(e: &StoreError) -> ChatError {
    ChatError::new(ErrorCode::Unavailable, format!("history store: {e}"))
}

fn cluster_unavailable(e: &ClusterError) -> ChatError {
    ChatError::new(ErrorCode::Unavailable, format!("cluster: {e}"))
}
