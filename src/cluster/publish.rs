//! The publish script's call: a batch is grouped by room ([`group_by_room`]), the rooms of
//! one Redis node become one `EVALSHA` ([`PublishCall`]), its reply one result per message
//! of each room, and the results are put back in the batch's order ([`scatter`]). A
//! shard's own connections send it ([`super::shard_link`]).

use std::time::Duration;

use redis::Value;

use super::wire::{message_payload_parts, parse_ack, strings};
use super::{keys, ClusterError, NewMessage, Published, RedisOptions};

/// The messages of a batch grouped by room, in order of first appearance: each group's
/// indexes into the batch and the highest floor given with the room's messages.
pub(crate) fn group_by_room(msgs: &[(NewMessage, u64)]) -> Vec<(Vec<usize>, u64)> {
    let mut groups: Vec<(&str, Vec<usize>, u64)> = Vec::new();
    for (i, (m, floor)) in msgs.iter().enumerate() {
        match groups.iter_mut().find(|(room, _, _)| *room == m.room) {
            Some((_, idx, f)) => {
                idx.push(i);
                *f = (*f).max(*floor);
            }
            None => groups.push((&m.room, vec![i], *floor)),
        }
    }
    groups.into_iter().map(|(_, idx, f)| (idx, f)).collect()
}

/// One result per message of a batch from its rooms' outcomes (`outcomes[g]` for
/// `groups[g]`): a room's error goes to each of its messages.
pub(crate) fn scatter(
    len: usize,
    groups: &[(Vec<usize>, u64)],
    outcomes: Vec<Result<Vec<Result<Published, ClusterError>>, ClusterError>>,
) -> Vec<Result<Published, ClusterError>> {
    let mut results: Vec<Option<Result<Published, ClusterError>>> =
        (0..len).map(|_| None).collect();
    for ((idx, _), outcome) in groups.iter().zip(outcomes) {
        match outcome {
            Ok(each) => {
                for (&i, r) in idx.iter().zip(each) {
                    results[i] = Some(r);
                }
            }
            Err(e) => {
                for &i in idx {
                    results[i] = Some(Err(e.clone()));
                }
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(ClusterError::Protocol("publish: no reply".into()))))
        .collect()
}

/// One room's messages, as they go into a [`PublishCall`].
pub(crate) struct RoomMessages<'a> {
    /// The room's group in the batch (an index into [`group_by_room`]'s answer).
    pub group: usize,
    /// The room's messages, in order.
    pub msgs: Vec<&'a NewMessage>,
    /// The highest floor given with them.
    pub floor: u64,
}

/// One call of the publish script for the messages of one or many rooms (all of one Redis
/// node): the `EVALSHA` command, and what is needed to turn its reply into one result per
/// message.
pub(crate) struct PublishCall<'a> {
    /// `EVALSHA <publish script> …`; on `NOSCRIPT`, load the script and send it again.
    pub cmd: redis::Cmd,
    /// The rooms in the call, in order.
    rooms: Vec<RoomPart<'a>>,
}

/// A room's part of a [`PublishCall`].
struct RoomPart<'a> {
    /// Its group in the batch.
    group: usize,
    /// The messages in the call, in order.
    sent: Vec<&'a NewMessage>,
    /// Per message of the room: `Some` when it failed before the call (its payload could
    /// not be built), `None` when its result is the next of the room's replies.
    early: Vec<Option<Result<Published, ClusterError>>>,
}

/// What a call gave one room: its messages' results, or one error for all of them.
pub(crate) type RoomOutcome = Result<Vec<Result<Published, ClusterError>>, ClusterError>;

impl<'a> PublishCall<'a> {
    /// The call for `rooms`: the script whose SHA1 is `script_sha`, with the limits of
    /// `opts`, publishing with `publish_command` (`PUBLISH` or `SPUBLISH`), refused by
    /// Redis after `deadline` (Redis's clock, ms; see [`ClusterError::Timeout`]). The keys
    /// are declared (KEYS) when `declare_keys`, else passed in ARGV (a Redis Cluster call
    /// over several slots; see the script).
    pub fn new(
        opts: &RedisOptions,
        script_sha: &str,
        publish_command: &str,
        deadline: u64,
        declare_keys: bool,
        rooms: Vec<RoomMessages<'a>>,
    ) -> PublishCall<'a> {
        // A message whose payload cannot be built fails alone; the others go.
        let mut payloads: Vec<Vec<(String, String)>> = Vec::with_capacity(rooms.len());
        let mut parts = Vec::with_capacity(rooms.len());
        for room in rooms {
            let mut part = RoomPart {
                group: room.group,
                sent: Vec::with_capacity(room.msgs.len()),
                early: Vec::with_capacity(room.msgs.len()),
            };
            let mut room_payloads = Vec::with_capacity(room.msgs.len());
            for m in room.msgs {
                match message_payload_parts(m) {
                    Ok(p) => {
                        room_payloads.push(p);
                        part.sent.push(m);
                        part.early.push(None);
                    }
                    Err(e) => part.early.push(Some(Err(e))),
                }
            }
            payloads.push(room_payloads);
            parts.push((part, room.floor));
        }
        let mut keys = Vec::with_capacity(parts.len() * 3);
        for (part, _) in parts.iter().filter(|(p, _)| !p.sent.is_empty()) {
            let room = part.room();
            keys.push(keys::offset(room));
            keys.push(keys::stream(room));
            for m in &part.sent {
                if let Some(cid) = &m.cid {
                    keys.push(keys::cid(room, &m.user, cid));
                }
            }
        }
        let sent_rooms = parts.iter().filter(|(p, _)| !p.sent.is_empty()).count();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script_sha);
        if declare_keys {
            cmd.arg(keys.len()).arg(&keys);
        } else {
            cmd.arg(0);
        }
        cmd.arg(opts.dedupe_window.as_millis() as u64)
            .arg(opts.history_max_len)
            .arg(opts.history_max_age.map_or(0, |d| d.as_millis() as u64))
            .arg(publish_command)
            .arg(deadline)
            .arg(sent_rooms);
        // Where the keys start in ARGV (1-based, after the fixed 7 and the rooms' values).
        let argv_len: usize = 7 + parts
            .iter()
            .filter(|(p, _)| !p.sent.is_empty())
            .map(|(p, _)| 4 + 2 * p.sent.len())
            .sum::<usize>();
        cmd.arg(if declare_keys { 0 } else { argv_len + 1 });
        for ((part, floor), payloads) in parts.iter().zip(&payloads) {
            let Some((prefix, _)) = payloads.first() else {
                continue;
            };
            cmd.arg(keys::channel(part.room()))
                .arg(*floor)
                .arg(part.sent.len())
                .arg(prefix);
            for (m, (_, suffix)) in part.sent.iter().zip(payloads) {
                match &m.cid {
                    // The dedupe record's tail: the script puts the offset before it.
                    Some(_) => cmd.arg(format!("{}:{}", m.ts, m.id)),
                    None => cmd.arg(""),
                };
                cmd.arg(suffix);
            }
        }
        if !declare_keys {
            cmd.arg(keys);
        }
        PublishCall {
            cmd,
            rooms: parts.into_iter().map(|(p, _)| p).collect(),
        }
    }

    /// Whether the call carries no message (every payload failed): nothing to send.
    pub fn is_empty(&self) -> bool {
        self.rooms.iter().all(|r| r.sent.is_empty())
    }

    /// What the call gave each of its rooms (by group) when it failed as a whole: `e` for
    /// the messages sent, their own error for those that failed before.
    pub fn fail(self, e: &ClusterError) -> Vec<(usize, RoomOutcome)> {
        self.rooms
            .into_iter()
            .map(|r| {
                let each = r
                    .early
                    .into_iter()
                    .map(|x| x.unwrap_or_else(|| Err(e.clone())))
                    .collect();
                (r.group, Ok(each))
            })
            .collect()
    }

    /// What the call gave each of its rooms (by group), from the script's reply (`target`
    /// and `command_timeout` for the messages).
    pub fn settle(
        self,
        reply: Value,
        target: &str,
        command_timeout: Duration,
    ) -> Vec<(usize, RoomOutcome)> {
        match self.room_replies(reply, target, command_timeout) {
            Err(e) => self.fail(&e),
            Ok(mut replies) => {
                replies.reverse();
                self.rooms
                    .into_iter()
                    .map(|r| {
                        if r.sent.is_empty() {
                            return (r.group, Ok(r.early.into_iter().flatten().collect()));
                        }
                        let group = r.group;
                        let outcome = match replies.pop() {
                            Some(replies) => r.settle(replies),
                            None => Err(ClusterError::Protocol("publish: no reply".into())),
                        };
                        (group, outcome)
                    })
                    .collect()
            }
        }
    }

    /// The script's reply split per room that was sent, or why it cannot be.
    fn room_replies(
        &self,
        reply: Value,
        target: &str,
        command_timeout: Duration,
    ) -> Result<Vec<RoomReply>, ClusterError> {
        let Value::Array(rooms) = reply else {
            return Err(ClusterError::Protocol(format!(
                "publish script answered {reply:?}"
            )));
        };
        if let Some(Value::BulkString(first)) = rooms.first() {
            if first == b"expired" {
                // Comes alone: the script did nothing.
                return Err(ClusterError::Timeout(format!(
                    "redis at {target} ran the publish after its deadline ({:?}): it was \
                     stalled (or its clock jumped); nothing was stored",
                    command_timeout / 2
                )));
            }
        }
        let sent = self.rooms.iter().filter(|r| !r.sent.is_empty()).count();
        if rooms.len() != sent {
            return Err(ClusterError::Protocol(format!(
                "publish script answered {} rooms for {sent}",
                rooms.len()
            )));
        }
        rooms
            .into_iter()
            .map(|room| match room {
                Value::Int(first) => u64::try_from(first)
                    .ok()
                    .filter(|&f| f > 0)
                    .map(RoomReply::From)
                    .ok_or_else(|| {
                        ClusterError::Protocol(format!(
                            "publish script answered offset {first} for a room"
                        ))
                    }),
                room @ Value::Array(_) => strings(room).map(RoomReply::Each),
                other => Err(ClusterError::Protocol(format!(
                    "publish script answered {other:?} for a room"
                ))),
            })
            .collect()
    }
}

/// The publish script's reply for one room.
enum RoomReply {
    /// Every message was new: they got consecutive offsets from this one.
    From(u64),
    /// One reply per message: its offset, or `d<first ack>` for a duplicate.
    Each(Vec<Vec<u8>>),
}

impl RoomPart<'_> {
    /// The room's name (of its first message sent).
    fn room(&self) -> &str {
        self.sent.first().map_or("", |m| m.room.as_str())
    }

    /// One result per message of the room from its reply.
    fn settle(self, reply: RoomReply) -> RoomOutcome {
        let mut results: Vec<Result<Published, ClusterError>> = match reply {
            RoomReply::From(first) => (first..)
                .zip(&self.sent)
                .map(|(offset, m)| Ok(Published::Stored(m.at(offset))))
                .collect(),
            RoomReply::Each(replies) => {
                if replies.len() != self.sent.len() {
                    return Err(ClusterError::Protocol(format!(
                        "publish script answered {} replies for {} messages",
                        replies.len(),
                        self.sent.len()
                    )));
                }
                replies
                    .iter()
                    .zip(&self.sent)
                    .map(|(reply, m)| published(m, reply))
                    .collect()
            }
        };
        results.reverse();
        Ok(self
            .early
            .into_iter()
            .map(|r| match r {
                Some(failed) => failed,
                None => results
                    .pop()
                    .unwrap_or_else(|| Err(ClusterError::Protocol("publish: no reply".into()))),
            })
            .collect())
    }
}

/// One message's reply of the publish script: its offset, or `d<first ack>`.
fn published(msg: &NewMessage, reply: &[u8]) -> Result<Published, ClusterError> {
    match reply.strip_prefix(b"d") {
        Some(first) => Ok(Published::Duplicate(parse_ack(first)?)),
        None => {
            let offset = std::str::from_utf8(reply)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| {
                    ClusterError::Protocol(format!(
                        "publish script answered {:?}",
                        String::from_utf8_lossy(reply)
                    ))
                })?;
            Ok(Published::Stored(msg.at(offset)))
        }
    }
}
