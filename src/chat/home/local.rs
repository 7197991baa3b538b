//! The local sequencer (one host): the home dedupes retries by `cid`, assigns offsets and
//! appends each batch to the store as one group commit; acks and deliveries go out once
//! the batch is durable.

use std::sync::Arc;

use bytes::Bytes;

use super::room::RoomState;
use super::{message_frame, unavailable, Home, HomeEvent, Pending, ReplyTo, Settled, ShardMetrics};
use crate::chat::events::message_ack_json;
use crate::ids::now_ms;
use crate::store::{HistoryStore, StoreError, StoredMessage};

/// The most messages written to the store in one group commit.
pub(super) const MAX_BATCH: usize = 1024;

/// A `(user, cid)` this home has seen in a room.
pub(super) enum CidState {
    /// Being written; retries wait here for the same ack.
    Pending(Vec<ReplyTo>),
    /// Stored: the first ack, handed back unchanged to retries.
    Done { ack: Bytes },
}

impl Home {
    /// One host: answers a retry whose `cid` this user sent to this room within the dedupe
    /// window with the first send's ack (or queues it behind the first send still being
    /// written). The publish comes back when it must be written.
    pub(super) async fn dedupe(&self, p: Pending) -> Option<Pending> {
        let Some(cid) = p.cid.clone() else {
            return Some(p);
        };
        let window = self.limits.dedupe_window.as_millis() as u64;
        let now = now_ms();
        let key = (p.user.clone(), cid);
        let check_store = {
            let mut rooms = self.rooms.borrow_mut();
            let r = rooms.get_mut(&p.room)?;
            expire_cids(r, now.saturating_sub(window));
            // Sends stored before this room was loaded are only in the store.
            now.saturating_sub(r.loaded_at) < window
        };
        let to = self.answer_known(&p.room, &key, p.to, false)?;
        if check_store {
            let found = self
                .store
                .find_cid(&p.room, &p.user, &key.1, now.saturating_sub(window))
                .await;
            match found {
                Ok(Some(m)) => {
                    let ack = Bytes::from(message_ack_json(&m));
                    if let Some(r) = self.rooms.borrow_mut().get_mut(&p.room) {
                        r.cids
                            .insert(key.clone(), CidState::Done { ack: ack.clone() });
                        r.cid_expiry.push_back((m.ts, key.0, key.1));
                    }
                    self.reply(to, &ack);
                    return None;
                }
                Ok(None) => {}
                Err(e) => {
                    ShardMetrics::inc(&self.metrics().store_errors);
                    self.reply_error(to, &unavailable(&e));
                    return None;
                }
            }
        }
        // A retry may have arrived while we looked in the store.
        let to = self.answer_known(&p.room, &key, to, true)?;
        Some(Pending { to, ..p })
    }

    /// What the room remembers of `key`: the first ack answers `to`; a first send still
    /// being written takes `to` as a waiter. An unknown cid gives `to` back (and is marked
    /// pending when `claim`). `None` as well when the room is not loaded (dropped).
    fn answer_known(
        &self,
        room: &Arc<str>,
        key: &(Arc<str>, String),
        to: ReplyTo,
        claim: bool,
    ) -> Option<ReplyTo> {
        let mut rooms = self.rooms.borrow_mut();
        let r = rooms.get_mut(room)?;
        match r.cids.get_mut(key) {
            Some(CidState::Done { ack }) => {
                let ack = ack.clone();
                drop(rooms);
                self.reply(to, &ack);
                None
            }
            Some(CidState::Pending(waiters)) => {
                waiters.push(to);
                None
            }
            None => {
                if claim {
                    r.cids.insert(key.clone(), CidState::Pending(Vec::new()));
                }
                Some(to)
            }
        }
    }

    /// Writes a batch: offsets are assigned here, just before the write, so a failed write
    /// can give them back and streams never have gaps.
    pub(super) async fn write_batch(&self, batch: Vec<Pending>) {
        self.reload_failed_rooms(&batch).await;
        let mut firsts: Vec<(Arc<str>, u64)> = Vec::new();
        let mut settled = Vec::with_capacity(batch.len());
        let mut messages = Vec::with_capacity(batch.len());
        {
            let mut rooms = self.rooms.borrow_mut();
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
                let (s, text) = p.split();
                messages.push(StoredMessage {
                    room: s.room.to_string(),
                    offset,
                    id: self.ids.next(ts),
                    user: s.user.to_string(),
                    text,
                    ts,
                    cid: s.cid.clone(),
                });
                settled.push(s);
            }
        }
        let result = self.store.append(messages.clone()).await;
        let event = match result {
            Ok(()) => HomeEvent::Written(settled.into_iter().zip(messages).collect()),
            Err(e) => {
                ShardMetrics::inc(&self.metrics().store_errors);
                let mut rooms = self.rooms.borrow_mut();
                for (room, first) in firsts {
                    if let Some(r) = rooms.get_mut(&room) {
                        r.next = first;
                        r.reload_next = true;
                    }
                }
                HomeEvent::Failed(settled, e)
            }
        };
        let _ = self.events.try_send(event);
    }

    /// Before writing to rooms whose last write failed, asks the store for their latest
    /// offset: a write reported failed may still have landed, and its offsets must not be
    /// handed out again. (The members see the gap and can read those messages back.)
    async fn reload_failed_rooms(&self, batch: &[Pending]) {
        let mut stale: Vec<Arc<str>> = Vec::new();
        {
            let rooms = self.rooms.borrow();
            for p in batch {
                if rooms.get(&p.room).is_some_and(|r| r.reload_next) && !stale.contains(&p.room) {
                    stale.push(p.room.clone());
                }
            }
        }
        for room in stale {
            // On failure keep the flag: the next batch tries again (and will fail or not).
            if let Ok(latest) = self.store.latest_offset(&room).await {
                if let Some(r) = self.rooms.borrow_mut().get_mut(&room) {
                    r.next = r.next.max(latest + 1);
                    r.reload_next = false;
                }
            }
        }
    }

    /// A batch is durable: ack the senders (and waiting retries), fan out, encoded once.
    pub(super) fn deliver(&self, done: Vec<(Settled, StoredMessage)>) {
        let mut touched: Vec<Arc<str>> = Vec::new();
        let mut payload = Vec::with_capacity(256);
        for (s, m) in done {
            let ack = Bytes::from(message_ack_json(&m));
            let frame = message_frame(&mut payload, &m);
            let mut waiters = Vec::new();
            {
                let mut rooms = self.rooms.borrow_mut();
                let Some(r) = rooms.get_mut(&s.room) else {
                    continue;
                };
                r.delivered = m.offset;
                r.inflight -= 1;
                self.inflight.set(self.inflight.get() - 1);
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
            if let Some(feed) = &self.feed {
                feed.note(&s.room, m.offset, m.ts);
            }
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
    pub(super) fn fail(&self, failed: Vec<Settled>, err: &StoreError) {
        let chat_err = unavailable(err);
        let mut touched: Vec<Arc<str>> = Vec::new();
        for s in failed {
            let mut waiters = Vec::new();
            if let Some(r) = self.rooms.borrow_mut().get_mut(&s.room) {
                r.inflight -= 1;
                self.inflight.set(self.inflight.get() - 1);
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
