//! The command connection of a [`RedisCluster`](super::RedisCluster): one multiplexed RESP2
//! connection shared by every shard, opened on demand and again after a failure (one attempt
//! at a time, spaced by backoff), every call bounded by `command_timeout`. Also measures
//! Redis's clock against this host's on each new connection.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Instant;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError};

use super::{backoff, classify, lock, Shared};
use crate::cluster::ClusterError;

impl Shared {
    /// The command connection: the current one, or a new one (one attempt at a time; while
    /// in backoff after a failure, the last error at once).
    pub(super) async fn cmd_conn(&self) -> Result<(u64, MultiplexedConnection), ClusterError> {
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
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.opts.connect_timeout))
            .set_response_timeout(Some(self.opts.command_timeout));
        let mut attempt = self
            .cmd_client
            .get_multiplexed_async_connection_with_config(&config)
            .await;
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
            Err(e) => {
                let err = self.classify(&e, "connect");
                st.failures = st.failures.saturating_add(1);
                st.retry_at = Some(Instant::now() + backoff(&self.opts, st.failures));
                st.last_error = Some(err.clone());
                Err(err)
            }
        }
    }

    /// Measures Redis's clock against this host's with TIME (keeps the last value when
    /// TIME fails, e.g. an ACL without it).
    pub(super) async fn measure_clock(&self, conn: &mut MultiplexedConnection) {
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
    /// means the connection is gone.
    fn cmd_failed(&self, generation: u64, err: &RedisError) {
        if !err.is_unrecoverable_error() && !err.is_connection_dropped() {
            return;
        }
        let mut st = lock(&self.cmd);
        if st.conn.as_ref().is_some_and(|(g, _)| *g == generation) {
            st.conn = None;
        }
    }

    /// Drops the command connection (the pub/sub link went down: a stalled or vanished
    /// server will not answer this one either).
    pub(super) fn cmd_reset(&self, why: &str) {
        let mut st = lock(&self.cmd);
        st.conn = None;
        st.last_error = Some(ClusterError::Unavailable(why.to_owned()));
    }

    /// Runs `f` on the command connection, within `command_timeout` (connecting included).
    pub(super) async fn with_conn<T, F, Fut>(&self, what: &str, f: F) -> Result<T, ClusterError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
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
