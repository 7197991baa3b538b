//! The Redis history store (`store = "redis"`): each room's recent history in a Redis
//! stream, for a cluster of hosts that has Redis but no ScyllaDB.
//!
//! # Who writes
//!
//! In a cluster the [publish script](crate::cluster::shard_link::ShardLink::publish_batch) writes the
//! stream: it assigns the offset and appends the message in the same atomic step, so the
//! message is durable (as far as Redis persistence goes) when the sender is acked. **The
//! home shard does not call [`HistoryStore::append`] for messages it published through the
//! script.** `append` exists for the store suite, for tools (import, repair) and for
//! completeness, and it is safe against that mistake: re-appending a message that the
//! stream already holds, field for field, at the same offset is a no-op, while a
//! *different* message at a taken offset is [`StoreError::OffsetConflict`].
//!
//! # Layout
//!
//! See [`crate::cluster`]: stream `corelay:{room}:stream` with entry ids `<offset>-0` (so
//! XRANGE / XREVRANGE read by offset), each entry either the publish script's one field `m`
//! (the message's channel payload: one field is cheaper for Redis to write than five) or
//! `append`'s fields `id`, `user`, `text`, `ts` and `cid`; offset counter `corelay:{room}:offset`, dedupe keys
//! `corelay:{room}:cid:…` holding `<offset>:<ts>:<id>`. Streams are trimmed by count and
//! age (`history.max_len`, `history.max_age`): reads return what is left, and
//! [`HistoryStore::latest_offset`] still reports the newest offset.
//!
//! # Semantics worth knowing
//!
//! - `find_cid` sees a cid only while its dedupe key lives (`limits.dedupe_window`) and its
//!   message is still in the stream: that is exactly what idempotent sends need.
//! - `append` is atomic per room (one script). A batch spanning several rooms is first
//!   checked room by room, then written room by room, under a store-wide lock that also
//!   applies appends in the order their futures are first polled; with no other writer it
//!   is all or nothing.
//! - Every call is bounded by `redis.command_timeout`; Redis down or stalled is
//!   [`StoreError::Unavailable`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ::redis::Value;

use super::HistoryStore;
use crate::cluster::redis::RedisCluster;
use crate::cluster::wire::{bytes, decode_event, lossy, parse_ack, parse_u64, strings};
use crate::cluster::{keys, ClusterError, ClusterEvent};
use crate::history::{HistoryQuery, StoreError, StoredMessage};

/// Raises `KEYS[1]` (an offset counter) to `ARGV[1]` when lower; 1 when raised, else 0. Rare
/// (room loads in `scylla` cluster mode, when ScyllaDB is ahead), so sent with EVAL.
const RAISE_OFFSET: &str = "local cur = tonumber(redis.call('GET', KEYS[1]) or '0') or 0 \
if cur < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) return 1 end return 0";

/// Largest COUNT sent to Redis for one read.
const MAX_COUNT: usize = 1 << 40;

/// [`HistoryStore`] over the rooms' Redis streams, sharing the [`RedisCluster`]'s command
/// connection. Cheap to clone, `Send + Sync`.
#[derive(Clone, Debug)]
pub struct RedisStore {
    cluster: RedisCluster,
    closed: Arc<AtomicBool>,
    /// Applies appends one at a time, in the order they were first polled (FIFO lock).
    order: Arc<tokio::sync::Mutex<()>>,
}

impl RedisStore {
    /// A store over `cluster`'s connection. Trimming and the dedupe window are the
    /// cluster's (`history.max_len`, `history.max_age`, `limits.dedupe_window`), so that
    /// appends and the publish script keep the streams alike.
    pub fn new(cluster: &RedisCluster) -> RedisStore {
        RedisStore {
            cluster: cluster.clone(),
            closed: Arc::new(AtomicBool::new(false)),
            order: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// `Ok` unless closed or Redis is known to be unreachable (no I/O).
    pub fn health(&self) -> Result<(), StoreError> {
        self.open()?;
        self.cluster.health().map_err(store_error)
    }

    /// Later calls on any clone fail with [`StoreError::Closed`]. The cluster connection is
    /// not closed (it is shared); close it with [`RedisCluster::close`].
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    fn open(&self) -> Result<(), StoreError> {
        if self.closed.load(Ordering::Acquire) {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }

    /// Runs the append script on one room's messages (`write` or only check).
    async fn append_room(
        &self,
        room: &str,
        msgs: &[StoredMessage],
        write: bool,
    ) -> Result<(), StoreError> {
        let opts = self.cluster.options();
        let mut keys_ = vec![keys::offset(room), keys::stream(room)];
        let mut args: Vec<Vec<u8>> = vec![
            if write {
                b"write".to_vec()
            } else {
                b"check".to_vec()
            },
            (opts.dedupe_window.as_millis() as u64)
                .to_string()
                .into_bytes(),
            opts.history_max_len.to_string().into_bytes(),
            opts.history_max_age
                .map_or(0, |d| d.as_millis() as u64)
                .to_string()
                .into_bytes(),
            msgs.len().to_string().into_bytes(),
        ];
        for m in msgs {
            let key_index = match &m.cid {
                Some(cid) => {
                    keys_.push(keys::cid(room, &m.user, cid));
                    keys_.len() - 2
                }
                None => 0,
            };
            args.push(m.offset.to_string().into_bytes());
            args.push(m.id.clone().into_bytes());
            args.push(m.user.clone().into_bytes());
            args.push(m.text.clone().into_bytes());
            args.push(m.ts.to_string().into_bytes());
            args.push(m.cid.clone().unwrap_or_default().into_bytes());
            args.push(key_index.to_string().into_bytes());
        }
        let reply = self
            .cluster
            .append_script(keys_, args)
            .await
            .map_err(store_error)?;
        let parts = strings(reply).map_err(store_error)?;
        match parts.first().map(Vec::as_slice) {
            Some(b"ok") => Ok(()),
            Some(b"conflict") => {
                let number =
                    |i: usize| parse_u64(parts.get(i), "conflict reply").map_err(store_error);
                Err(StoreError::OffsetConflict {
                    room: room.to_owned(),
                    offset: number(1)?,
                    latest: number(2)?,
                })
            }
            _ => Err(StoreError::Corrupt(format!(
                "append script answered {:?}",
                lossy(&parts)
            ))),
        }
    }

    /// Raises the room's offset counter to `at_least` if it is lower (never lowers it).
    /// Returns whether it was raised. For a durable store that holds offsets Redis no longer
    /// knows (Redis lost its data, or the history was written before Redis was the
    /// sequencer): the next publish then gets `at_least + 1`, never an offset in use.
    pub async fn raise_offset(&self, room: &str, at_least: u64) -> Result<bool, StoreError> {
        self.open()?;
        let mut cmd = ::redis::cmd("EVAL");
        cmd.arg(RAISE_OFFSET)
            .arg(1)
            .arg(keys::offset(room))
            .arg(at_least.to_string());
        match self
            .cluster
            .query("raising the offset counter", cmd)
            .await
            .map_err(store_error)?
        {
            Value::Int(n) => Ok(n == 1),
            other => Err(StoreError::Corrupt(format!(
                "raising the offset counter of room {room:?} answered {other:?}"
            ))),
        }
    }

    /// XRANGE / XREVRANGE of one room's stream, decoded, in the order Redis gave.
    async fn range(
        &self,
        room: &str,
        reverse: bool,
        from: String,
        to: String,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut cmd = ::redis::cmd(if reverse { "XREVRANGE" } else { "XRANGE" });
        cmd.arg(keys::stream(room))
            .arg(from)
            .arg(to)
            .arg("COUNT")
            .arg(limit.min(MAX_COUNT));
        let reply = self
            .cluster
            .query("a history read", cmd)
            .await
            .map_err(store_error)?;
        decode_entries(room, reply)
    }
}

impl HistoryStore for RedisStore {
    async fn append(&self, batch: Vec<StoredMessage>) -> Result<(), StoreError> {
        self.open()?;
        if batch.is_empty() {
            return Ok(());
        }
        let _order = self.order.lock().await;
        // The batch's rooms, in order of first appearance, each with its messages in order.
        let mut rooms: Vec<(&str, Vec<StoredMessage>)> = Vec::new();
        for m in &batch {
            match rooms.iter_mut().find(|(r, _)| *r == m.room.as_str()) {
                Some((_, msgs)) => msgs.push(m.clone()),
                None => rooms.push((m.room.as_str(), vec![m.clone()])),
            }
        }
        if rooms.len() > 1 {
            for (room, msgs) in &rooms {
                self.append_room(room, msgs, false).await?;
            }
        }
        for (room, msgs) in &rooms {
            self.append_room(room, msgs, true).await?;
        }
        Ok(())
    }

    async fn read(
        &self,
        room: &str,
        query: HistoryQuery,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.open()?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        match query {
            HistoryQuery::Latest => {
                let mut msgs = self
                    .range(room, true, "+".into(), "-".into(), limit)
                    .await?;
                msgs.reverse();
                Ok(msgs)
            }
            HistoryQuery::Before(offset) => {
                if offset <= 1 {
                    return Ok(Vec::new());
                }
                // An end id without a sequence means `<ms>-<max seq>`: offsets < `offset`.
                let mut msgs = self
                    .range(room, true, (offset - 1).to_string(), "-".into(), limit)
                    .await?;
                msgs.reverse();
                Ok(msgs)
            }
            HistoryQuery::After(offset) => match offset.checked_add(1) {
                None => Ok(Vec::new()),
                Some(first) => {
                    self.range(room, false, format!("{first}-0"), "+".into(), limit)
                        .await
                }
            },
        }
    }

    async fn latest_offset(&self, room: &str) -> Result<u64, StoreError> {
        self.open()?;
        let mut cmd = ::redis::cmd("GET");
        cmd.arg(keys::offset(room));
        match self
            .cluster
            .query("the latest offset", cmd)
            .await
            .map_err(store_error)?
        {
            Value::Nil => Ok(0),
            v => bytes(v)
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("offset counter of room {room:?} is not a number"))
                }),
        }
    }

    async fn find_cid(
        &self,
        room: &str,
        user: &str,
        cid: &str,
        not_before_ts: u64,
    ) -> Result<Option<StoredMessage>, StoreError> {
        self.open()?;
        let mut get = ::redis::cmd("GET");
        get.arg(keys::cid(room, user, cid));
        let record = match self
            .cluster
            .query("a cid lookup", get)
            .await
            .map_err(store_error)?
        {
            Value::Nil => return Ok(None),
            v => bytes(v)
                .ok_or_else(|| StoreError::Corrupt("dedupe record is not a string".into()))?,
        };
        let ack = parse_ack(&record).map_err(store_error)?;
        let id = format!("{}-0", ack.offset);
        let found = self.range(room, false, id.clone(), id, 1).await?;
        Ok(found
            .into_iter()
            .next()
            .filter(|m| m.user == user && m.cid.as_deref() == Some(cid) && m.ts >= not_before_ts))
    }
}

/// The store's view of a cluster error.
fn store_error(e: ClusterError) -> StoreError {
    match e {
        ClusterError::Closed => StoreError::Closed,
        ClusterError::Protocol(text) => StoreError::Corrupt(text),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// Decodes an XRANGE / XREVRANGE reply of `room`'s stream.
fn decode_entries(room: &str, reply: Value) -> Result<Vec<StoredMessage>, StoreError> {
    let entries = match reply {
        Value::Array(entries) => entries,
        Value::Nil => return Ok(Vec::new()),
        other => {
            return Err(StoreError::Corrupt(format!(
                "stream read of room {room:?} answered {other:?}"
            )))
        }
    };
    entries.into_iter().map(|e| decode_entry(room, e)).collect()
}

/// One stream entry: `[id, [field, value, …]]`.
fn decode_entry(room: &str, entry: Value) -> Result<StoredMessage, StoreError> {
    let corrupt =
        |what: &str| StoreError::Corrupt(format!("stream entry of room {room:?}: {what}"));
    let Value::Array(parts) = entry else {
        return Err(corrupt("not an array"));
    };
    let mut parts = parts.into_iter();
    let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
        return Err(corrupt("missing id or fields"));
    };
    let id = bytes(id).ok_or_else(|| corrupt("id is not a string"))?;
    let offset = std::str::from_utf8(&id)
        .ok()
        .and_then(|s| s.split_once('-'))
        .and_then(|(ms, _)| ms.parse::<u64>().ok())
        .ok_or_else(|| corrupt("id is not <offset>-<seq>"))?;
    let pairs: Vec<(Value, Value)> = match fields {
        Value::Array(flat) => {
            if flat.len() % 2 != 0 {
                return Err(corrupt("odd field list"));
            }
            let mut it = flat.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        Value::Map(pairs) => pairs,
        _ => return Err(corrupt("fields are not a list")),
    };
    let (mut msg_id, mut user, mut text, mut ts, mut cid) = (None, None, None, None, None);
    for (k, v) in pairs {
        let k = bytes(k).ok_or_else(|| corrupt("field name is not a string"))?;
        let v = bytes(v).ok_or_else(|| corrupt("field value is not a string"))?;
        if k == b"m" {
            // The publish script's entry: the channel payload, offset included.
            return match decode_event(room, &v) {
                Ok(ClusterEvent::Message(m)) if m.offset == offset => Ok(m),
                Ok(ClusterEvent::Message(m)) => Err(corrupt(&format!(
                    "payload of offset {} at id {offset}",
                    m.offset
                ))),
                Ok(_) => Err(corrupt("payload is not a message")),
                Err(e) => Err(corrupt(&e)),
            };
        }
        let v = String::from_utf8(v).map_err(|_| corrupt("field value is not UTF-8"))?;
        match k.as_slice() {
            b"id" => msg_id = Some(v),
            b"user" => user = Some(v),
            b"text" => text = Some(v),
            b"ts" => {
                ts = Some(
                    v.parse::<u64>()
                        .map_err(|_| corrupt("ts is not a number"))?,
                )
            }
            b"cid" => cid = Some(v),
            _ => {}
        }
    }
    Ok(StoredMessage {
        room: room.to_owned(),
        offset,
        id: msg_id.ok_or_else(|| corrupt("no id field"))?,
        user: user.ok_or_else(|| corrupt("no user field"))?,
        text: text.ok_or_else(|| corrupt("no text field"))?,
        ts: ts.ok_or_else(|| corrupt("no ts field"))?,
        cid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn decodes_entries_and_refuses_corrupt_ones() {
        let entry = Value::Array(vec![
            bulk("42-0"),
            Value::Array(vec![
                bulk("id"),
                bulk("X"),
                bulk("user"),
                bulk("u"),
                bulk("text"),
                bulk(""),
                bulk("ts"),
                bulk("7"),
                bulk("cid"),
                bulk("c"),
            ]),
        ]);
        let m = decode_entry("r", entry).expect("decode");
        assert_eq!(
            m,
            StoredMessage {
                room: "r".into(),
                offset: 42,
                id: "X".into(),
                user: "u".into(),
                text: String::new(),
                ts: 7,
                cid: Some("c".into()),
            }
        );
        // The publish script's entry: one field, the channel payload.
        let payload = |room: &str, offset: u64| {
            format!(
                r#"m{{"room":"{room}","offset":{offset},"id":"X","user":"u","text":"","ts":7,"cid":"c"}}"#
            )
        };
        let one_field = |id: &str, payload: String| {
            Value::Array(vec![
                bulk(id),
                Value::Array(vec![bulk("m"), bulk(&payload)]),
            ])
        };
        assert_eq!(
            decode_entry("r", one_field("42-0", payload("r", 42))).expect("decode"),
            m
        );
        for bad in [
            one_field("43-0", payload("r", 42)),
            one_field("42-0", payload("other", 42)),
            one_field("42-0", "m{".into()),
            one_field(
                "42-0",
                r#"p{"room":"r","user":"u","online":true,"host":"h"}"#.into(),
            ),
        ] {
            assert!(
                matches!(decode_entry("r", bad), Err(StoreError::Corrupt(_))),
                "must refuse"
            );
        }
        for bad in [
            Value::Array(vec![bulk("x-0"), Value::Array(vec![])]),
            Value::Array(vec![bulk("1-0"), Value::Array(vec![bulk("id")])]),
            Value::Array(vec![bulk("1-0"), Value::Array(vec![bulk("ts"), bulk("t")])]),
            Value::Array(vec![
                bulk("1-0"),
                Value::Array(vec![bulk("text"), Value::BulkString(vec![0xff])]),
            ]),
            Value::Int(3),
        ] {
            assert!(
                matches!(decode_entry("r", bad), Err(StoreError::Corrupt(_))),
                "must refuse"
            );
        }
    }
}
