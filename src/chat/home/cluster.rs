//! The cluster sequencer (`redis.url` set): Redis's publish script assigns offsets and
//! dedupes by `cid`; the home acks with its answer once the history store has the message
//! (`store = "scylla"`: a group write per batch, retried in the background when it fails).
//! Presence and typing go through Redis too. Delivery comes back through the room's
//! subscription (`echo.rs`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{
    cluster_unavailable, ChatError, ConnRef, ErrorCode, Home, HomeEvent, Pending, ReplyTo,
    Sequencer, Settled, ShardMetrics,
};
use crate::chat::events::{message_ack_json, presence_ack_json, PresentUser};
use crate::cluster::shard_link::ShardLink;
use crate::cluster::{ClusterError, NewMessage, Published};
use crate::ids::now_ms;
use crate::store::{StoreError, StoredMessage};

/// Most messages one publish round trip to Redis carries. The script runs atomically, so a
/// batch holds Redis up for every other client while it runs: a few hundred µs at this size.
pub(super) const MAX_CLUSTER_BATCH: usize = 128;

/// Most published messages kept for a background retry of their ScyllaDB write, per shard.
const MAX_UNPERSISTED: usize = 10_000;

/// Delay between background retries of failed ScyllaDB writes.
const PERSIST_RETRY: Duration = Duration::from_secs(1);

/// Why a cluster-mode publish was not acked.
#[derive(Debug)]
pub(super) enum PublishError {
    /// The publish script did not run (or its answer was lost): see [`ClusterError`].
    Cluster(ClusterError),
    /// The script stored and published the message, but the history store could not make
    /// it durable (`store = "scylla"`): a retry with the same `cid` gets its offset back.
    Store(StoreError),
}

/// A batch on its way to the publish script.
struct Outgoing {
    /// Each message with a floor: its room's delivered offset (Redis's offsets stay above).
    script: Vec<(NewMessage, u64)>,
    /// What each message must answer, with its message id.
    settle: Vec<(Settled, String)>,
}

/// A home's way through Redis: its shard's link, and what it tracks about its publishes
/// and subscriptions.
pub struct ClusterSequencer {
    /// This shard's Redis link: the publish script, and the rooms' subscriptions.
    pub(super) link: ShardLink,
    /// Catch-up checks done since the last `Reconnected` from the link.
    pub(super) catch_up_rounds: Cell<u32>,
    /// Ids of messages this shard published for a connection, waiting for their echo
    /// through Redis (so the sender's own socket is skipped).
    pub(super) own_ids: RefCell<HashMap<String, ConnRef>>,
    /// Rooms evicted whose subscription is to be dropped by the service task (which also
    /// subscribes, so Redis sees the changes in order).
    unsubscribe: RefCell<Vec<Arc<str>>>,
    /// With ScyllaDB: published messages whose durable write failed (their senders got
    /// `unavailable`), written again in the background so the durable history gets them
    /// even when no sender retries. Bounded by [`MAX_UNPERSISTED`].
    unpersisted: RefCell<Vec<StoredMessage>>,
    /// Whether the background retry of `unpersisted` is running.
    pub(super) persist_retrying: Cell<bool>,
}

impl ClusterSequencer {
    /// A sequencer publishing through `link`, with nothing in flight.
    pub fn new(link: ShardLink) -> ClusterSequencer {
        ClusterSequencer {
            link,
            catch_up_rounds: Cell::new(0),
            own_ids: RefCell::new(HashMap::new()),
            unsubscribe: RefCell::new(Vec::new()),
            unpersisted: RefCell::new(Vec::new()),
            persist_retrying: Cell::new(false),
        }
    }
}

impl Sequencer {
    /// Before a room is loaded: in a cluster, subscribes its channel, so that every message
    /// after the latest offset read next reaches this shard.
    pub(super) async fn watch(&self, room: &Arc<str>) -> Result<(), ChatError> {
        let Sequencer::Cluster(c) = self else {
            return Ok(());
        };
        match c.link.subscribe(room).await {
            // Registered: subscribed again when the link is back (`Reconnected`).
            Ok(()) | Err(ClusterError::Unavailable(_) | ClusterError::Timeout(_)) => Ok(()),
            Err(e) => Err(cluster_unavailable(&e)),
        }
    }

    /// A room is unloaded (or failed to load): in a cluster, its subscription is dropped
    /// by the service task once the current event is handled.
    pub(super) fn unwatch(&self, room: &Arc<str>) {
        if let Sequencer::Cluster(c) = self {
            c.unsubscribe.borrow_mut().push(room.clone());
        }
    }

    /// Whether a join may load a room whose offset the store cannot tell (a cluster, while
    /// Redis is down: members may join, type and leave meanwhile).
    pub(super) fn loads_unsynced(&self) -> bool {
        matches!(self, Sequencer::Cluster(_))
    }

    /// Tells the other hosts a member is typing (dropped while Redis is down).
    pub(super) fn typing(&self, room: &str, user: &str) {
        if let Sequencer::Cluster(c) = self {
            c.link.redis().publish_typing(room, user);
        }
    }
}

impl Home {
    /// Drops the subscriptions of rooms evicted meanwhile (unless loaded again).
    pub(super) async fn drop_subscriptions(&self, c: &ClusterSequencer) {
        loop {
            let Some(room) = c.unsubscribe.borrow_mut().pop() else {
                return;
            };
            if self.rooms.borrow().contains_key(&room) {
                continue;
            }
            if let Err(e) = c.link.unsubscribe(&room).await {
                tracing::debug!(shard = self.shard, %room, error = %e, "unsubscribe failed");
            }
        }
    }

    /// Who is present in a room, on every host (Redis keeps it).
    pub(super) async fn cluster_presence(&self, c: &ClusterSequencer, room: &str, to: ReplyTo) {
        match c.link.redis().presence_list(room).await {
            Ok(list) => {
                let users: Vec<PresentUser> = list
                    .into_iter()
                    .map(|p| PresentUser {
                        user: p.user,
                        name: p.name,
                    })
                    .collect();
                self.reply(to, &presence_ack_json(&users));
            }
            Err(e) => self.reply_error(to, &cluster_unavailable(&e)),
        }
    }

    /// Tells Redis a user's first connection here joined a room (`online`) or their last one
    /// left: true when that was their first or last anywhere, so the members are told.
    pub(super) async fn announce_to_cluster(
        &self,
        c: &ClusterSequencer,
        room: &str,
        user: &str,
        name: Option<&str>,
        online: bool,
    ) -> bool {
        let redis = c.link.redis();
        let result = if online {
            redis.presence_join(room, user, name).await
        } else {
            redis.presence_leave(room, user).await
        };
        result.unwrap_or_else(|e| {
            let what = if online {
                "presence_join"
            } else {
                "presence_leave"
            };
            tracing::debug!(shard = self.shard, %room, error = %e, "{what} failed");
            false
        })
    }

    /// Publishes the batch in one round trip to Redis (one script call per room; a room's
    /// messages get consecutive offsets in the order they were sent, so one connection's
    /// messages are accepted in its order), makes what it stored durable in the history
    /// store (one group write for the batch; a no-op for the `redis` store) and hands each
    /// outcome to the service task. Delivery comes back through the subscription.
    pub(super) async fn publish_to_cluster(&self, c: &ClusterSequencer, batch: Vec<Pending>) {
        let Outgoing { script, settle } = self.new_messages(c, batch);
        let results = c.link.publish_batch(script).await;
        let results = self.mark_for_feed(&settle, results).await;
        let mut stored: Vec<(Settled, Published)> = Vec::new();
        for ((settled, id), result) in settle.into_iter().zip(results) {
            if !matches!(result, Ok(Published::Stored(_))) {
                c.own_ids.borrow_mut().remove(&id);
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
            let _ = self.events.try_send(HomeEvent::Published(settled, outcome));
        }
        if !stored.is_empty() {
            self.persist_stored(c, stored).await;
        }
    }

    /// With the feed on: marks the rooms of the messages Redis stored (or had stored: a
    /// retry's duplicate) as owed to the feed, before any sender is acked, so the feed
    /// owes every acked message whichever host dies. If the mark fails, those senders get
    /// `unavailable` (the message may be stored: a retry with its `cid` gets its ack) and
    /// the feed makes the mark again in the background.
    async fn mark_for_feed(
        &self,
        settle: &[(Settled, String)],
        results: Vec<Result<Published, ClusterError>>,
    ) -> Vec<Result<Published, ClusterError>> {
        let Some(feed) = &self.feed else {
            return results;
        };
        let marks: Vec<(String, u64)> = settle
            .iter()
            .zip(&results)
            .filter_map(|((s, _), r)| match r {
                Ok(Published::Stored(m)) => Some((m.room.clone(), m.offset)),
                Ok(Published::Duplicate(ack)) => Some((s.room.to_string(), ack.offset)),
                Err(_) => None,
            })
            .collect();
        if marks.is_empty() {
            return results;
        }
        match feed.mark(marks).await {
            Ok(()) => results,
            Err(e) => {
                tracing::warn!(shard = self.shard, error = %e, "cannot mark rooms for the feed: senders get unavailable");
                results
                    .into_iter()
                    .map(|r| {
                        r.and_then(|_| {
                            Err(ClusterError::Unavailable(format!(
                                "the feed's ledger in redis: {e}"
                            )))
                        })
                    })
                    .collect()
            }
        }
    }

    /// A batch as the publish script takes it, with each message's id kept to skip its
    /// sender's connection when its echo comes back.
    fn new_messages(&self, c: &ClusterSequencer, batch: Vec<Pending>) -> Outgoing {
        let mut script = Vec::with_capacity(batch.len());
        let mut settle = Vec::with_capacity(batch.len());
        for p in batch {
            let ts = now_ms();
            let id = self.ids.next(ts);
            if let Some(conn) = p.to.conn() {
                c.own_ids.borrow_mut().insert(id.clone(), conn);
            }
            // Never below what this host delivered already, even if Redis lost the room.
            let floor = self.rooms.borrow().get(&p.room).map_or(0, |r| r.delivered);
            let (settled, text) = p.split();
            script.push((
                NewMessage {
                    room: settled.room.to_string(),
                    user: settled.user.to_string(),
                    text,
                    cid: settled.cid.clone(),
                    ts,
                    id: id.clone(),
                },
                floor,
            ));
            settle.push((settled, id));
        }
        Outgoing { script, settle }
    }

    /// Makes the messages the script stored durable in the history store (the `redis` store
    /// has them already: no copy, no call), then hands each outcome to the service task.
    async fn persist_stored(&self, c: &ClusterSequencer, stored: Vec<(Settled, Published)>) {
        let stored_messages = || {
            stored.iter().filter_map(|(_, p)| match p {
                Published::Stored(m) => Some(m.clone()),
                Published::Duplicate(_) => None,
            })
        };
        let persisted = if self.store.persists_published() {
            self.store
                .persist_published(stored_messages().collect())
                .await
        } else {
            Ok(())
        };
        if let Err(e) = &persisted {
            tracing::warn!(shard = self.shard, count = stored.len(), error = %e,
                "published messages are not durable yet: senders get unavailable; writing them again in the background");
            self.retry_persist_later(c, stored_messages().collect());
        }
        for (settled, published) in stored {
            let outcome = match &persisted {
                Ok(()) => Ok(published),
                Err(e) => Err(PublishError::Store(e.clone())),
            };
            let _ = self.events.try_send(HomeEvent::Published(settled, outcome));
        }
    }

    /// Keeps published messages whose durable write failed, and makes sure a background
    /// task writes them again (every [`PERSIST_RETRY`], until it succeeds). Past
    /// [`MAX_UNPERSISTED`] the oldest are dropped, with an error in the log: they stay in
    /// the Redis stream until it is trimmed, and a sender's retry with its `cid` still
    /// writes its own.
    fn retry_persist_later(&self, c: &ClusterSequencer, messages: Vec<StoredMessage>) {
        {
            let mut unpersisted = c.unpersisted.borrow_mut();
            unpersisted.extend(messages);
            if unpersisted.len() > MAX_UNPERSISTED {
                let dropped = unpersisted.len() - MAX_UNPERSISTED;
                unpersisted.drain(..dropped);
                tracing::error!(
                    shard = self.shard,
                    dropped,
                    "too many messages waiting for their durable write: the oldest are no \
                     longer retried (they stay in the Redis stream until trimmed)"
                );
            }
        }
        if c.persist_retrying.replace(true) {
            return;
        }
        let Some(home) = self.me.upgrade() else {
            c.persist_retrying.set(false);
            return;
        };
        glommio::spawn_local(async move {
            if let Sequencer::Cluster(c) = &home.sequencer {
                home.persist_in_background(c).await;
                c.persist_retrying.set(false);
            }
        })
        .detach();
    }

    /// The background retry of failed durable writes, until none is left.
    async fn persist_in_background(&self, c: &ClusterSequencer) {
        loop {
            glommio::timer::sleep(PERSIST_RETRY).await;
            let batch = std::mem::take(&mut *c.unpersisted.borrow_mut());
            if batch.is_empty() {
                break;
            }
            let count = batch.len();
            match self.store.persist_published(batch.clone()).await {
                Ok(()) => {
                    tracing::info!(shard = self.shard, count, "background durable write done");
                    if c.unpersisted.borrow().is_empty() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(shard = self.shard, count, error = %e, "background durable write failed; retrying");
                    let mut unpersisted = c.unpersisted.borrow_mut();
                    let newer = std::mem::replace(&mut *unpersisted, batch);
                    unpersisted.extend(newer);
                    let excess = unpersisted.len().saturating_sub(MAX_UNPERSISTED);
                    unpersisted.drain(..excess);
                }
            }
        }
    }

    /// Acks one publish (the first ack for a duplicate cid) or refuses it.
    pub(super) fn settle_published(&self, s: Settled, result: Result<Published, PublishError>) {
        if let Some(r) = self.rooms.borrow_mut().get_mut(&s.room) {
            r.inflight -= 1;
        }
        self.inflight.set(self.inflight.get() - 1);
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
                self.reply_error(s.to, &not_acked(&e, s.cid.is_some()));
            }
        }
        self.evict_if_idle(&s.room);
    }
}

/// What a sender whose publish was not acked is told.
fn not_acked(e: &PublishError, has_cid: bool) -> ChatError {
    match e {
        PublishError::Cluster(e) => cluster_unavailable(e),
        PublishError::Store(e) if has_cid => ChatError::new(
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
    }
}
