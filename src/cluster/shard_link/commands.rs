//! Publishing: the publish script on the shard's command connection, one batch at a
//! time, with its reconnect backoff.

use std::rc::Rc;
use std::time::Instant;

use redis::{ErrorKind, ServerErrorKind, Value};

use super::{within, Commands, Conns};
use crate::cluster::publish::{group_by_room, scatter, PublishCall};
use crate::cluster::redis::backoff;
use crate::cluster::resp::RespConn;
use crate::cluster::{ClusterError, NewMessage, Published};

/// Result of one publish script call: per message, or one error for the call.
type CallOutcome = Result<Vec<Result<Published, ClusterError>>, ClusterError>;

impl Conns {
    pub(super) async fn publish_batch(
        &self,
        msgs: Vec<(NewMessage, u64)>,
    ) -> Vec<Result<Published, ClusterError>> {
        let groups = group_by_room(&msgs);
        let calls: Vec<PublishCall<'_>> = groups
            .iter()
            .map(|(idx, floor)| {
                let group: Vec<&NewMessage> = idx.iter().map(|&i| &msgs[i].0).collect();
                self.cluster.publish_call(&group, *floor)
            })
            .collect();
        let outcomes = self.run_calls(calls).await;
        scatter(msgs.len(), &groups, outcomes)
    }

    /// Sends the calls in one write and reads their replies, within `command_timeout`.
    async fn run_calls(&self, calls: Vec<PublishCall<'_>>) -> Vec<CallOutcome> {
        let (target, timeout) = (self.cluster.target(), self.opts().command_timeout);
        let mut commands = self.commands.lock().await;
        let sendable: Vec<&redis::Cmd> = calls
            .iter()
            .filter(|c| !c.is_empty())
            .map(|c| &c.cmd)
            .collect();
        let replies = match within(timeout, self.exchange(&mut commands, &sendable)).await {
            Some(replies) => replies,
            None => {
                // The replies may still come: this connection cannot be trusted any more.
                commands.conn = None;
                Err(self.timed_out("the publish script"))
            }
        };
        drop(commands);
        let mut replies = match replies {
            Ok(each) => each,
            Err(e) => vec![Err(e); sendable.len()],
        }
        .into_iter();
        calls
            .into_iter()
            .map(|call| {
                if call.is_empty() {
                    return call.settle(Value::Nil, target, timeout);
                }
                match replies.next() {
                    Some(Ok(reply)) => call.settle(reply, target, timeout),
                    Some(Err(e)) => Err(e),
                    None => Err(ClusterError::Protocol("publish: no reply".into())),
                }
            })
            .collect()
    }

    /// Writes `cmds` (pipelined) on the command connection and reads one reply each: the
    /// error of the connection, or one result per command (a command Redis refused fails
    /// alone). Loads the script and sends again the calls Redis answered `NOSCRIPT`.
    async fn exchange(
        &self,
        commands: &mut Commands,
        cmds: &[&redis::Cmd],
    ) -> Result<Vec<Result<Value, ClusterError>>, ClusterError> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.command_conn(commands).await?;
        let mut replies = match pipeline(conn, cmds).await {
            Ok(r) => r,
            Err(e) => {
                commands.conn = None;
                return Err(self.cluster.classify(&e, "the publish script"));
            }
        };
        let unknown: Vec<usize> = (0..replies.len())
            .filter(|&i| matches!(&replies[i], Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)))
            .collect();
        if !unknown.is_empty() {
            let again: Vec<&redis::Cmd> = unknown.iter().map(|&i| cmds[i]).collect();
            let loaded = async {
                conn.call(&self.cluster.load_publish_script()).await?;
                pipeline(conn, &again).await
            };
            match loaded.await {
                Ok(second) => {
                    for (i, r) in unknown.into_iter().zip(second) {
                        replies[i] = r;
                    }
                }
                Err(e) => {
                    commands.conn = None;
                    return Err(self.cluster.classify(&e, "loading the publish script"));
                }
            }
        }
        Ok(replies
            .into_iter()
            .map(|r| r.map_err(|e| self.cluster.classify(&e, "the publish script")))
            .collect())
    }

    /// The command connection: the current one, or a new one (while in backoff after a
    /// failed connect, that error at once).
    async fn command_conn<'c>(
        &self,
        commands: &'c mut Commands,
    ) -> Result<&'c mut RespConn, ClusterError> {
        let conn = match commands.conn.take() {
            Some(conn) => conn,
            None => {
                if let Some((at, e)) = &commands.retry {
                    if Instant::now() < *at {
                        return Err(e.clone());
                    }
                }
                match self.connect("connect", "commands").await {
                    Ok(conn) => {
                        commands.failures = 0;
                        commands.retry = None;
                        conn
                    }
                    Err(e) => {
                        commands.failures = commands.failures.saturating_add(1);
                        let at = Instant::now() + backoff(self.opts(), commands.failures);
                        commands.retry = Some((at, e.clone()));
                        return Err(e);
                    }
                }
            }
        };
        Ok(commands.conn.insert(conn))
    }

    /// Opens the command connection ahead of the first publish, unless one is open (or
    /// being opened) already. A failure is the first call's error, as if it had tried.
    pub(super) async fn warm_commands(self: Rc<Self>) {
        let mut commands = self.commands.lock().await;
        if let Err(e) = self.command_conn(&mut commands).await {
            tracing::warn!(shard = self.shard, error = %e, "redis command connection of a shard failed at start; publishes retry it after backoff");
        }
    }

    /// The link is back: Redis answers again, so the command connection is tried at once.
    pub(super) fn reset_command_backoff(&self) {
        if let Some(mut commands) = self.commands.try_lock() {
            commands.retry = None;
        }
    }
}

/// Writes `cmds` in one go and reads one reply each, in order: an I/O or protocol error
/// for the connection, else a result per command.
async fn pipeline(
    conn: &mut RespConn,
    cmds: &[&redis::Cmd],
) -> redis::RedisResult<Vec<redis::RedisResult<Value>>> {
    let mut packed = Vec::new();
    for cmd in cmds {
        cmd.write_packed_command(&mut packed);
    }
    conn.writer.send(&packed).await?;
    let mut replies = Vec::with_capacity(cmds.len());
    for _ in cmds {
        replies.push(conn.reader.read().await?.extract_error());
    }
    Ok(replies)
}
