//! A room's home shard: the one place that knows a room's state (next offset, members
//! per shard, who is present, recent `cid`s). It assigns offsets, stores messages in
//! group commits and fans each one out, encoded once, to the shards with members.
//!
//! Two tasks per shard: the *service* handles commands and store results one at a
//! time (so a room's joins and deliveries are strictly ordered), and the *writer* takes
//! every publish queued since its last write, assigns offsets and appends them to the
//! store as one batch. Acks and deliveries go out only after the batch is durable.

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
use super::mesh::{HomeCmd, MemberMsg, ReplyTo, ShardMsg};
use super::session::{ConnRef, User};
use crate::ids::{now_ms, MessageIds};
use crate::metrics::ShardMetrics;
use crate::protocol::socketio::{encode_ack, encode_event};
use crate::shard::Shard;
use crate::store::{HistoryQuery, HistoryStore, StoreError, StoredMessage};
use crate::transport::websocket::text_frame;

/// The most messages written to the store in one group commit.
const MAX_BATCH: usize = 1024;

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
}

/// The home-shard state of one shard.
pub struct Home {
    rooms: RefCell<HashMap<Arc<str>, RoomState>>,
    /// Publishes accepted and not yet settled, over all rooms.
    inflight: std::cell::Cell<usize>,
    pending: RefCell<VecDeque<Pending>>,
    writer_waker: RefCell<Option<Waker>>,
    events: LocalSender<HomeEvent>,
    ids: MessageIds,
}

impl Home {
    /// A home with no rooms loaded; `events` feeds the service task.
    pub fn new(events: LocalSender<HomeEvent>, ids: MessageIds) -> Home {
        Home {
            rooms: RefCell::new(HashMap::new()),
            inflight: std::cell::Cell::new(0),
            pending: RefCell::new(VecDeque::new()),
            writer_waker: RefCell::new(None),
            events,
            ids,
        }
    }

    /// Queues a command for the service task (from this shard or another).
    pub fn enqueue(&self, cmd: HomeCmd) {
        // The receiver lives as long as the shard; an unbounded local send cannot fail otherwise.
        let _ = self.events.try_send(HomeEvent::Cmd(cmd));
    }

    /// Whether every accepted publish has been settled (acked or refused).
    pub fn is_idle(&self) -> bool {
        self.inflight.get() == 0
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

    /// Makes sure a room is loaded (its latest offset read from the store).
    async fn load_room(&self, room: &Arc<str>) -> Result<(), StoreError> {
        if self.home.rooms.borrow().contains_key(room) {
            return Ok(());
        }
        let latest = self.store.latest_offset(room).await;
        let latest = latest.inspect_err(|_| ShardMetrics::inc(&self.metrics().store_errors))?;
        let mut rooms = self.home.rooms.borrow_mut();
        // Another command may have loaded it while we waited.
        rooms.entry(room.clone()).or_insert_with(|| RoomState {
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
        });
        self.metrics()
            .home_rooms
            .store(rooms.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
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
        }
    }

    /// The service task: handles commands and store results in arrival order.
    pub async fn run_home(self: Rc<Self>, events: LocalReceiver<HomeEvent>) {
        while let Some(event) = events.recv().await {
            match event {
                HomeEvent::Cmd(cmd) => self.handle_cmd(cmd).await,
                HomeEvent::Written(done) => self.deliver(done),
                HomeEvent::Failed(failed, err) => self.fail(failed, &err),
            }
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
                self.leave(&room, conn);
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
                    }
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
        if let Err(e) = self.load_room(&room).await {
            refuse(unavailable(&e));
            return;
        }
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
                if p.connections == 1 {
                    let frame = text_frame(&encode_event(
                        "presence",
                        &presence_event_json(&room, &user.id, true),
                    ));
                    self.broadcast(&room, &r.per_shard, frame, Some(conn), false);
                }
            }
            r.delivered
        };
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
                        self.leave(&room, conn);
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

    /// Removes a connection from a room (no-op if it is not a member).
    fn leave(&self, room: &Arc<str>, conn: ConnRef) {
        {
            let mut rooms = self.home.rooms.borrow_mut();
            let Some(r) = rooms.get_mut(room) else { return };
            let Some(user) = r.members.remove(&conn) else {
                return;
            };
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
                let frame = text_frame(&encode_event(
                    "presence",
                    &presence_event_json(room, &user, false),
                ));
                self.broadcast(room, &r.per_shard, frame, None, false);
            }
        }
        self.evict_if_idle(room);
    }

    async fn publish(
        &self,
        room: Arc<str>,
        user: Arc<str>,
        text: String,
        cid: Option<String>,
        to: ReplyTo,
    ) {
        if let Err(e) = self.load_room(&room).await {
            self.reply_error(to, &unavailable(&e));
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
                let n = pending.len().min(MAX_BATCH);
                pending.drain(..n).collect()
            };
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
