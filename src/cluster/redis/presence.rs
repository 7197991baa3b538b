//! This host's presence in Redis: the users connected through it, per room, kept locally and
//! written by the presence scripts (join, leave, periodic refresh), and the cluster-wide
//! list of a room. See the key table in [`crate::cluster`] for what the scripts keep.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use redis::Value;

use super::{lock, RedisCluster, Shared};
use crate::cluster::topology::{slot_of, NodeAddr};
use crate::cluster::wire::{presence_payload, strings, utf8};
use crate::cluster::{keys, ClusterError, PresenceEntry};

/// How long Redis remembers the users of a reaped host that were announced offline (so
/// that the host, if it was only cut off, announces them online again when it is back).
const REAPED_KEEP: Duration = Duration::from_secs(3600);

/// A user present through this host, and their display name.
type PresenceUser = (String, Option<String>);

impl RedisCluster {
    /// Marks `user` present in `room` through this host (call it when the user's first
    /// connection on this host joins the room), with an optional display name (an empty
    /// name counts as none). Returns
    /// `true` when the user was present through no live host before, in which case the
    /// online event was published on the room's channel (every host, this one included,
    /// receives it as [`ClusterEvent::Presence`](crate::cluster::ClusterEvent::Presence)).
    ///
    /// The local record is kept even when Redis fails, and written again by the periodic
    /// refresh (every `presence_ttl / 3`).
    pub async fn presence_join(
        &self,
        room: &str,
        user: &str,
        name: Option<&str>,
    ) -> Result<bool, ClusterError> {
        let shared = self.inner.shared.clone();
        let (room, user, name) = (room.to_owned(), user.to_owned(), name.map(str::to_owned));
        self.on_bridge(async move { shared.presence_join(room, user, name).await })
            .await
    }

    /// The user's last connection on this host left `room`. Returns `true` when the user is
    /// now present through no live host, in which case the offline event was published.
    ///
    /// When Redis cannot be reached the local record is dropped anyway: the user disappears
    /// from Redis at the next refresh, or within `presence_ttl` (without an offline event).
    pub async fn presence_leave(&self, room: &str, user: &str) -> Result<bool, ClusterError> {
        let shared = self.inner.shared.clone();
        let (room, user) = (room.to_owned(), user.to_owned());
        self.on_bridge(async move { shared.presence_leave(room, user).await })
            .await
    }

    /// The users present in `room` through any live host, one entry per user, sorted by
    /// user id. A host that stopped refreshing (dead, or cut off from Redis) stops counting
    /// within `presence_ttl`.
    pub async fn presence_list(&self, room: &str) -> Result<Vec<PresenceEntry>, ClusterError> {
        let shared = self.inner.shared.clone();
        let room = room.to_owned();
        self.on_bridge(async move { shared.presence_list(room).await })
            .await
    }
}

impl Shared {
    /// The `presence_set` script call for this host's users in `room`: `mode` is "join" or
    /// "refresh", `payload` the presence event to publish ("" for none). Callers append the
    /// (user, name) pairs.
    fn presence_set_call(
        &self,
        room: &str,
        mode: &str,
        payload: impl redis::ToRedisArgs,
    ) -> redis::ScriptInvocation<'_> {
        let mut inv = self
            .scripts
            .presence_set
            .key(keys::presence(room, &self.opts.host_id));
        inv.key(keys::presence_hosts(room))
            .key(keys::reaped(room, &self.opts.host_id))
            .arg(&self.opts.host_id)
            .arg(self.opts.presence_ttl.as_millis() as u64)
            .arg(keys::presence_prefix(room))
            .arg(mode)
            .arg(self.options().publish_command())
            .arg(keys::channel(room))
            .arg(payload)
            .arg(room)
            .arg(keys::reaped_prefix(room))
            .arg(REAPED_KEEP.as_millis() as u64);
        inv
    }

    async fn presence_join(
        &self,
        room: String,
        user: String,
        name: Option<String>,
    ) -> Result<bool, ClusterError> {
        lock(&self.presence)
            .entry(room.clone())
            .or_default()
            .insert(user.clone(), name.clone());
        let payload = presence_payload(&room, &user, name.as_deref(), true, &self.opts.host_id)?;
        let mut inv = self.presence_set_call(&room, "join", payload);
        inv.arg(&user).arg(name.as_deref().unwrap_or(""));
        let inv = &inv;
        let reply = self
            .with_conn("presence join", |mut c| async move {
                inv.invoke_async::<i64>(&mut c).await
            })
            .await?;
        Ok(reply == 1)
    }

    async fn presence_leave(&self, room: String, user: String) -> Result<bool, ClusterError> {
        {
            let mut presence = lock(&self.presence);
            if let Some(users) = presence.get_mut(&room) {
                users.remove(&user);
                if users.is_empty() {
                    presence.remove(&room);
                }
            }
        }
        let payload = presence_payload(&room, &user, None, false, &self.opts.host_id)?;
        let mut inv = self
            .scripts
            .presence_leave
            .key(keys::presence(&room, &self.opts.host_id));
        inv.key(keys::presence_hosts(&room))
            .key(keys::reaped(&room, &self.opts.host_id))
            .arg(&self.opts.host_id)
            .arg(keys::presence_prefix(&room))
            .arg(&user)
            .arg(self.options().publish_command())
            .arg(keys::channel(&room))
            .arg(payload)
            .arg(&room)
            .arg(keys::reaped_prefix(&room))
            .arg(REAPED_KEEP.as_millis() as u64);
        let inv = &inv;
        let reply = self
            .with_conn("presence leave", |mut c| async move {
                inv.invoke_async::<i64>(&mut c).await
            })
            .await?;
        Ok(reply == 1)
    }

    async fn presence_list(&self, room: String) -> Result<Vec<PresenceEntry>, ClusterError> {
        let mut inv = self.scripts.presence_list.key(keys::presence_hosts(&room));
        inv.arg(keys::presence_prefix(&room));
        let inv = &inv;
        let reply = self
            .with_conn("presence list", |mut c| async move {
                inv.invoke_async::<Value>(&mut c).await
            })
            .await?;
        let flat = strings(reply)?;
        let mut users: HashMap<String, Option<String>> = HashMap::new();
        for pair in flat.chunks(2) {
            let [user, name] = pair else {
                return Err(ClusterError::Protocol("presence list: odd reply".into()));
            };
            let user = utf8(user.clone(), "presence user")?;
            let name = utf8(name.clone(), "presence name")?;
            let name = (!name.is_empty()).then_some(name);
            let slot = users.entry(user).or_default();
            if slot.is_none() {
                *slot = name;
            }
        }
        let mut out: Vec<PresenceEntry> = users
            .into_iter()
            .map(|(user, name)| PresenceEntry { user, name })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Rewrites this host's presence hash of every room it has users in, and refreshes the
    /// expiries (also puts it back after Redis lost it). Stops at the first failure (Redis
    /// is down or stalled: each further room would wait for it too), but on a Redis Cluster
    /// only skips the other rooms of the master that failed: the others' rooms are still
    /// refreshed, so their presence does not expire while one master is down.
    pub(super) async fn presence_refresh(&self) {
        let rooms: Vec<(String, Vec<PresenceUser>)> = lock(&self.presence)
            .iter()
            .map(|(room, users)| {
                (
                    room.clone(),
                    users.iter().map(|(u, n)| (u.clone(), n.clone())).collect(),
                )
            })
            .collect();
        let map = if self.is_cluster() {
            lock(&self.topology).map.clone()
        } else {
            None
        };
        let mut failed: HashSet<NodeAddr> = HashSet::new();
        for (room, users) in rooms {
            let master = map.as_ref().and_then(|m| {
                m.master_of(slot_of(keys::presence_hosts(&room).as_bytes()))
                    .cloned()
            });
            if master.as_ref().is_some_and(|m| failed.contains(m)) {
                continue;
            }
            let mut inv = self.presence_set_call(&room, "refresh", "");
            for (user, name) in &users {
                inv.arg(user).arg(name.as_deref().unwrap_or(""));
            }
            let inv = &inv;
            let refreshed = self
                .with_conn("presence refresh", |mut c| async move {
                    inv.invoke_async::<i64>(&mut c).await
                })
                .await;
            if let Err(e) = refreshed {
                tracing::debug!(room = %room, error = %e, "presence refresh failed");
                match master {
                    Some(m) => {
                        failed.insert(m);
                    }
                    None => return,
                }
            }
        }
    }
}
