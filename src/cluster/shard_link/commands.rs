//! A node's command connection: the publish script (with `ASKING` before it during a
//! slot's migration, and `WAIT` after it on a master with replicas), one call at a time,
//! with its reconnect backoff.

use std::rc::Rc;
use std::time::Instant;

use redis::{ErrorKind, RedisResult, ServerErrorKind, Value};

use super::node::{Commands, NodeLink};
use super::within;
use crate::cluster::redis::backoff;
use crate::cluster::resp::RespConn;
use crate::cluster::topology::Redirect;
use crate::cluster::ClusterError;

/// What one publish script call on a node gave.
pub(super) enum ScriptReply {
    /// The script ran: its reply.
    Reply(Value),
    /// The node sent the call elsewhere (a Redis Cluster's slot moved, or is moving);
    /// nothing ran.
    Redirect(Redirect),
    /// The call failed: nothing ran, except after a lost reply ([`ClusterError::Timeout`]).
    Failed(ClusterError),
}

impl NodeLink {
    /// Runs the publish script `script` (an `EVALSHA` of `sha`, whose source is `source`)
    /// on this node within `command_timeout`: after `ASKING` when `asking`, followed by
    /// `WAIT 1` when the node has replicas, all in one write.
    pub(super) async fn run_script(
        &self,
        script: &redis::Cmd,
        source: &str,
        asking: bool,
    ) -> ScriptReply {
        let timeout = self.opts().command_timeout;
        let mut commands = self.commands.lock().await;
        let wait = (self.replicas.get() > 0).then(|| {
            let mut wait = redis::cmd("WAIT");
            wait.arg(1).arg((timeout / 2).as_millis() as u64);
            wait
        });
        let exchange = async {
            let conn = self.command_conn(&mut commands).await?;
            let mut reply = script_exchange(conn, script, asking, wait.as_ref()).await;
            if matches!(&reply, Ok(Err(e)) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript))
            {
                // First call on this connection since Redis lost its scripts: load, again.
                let load = redis::cmd("SCRIPT").arg("LOAD").arg(source).clone();
                reply = match conn.call(&load).await {
                    Ok(_) => script_exchange(conn, script, asking, wait.as_ref()).await,
                    Err(e) => Err(e),
                };
            }
            reply.map_err(|e| self.classify(&e, "the publish script"))
        };
        let outcome = within(timeout, exchange).await;
        let reply = match outcome {
            None => {
                // The replies may still come: this connection cannot be trusted any more.
                commands.conn = None;
                return ScriptReply::Failed(self.timed_out("the publish script"));
            }
            Some(Err(e)) => {
                commands.conn = None;
                return ScriptReply::Failed(e);
            }
            Some(Ok(reply)) => reply,
        };
        drop(commands);
        match reply {
            Ok(value) => ScriptReply::Reply(value),
            Err(e) => match Redirect::of_error(&e) {
                Some(redirect) => ScriptReply::Redirect(redirect),
                None => ScriptReply::Failed(self.classify(&e, "the publish script")),
            },
        }
    }

    /// One command on the command connection, within `command_timeout`.
    pub(super) async fn call(&self, cmd: &redis::Cmd) -> Result<Value, ClusterError> {
        let timeout = self.opts().command_timeout;
        let mut commands = self.commands.lock().await;
        let exchange = async {
            let conn = self.command_conn(&mut commands).await?;
            conn.call(cmd)
                .await
                .map_err(|e| self.classify(&e, "a command"))
        };
        match within(timeout, exchange).await {
            Some(Ok(value)) => Ok(value),
            Some(Err(e)) => {
                if e.is_transient() {
                    commands.conn = None;
                }
                Err(e)
            }
            None => {
                commands.conn = None;
                Err(self.timed_out("a command"))
            }
        }
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
            tracing::warn!(shard = self.shard, node = %self.name, error = %e, "redis command connection of a shard failed at start; publishes retry it after backoff");
        }
    }

    /// The link is back: Redis answers again, so the command connection is tried at once.
    pub(super) fn reset_command_backoff(&self) {
        if let Some(mut commands) = self.commands.try_lock() {
            commands.retry = None;
        }
    }
}

/// Writes `[ASKING] script [WAIT]` in one go and reads their replies: an I/O or protocol
/// error for the connection (`Err`), else the script's result (`Ok(Err)` when Redis
/// refused it, or `ASKING` was refused).
async fn script_exchange(
    conn: &mut RespConn,
    script: &redis::Cmd,
    asking: bool,
    wait: Option<&redis::Cmd>,
) -> RedisResult<RedisResult<Value>> {
    let mut packed = Vec::new();
    if asking {
        redis::cmd("ASKING").write_packed_command(&mut packed);
    }
    script.write_packed_command(&mut packed);
    if let Some(wait) = wait {
        wait.write_packed_command(&mut packed);
    }
    conn.writer.send(&packed).await?;
    let asked = if asking {
        Some(conn.reader.read().await?.extract_error())
    } else {
        None
    };
    let reply = conn.reader.read().await?.extract_error();
    if wait.is_some() {
        match conn.reader.read().await?.extract_error() {
            Ok(Value::Int(0)) if reply.is_ok() => {
                tracing::debug!("no replica confirmed a publish within the wait; acked anyway")
            }
            _ => {}
        }
    }
    Ok(match asked {
        Some(Err(e)) => Err(e),
        _ => reply,
    })
}
