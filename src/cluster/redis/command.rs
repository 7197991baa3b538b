//! The command connection of a [`RedisCluster`](super::RedisCluster), shared by every shard:
//! opened on demand and again after a failure (one attempt at a time, spaced by backoff),
//! every call bounded by `command_timeout`. Also measures Redis's clock against this
//! host's on each new connection.
//!
//! What it is depends on the server, found out on the first connection ([`Mode`], from
//! `HELLO`'s `mode`): one multiplexed RESP2 connection to a standalone Redis, or a Redis
//! Cluster connection ([`redis::cluster_async::ClusterConnection`]) that keeps a connection
//! to every node, sends each command to the master of its key's slot, follows MOVED and
//! ASK, waits out TRYAGAIN and CLUSTERDOWN, and reads the slot map again when the cluster
//! says it changed. Both hide behind [`CmdConn`], so every caller (presence scripts, typing
//! notices, the history store) runs the same code on either.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Instant;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, RedisError, RedisFuture, Value};

use super::nodes::Mode;
use super::{backoff, build_cluster_client, classify, lock, Shared};
use crate::cluster::ClusterError;

/// The command connection: to a standalone Redis, or to a Redis Cluster. Cheap to clone
/// (both are handles to a connection driven by its own task).
#[derive(Clone)]
pub(super) enum CmdConn {
    /// One multiplexed connection to a standalone Redis.
    Single(MultiplexedConnection),
    /// A Redis Cluster connection, routing each command by its key's slot.
    Cluster(ClusterConnection),
}

impl ConnectionLike for CmdConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            CmdConn::Single(c) => c.req_packed_command(cmd),
            CmdConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            CmdConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            CmdConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            CmdConn::Single(c) => c.get_db(),
            CmdConn::Cluster(c) => c.get_db(),
        }
    }
}

impl Shared {
    /// The command connection: the current one, or a new one (one attempt at a time; while
    /// in backoff after a failure, the last error at once). The first connection also finds
    /// out whether the server is a Redis Cluster ([`Shared::mode`]).
    pub(super) async fn cmd_conn(&self) -> Result<(u64, CmdConn), ClusterError> {
        if let Some(c) = lock(&self.cmd).conn.clone() {
            return Ok(c);
        }
        let _one = self.cmd_connecting.lock().await;
        {
            let st = lock(&self.cmd);
            if let Some(c) = st.conn.clone() {
                return Ok(c);
            }
            if let (Some(at), Some(e)) = (st.retry_at, &st.last_error) {
                if Instant::now() < at {
                    return Err(e.clone());
                }
            }
        }
        let mut attempt = self.open_cmd().await;
        if let Ok(conn) = &mut attempt {
            self.measure_clock(conn).await;
        }
        let mut st = lock(&self.cmd);
        match attempt {
            Ok(conn) => {
                st.generation += 1;
                let current = (st.generation, conn);
                st.conn = Some(current.clone());
                st.failures = 0;
                st.retry_at = None;
                st.last_error = None;
                Ok(current)
            }
            Err(err) => {
                st.failures = st.failures.saturating_add(1);
                st.retry_at = Some(Instant::now() + backoff(&self.opts, st.failures));
                st.last_error = Some(err.clone());
                Err(err)
            }
        }
    }

    /// Opens a command connection of the kind the server needs: on the first one, a plain
    /// connection asks the server what it is, and becomes the command connection of a
    /// standalone Redis.
    async fn open_cmd(&self) -> Result<CmdConn, ClusterError> {
        match self.mode.get() {
            Some(Mode::Cluster { .. }) => self.open_cluster().await,
            Some(Mode::Standalone) => Ok(CmdConn::Single(self.open_single().await?)),
            None => {
                let mut conn = self.open_single().await?;
                let mode = super::nodes::detect_mode(self, &mut conn).await?;
                match self.mode.get_or_init(|| mode) {
                    Mode::Standalone => Ok(CmdConn::Single(conn)),
                    Mode::Cluster { .. } => {
                        tracing::info!(
                            target = %self.target,
                            "redis is a Redis Cluster: commands go to each slot's master, \
                             pub/sub is sharded"
                        );
                        drop(conn);
                        self.open_cluster().await
                    }
                }
            }
        }
    }

    /// One multiplexed connection to the URL's server.
    async fn open_single(&self) -> Result<MultiplexedConnection, ClusterError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.opts.connect_timeout))
            .set_response_timeout(Some(self.opts.command_timeout));
        self.cmd_client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| self.classify(&e, "connect"))
    }

    /// A Redis Cluster connection, seeded with the URL's node and every node seen since
    /// (so that it can be made while the URL's node is down), within `connect_timeout +
    /// command_timeout`.
    async fn open_cluster(&self) -> Result<CmdConn, ClusterError> {
        let known = self.known_nodes();
        let client = build_cluster_client(&self.opts, &known)?;
        let limit = self.opts.connect_timeout + self.opts.command_timeout;
        match tokio::time::timeout(limit, client.get_async_connection()).await {
            Ok(Ok(conn)) => Ok(CmdConn::Cluster(conn)),
            Ok(Err(e)) => Err(self.classify(&e, "connect (cluster)")),
            Err(_) => Err(ClusterError::Timeout(format!(
                "the redis cluster at {} did not answer connect within {limit:?}",
                self.target
            ))),
        }
    }

    /// Measures Redis's clock against this host's with TIME (keeps the last value when
    /// TIME fails, e.g. an ACL without it).
    pub(super) async fn measure_clock(&self, conn: &mut CmdConn) {
        let before = crate::ids::now_ms();
        let time = tokio::time::timeout(
            self.opts.command_timeout,
            redis::cmd("TIME").query_async::<(u64, u64)>(conn),
        )
        .await;
        let after = crate::ids::now_ms();
        if let Ok(Ok((secs, micros))) = time {
            let redis_ms = secs.saturating_mul(1000).saturating_add(micros / 1000);
            let local_ms = before / 2 + after / 2;
            let skew = redis_ms as i64 - local_ms as i64;
            if skew.abs() > 1000 {
                tracing::warn!(
                    skew_ms = skew,
                    "redis's clock and this host's differ by more than a second"
                );
            }
            self.skew_ms.store(skew, Ordering::Release);
        }
    }

    /// Now in Redis's clock (ms), as far as the last measurement knows.
    pub(super) fn redis_now_ms(&self) -> u64 {
        let local = crate::ids::now_ms() as i64;
        local
            .saturating_add(self.skew_ms.load(Ordering::Acquire))
            .max(0) as u64
    }

    /// Forgets the command connection of generation `generation` after `err`, if `err`
    /// means the connection is gone. Never a Redis Cluster connection: it repairs its
    /// nodes' connections itself, and a new one could not be made while its seeds are down.
    fn cmd_failed(&self, generation: u64, err: &RedisError) {
        if !err.is_unrecoverable_error() && !err.is_connection_dropped() {
            return;
        }
        let mut st = lock(&self.cmd);
        let current = st
            .conn
            .as_ref()
            .is_some_and(|(g, c)| *g == generation && matches!(c, CmdConn::Single(_)));
        if current {
            st.conn = None;
        }
    }

    /// Drops the command connection (the pub/sub link went down: a stalled or vanished
    /// server will not answer this one either). Not on a Redis Cluster: there the link is
    /// down when one master is, and the others still serve their rooms.
    pub(super) fn cmd_reset(&self, why: &str) {
        if self.is_cluster() {
            return;
        }
        let mut st = lock(&self.cmd);
        st.conn = None;
        st.last_error = Some(ClusterError::Unavailable(why.to_owned()));
    }

    /// Runs `f` on the command connection, within `command_timeout` (connecting included).
    pub(super) async fn with_conn<T, F, Fut>(&self, what: &str, f: F) -> Result<T, ClusterError>
    where
        F: FnOnce(CmdConn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if self.closed.load(Ordering::Acquire) {
            return Err(ClusterError::Closed);
        }
        let limit = self.opts.command_timeout;
        let run = async {
            let (generation, conn) = self.cmd_conn().await?;
            f(conn).await.map_err(|e| {
                self.cmd_failed(generation, &e);
                self.classify(&e, what)
            })
        };
        match tokio::time::timeout(limit, run).await {
            Ok(result) => result,
            Err(_) => Err(ClusterError::Timeout(format!(
                "redis at {} did not answer {what} within {limit:?}",
                self.target
            ))),
        }
    }

    /// A [`ClusterError`] that says what went wrong with `what` and, where it can, what to do.
    pub(super) fn classify(&self, e: &RedisError, what: &str) -> ClusterError {
        classify(e, &self.target, what, self.opts.command_timeout)
    }

    /// `fut` (a pub/sub command) within `command_timeout`, its error classified.
    pub(super) async fn bounded<T>(
        &self,
        what: &str,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, ClusterError> {
        let limit = self.opts.command_timeout;
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r.map_err(|e| self.classify(&e, what)),
            Err(_) => Err(ClusterError::Timeout(format!(
                "redis at {} did not confirm {what} within {limit:?}",
                self.target
            ))),
        }
    }
}
