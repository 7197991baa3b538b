//! A loaded room's state and what every home does with it whatever its sequencer:
//! loading and evicting rooms, joins, leaves, typing and presence.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::local::CidState;
use super::{
    ack_frame, error_frame, unavailable, ChatError, ConnRef, ErrorCode, Home, HomeCmd, MemberMsg,
    ReplyTo, Sequencer, ShardMetrics, ShardMsg,
};
use crate::chat::events::{
    join_ack_json, presence_ack_json, presence_event_json, typing_json, PresentUser, OK_ACK,
};
use crate::chat::member::User;
use crate::ids::now_ms;
use crate::protocol::socketio::encode_event;
use crate::store::{HistoryQuery, HistoryStore, StoredMessage};
use crate::transport::budget::Charge;
use crate::transport::websocket::text_frame;

/// A present user: how many of their connections are in the room.
pub(super) struct Presence {
    connections: u32,
    name: Option<Arc<str>>,
}

/// What the home shard keeps about one loaded room.
pub(super) struct RoomState {
    /// The next offset to assign (the writer's).
    pub(super) next: u64,
    /// The newest offset delivered to members (durable).
    pub(super) delivered: u64,
    /// Publishes accepted and not yet settled; the room stays loaded while any are.
    pub(super) inflight: usize,
    members: HashMap<ConnRef, Arc<str>>,
    pub(super) per_shard: Vec<u32>,
    users: HashMap<Arc<str>, Presence>,
    /// One host: recent `(user, cid)`s and their acks (or the retries waiting for them).
    pub(super) cids: HashMap<(Arc<str>, String), CidState>,
    pub(super) cid_expiry: VecDeque<(u64, Arc<str>, String)>,
    pub(super) loaded_at: u64,
    /// A write failed: the store may or may not hold it (a timeout can land late), so the
    /// next offset is read back from the store before this room's next batch.
    pub(super) reload_next: bool,
    /// Cluster mode: `false` while the room's latest offset is unknown (it was loaded while
    /// the store, i.e. Redis, could not be read; `delivered` is 0 then). Members may join
    /// (without `since`), type and leave; live delivery starts at the latest offset once
    /// the store answers or from the first message the subscription brings.
    synced: bool,
}

impl RoomState {
    fn new(latest: u64, shards: usize, synced: bool) -> RoomState {
        RoomState {
            next: latest + 1,
            delivered: latest,
            inflight: 0,
            members: HashMap::new(),
            per_shard: vec![0; shards],
            users: HashMap::new(),
            cids: HashMap::new(),
            cid_expiry: VecDeque::new(),
            loaded_at: now_ms(),
            reload_next: false,
            synced,
        }
    }

    /// A room loaded without its offset learns it; no-op once known.
    pub(super) fn learn_offset(&mut self, latest: u64) {
        if !self.synced {
            self.synced = true;
            self.delivered = self.delivered.max(latest);
            self.next = self.next.max(latest + 1);
        }
    }
}

impl Home {
    /// Makes sure a room is loaded (its latest offset read from the store). In cluster
    /// mode the room's channel is subscribed first, so that every message after the
    /// latest offset read here reaches this shard.
    ///
    /// `allow_unsynced` (cluster mode, joins): when the store cannot be read (Redis is
    /// down), load the room anyway with its offset unknown (see [`RoomState::synced`]) so
    /// that members can join and type locally; a later call tries the store again.
    pub(super) async fn load_room(
        &self,
        room: &Arc<str>,
        allow_unsynced: bool,
    ) -> Result<(), ChatError> {
        let loaded = self.rooms.borrow().get(room).map(|r| r.synced);
        match loaded {
            Some(true) => return Ok(()),
            Some(false) => return self.sync_room(room, allow_unsynced).await,
            None => {}
        }
        self.sequencer.watch(room).await?;
        let (latest, synced) = match self.store.latest_offset(room).await {
            Ok(latest) => (latest, true),
            Err(e) if allow_unsynced && self.sequencer.loads_unsynced() => {
                ShardMetrics::inc(&self.metrics().store_errors);
                tracing::debug!(shard = self.shard, %room, error = %e, "room loaded without its offset (store unreachable)");
                (0, false)
            }
            Err(e) => {
                ShardMetrics::inc(&self.metrics().store_errors);
                self.sequencer.unwatch(room);
                return Err(unavailable(&e));
            }
        };
        let mut rooms = self.rooms.borrow_mut();
        // Another command may have loaded it while we waited (perhaps without its offset).
        let r = rooms
            .entry(room.clone())
            .or_insert_with(|| RoomState::new(latest, self.count, synced));
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
    pub(super) fn mark_synced(&self, room: &Arc<str>, latest: u64) {
        if let Some(r) = self.rooms.borrow_mut().get_mut(room) {
            r.learn_offset(latest);
        }
    }

    /// Unloads a room with no members and nothing in flight.
    pub(super) fn evict_if_idle(&self, room: &Arc<str>) {
        let mut rooms = self.rooms.borrow_mut();
        if rooms
            .get(room)
            .is_some_and(|r| r.members.is_empty() && r.inflight == 0)
        {
            rooms.remove(room);
            self.metrics()
                .home_rooms
                .store(rooms.len() as u64, std::sync::atomic::Ordering::Relaxed);
            self.sequencer.unwatch(room);
        }
    }

    /// Handles a command; its bytes stay counted (`charge`) until it is handled, and a
    /// publish's until it is answered.
    pub(super) async fn handle_cmd(&self, cmd: HomeCmd, charge: Charge) {
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
                self.reply(ReplyTo::Conn { conn, ack_id }, OK_ACK);
            }
            HomeCmd::Publish {
                room,
                user,
                text,
                cid,
                reply,
            } => {
                let p = super::Pending {
                    room,
                    user,
                    text,
                    cid,
                    to: reply,
                    charge,
                };
                self.publish(p).await;
            }
            HomeCmd::Typing { room, conn, user } => self.typing(&room, conn, &user),
            HomeCmd::Presence { room, reply } => match &self.sequencer {
                Sequencer::Local => self.reply(reply, &presence_ack_json(&self.present(&room))),
                Sequencer::Cluster(c) => self.cluster_presence(c, &room, reply).await,
            },
        }
    }

    /// A member is typing: its room's other members are told (volatile), here and, in
    /// cluster mode, on the other hosts.
    fn typing(&self, room: &Arc<str>, conn: ConnRef, user: &Arc<str>) {
        let rooms = self.rooms.borrow();
        if let Some(r) = rooms.get(room) {
            if r.members.contains_key(&conn) {
                let frame = text_frame(&encode_event("typing", &typing_json(room, user)));
                self.broadcast(room, &r.per_shard, frame, Some(conn), true);
                self.sequencer.typing(room, user);
            }
        }
    }

    /// Who this home counts present in a room (one host), sorted by user id.
    fn present(&self, room: &Arc<str>) -> Vec<PresentUser> {
        let rooms = self.rooms.borrow();
        let Some(r) = rooms.get(room) else {
            return Vec::new();
        };
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
    }

    /// Tells the member's shard its join was refused (it waits for an answer to clear its
    /// pending join).
    fn refuse_join(&self, room: &Arc<str>, conn: ConnRef, ack_id: Option<u64>, err: ChatError) {
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
    }

    async fn join(
        &self,
        room: Arc<str>,
        conn: ConnRef,
        user: User,
        since: Option<u64>,
        ack_id: Option<u64>,
    ) {
        if let Err(e) = self.load_room(&room, since.is_none()).await {
            self.refuse_join(&room, conn, ack_id, e);
            return;
        }
        let Some((offset, first)) = self.add_member(&room, conn, &user) else {
            let err = ChatError::new(ErrorCode::Internal, "room vanished");
            self.refuse_join(&room, conn, ack_id, err);
            return;
        };
        if first {
            self.announce(&room, &user.id, user.name.as_deref(), true, Some(conn))
                .await;
        }
        let missed = match since {
            None => None,
            Some(since) => match self.missed(&room, since, offset).await {
                Ok(missed) => Some(missed),
                Err(e) => {
                    // The member is in the room but cannot get its backlog: undo the join.
                    self.leave_and_announce(&room, conn).await;
                    self.refuse_join(&room, conn, ack_id, e);
                    return;
                }
            },
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

    /// Adds a connection to a loaded room: the room's delivered offset, and whether it is
    /// its user's first connection in the room. `None` if the room is not loaded.
    fn add_member(&self, room: &Arc<str>, conn: ConnRef, user: &User) -> Option<(u64, bool)> {
        let mut rooms = self.rooms.borrow_mut();
        let r = rooms.get_mut(room)?;
        let mut first = false;
        if r.members.insert(conn, user.id.clone()).is_none() {
            r.per_shard[conn.shard] += 1;
            let p = r.users.entry(user.id.clone()).or_insert(Presence {
                connections: 0,
                name: user.name.clone(),
            });
            p.connections += 1;
            first = p.connections == 1;
        }
        Some((r.delivered, first))
    }

    /// The messages after `since` up to `offset` (at most `history.max_replay`, the newest),
    /// and whether some were left out.
    async fn missed(
        &self,
        room: &Arc<str>,
        since: u64,
        offset: u64,
    ) -> Result<(Vec<StoredMessage>, bool), ChatError> {
        if since >= offset {
            return Ok((Vec::new(), false));
        }
        let count = offset - since;
        let want = count.min(self.limits.max_replay as u64) as usize;
        match self
            .store
            .read(room, HistoryQuery::Before(offset + 1), want)
            .await
        {
            Ok(mut msgs) => {
                msgs.retain(|m| m.offset > since && m.offset <= offset);
                Ok((msgs, count > want as u64))
            }
            Err(e) => {
                ShardMetrics::inc(&self.metrics().store_errors);
                Err(unavailable(&e))
            }
        }
    }

    /// A user came online in a room (their first connection here) or went offline (their
    /// last one left): one host tells the room's members at once; a cluster asks Redis
    /// first, and tells them only if it was the user's first or last connection anywhere.
    async fn announce(
        &self,
        room: &Arc<str>,
        user: &Arc<str>,
        name: Option<&str>,
        online: bool,
        except: Option<ConnRef>,
    ) {
        let tell = match &self.sequencer {
            Sequencer::Local => true,
            Sequencer::Cluster(c) => self.announce_to_cluster(c, room, user, name, online).await,
        };
        if tell {
            let frame = text_frame(&encode_event(
                "presence",
                &presence_event_json(room, user, online),
            ));
            self.broadcast_to_room(room, frame, except);
        }
    }

    /// Removes a connection from a room and announces it when it was the user's last one.
    pub(super) async fn leave_and_announce(&self, room: &Arc<str>, conn: ConnRef) {
        if let Some(user) = self.leave(room, conn) {
            self.announce(room, &user, None, false, None).await;
        }
    }

    /// Removes a connection from a room (no-op if it is not a member). Returns the user
    /// when it was their last connection in the room.
    fn leave(&self, room: &Arc<str>, conn: ConnRef) -> Option<Arc<str>> {
        let mut last = None;
        {
            let mut rooms = self.rooms.borrow_mut();
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
                last = Some(user);
            }
        }
        self.evict_if_idle(room);
        last
    }
}
