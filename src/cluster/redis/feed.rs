//! The backend feed's ledger in Redis, for a cluster of hosts (see `crate::feed`).
//!
//! Rooms are split into [`FEED_PARTITIONS`] partitions (by their key slot). Per partition,
//! under one hash tag so that each script below touches one slot:
//!
//! - `corelay:feed:{p<n>}:owed`, a hash room → the highest offset acked to a sender. The
//!   host that sequenced a message marks it ([`RedisCluster::feed_mark`]) **before** it
//!   acks the sender, so every acked message's room is marked, whichever host dies.
//! - `corelay:feed:{p<n>}:cursors`, a hash room → the highest offset the backend took.
//! - `corelay:feed:{p<n>}:lease`, the id of the host delivering the partition, with an
//!   expiry the holder renews. A host that dies stops renewing; another takes the lease
//!   and resumes every owed room from its cursor.
//!
//! `corelay:feed:hosts` is a sorted set of the hosts running a feed, scored by expiry, so
//! that each host takes about its share of the partitions.

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::Value;

use super::RedisCluster;
use crate::cluster::topology::slot_of;
use crate::cluster::wire::{lossy, strings};
use crate::cluster::ClusterError;

/// How many partitions the rooms' feed is split into.
pub const FEED_PARTITIONS: u16 = 64;

/// The partition of a room.
pub fn feed_partition(room: &str) -> u16 {
    slot_of(room.as_bytes()) % FEED_PARTITIONS
}

/// `(room, offset)` pairs grouped by the rooms' partitions.
pub fn by_partition(rooms: Vec<(String, u64)>) -> BTreeMap<u16, Vec<(String, u64)>> {
    let mut out: BTreeMap<u16, Vec<(String, u64)>> = BTreeMap::new();
    for (room, offset) in rooms {
        out.entry(feed_partition(&room))
            .or_default()
            .push((room, offset));
    }
    out
}

fn owed_key(p: u16) -> String {
    format!("corelay:feed:{{p{p}}}:owed")
}

fn cursors_key(p: u16) -> String {
    format!("corelay:feed:{{p{p}}}:cursors")
}

fn lease_key(p: u16) -> String {
    format!("corelay:feed:{{p{p}}}:lease")
}

const HOSTS_KEY: &str = "corelay:feed:hosts";

/// KEYS: owed. ARGV: room, offset pairs. Raises each room's mark to its offset.
static MARK: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
for i = 1, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0') or 0
  if tonumber(ARGV[i + 1]) > cur then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
"#,
    )
});

/// KEYS: lease. ARGV: host, ttl ms, mode (`hold` or `release`). `hold` takes a free lease
/// or renews this host's; answers 1 when the host holds it after the call.
static LEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
if ARGV[3] == 'release' then
  if cur == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#,
    )
});

/// KEYS: owed, cursors. Answers a flat list room, cursor, mark for every room whose mark
/// is above its cursor.
static OWED: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local marks = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #marks, 2 do
  local cursor = redis.call('HGET', KEYS[2], marks[i]) or '0'
  if tonumber(marks[i + 1]) > tonumber(cursor) then
    out[#out + 1] = marks[i]
    out[#out + 1] = cursor
    out[#out + 1] = marks[i + 1]
  end
end
return out
"#,
    )
});

/// KEYS: owed, cursors, lease. ARGV: host, then room, offset pairs. Only while `host`
/// holds the lease (else answers 0 and changes nothing: a host that lost its lease must not
/// move the cursors of the host that took it): moves the cursors, and clears each mark
/// that is not above its new cursor.
static DONE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do
  local mark = redis.call('HGET', KEYS[1], ARGV[i])
  if mark and tonumber(mark) <= tonumber(ARGV[i + 1]) then redis.call('HDEL', KEYS[1], ARGV[i]) end
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
return 1
"#,
    )
});

/// A room the feed owes messages, as the Redis ledger has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwedRoom {
    pub room: String,
    /// The highest offset the backend took.
    pub delivered: u64,
    /// The highest offset acked.
    pub latest: u64,
}

impl RedisCluster {
    /// Marks rooms as owed to the feed up to these offsets (acked, or about to be): one
    /// script call per partition, all at once. Must succeed before the senders are acked.
    pub async fn feed_mark(&self, marks: Vec<(String, u64)>) -> Result<(), ClusterError> {
        let by_partition = by_partition(marks);
        let shared = self.inner.shared.clone();
        self.on_bridge(async move {
            let calls = by_partition.into_iter().map(|(p, rooms)| {
                let shared = shared.clone();
                async move {
                    let mut inv = MARK.key(owed_key(p));
                    for (room, offset) in &rooms {
                        inv.arg(room).arg(*offset);
                    }
                    let inv = &inv;
                    shared
                        .with_conn("a feed mark", |mut c| async move {
                            inv.invoke_async::<Value>(&mut c).await
                        })
                        .await
                }
            });
            for r in futures::future::join_all(calls).await {
                r?;
            }
            Ok(())
        })
        .await
    }

    /// Takes or renews (`hold`) or gives up (`!hold`) the lease of partition `p` for this
    /// host, for `ttl`; whether this host holds it after the call.
    pub async fn feed_lease(
        &self,
        p: u16,
        hold: bool,
        ttl: Duration,
    ) -> Result<bool, ClusterError> {
        let shared = self.inner.shared.clone();
        self.on_bridge(async move {
            let mut inv = LEASE.key(lease_key(p));
            inv.arg(&shared.opts.host_id)
                .arg(ttl.as_millis() as u64)
                .arg(if hold { "hold" } else { "release" });
            let inv = &inv;
            shared
                .with_conn("a feed lease", |mut c| async move {
                    inv.invoke_async::<i64>(&mut c).await
                })
                .await
                .map(|held| held == 1)
        })
        .await
    }

    /// The rooms of partition `p` the feed owes messages.
    pub async fn feed_owed(&self, p: u16) -> Result<Vec<OwedRoom>, ClusterError> {
        let shared = self.inner.shared.clone();
        let reply = self
            .on_bridge(async move {
                let mut inv = OWED.key(owed_key(p));
                inv.key(cursors_key(p));
                let inv = &inv;
                shared
                    .with_conn("the feed's owed rooms", |mut c| async move {
                        inv.invoke_async::<Value>(&mut c).await
                    })
                    .await
            })
            .await?;
        let flat = strings(reply)?;
        let text = lossy(&flat);
        let mut out = Vec::with_capacity(flat.len() / 3);
        for triple in text.chunks_exact(3) {
            let number = |s: &str| {
                s.parse::<u64>()
                    .map_err(|_| ClusterError::Protocol(format!("feed ledger offset {s:?}")))
            };
            out.push(OwedRoom {
                room: triple[0].to_string(),
                delivered: number(&triple[1])?,
                latest: number(&triple[2])?,
            });
        }
        Ok(out)
    }

    /// The backend took partition `p`'s rooms up to these offsets: moves their cursors and
    /// clears the marks they reached, only while this host holds the lease; whether it did.
    pub async fn feed_done(&self, p: u16, rooms: Vec<(String, u64)>) -> Result<bool, ClusterError> {
        let shared = self.inner.shared.clone();
        self.on_bridge(async move {
            let mut inv = DONE.key(owed_key(p));
            inv.key(cursors_key(p))
                .key(lease_key(p))
                .arg(&shared.opts.host_id);
            for (room, offset) in &rooms {
                inv.arg(room).arg(*offset);
            }
            let inv = &inv;
            shared
                .with_conn("the feed's cursors", |mut c| async move {
                    inv.invoke_async::<i64>(&mut c).await
                })
                .await
                .map(|done| done == 1)
        })
        .await
    }

    /// Says this host runs a feed (for `ttl`) and answers how many hosts do.
    pub async fn feed_hosts(&self, ttl: Duration) -> Result<u64, ClusterError> {
        let shared = self.inner.shared.clone();
        self.on_bridge(async move {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let mut pipe = redis::pipe();
            pipe.cmd("ZADD")
                .arg(HOSTS_KEY)
                .arg(now + ttl.as_millis() as u64)
                .arg(&shared.opts.host_id)
                .ignore()
                .cmd("ZREMRANGEBYSCORE")
                .arg(HOSTS_KEY)
                .arg("-inf")
                .arg(now)
                .ignore()
                .cmd("ZCARD")
                .arg(HOSTS_KEY);
            let pipe = &pipe;
            shared
                .with_conn("the feed's hosts", |mut c| async move {
                    pipe.query_async::<(u64,)>(&mut c).await
                })
                .await
                .map(|(n,)| n)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_in_range() {
        assert_eq!(feed_partition("lobby"), feed_partition("lobby"));
        assert!((0..2000).all(|i| feed_partition(&format!("r{i}")) < FEED_PARTITIONS));
        // Every partition's keys share one hash tag (one slot).
        let p = feed_partition("lobby");
        let slot = |k: &str| slot_of(k.as_bytes());
        assert_eq!(slot(&owed_key(p)), slot(&cursors_key(p)));
        assert_eq!(slot(&owed_key(p)), slot(&lease_key(p)));
    }
}
