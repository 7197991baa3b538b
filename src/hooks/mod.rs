//! The application's backend asked synchronously (PROTOCOL.md, "Hooks"): an HTTP/1.1
//! client of its own on each shard (keep-alive, a bounded pool, a whole-call timeout,
//! signed requests) and the answers' shapes. It knows nothing of chat: chat builds the
//! bodies, calls [`Hooks::ask`], and decides what the answer or a failure means.
//!
//! Hand-written rather than a crate: the HTTP clients on crates.io run on tokio or
//! need an executor and I/O traits of their own; this needs one request shape and
//! three body framings, over glommio's futures-io sockets like the rest of corelay.

pub mod answer;
mod conn;
pub mod http;
mod log;
mod pool;
mod sign;
mod tls;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::LocalBoxFuture;
use futures::io::AsyncWriteExt as _;
use thiserror::Error;

pub use answer::{ConnectAnswer, Refusal, RpcAnswer, Verdict};
pub use http::MAX_BODY;

use crate::config::{BackendUrl, FeedConfig, HooksConfig, OnFailure};
use crate::metrics::Metrics;
use conn::Conn;
use log::FailureLog;
use pool::Pool;

/// The hooks, in the order of `metrics::HOOKS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect = 0,
    Join = 1,
    Publish = 2,
    Rpc = 3,
}

impl Hook {
    /// The hook's name: its URL path segment and metrics label.
    pub fn name(self) -> &'static str {
        crate::metrics::HOOKS[self as usize]
    }
}

/// Why a hook call failed (`hooks.on_failure` decides what that means).
#[derive(Debug, Error)]
pub enum Failure {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect to the backend: {0}")]
    Connect(#[source] io::Error),
    #[error("connection to the backend failed: {0}")]
    Io(#[source] io::Error),
    #[error("the backend closed the connection before answering")]
    Closed,
    #[error("malformed HTTP answer: {0}")]
    Http(&'static str),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("answered a redirect (HTTP {0}); hooks follow none")]
    Redirect(u16),
    #[error("answer larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("answer is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("answer has the wrong shape: {0}")]
    Shape(&'static str),
}

impl Failure {
    /// The failure's reason, an index into `metrics::HOOK_FAILURES`.
    fn reason(&self) -> usize {
        match self {
            Failure::Timeout(_) => 0,
            Failure::Connect(_) => 1,
            Failure::Io(_) | Failure::Closed | Failure::Http(_) => 2,
            Failure::Status(_) => 3,
            Failure::Redirect(_) => 4,
            Failure::TooLarge => 5,
            Failure::NotJson(_) => 6,
            Failure::Shape(_) => 7,
        }
    }
}

/// Why the hooks' settings cannot be used.
#[derive(Debug, Error)]
pub enum SetupError {
    #[error("hooks.url {url:?} has a host name TLS cannot check")]
    ServerName { url: String },
    #[error("hooks.url: {0}")]
    Url(String),
    #[error("hooks TLS: {0}")]
    Tls(String),
}

/// What every shard's hooks client shares: where the backend is, how to sign, which
/// hooks are on, the TLS settings. Built once at start.
pub struct Backend {
    url: BackendUrl,
    host_header: String,
    secret: Option<Vec<u8>>,
    timeout: Duration,
    on_failure: OnFailure,
    enabled: [bool; 4],
    max_connections: usize,
    tls: Option<tls::Tls>,
}

impl Backend {
    /// The backend of a validated `[hooks]` section; `None` when every hook is off.
    pub fn from_config(config: &HooksConfig) -> Result<Option<Backend>, SetupError> {
        let (true, Some(raw)) = (config.any(), config.url.as_deref()) else {
            return Ok(None);
        };
        let mut backend = Backend::new(raw, config, config.timeout.0, config.max_connections)?;
        backend.on_failure = config.on_failure;
        backend.enabled = [config.connect, config.join, config.publish, config.rpc];
        Ok(Some(backend))
    }

    /// The feed's endpoint (`feed.url`), signed with `hooks.secret` and trusting
    /// `hooks.tls_ca_file` like the hooks; `None` when the feed is off. One connection per
    /// shard: a shard's feed sends one batch at a time.
    pub fn for_feed(feed: &FeedConfig, hooks: &HooksConfig) -> Result<Option<Backend>, SetupError> {
        let Some(raw) = feed.url.as_deref() else {
            return Ok(None);
        };
        Backend::new(raw, hooks, feed.timeout.0, 1).map(Some)
    }

    /// A backend at `raw` (a validated URL) with `hooks`' secret and TLS settings, no hook
    /// on.
    fn new(
        raw: &str,
        hooks: &HooksConfig,
        timeout: Duration,
        max_connections: usize,
    ) -> Result<Backend, SetupError> {
        let url = BackendUrl::parse(raw).map_err(SetupError::Url)?;
        let tls = match url.tls {
            true => Some(tls::Tls::new(&url, raw, hooks.tls_ca_file.as_deref())?),
            false => None,
        };
        Ok(Backend {
            host_header: url.authority(),
            url,
            secret: hooks.secret.as_ref().map(|s| s.as_bytes().to_vec()),
            timeout,
            on_failure: OnFailure::Deny,
            enabled: [false; 4],
            max_connections,
            tls,
        })
    }
}

/// One shard's hooks client: the shared [`Backend`] and this shard's pool, counters and
/// failure log.
pub struct Hooks {
    backend: Arc<Backend>,
    pool: Pool,
    metrics: Arc<Metrics>,
    shard: usize,
    logs: [FailureLog; 4],
}

impl Hooks {
    /// Shard `shard`'s client of `backend`.
    pub fn new(backend: Arc<Backend>, metrics: Arc<Metrics>, shard: usize) -> Hooks {
        Hooks {
            pool: Pool::new(backend.max_connections),
            backend,
            metrics,
            shard,
            logs: Default::default(),
        }
    }

    /// Whether `hook` is on.
    pub fn enabled(&self, hook: Hook) -> bool {
        self.backend.enabled[hook as usize]
    }

    /// What a failed call means (`hooks.on_failure`).
    pub fn on_failure(&self) -> OnFailure {
        self.backend.on_failure
    }

    /// Calls `hook` with a JSON `body` and reads its answer with `parse`, all within
    /// `hooks.timeout`; a failure is counted and logged (rate-limited) before it returns.
    pub async fn ask<T>(
        &self,
        hook: Hook,
        body: &[u8],
        parse: fn(&[u8]) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let start = Instant::now();
        let limit = self.backend.timeout;
        let path = format!("{}/{}", self.backend.url.path, hook.name());
        let answer = glommio::timer::timeout(limit, async { Ok(self.exchange(&path, body).await) })
            .await
            .unwrap_or(Err(Failure::Timeout(limit)));
        let result = answer.and_then(|a| parse(&a));
        let stats = &self.metrics.shards[self.shard].hooks;
        stats.observe(hook as usize, start.elapsed());
        if let Err(failure) = &result {
            stats.failed(hook as usize, failure.reason());
            if let Some(suppressed) = self.logs[hook as usize].admit(Instant::now()) {
                tracing::warn!(
                    hook = hook.name(),
                    error = %failure,
                    suppressed,
                    policy = ?self.backend.on_failure,
                    "hook failed"
                );
            }
        }
        result
    }

    /// One request and its 2xx answer's body, on a pooled connection; a kept-alive
    /// connection that turns out closed is replaced once.
    async fn exchange(&self, path: &str, body: &[u8]) -> Result<Vec<u8>, Failure> {
        let _permit = self
            .pool
            .permit()
            .await
            .ok_or(Failure::Io(io::ErrorKind::BrokenPipe.into()))?;
        let request = self.request(path, body);
        if let Some(mut conn) = self.pool.take_idle(Instant::now()) {
            match self.round_trip(&mut conn, &request).await {
                Ok((body, reusable)) => return Ok(self.done(conn, body, reusable)),
                Err(Failure::Closed) => {} // stale: once more on a new connection
                Err(e) => return Err(e),
            }
        }
        let mut conn = Conn::open(&self.backend).await.map_err(Failure::Connect)?;
        let (body, reusable) = self.round_trip(&mut conn, &request).await?;
        Ok(self.done(conn, body, reusable))
    }

    /// Puts a connection back when its answer left it clean; returns the body.
    fn done(&self, conn: Conn, body: Vec<u8>, reusable: bool) -> Vec<u8> {
        if reusable {
            self.pool.put_back(conn, Instant::now());
        }
        body
    }

    /// Writes the request and reads its answer: the body, and whether the connection may
    /// carry another call. A write that fails finds the connection closed.
    async fn round_trip(
        &self,
        conn: &mut Conn,
        request: &[u8],
    ) -> Result<(Vec<u8>, bool), Failure> {
        let written = async {
            conn.stream.write_all(request).await?;
            conn.stream.flush().await
        };
        written.await.map_err(|_| Failure::Closed)?;
        let answer = http::read_answer(&mut conn.stream).await?;
        Ok((answer.body, answer.reusable))
    }

    /// The request bytes: `POST {url}/{hook}`, signed when `hooks.secret` is set.
    fn request(&self, path: &str, body: &[u8]) -> Vec<u8> {
        let b = &self.backend;
        let extra = match &b.secret {
            None => String::new(),
            Some(secret) => {
                let ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                format!(
                    "X-Corelay-Timestamp: {ms}\r\nX-Corelay-Signature: {}\r\n",
                    sign::signature(secret, ms, body)
                )
            }
        };
        http::post(&b.host_header, path, &extra, body)
    }
}

/// The feed's batches go through a shard's client of `feed.url` (see
/// [`Backend::for_feed`]): a POST to the URL itself, within `feed.timeout`, done on a 2xx.
impl crate::feed::Deliver for Hooks {
    fn deliver<'a>(&'a self, body: &'a [u8]) -> LocalBoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let limit = self.backend.timeout;
            let path = if self.backend.url.path.is_empty() {
                "/"
            } else {
                self.backend.url.path.as_str()
            };
            match glommio::timer::timeout(limit, async { Ok(self.exchange(path, body).await) })
                .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(Failure::Timeout(limit).to_string()),
            }
        })
    }
}
