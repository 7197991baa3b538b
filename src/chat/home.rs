//! A room's home shard: the one place that knows a room's state (next offset, members
//! per shard, who is present, recent `cid`s). It assigns offsets, stores messages in
//! group commits and fans each one out, encoded once, to the shards with members.
//!
//! Two tasks per shard: the *service* handles commands and store results one at a
//! time (so a room's joins and deliveries are strictly ordered), and the *writer* takes
//! every publish queued since its last write, assigns offsets and appends them to the
//! store as one batch. Acks and deliveries go out only after the batch is durable.
//!
//! Cluster mode (`redis.url` set): the writer runs Redis's publish script per message, in
//! order (it dedupes by `cid`, assigns the offset, appends to the room's stream and
//! publishes), and acks with its answer. With `store = "scylla"` the messages of a batch are
//! written to ScyllaDB first (one group write; a retry's first send again), and acked only
//! once that succeeded; a failed write answers `unavailable` and is retried in the
//! background until ScyllaDB has it. Delivery comes only from the room's subscription,
//! this host's own publishes included, strictly by offset: a gap is read from the store,
//! and after a lost link (`Reconnected`) every loaded room catches up from the store.
//! Presence goes through Redis (`presence_join/leave/list`), and so does typing (a
//! volatile `t` notice on the room's channel, outside the offset order); a host ignores
//! its own presence and typing echoes. The offline events of a dead host's users come from
//! whichever host's presence script reaps it, and are told to every host's members. A
//! room is subscribed while loaded, i.e. while it has members here or publishes in
//! flight; the service task does every subscribe and unsubscribe, in order.
//! A join while Redis is down loads the room without its offset (`RoomState::synced`), so
//! members can join, type and leave; delivery resumes at the room's real offsets once the
//! store answers again.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use glommio::channels::local_channel::{LocalReceiver, LocalSender};

use super::events::{
    error_ack_json, join_ack_json, message_ack_json, presence_ack_json, presence_event_json,
    typing_json, write_message_json, ChatError, ErrorCode, PresentUser,
};
use super::member::{ConnRef, User};
use super::mesh::{HomeCmd, MemberMsg, ReplyTo, ShardMsg};
use crate::cluster::shard_link::ShardLink;
use crate::cluster::{ClusterError, ClusterEvent, NewMessage, Published};
use crate::ids::{now_ms, MessageIds};
use crate::metrics::ShardMetrics;
use crate::protocol::socketio::{encode_ack, encode_event};
use crate::shard::Shard;
use crate::store::{HistoryQuery, HistoryStore, StoreError, StoredMessage};
use crate::transport::websocket::text_frame;

/// The most messages written to the store in one group commit.
const MAX_BATCH: usize = 1024;
/// Most messages one publish round trip to Redis carries (cluster mode). The script runs
/// atomically, so a batch holds Redis up for every other client while it runs: a few
/// hundred µs at this size.
const MAX_CLUSTER_BATCH: usize = 128;

enum CidState {
    /// Being written; retries wait here for the same ack.
    Pending(Vec<ReplyTo>),
    /// Stored: the first ack, handed back unchanged to retries.
    Done { ack: Bytes },
}

/// A present user: how many of their connections are in the room.
struct Presence {
    connections: u32,
    name: Option<Arc<str>>,
}

/// What the home shard keeps about one loaded room.
struct RoomState {
    /// The next offset to assign (the writer's).
    next: u64,
    /// The newest offset delivered to members (durable).
    delivered: u64,
    /// Publishes accepted and not yet settled; the room stays loaded while any are.
    inflight: usize,
    members: HashMap<ConnRef, Arc<str>>,
    per_shard: Vec<u32>,
    users: HashMap<Arc<str>, Presence>,
    cids: HashMap<(Arc<str>, String), CidState>,
    cid_expiry: VecDeque<(u64, Arc<str>, String)>,
    loaded_at: u64,
    /// A write failed: the store may or may not hold it (a timeout can land late), so the
    /// next offset is read back from the store before this room's next batch.
    reload_next: bool,
    /// Cluster mode: `false` while the room's latest offset is unknown (it was loaded while
    /// the store, i.e. Redis, could not be read; `delivered` is 0 then). Members may join
    /// (without `since`), type and leave; live delivery starts at the latest offset once
    /// the store answers or from the first message the subscription brings.
    synced: bool,
}

impl RoomState {
    /// A room loaded without its offset learns it; no-op once known.
    fn learn_offset(&mut self, latest: u64) {
        if !self.synced {
            self.synced = true;
            self.delivered = self.delivered.max(latest);
            self.next = self.next.max(latest + 1);
        }
    }
}

/// A publish waiting for the writer.
struct Pending {
    room: Arc<str>,
    user: Arc<str>,
    text: String,
    cid: Option<String>,
    to: ReplyTo,
}

/// What a settled publish must answer.
pub struct Settled {
    room: Arc<str>,
    user: Arc<str>,
    cid: Option<String>,
    to: ReplyTo,
}

/// Input to the service task, in the order it must be handled.
pub enum HomeEvent {
    Cmd(HomeCmd),
    Written(Vec<(Settled, StoredMessage)>),
    Failed(Vec<Settled>, StoreError),
    /// Cluster mode: the publish script answered (or failed) for one message, and the
    /// store made it durable (or failed to).
    Published(Settled, Result<Published, PublishError>),
    /// Cluster mode: an event of this shard's Redis subscription.
    Cluster(ClusterEvent),
}

/// Why a cluster-mode publish was not acked.
#[derive(Debug)]
pub enum PublishError {
    /// The publish script did not run (or its answer was lost): see [`ClusterError`].
    Cluster(ClusterError),
    /// The script stored and published the message, but the history store could not make
    /// it durable (`store = "scylla"`): a retry with the same `cid` gets its offset back.
    Store(StoreError),
}

/// Most published messages kept for a background retry of their ScyllaDB write, per shard.
const MAX_UNPERSISTED: usize = 10_000;

/// Delay between background retries of failed ScyllaDB writes.
const PERSIST_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Extra catch-up checks after the Redis link comes back (500 ms apart).
const CATCH_UP_ROUNDS: u32 = 2;

/// The home-shard state of one shard.
pub struct Home {
    rooms: RefCell<HashMap<Arc<str>, RoomState>>,
    /// Cluster mode: catch-up checks done since the last `Reconnected` from the link.
    catch_up_rounds: std::cell::Cell<u32>,
    /// Publishes accepted and not yet settled, over all rooms.
    inflight: std::cell::Cell<usize>,
    pending: RefCell<VecDeque<Pending>>,
    writer_waker: RefCell<Option<Waker>>,
    events: LocalSender<HomeEvent>,
    ids: MessageIds,
    /// Cluster mode: Redis assigns offsets and carries every delivery (`None`: one host).
    cluster: Option<ShardLink>,
    /// Cluster mode: ids of messages this shard published for a connection, waiting for
    /// their echo through Redis (so the sender's own socket is skipped).
    own_ids: RefCell<HashMap<String, ConnRef>>,
    /// Cluster mode: rooms evicted whose subscription is to be dropped by the service task
    /// (which also subscribes, so Redis sees the changes in order).
    unsubscribe: RefCell<Vec<Arc<str>>>,
    /// Cluster mode with ScyllaDB: published messages whose durable write failed (their
    /// senders got `unavailable`), written again in the background so the durable history
    /// gets them even when no sender retries. Bounded by [`MAX_UNPERSISTED`].
    unpersisted: RefCell<Vec<StoredMessage>>,
    /// Whether the background retry of `unpersisted` is running.
    persist_retrying: std::cell::Cell<bool>,
}

impl Home {
    /// A home with no rooms loaded; `events` feeds the service task.
    pub fn new(
        events: LocalSender<HomeEvent>,
        ids: MessageIds,
        cluster: Option<ShardLink>,
    ) -> Home {
        Home {
            rooms: RefCell::new(HashMap::new()),
            catch_up_rounds: std::cell::Cell::new(0),
            inflight: std::cell::Cell::new(0),
            pending: RefCell::new(VecDeque::new()),
            writer_waker: RefCell::new(None),
            events,
            ids,
            cluster,
            own_ids: RefCell::new(HashMap::new()),
            unsubscribe: RefCell::new(Vec::new()),
            unpersisted: RefCell::new(Vec::new()),
            persist_retrying: std::cell::Cell::new(false),
        }
    }

    /// Queues an event of this shard's Redis subscription for the service task.
    pub fn enqueue_cluster(&self, event: ClusterEvent) {
        let _ = self.events.try_send(HomeEvent::Cluster(event));
    }

    /// Queues a command for the service task (from this shard or another).
    pub fn enqueue(&self, cmd: HomeCmd) {
        // The receiver lives as long as the shard; an unbounded local send cannot fail otherwise.
        let _ = self.events.try_send(HomeEvent::Cmd(cmd));
    }

    /// Commands and events waiting for the service task.
    pub fn queued(&self) -> usize {
        self.events.len()
    }

    /// Whether every accepted publish has been settled (acked or refused), and no failed
    /// durable write is waiting for its background retry (a drain waits for those too, up
    /// to its deadline).
    pub fn is_idle(&self) -> bool {
        self.inflight.get() == 0 && !self.persist_retrying.get()
    }

    /// Loaded rooms.
    pub fn room_count(&self) -> usize {
        self.rooms.borrow().len()
    }
}

fn ack_frame(ack_id: u64, json: &[u8]) -> Bytes {
    text_frame(&encode_ack(ack_id, json))
}

fn error_frame(ack_id: u64, err: &ChatError) -> Bytes {
    ack_frame(ack_id, &error_ack_json(err))
}

fn unavailable(e: &StoreError) -> ChatError {
    ChatError::new(ErrorCode::Unavailable, format!("history store: {e}"))
}

fn cluster_unavailable(e: &ClusterError) -> ChatError {
    ChatError::new(ErrorCode::Unavailable, format!("cluster: {e}"))
}

/// The most messages read from the store per catch-up read.
const CATCH_UP_READ: usize = 1000;

impl Shard {
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

    fn metrics(&self) -> &ShardMetrics {
        &self.ctx.metrics.shards[self.id]
    }

    /// Makes sure a room is loaded (its latest offset read from the store). In cluster
    /// mode the room's channel is subscribed first, so that every message after the
    /// latest offset read here reaches this shard.
    ///
    /// `allow_unsynced` (cluster mode, joins): when the store cannot be read (Redis is
    /// down), load the room anyway with its offset unknown (see [`RoomState::synced`]) so
    /// that members can join and type locally; a later call tries the store again.
    async fn load_room(&self, room: &Arc<str>, allow_unsynced: bool) -> Result<(), ChatError> {
        let loaded = self.home.rooms.borrow().get(room).map(|r| r.synced);
        match loaded {
            Some(true) => return Ok(()),
            Some(false) => return self.sync_room(room, allow_unsynced).await,
            None => {}
        }
        if let Some(cluster) = &self.home.cluster {
            match cluster.subscribe(room).await {
                // Registered: subscribed again when the link is back (`Reconnected`).
                Ok(()) | Err(ClusterError::Unavailable(_) | ClusterError::Timeout(_)) => {}
                Err(e) => return Err(cluster_unavailable(&e)),
            }
        }
        let (latest, synced) = match self.store.latest_offset(room).await {
            Ok(latest) => (latest, true),
            Err(e) if allow_unsynced && self.home.cluster.is_some() => {
                ShardMetrics::inc(&self.metrics().store_errors);
                tracing::debug!(shard = self.id, %room, error = %e, "room loaded without its offset (store unreachable)");
                (0, false)
            }
            Err(e) => {
                ShardMetrics::inc(&self.metrics().store_errors);
                if self.home.cluster.is_some() {
                    self.home.unsubscribe.borrow_mut().push(room.clone());
                }
                return Err(unavailable(&e));
            }
        };
        let mut rooms = self.home.rooms.borrow_mut();
        // Another command may have loaded it while we waited (perhaps without its offset).
        let r = rooms.entry(room.clone()).or_insert_with(|| RoomState {
            next: latest + 1,
            delivered: latest,
            inflight: 0,
            members: HashMap::new(),
            per_shard: vec![0; self.count],
            users: HashMap::new(),
            cids: HashMap::new(),
            cid_expiry: VecDeque::new(),
            loaded_at: now_ms(),
            reload_next: false,
            synced,
        });
        if synced {
            r.learn_offset(latest);
        }
        self.metrics()
            .home_rooms
            .store(rooms.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// A loaded room whose offset is unknown: asks the store for it again. An error only
    /// when the store still cannot answer and the caller needs the offset.
    async fn sync_room(&self, room: &Arc<str>, allow_unsynced: bool) -> Result<(), ChatError> {
        match self.store.latest_offset(room).await {
            Ok(latest) => {
                self.mark_synced(room, latest);
                Ok(())
            }
            Err(e) => {
                ShardMetrics::inc(&self.metrics().store_errors);
                if allow_unsynced {
                    Ok(())
                } else {
                    Err(unavailable(&e))
                }
            }
        }
    }

    /// Cluster mode: a room loaded without its offset learns it (`latest`, from the store
    /// or just below the first message its subscription brought). Live delivery goes on
    /// from there; its members see older messages as a gap they can read with `history`.
    /// No-op for a room that knows its offset already.
    fn mark_synced(&self, room: &Arc<str>, latest: u64) {
        if let Some(r) = self.home.rooms.borrow_mut().get_mut(room) {
            r.learn_offset(latest);
        }
    }

    fn evict_if_idle(&self, room: &Arc<str>) {
        let mut rooms = self.home.rooms.borrow_mut();
        if rooms
            .get(room)
            .is_some_and(|r| r.members.is_empty() && r.inflight == 0)
        {
            rooms.remove(room);
            self.metrics()
                .home_rooms
                .store(rooms.len() as u64, std::sync::atomic::Ordering::Relaxed);
            if self.home.cluster.is_some() {
                self.home.unsubscribe.borrow_mut().push(room.clone());
            }
        }
    }

    /// Drops the subscriptions of rooms evicted meanwhile (unless loaded again).
    async fn drop_subscriptions(&self) {
        let Some(cluster) = &self.home.cluster else {
            return;
        };
        loop {
            let Some(room) = self.home.unsubscribe.borrow_mut().pop() else {
                return;
            };
            if self.home.rooms.borrow().contains_key(&room) {
                continue;
            }
            if let Err(e) = cluster.unsubscribe(&room).await {
                tracing::debug!(shard = self.id, %room, error = %e, "unsubscribe failed");
            }
        }
    }

    /// The service task: handles commands and store results in arrival order.
    pub async fn run_home(self: Rc<Self>, events: LocalReceiver<HomeEvent>) {
        while let Some(event) = events.recv().await {
            match event {
                HomeEvent::Cmd(cmd) => self.handle_cmd(cmd).await,
                HomeEvent::Written(done) => self.deliver(done),
                HomeEvent::Failed(failed, err) => self.fail(failed, &err),
                HomeEvent::Published(settled, result) => self.settle_published(settled, result),
                HomeEvent::Cluster(event) => self.on_cluster_event(event).await,
            }
            self.drop_subscriptions().await;
        }
    }

    async fn handle_cmd(&self, cmd: HomeCmd) {
        match cmd {
            HomeCmd::Join {
                room,
                conn,
                user,
                since,
                ack_id,
            } => self.join(room, conn, user, since, ack_id).await,
            HomeCmd::Leave { room, conn, ack_id } => {
                self.leave_and_announce(&room, conn).await;
                self.reply(ReplyTo::Conn { conn, ack_id }, super::events::OK_ACK);
            }
            HomeCmd::Publish {
                room,
                user,
                text,
                cid,
                reply,
            } => self.publish(room, user, text, cid, reply).await,
            HomeCmd::Typing { room, conn, user } => {
                let rooms = self.home.rooms.borrow();
                if let Some(r) = rooms.get(&room) {
                    if r.members.contains_key(&conn) {
                        let frame = text_frame(&encode_event("typing", &typing_json(&room, &user)));
                        self.broadcast(&room, &r.per_shard, frame, Some(conn), true);
                        if let Some(cluster) = &self.home.cluster {
                            // The other hosts' members; dropped while Redis is down.
                            cluster.redis().publish_typing(&room, &user);
                        }
                    }
                }
            }
            HomeCmd::Presence { room, reply } if self.home.cluster.is_some() => {
                let Some(cluster) = &self.home.cluster else {
                    return;
                };
                match cluster.redis().presence_list(&room).await {
                    Ok(list) => {
                        let users: Vec<PresentUser> = list
                            .into_iter()
                            .map(|p| PresentUser {
                                user: p.user,
                                name: p.name,
                            })
                            .collect();
                        self.reply(reply, &presence_ack_json(&users));
                    }
                    Err(e) => self.reply_error(reply, &cluster_unavailable(&e)),
                }
            }
            HomeCmd::Presence { room, reply } => {
                let users: Vec<PresentUser> = self
                    .home
                    .rooms
                    .borrow()
                    .get(&room)
                    .map(|r| {
                        let mut v: Vec<PresentUser> = r
                            .users
                            .iter()
                            .map(|(u, p)| PresentUser {
                                user: u.to_string(),
                                name: p.name.as_ref().map(|n| n.to_string()),
                            })
                            .collect();
                        v.sort_by(|a, b| a.user.cmp(&b.user));
                        v
                    })
                    .unwrap_or_default();
                self.reply(reply, &presence_ack_json(&users));
            }
        }
    }

    async fn join(
        &self,
        room: Arc<str>,
        conn: ConnRef,
        user: User,
        since: Option<u64>,
        ack_id: Option<u64>,
    ) {
        let refuse = |err: ChatError| {
            // The member shard waits for an answer to clear its pending join.
            let frame = ack_id.map(|id| error_frame(id, &err)).unwrap_or_default();
            self.send(
                conn.shard,
                ShardMsg::Member(MemberMsg::Joined {
                    room: room.clone(),
                    conn: conn.id,
                    frame,
                    admitted: false,
                }),
            );
        };
        if let Err(e) = self.load_room(&room, since.is_none()).await {
            refuse(e);
            return;
        }
        let mut announce = false;
        let offset = {
            let mut rooms = self.home.rooms.borrow_mut();
            let Some(r) = rooms.get_mut(&room) else {
                drop(rooms);
                refuse(ChatError::new(ErrorCode::Internal, "room vanished"));
                return;
            };
            if r.members.insert(conn, user.id.clone()).is_none() {
                r.per_shard[conn.shard] += 1;
                let p = r.users.entry(user.id.clone()).or_insert(Presence {
                    connections: 0,
                    name: user.name.clone(),
                });
                p.connections += 1;
                if p.connections == 1 && self.home.cluster.is_some() {
                    // Cluster-wide: announced only if no other host has the user here.
                    announce = true;
                } else if p.connections == 1 {
                    let frame = text_frame(&encode_event(
                        "presence",
                        &presence_event_json(&room, &user.id, true),
                    ));
                    self.broadcast(&room, &r.per_shard, frame, Some(conn), false);
                }
            }
            r.delivered
        };
        if announce {
            if let Some(cluster) = &self.home.cluster {
                match cluster
                    .redis()
                    .presence_join(&room, &user.id, user.name.as_deref())
                    .await
                {
                    Ok(true) => {
                        let frame = text_frame(&encode_event(
                            "presence",
                            &presence_event_json(&room, &user.id, true),
                        ));
                        if let Some(r) = self.home.rooms.borrow().get(&room) {
                            self.broadcast(&room, &r.per_shard, frame, Some(conn), false);
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::debug!(shard = self.id, %room, error = %e, "presence_join failed");
                    }
                }
            }
        }
        let missed = match since {
            None => None,
            Some(since) if since >= offset => Some((Vec::new(), false)),
            Some(since) => {
                let count = offset - since;
                let want = count.min(self.ctx.config.history.max_replay as u64) as usize;
                match self
                    .store
                    .read(&room, HistoryQuery::Before(offset + 1), want)
                    .await
                {
                    Ok(mut msgs) => {
                        msgs.retain(|m| m.offset > since && m.offset <= offset);
                        Some((msgs, count > want as u64))
                    }
                    Err(e) => {
                        ShardMetrics::inc(&self.metrics().store_errors);
                        // The member is in the room but cannot get its backlog: undo the join.
                        self.leave_and_announce(&room, conn).await;
                        refuse(unavailable(&e));
                        return;
                    }
                }
            }
        };
        let json = join_ack_json(
            &room,
            offset,
            missed.as_ref().map(|(m, t)| (m.as_slice(), *t)),
        );
        let frame = ack_id.map(|id| ack_frame(id, &json)).unwrap_or_default();
        self.send(
            conn.shard,
            ShardMsg::Member(MemberMsg::Joined {
                room,
                conn: conn.id,
                frame,
                admitted: true,
            }),
        );
    }

    /// A notice another host sent on a room's channel (presence, typing): event `name`
    /// with the JSON `json` makes, to this room's members on every shard. The notices
    /// this host sent itself come back too and are skipped: its members were told already.
    fn relay_from_host(
        &self,
        room: &str,
        host: &str,
        name: &str,
        volatile: bool,
        json: impl FnOnce() -> Vec<u8>,
    ) {
        let Some(cluster) = &self.home.cluster else {
            return;
        };
        if host == cluster.redis().host_id() {
            return;
        }
        if let Some((room, r)) = self.home.rooms.borrow().get_key_value(room) {
            let frame = text_frame(&encode_event(name, &json()));
            self.broadcast(room, &r.per_shard, frame, None, volatile);
        }
    }

    /// Removes a connection from a room and, in cluster mode, tells Redis when it was the
    /// user's last one on this host (the offline event goes out if it was the last anywhere).
    async fn leave_and_announce(&self, room: &Arc<str>, conn: ConnRef) {
        let Some(user) = self.leave(room, conn) else {
            return;
        };
        let Some(cluster) = &self.home.cluster else {
            return;
        };
        match cluster.redis().presence_leave(room, &user).await {
            Ok(true) => {
                let frame = text_frame(&encode_event(
                    "presence",
                    &presence_event_json(room, &user, false),
                ));
                if let Some(r) = self.home.rooms.borrow().get(room) {
                    self.broadcast(room, &r.per_shard, frame, None, false);
                }
            }
            Ok(false) => {}
            Err(e) => tracing::debug!(shard = self.id, %room, error = %e, "presence_leave failed"),
        }
    }

    /// Removes a connection from a room (no-op if it is not a member). Returns the user
    /// when it was their last connection in the room (the offline event is sent here on
    /// one host; in cluster mode the caller asks Redis first).
    fn leave(&self, room: &Arc<str>, conn: ConnRef) -> Option<Arc<str>> {
        let mut last = None;
        {
            let mut rooms = self.home.rooms.borrow_mut();
            let r = rooms.get_mut(room)?;
            let user = r.members.remove(&conn)?;
            r.per_shard[conn.shard] = r.per_shard[conn.shard].saturating_sub(1);
            let gone = match r.users.get_mut(&user) {
                Some(p) => {
                    p.connections -= 1;
                    p.connections == 0
                }
                None => false,
            };
            if gone {
                r.users.remove(&user);
                if self.home.cluster.is_none() {
                    let frame = text_frame(&encode_event(
                        "presence",
                        &presence_event_json(room, &user, false),
                    ));
                    self.broadcast(room, &r.per_shard, frame, None, false);
                }
                last = Some(user);
            }
        }
        self.evict_if_idle(room);
        last
    }

    async fn publish(
        &self,
        room: Arc<str>,
        user: Arc<str>,
        text: String,
        cid: Option<String>,
        to: ReplyTo,
    ) {
        if self.any_mesh_congested() {
            self.reply_error(to, &super::handler::overloaded());
            return;
        }
        if let Err(e) = self.load_room(&room, false).await {
            self.reply_error(to, &e);
            return;
        }
        if self.home.cluster.is_some() {
            // Redis dedupes by cid (the publish script) and assigns the offset.
            self.queue_publish(room, user, text, cid, to);
            return;
        }
        let window = self.ctx.config.limits.dedupe_window.0.as_millis() as u64;
        let now = now_ms();
        if let Some(cid) = &cid {
            let key = (user.clone(), cid.clone());
            let check_store = {
                let mut rooms = self.home.rooms.borrow_mut();
                let Some(r) = rooms.get_mut(&room) else {
                    return;
                };
                expire_cids(r, now.saturating_sub(window));
                match r.cids.get_mut(&key) {
                    Some(CidState::Done { ack }) => {
                        let ack = ack.clone();
                        drop(rooms);
                        self.reply(to, &ack);
                        return;
                    }
                    Some(CidState::Pending(waiters)) => {
                        waiters.push(to);
                        return;
                    }
                    // Sends stored before this room was loaded are only in the store.
                    None => now.saturating_sub(r.loaded_at) < window,
                }
            };
            if check_store {
                match self
                    .store
                    .find_cid(&room, &user, cid, now.saturating_sub(window))
                    .await
                {
                    Ok(Some(m)) => {
                        let ack = Bytes::from(message_ack_json(&m));
                        if let Some(r) = self.home.rooms.borrow_mut().get_mut(&room) {
                            r.cids
                                .insert(key.clone(), CidState::Done { ack: ack.clone() });
                            r.cid_expiry.push_back((m.ts, user.clone(), cid.clone()));
                        }
                        self.reply(to, &ack);
                        return;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        ShardMetrics::inc(&self.metrics().store_errors);
                        self.reply_error(to, &unavailable(&e));
                        return;
                    }
                }
            }
            let mut rooms = self.home.rooms.borrow_mut();
            let Some(r) = rooms.get_mut(&room) else {
                return;
            };
            // A retry may have arrived while we looked in the store.
            match r.cids.get_mut(&key) {
                Some(CidState::Pending(waiters)) => {
                    waiters.push(to);
                    return;
                }
                Some(CidState::Done { ack }) => {
                    let ack = ack.clone();
                    drop(rooms);
                    self.reply(to, &ack);
                    return;
                }
                None => {
                    r.cids.insert(key, CidState::Pending(Vec::new()));
                }
            }
        }
        self.queue_publish(room, user, text, cid, to);
    }

    /// Hands a publish to the writer task.
    fn queue_publish(
        &self,
        room: Arc<str>,
        user: Arc<str>,
        text: String,
        cid: Option<String>,
        to: ReplyTo,
    ) {
        {
            let mut rooms = self.home.rooms.borrow_mut();
            let Some(r) = rooms.get_mut(&room) else {
                return;
            };
            r.inflight += 1;
        }
        self.home.inflight.set(self.home.inflight.get() + 1);
        self.home.pending.borrow_mut().push_back(Pending {
            room,
            user,
            text,
            cid,
            to,
        });
        if let Some(w) = self.home.writer_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// The writer task: group commits. Offsets are assigned here, just before the write,
    /// so a failed write can give them back and streams never have gaps.
    pub async fn run_writer(self: Rc<Self>) {
        loop {
            poll_fn(|cx| {
                if self.home.pending.borrow().is_empty() {
                    *self.home.writer_waker.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            let batch: Vec<Pending> = {
                let mut pending = self.home.pending.borrow_mut();
                let max = if self.home.cluster.is_some() {
                    MAX_CLUSTER_BATCH
                } else {
                    MAX_BATCH
                };
                let n = pending.len().min(max);
                pending.drain(..n).collect()
            };
            if let Some(cluster) = &self.home.cluster {
                self.publish_to_cluster(cluster, batch).await;
                continue;
            }
            self.reload_failed_rooms(&batch).await;
            let mut firsts: Vec<(Arc<str>, u64)> = Vec::new();
            let mut settled = Vec::with_capacity(batch.len());
            let mut messages = Vec::with_capacity(batch.len());
            {
                let mut rooms = self.home.rooms.borrow_mut();
                for p in batch {
                    let Some(r) = rooms.get_mut(&p.room) else {
                        continue; // Cannot happen: a room with inflight publishes stays loaded.
                    };
                    if !firsts.iter().any(|(name, _)| *name == p.room) {
                        firsts.push((p.room.clone(), r.next));
                    }
                    let offset = r.next;
                    r.next += 1;
                    let ts = now_ms();
                    messages.push(StoredMessage {
                        room: p.room.to_string(),
                        offset,
                        id: self.home.ids.next(ts),
                        user: p.user.to_string(),
                        text: p.text,
                        ts,
                        cid: p.cid.clone(),
                    });
                    settled.push(Settled {
                        room: p.room,
                        user: p.user,
                        cid: p.cid,
                        to: p.to,
                    });
                }
            }
            let result = self.store.append(messages.clone()).await;
            let event = match result {
                Ok(()) => HomeEvent::Written(settled.into_iter().zip(messages).collect()),
                Err(e) => {
                    ShardMetrics::inc(&self.metrics().store_errors);
                    let mut rooms = self.home.rooms.borrow_mut();
                    for (room, first) in firsts {
                        if let Some(r) = rooms.get_mut(&room) {
                            r.next = first;
                            r.reload_next = true;
                        }
                    }
                    HomeEvent::Failed(settled, e)
                }
            };
            let _ = self.home.events.try_send(event);
        }
    }

    /// Cluster mode: publishes the batch in one round trip to Redis (one script call per
    /// room; a room's messages get consecutive offsets in the order they were sent, so one
    /// connection's messages are accepted in its order), makes what it stored durable in
    /// the history store (one group write for the batch; a no-op for the `redis` store) and
    /// hands each outcome to the service task. Delivery comes back through the
    /// subscription.
    async fn publish_to_cluster(&self, cluster: &ShardLink, batch: Vec<Pending>) {
        let mut msgs = Vec::with_capacity(batch.len());
        let mut settle = Vec::with_capacity(batch.len());
        for p in batch {
            let ts = now_ms();
            let id = self.home.ids.next(ts);
            if let Some(conn) = p.to.conn() {
                self.home.own_ids.borrow_mut().insert(id.clone(), conn);
            }
            // Never below what this host delivered already, even if Redis lost the room.
            let floor = self
                .home
                .rooms
                .borrow()
                .get(&p.room)
                .map_or(0, |r| r.delivered);
            msgs.push((
                NewMessage {
                    room: p.room.to_string(),
                    user: p.user.to_string(),
                    text: p.text,
                    cid: p.cid.clone(),
                    ts,
                    id: id.clone(),
                },
                floor,
            ));
            let settled = Settled {
                room: p.room,
                user: p.user,
                cid: p.cid,
                to: p.to,
            };
            settle.push((settled, id));
        }
        let results = cluster.publish_batch(msgs).await;
        let mut stored: Vec<(Settled, Published)> = Vec::new();
        for ((settled, id), result) in settle.into_iter().zip(results) {
            if !matches!(result, Ok(Published::Stored(_))) {
                self.home.own_ids.borrow_mut().remove(&id);
            }
            let outcome = match result {
                Ok(published @ Published::Stored(_)) => {
                    stored.push((settled, published));
                    continue;
                }
                // The first send's durable write may have failed: write it again first.
                Ok(Published::Duplicate(ack)) => match settled.cid.as_deref() {
                    Some(cid) => self
                        .store
                        .persist_duplicate(&settled.room, &settled.user, cid, ack.offset)
                        .await
                        .map(|()| Published::Duplicate(ack))
                        .map_err(PublishError::Store),
                    None => Ok(Published::Duplicate(ack)),
                },
                Err(e) => Err(PublishError::Cluster(e)),
            };
            let _ = self
                .home
                .events
                .try_send(HomeEvent::Published(settled, outcome));
        }
        if stored.is_empty() {
            return;
        }
        let stored_messages = || {
            stored.iter().filter_map(|(_, p)| match p {
                Published::Stored(m) => Some(m.clone()),
                Published::Duplicate(_) => None,
            })
        };
        // The `redis` store has them already (the script's stream write): no copy, no call.
        let persisted = if self.store.persists_published() {
            self.store
                .persist_published(stored_messages().collect())
                .await
        } else {
            Ok(())
        };
        if let Err(e) = &persisted {
            tracing::warn!(shard = self.id, count = stored.len(), error = %e,
                "published messages are not durable yet: senders get unavailable; writing them again in the background");
            self.retry_persist_later(stored_messages().collect());
        }
        for (settled, published) in stored {
            let outcome = match &persisted {
                Ok(()) => Ok(published),
                Err(e) => Err(PublishError::Store(e.clone())),
            };
            let _ = self
                .home
                .events
                .try_send(HomeEvent::Published(settled, outcome));
        }
    }

    /// Keeps published messages whose durable write failed, and makes sure a background
    /// task writes them again (every [`PERSIST_RETRY`], until it succeeds). Past
    /// [`MAX_UNPERSISTED`] the oldest are dropped, with an error in the log: they stay in
    /// the Redis stream until it is trimmed, and a sender's retry with its `cid` still
    /// writes its own.
    fn retry_persist_later(&self, messages: Vec<StoredMessage>) {
        {
            let mut unpersisted = self.home.unpersisted.borrow_mut();
            unpersisted.extend(messages);
            if unpersisted.len() > MAX_UNPERSISTED {
                let dropped = unpersisted.len() - MAX_UNPERSISTED;
                unpersisted.drain(..dropped);
                tracing::error!(
                    shard = self.id,
                    dropped,
                    "too many messages waiting for their durable write: the oldest are no \
                     longer retried (they stay in the Redis stream until trimmed)"
                );
            }
        }
        if self.home.persist_retrying.replace(true) {
            return;
        }
        let Some(shard) = self.this() else {
            self.home.persist_retrying.set(false);
            return;
        };
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(PERSIST_RETRY).await;
                let batch = std::mem::take(&mut *shard.home.unpersisted.borrow_mut());
                if batch.is_empty() {
                    break;
                }
                let count = batch.len();
                match shard.store.persist_published(batch.clone()).await {
                    Ok(()) => {
                        tracing::info!(shard = shard.id, count, "background durable write done");
                        if shard.home.unpersisted.borrow().is_empty() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(shard = shard.id, count, error = %e, "background durable write failed; retrying");
                        let mut unpersisted = shard.home.unpersisted.borrow_mut();
                        let newer = std::mem::replace(&mut *unpersisted, batch);
                        unpersisted.extend(newer);
                        let excess = unpersisted.len().saturating_sub(MAX_UNPERSISTED);
                        unpersisted.drain(..excess);
                    }
                }
            }
            shard.home.persist_retrying.set(false);
        })
        .detach();
    }

    /// Cluster mode: acks one publish (the first ack for a duplicate cid) or refuses it.
    fn settle_published(&self, s: Settled, result: Result<Published, PublishError>) {
        if let Some(r) = self.home.rooms.borrow_mut().get_mut(&s.room) {
            r.inflight -= 1;
        }
        self.home.inflight.set(self.home.inflight.get() - 1);
        match result {
            Ok(published) => {
                if matches!(published, Published::Stored(_)) {
                    ShardMetrics::inc(&self.metrics().messages_in);
                }
                let ack = published.ack();
                let json = message_ack_json(&StoredMessage {
                    room: s.room.to_string(),
                    offset: ack.offset,
                    id: ack.id,
                    user: s.user.to_string(),
                    text: String::new(),
                    ts: ack.ts,
                    cid: s.cid,
                });
                self.reply(s.to, &json);
            }
            Err(e) => {
                ShardMetrics::inc(&self.metrics().store_errors);
                let err = match &e {
                    PublishError::Cluster(e) => cluster_unavailable(e),
                    PublishError::Store(e) if s.cid.is_some() => ChatError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "history store: {e} (the message was published but is not durable \
                             yet: a retry with the same cid gets its ack once it is)"
                        ),
                    ),
                    PublishError::Store(e) => ChatError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "history store: {e} (the message was published but is not durable \
                             yet; send a cid to make retries safe)"
                        ),
                    ),
                };
                self.reply_error(s.to, &err);
            }
        }
        self.evict_if_idle(&s.room);
    }

    /// Cluster mode: one event of this shard's subscription.
    async fn on_cluster_event(&self, event: ClusterEvent) {
        match event {
            ClusterEvent::Message(m) => {
                let room: Arc<str> = Arc::from(m.room.as_str());
                let delivered = self.home.rooms.borrow().get(&room).map(|r| r.delivered);
                let Some(delivered) = delivered else {
                    self.home.own_ids.borrow_mut().remove(&m.id);
                    return;
                };
                // Loaded while Redis was down: live delivery starts with this message.
                self.mark_synced(&room, m.offset.saturating_sub(1));
                let delivered = self
                    .home
                    .rooms
                    .borrow()
                    .get(&room)
                    .map_or(delivered, |r| r.delivered);
                if m.offset <= delivered {
                    return; // Delivered already (a catch-up read got it first).
                }
                if m.offset > delivered + 1 && !self.catch_up(&room, m.offset - 1).await {
                    // The gap cannot be read yet (the command link may still be coming
                    // back): hold this message and try again shortly. Delivering it now
                    // would skip the gap for good.
                    if let Some(shard) = self.this() {
                        glommio::spawn_local(async move {
                            glommio::timer::sleep(std::time::Duration::from_millis(200)).await;
                            shard.home.enqueue_cluster(ClusterEvent::Message(m));
                        })
                        .detach();
                    }
                    return;
                }
                self.deliver_in_order(&room, vec![m]);
            }
            ClusterEvent::Presence {
                room,
                user,
                online,
                host,
                ..
            } => self.relay_from_host(&room, &host, "presence", false, || {
                presence_event_json(&room, &user, online)
            }),
            ClusterEvent::Typing { room, user, host } => {
                self.relay_from_host(&room, &host, "typing", true, || typing_json(&room, &user))
            }
            ClusterEvent::Down { reason } => {
                self.metrics()
                    .redis_link_down
                    .store(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(shard = self.id, %reason, "redis link down: sends refused until it is back");
            }
            ClusterEvent::Reconnected => {
                self.metrics()
                    .redis_link_down
                    .store(0, std::sync::atomic::Ordering::Relaxed);
                let rooms: Vec<Arc<str>> = self.home.rooms.borrow().keys().cloned().collect();
                tracing::info!(
                    shard = self.id,
                    rooms = rooms.len(),
                    "redis link back: delivering what was missed"
                );
                let mut failed = false;
                for room in rooms {
                    match self.store.latest_offset(&room).await {
                        Ok(latest) => {
                            // A room loaded while Redis was down starts from `latest`.
                            self.mark_synced(&room, latest);
                            if !self.catch_up(&room, latest).await {
                                failed = true;
                            }
                        }
                        Err(e) => {
                            failed = true;
                            ShardMetrics::inc(&self.metrics().store_errors);
                            tracing::warn!(shard = self.id, %room, error = %e, "catch-up failed; retrying");
                        }
                    }
                }
                // The command link and the subscription come back separately: check again
                // shortly (and keep retrying while the store cannot answer), so a message
                // published in between is delivered live and not only through `since`.
                let again = self.home.catch_up_rounds.get();
                if failed || again < CATCH_UP_ROUNDS {
                    self.home
                        .catch_up_rounds
                        .set(if failed { 0 } else { again + 1 });
                    if let Some(shard) = self.this() {
                        glommio::spawn_local(async move {
                            glommio::timer::sleep(std::time::Duration::from_millis(500)).await;
                            shard.home.enqueue_cluster(ClusterEvent::Reconnected);
                        })
                        .detach();
                    }
                } else {
                    self.home.catch_up_rounds.set(0);
                }
            }
        }
    }

    /// Cluster mode: delivers a loaded room's messages from the store up to offset `upto`.
    /// Offsets the store no longer has (trimmed) are skipped: members see the gap. False
    /// when the store could not be read (nothing was skipped; try again later).
    async fn catch_up(&self, room: &Arc<str>, upto: u64) -> bool {
        loop {
            let delivered = self.home.rooms.borrow().get(room).map(|r| r.delivered);
            let Some(delivered) = delivered else {
                return true;
            };
            if delivered >= upto {
                return true;
            }
            let want = ((upto - delivered) as usize).min(CATCH_UP_READ);
            match self
                .store
                .read(room, HistoryQuery::After(delivered), want)
                .await
            {
                Ok(mut msgs) => {
                    msgs.retain(|m| m.offset > delivered && m.offset <= upto);
                    if msgs.is_empty() {
                        if let Some(r) = self.home.rooms.borrow_mut().get_mut(room) {
                            r.delivered = r.delivered.max(upto);
                        }
                        return true;
                    }
                    tracing::debug!(shard = self.id, %room, count = msgs.len(), after = delivered, "delivering from the store");
                    self.deliver_in_order(room, msgs);
                }
                Err(e) => {
                    ShardMetrics::inc(&self.metrics().store_errors);
                    tracing::warn!(shard = self.id, %room, error = %e, "catch-up read failed");
                    return false;
                }
            }
        }
    }

    /// Cluster mode: fans out messages (oldest first) above the room's delivered offset.
    fn deliver_in_order(&self, room: &Arc<str>, msgs: Vec<StoredMessage>) {
        let mut payload = Vec::with_capacity(256);
        let mut rooms = self.home.rooms.borrow_mut();
        let Some(r) = rooms.get_mut(room) else { return };
        for m in msgs {
            let except = self.home.own_ids.borrow_mut().remove(&m.id);
            if m.offset <= r.delivered {
                continue;
            }
            r.delivered = m.offset;
            payload.clear();
            payload.extend_from_slice(b"42[\"message\",");
            write_message_json(&mut payload, &m);
            payload.push(b']');
            self.broadcast(room, &r.per_shard, text_frame(&payload), except, false);
        }
    }

    /// Before writing to rooms whose last write failed, asks the store for their latest
    /// offset: a write reported failed may still have landed, and its offsets must not be
    /// handed out again. (The members see the gap and can read those messages back.)
    async fn reload_failed_rooms(&self, batch: &[Pending]) {
        let mut stale: Vec<Arc<str>> = Vec::new();
        {
            let rooms = self.home.rooms.borrow();
            for p in batch {
                if rooms.get(&p.room).is_some_and(|r| r.reload_next) && !stale.contains(&p.room) {
                    stale.push(p.room.clone());
                }
            }
        }
        for room in stale {
            // On failure keep the flag: the next batch tries again (and will fail or not).
            if let Ok(latest) = self.store.latest_offset(&room).await {
                if let Some(r) = self.home.rooms.borrow_mut().get_mut(&room) {
                    r.next = r.next.max(latest + 1);
                    r.reload_next = false;
                }
            }
        }
    }

    /// A batch is durable: ack the senders (and waiting retries), fan out, encoded once.
    fn deliver(&self, done: Vec<(Settled, StoredMessage)>) {
        let mut touched: Vec<Arc<str>> = Vec::new();
        let mut payload = Vec::with_capacity(256);
        for (s, m) in done {
            let ack = Bytes::from(message_ack_json(&m));
            payload.clear();
            payload.extend_from_slice(b"42[\"message\",");
            write_message_json(&mut payload, &m);
            payload.push(b']');
            let frame = text_frame(&payload);
            let mut waiters = Vec::new();
            {
                let mut rooms = self.home.rooms.borrow_mut();
                let Some(r) = rooms.get_mut(&s.room) else {
                    continue;
                };
                r.delivered = m.offset;
                r.inflight -= 1;
                self.home.inflight.set(self.home.inflight.get() - 1);
                if let Some(cid) = s.cid {
                    let key = (s.user.clone(), cid);
                    if let Some(CidState::Pending(w)) = r
                        .cids
                        .insert(key.clone(), CidState::Done { ack: ack.clone() })
                    {
                        waiters = w;
                    }
                    r.cid_expiry.push_back((m.ts, key.0, key.1));
                }
                self.broadcast(&s.room, &r.per_shard, frame, s.to.conn(), false);
            }
            ShardMetrics::inc(&self.metrics().messages_in);
            self.reply(s.to, &ack);
            for w in waiters {
                self.reply(w, &ack);
            }
            if !touched.contains(&s.room) {
                touched.push(s.room);
            }
        }
        for room in touched {
            self.evict_if_idle(&room);
        }
    }

    /// A batch could not be stored: nothing of it exists; every sender gets `unavailable`.
    fn fail(&self, failed: Vec<Settled>, err: &StoreError) {
        let chat_err = unavailable(err);
        let mut touched: Vec<Arc<str>> = Vec::new();
        for s in failed {
            let mut waiters = Vec::new();
            if let Some(r) = self.home.rooms.borrow_mut().get_mut(&s.room) {
                r.inflight -= 1;
                self.home.inflight.set(self.home.inflight.get() - 1);
                if let Some(cid) = s.cid {
                    if let Some(CidState::Pending(w)) = r.cids.remove(&(s.user.clone(), cid)) {
                        waiters = w;
                    }
                }
            }
            self.reply_error(s.to, &chat_err);
            for w in waiters {
                self.reply_error(w, &chat_err);
            }
            if !touched.contains(&s.room) {
                touched.push(s.room);
            }
        }
        for room in touched {
            self.evict_if_idle(&room);
        }
    }
}

/// Forgets cids older than the dedupe window.
fn expire_cids(r: &mut RoomState, older_than: u64) {
    while let Some((ts, _, _)) = r.cid_expiry.front() {
        if *ts >= older_than {
            break;
        }
        if let Some((_, user, cid)) = r.cid_expiry.pop_front() {
            if matches!(
                r.cids.get(&(user.clone(), cid.clone())),
                Some(CidState::Done { .. })
            ) {
                r.cids.remove(&(user, cid));
            }
        }
    }
}
