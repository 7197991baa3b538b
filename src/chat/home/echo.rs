//! Cluster mode: what a home's Redis subscription brings. A room's messages, this host's
//! own included, are delivered strictly by offset: a gap is read from the store first, and
//! after a lost link every loaded room catches up from the store. Presence and typing
//! notices of other hosts are relayed to the room's members.

use std::sync::Arc;
use std::time::Duration;

use super::{message_frame, ClusterSequencer, Home, ShardMetrics};
use crate::chat::events::{presence_event_json, typing_json};
use crate::cluster::ClusterEvent;
use crate::protocol::socketio::encode_event;
use crate::store::{HistoryQuery, HistoryStore, StoredMessage};
use crate::transport::websocket::text_frame;

/// Extra catch-up checks after the Redis link comes back (500 ms apart).
const CATCH_UP_ROUNDS: u32 = 2;

/// The most messages read from the store per catch-up read.
const CATCH_UP_READ: usize = 1000;

impl Home {
    /// One event of this shard's subscription.
    pub(super) async fn on_cluster_event(&self, c: &ClusterSequencer, event: ClusterEvent) {
        match event {
            ClusterEvent::Message(m) => self.on_message(c, m).await,
            ClusterEvent::Presence {
                room,
                user,
                online,
                host,
                ..
            } => self.relay_from_host(c, &room, &host, "presence", false, || {
                presence_event_json(&room, &user, online)
            }),
            ClusterEvent::Typing { room, user, host } => {
                self.relay_from_host(c, &room, &host, "typing", true, || {
                    typing_json(&room, &user)
                })
            }
            ClusterEvent::Down { reason } => {
                self.metrics()
                    .redis_link_down
                    .store(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(shard = self.shard, %reason, "redis link down: sends refused until it is back");
            }
            ClusterEvent::Reconnected => self.on_reconnected(c).await,
        }
    }

    /// A message of a room's channel: delivered in offset order, after any gap before it.
    async fn on_message(&self, c: &ClusterSequencer, m: StoredMessage) {
        let room: Arc<str> = Arc::from(m.room.as_str());
        let delivered = self.rooms.borrow().get(&room).map(|r| r.delivered);
        let Some(delivered) = delivered else {
            c.own_ids.borrow_mut().remove(&m.id);
            return;
        };
        // Loaded while Redis was down: live delivery starts with this message.
        self.mark_synced(&room, m.offset.saturating_sub(1));
        let delivered = self
            .rooms
            .borrow()
            .get(&room)
            .map_or(delivered, |r| r.delivered);
        if m.offset <= delivered {
            return; // Delivered already (a catch-up read got it first).
        }
        if m.offset > delivered + 1 && !self.catch_up(c, &room, m.offset - 1).await {
            // The gap cannot be read yet (the command link may still be coming back): hold
            // this message and try again shortly. Delivering it now would skip the gap for
            // good.
            self.enqueue_later(Duration::from_millis(200), ClusterEvent::Message(m));
            return;
        }
        self.deliver_in_order(c, &room, vec![m]);
    }

    /// The link is back: every loaded room catches up from the store, checked again a few
    /// times (and until the store answers).
    async fn on_reconnected(&self, c: &ClusterSequencer) {
        // On a Redis Cluster, another master's link may still be down.
        self.metrics().redis_link_down.store(
            u64::from(c.link.is_down()),
            std::sync::atomic::Ordering::Relaxed,
        );
        let rooms: Vec<Arc<str>> = self.rooms.borrow().keys().cloned().collect();
        tracing::info!(
            shard = self.shard,
            rooms = rooms.len(),
            "redis link back: delivering what was missed"
        );
        let mut failed = false;
        for room in rooms {
            match self.store.latest_offset(&room).await {
                Ok(latest) => {
                    // A room loaded while Redis was down starts from `latest`.
                    self.mark_synced(&room, latest);
                    if !self.catch_up(c, &room, latest).await {
                        failed = true;
                    }
                }
                Err(e) => {
                    failed = true;
                    ShardMetrics::inc(&self.metrics().store_errors);
                    tracing::warn!(shard = self.shard, %room, error = %e, "catch-up failed; retrying");
                }
            }
        }
        // The command link and the subscription come back separately: check again shortly
        // (and keep retrying while the store cannot answer), so a message published in
        // between is delivered live and not only through `since`.
        let again = c.catch_up_rounds.get();
        if failed || again < CATCH_UP_ROUNDS {
            c.catch_up_rounds.set(if failed { 0 } else { again + 1 });
            self.enqueue_later(Duration::from_millis(500), ClusterEvent::Reconnected);
        } else {
            c.catch_up_rounds.set(0);
        }
    }

    /// Queues `event` for the service task again after `delay`.
    fn enqueue_later(&self, delay: Duration, event: ClusterEvent) {
        if let Some(home) = self.me.upgrade() {
            glommio::spawn_local(async move {
                glommio::timer::sleep(delay).await;
                home.enqueue_cluster(event);
            })
            .detach();
        }
    }

    /// Delivers a loaded room's messages from the store up to offset `upto`. Offsets the
    /// store no longer has (trimmed) are skipped: members see the gap. False when the store
    /// could not be read (nothing was skipped; try again later).
    async fn catch_up(&self, c: &ClusterSequencer, room: &Arc<str>, upto: u64) -> bool {
        loop {
            let delivered = self.rooms.borrow().get(room).map(|r| r.delivered);
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
                        if let Some(r) = self.rooms.borrow_mut().get_mut(room) {
                            r.delivered = r.delivered.max(upto);
                        }
                        return true;
                    }
                    tracing::debug!(shard = self.shard, %room, count = msgs.len(), after = delivered, "delivering from the store");
                    self.deliver_in_order(c, room, msgs);
                }
                Err(e) => {
                    ShardMetrics::inc(&self.metrics().store_errors);
                    tracing::warn!(shard = self.shard, %room, error = %e, "catch-up read failed");
                    return false;
                }
            }
        }
    }

    /// Fans out messages (oldest first) above the room's delivered offset; this shard's own
    /// publishes skip their sender's connection.
    fn deliver_in_order(&self, c: &ClusterSequencer, room: &Arc<str>, msgs: Vec<StoredMessage>) {
        let mut payload = Vec::with_capacity(256);
        let mut rooms = self.rooms.borrow_mut();
        let Some(r) = rooms.get_mut(room) else { return };
        for m in msgs {
            let except = c.own_ids.borrow_mut().remove(&m.id);
            if m.offset <= r.delivered {
                continue;
            }
            r.delivered = m.offset;
            let frame = message_frame(&mut payload, &m);
            self.broadcast(room, &r.per_shard, frame, except, false);
        }
    }

    /// A notice another host sent on a room's channel (presence, typing): event `name`
    /// with the JSON `json` makes, to this room's members on every shard. The notices
    /// this host sent itself come back too and are skipped: its members were told already.
    fn relay_from_host(
        &self,
        c: &ClusterSequencer,
        room: &str,
        host: &str,
        name: &str,
        volatile: bool,
        json: impl FnOnce() -> Vec<u8>,
    ) {
        if host == c.link.redis().host_id() {
            return;
        }
        if let Some((room, r)) = self.rooms.borrow().get_key_value(room) {
            let frame = text_frame(&encode_event(name, &json()));
            self.broadcast(room, &r.per_shard, frame, None, volatile);
        }
    }
}
