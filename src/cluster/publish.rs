//! The publish script's call: one room's messages become one `EVALSHA` ([`PublishCall`]),
//! and its reply one result per message. A batch over several rooms is grouped by room
//! ([`group_by_room`]), one call each, and the results are put back in the batch's order
//! ([`scatter`]). A shard's own command connection sends it ([`super::shard_link`]).

use std::time::Duration;

use redis::Value;

use super::wire::{lossy, message_payload_parts, parse_ack, parse_u64, strings};
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

/// One call of the publish script for one room's messages: the `EVALSHA` command, and
/// what is needed to turn its reply into one result per message.
pub(crate) struct PublishCall<'a> {
    /// `EVALSHA <publish script> …`; on `NOSCRIPT`, load the script and send it again.
    pub cmd: redis::Cmd,
    /// The messages in the call, in order.
    sent: Vec<&'a NewMessage>,
    /// Per message of the room: `Some` when it failed before the call (its payload could
    /// not be built), `None` when its result is the next reply.
    early: Vec<Option<Result<Published, ClusterError>>>,
}

impl<'a> PublishCall<'a> {
    /// The call for `msgs` (one room's, in order), their offsets above `floor`: the script
    /// whose SHA1 is `script_sha`, with the limits of `opts` and a deadline in Redis's clock
    /// (`redis_now_ms`, see [`ClusterError::Timeout`]).
    pub fn new(
        opts: &RedisOptions,
        script_sha: &str,
        redis_now_ms: u64,
        msgs: &[&'a NewMessage],
        floor: u64,
    ) -> PublishCall<'a> {
        let room = msgs.first().map_or("", |m| m.room.as_str());
        // A message whose payload cannot be built fails alone; the others go.
        let mut parts = Vec::with_capacity(msgs.len());
        let mut early = Vec::with_capacity(msgs.len());
        for m in msgs {
            match message_payload_parts(m) {
                Ok(p) => {
                    parts.push((*m, p));
                    early.push(None);
                }
                Err(e) => early.push(Some(Err(e))),
            }
        }
        let half = opts.command_timeout / 2;
        // In Redis's clock: the script refuses to run after it (see `ClusterError::Timeout`).
        let deadline = redis_now_ms.saturating_add(half.as_millis() as u64);
        let mut keys = vec![keys::offset(room), keys::stream(room)];
        for (m, _) in &parts {
            if let Some(cid) = &m.cid {
                keys.push(keys::cid(room, &m.user, cid));
            }
        }
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script_sha)
            .arg(keys.len())
            .arg(keys)
            .arg(keys::channel(room))
            .arg(opts.dedupe_window.as_millis() as u64)
            .arg(opts.history_max_len)
            .arg(opts.history_max_age.map_or(0, |d| d.as_millis() as u64))
            .arg(opts.publish_command())
            .arg(deadline)
            .arg(floor)
            .arg(parts.len());
        for (m, (prefix, suffix)) in &parts {
            cmd.arg(if m.cid.is_some() { "1" } else { "0" })
                .arg(m.cid.as_deref().unwrap_or(""))
                .arg(&m.user)
                .arg(&m.text)
                .arg(m.ts)
                .arg(&m.id)
                .arg(prefix)
                .arg(suffix);
        }
        PublishCall {
            cmd,
            sent: parts.into_iter().map(|(m, _)| m).collect(),
            early,
        }
    }

    /// Whether the call carries no message (every payload failed): nothing to send.
    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    /// One result per message of the call from the script's reply (`target` and
    /// `command_timeout` for the messages).
    pub fn settle(
        self,
        reply: Value,
        target: &str,
        command_timeout: Duration,
    ) -> Result<Vec<Result<Published, ClusterError>>, ClusterError> {
        if self.sent.is_empty() {
            return Ok(self.early.into_iter().flatten().collect());
        }
        let Value::Array(replies) = reply else {
            return Err(ClusterError::Protocol(format!(
                "publish script answered {reply:?}"
            )));
        };
        let replies = replies
            .into_iter()
            .map(strings)
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(b"expired") = replies.first().and_then(|r| r.first()).map(Vec::as_slice) {
            // Comes alone: the script did nothing.
            return Err(ClusterError::Timeout(format!(
                "redis at {target} ran the publish after its deadline ({:?}): it was stalled \
                 (or its clock jumped); nothing was stored",
                command_timeout / 2
            )));
        }
        if replies.len() != self.sent.len() {
            return Err(ClusterError::Protocol(format!(
                "publish script answered {} replies for {} messages",
                replies.len(),
                self.sent.len()
            )));
        }
        let mut replies = replies.into_iter().zip(self.sent);
        Ok(self
            .early
            .into_iter()
            .map(|r| match r {
                Some(failed) => failed,
                None => match replies.next() {
                    Some((reply, m)) => published(m, &reply),
                    None => Err(ClusterError::Protocol("publish: no reply".into())),
                },
            })
            .collect())
    }
}

/// One message's reply of the publish script: `ok <offset>` or `dup <first ack>`.
fn published(msg: &NewMessage, reply: &[Vec<u8>]) -> Result<Published, ClusterError> {
    match reply.first().map(Vec::as_slice) {
        Some(b"ok") => {
            let offset = parse_u64(reply.get(1), "publish offset")?;
            Ok(Published::Stored(msg.at(offset)))
        }
        Some(b"dup") => {
            let first = reply
                .get(1)
                .ok_or_else(|| ClusterError::Protocol("publish: dup without ack".into()))?;
            Ok(Published::Duplicate(parse_ack(first)?))
        }
        _ => Err(ClusterError::Protocol(format!(
            "publish script answered {:?}",
            lossy(reply)
        ))),
    }
}
