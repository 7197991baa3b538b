//! Starting a server from a configuration: refuse unsafe or impossible settings with
//! a clear message, open the store, bind, and run the shards.

use std::net::SocketAddr;
use std::sync::Arc;

use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;

use crate::auth::Authenticator;
use crate::cluster::redis::RedisCluster;
use crate::cluster::RedisOptions;
use crate::config::{Config, StoreKind};
use crate::context::Context;
use crate::metrics::Metrics;
use crate::shard::runtime::{self, StartError};
use crate::store::{Store, StoreError};

/// Why `corelay serve` could not run.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error("dev mode (no auth.jwt_secret / CORELAY_JWT_SECRET) only listens on loopback, not {0}: set a secret or listen on 127.0.0.1")]
    DevModeNotLoopback(SocketAddr),
    #[error("store \"redis\" keeps history in the cluster's Redis: set redis.url (--redis, CORELAY_REDIS_URL) or use \"embedded\" on one host")]
    RedisStoreWithoutRedis,
    #[error("emitter.enabled reads @socket.io/redis-emitter's channels on the shared Redis: set redis.url (--redis, CORELAY_REDIS_URL) too, or turn the emitter off")]
    EmitterWithoutRedis,
    #[error("the embedded store is local to one host; use store.kind = \"redis\" (recent history) or \"scylla\" (unbounded history) in cluster mode (redis.url is set)")]
    EmbeddedInCluster,
    #[error("the memory store is local to one process; use store.kind = \"redis\" (recent history) or \"scylla\" (unbounded history) in cluster mode (redis.url is set)")]
    MemoryInCluster,
    /// Redis refused this configuration (credentials, TLS, URL): retrying cannot help. A
    /// Redis that is merely unreachable at start is not an error (the host serves degraded).
    /// (`error` is not a `#[source]`: its text is in this message already, and `{:#}`
    /// would print it twice.)
    #[error(
        "cluster mode cannot use Redis at {url}: {error} (`corelay check` tests the connection)"
    )]
    Redis {
        url: String,
        error: crate::cluster::ClusterError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Hooks(#[from] crate::hooks::SetupError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// First SIGTERM/SIGINT: drain. A second one: exit at once.
fn watch_signals(ctx: Arc<Context>) -> Result<(), ServeError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(ServeError::Signals)?;
    std::thread::Builder::new()
        .name("corelay-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if ctx.draining.swap(true, Ordering::SeqCst) {
                    eprintln!("corelay: second signal ({signal}): exiting now");
                    std::process::exit(1);
                }
                let _ = crate::notify::notify("STOPPING=1");
                tracing::info!(
                    signal,
                    "draining: closing connections with 1012 (send the signal again to exit now)"
                );
            }
        })
        .map_err(ServeError::Signals)?;
    Ok(())
}

/// Runs the server until its shards stop. `on_ready(addr, shards)` is called once
/// every shard accepts connections.
pub fn run(config: Config, on_ready: impl FnOnce(SocketAddr, usize)) -> Result<(), ServeError> {
    let auth = Authenticator::new(config.auth.jwt_secret.as_deref());
    if auth.is_dev_mode() {
        if !config.server.listen.ip().is_loopback() {
            return Err(ServeError::DevModeNotLoopback(config.server.listen));
        }
        tracing::warn!("dev mode: no JWT secret set; clients connect as {{\"user\":\"name\"}} and may join every room");
    }
    runtime::check_io_uring()?;
    let cluster = connect_cluster(&config)?;
    let store = open_store(&config, cluster.as_ref())?;
    let shards = config.shard_count();
    let (addr, fds) = runtime::bind_listeners(config.server.listen, shards)?;
    let backends = runtime::Backends {
        hooks: crate::hooks::Backend::from_config(&config.hooks)?.map(Arc::new),
        feed: crate::hooks::Backend::for_feed(&config.feed, &config.hooks)?.map(Arc::new),
    };
    if backends.feed.is_some() && cluster.is_none() {
        // One host: from here on every append marks its room for the feed, durably with
        // it (a cluster keeps the feed's ledger in Redis).
        store.enable_feed()?;
    }
    let ctx = Arc::new(context(config, auth, shards));
    if let Some(c) = &cluster {
        let _ = ctx.metrics.redis.set(c.clone());
    }
    watch_signals(ctx.clone())?;
    let result = runtime::run_shards(ctx, store.clone(), cluster.clone(), backends, fds, || {
        on_ready(addr, shards)
    });
    let _ = futures::executor::block_on(store.close());
    if let Some(c) = &cluster {
        c.close();
    }
    Ok(result?)
}

/// Cluster mode (`redis.url` set): the link to Redis, once the store kind is one a cluster
/// can share. A Redis that cannot be reached yet is logged, not an error; `None` on a
/// single host.
fn connect_cluster(config: &Config) -> Result<Option<RedisCluster>, ServeError> {
    let Some(options) = RedisOptions::from_config(config) else {
        if config.emitter.enabled {
            return Err(ServeError::EmitterWithoutRedis);
        }
        return Ok(None);
    };
    match config.store.kind {
        StoreKind::Redis | StoreKind::Scylla => {}
        StoreKind::Embedded => return Err(ServeError::EmbeddedInCluster),
        StoreKind::Memory => return Err(ServeError::MemoryInCluster),
    }
    let url = options.redacted_url();
    let (cluster, down) =
        RedisCluster::connect_or_retry_blocking(options).map_err(|error| ServeError::Redis {
            url: url.clone(),
            error,
        })?;
    match down {
        None => {
            tracing::info!(host = cluster.host_id(), %url, "cluster mode: connected to redis")
        }
        // Serve anyway, as after losing Redis mid-run: the link keeps reconnecting.
        Some(e) => tracing::warn!(
            host = cluster.host_id(),
            %url,
            error = %e,
            "cluster mode: cannot reach redis at {url} yet; serving degraded (sends get \
             `unavailable`, /healthz says degraded) and reconnecting with backoff"
        ),
    }
    Ok(Some(cluster))
}

/// The history store `store.kind` names (in cluster mode, through `cluster`).
fn open_store(config: &Config, cluster: Option<&RedisCluster>) -> Result<Store, ServeError> {
    Ok(match config.store.kind {
        StoreKind::Memory => Store::memory(),
        StoreKind::Embedded => {
            Store::open_embedded(&config.server.data_dir, config.store.durability)?
        }
        // Its errors already say what is wrong ("cannot reach ScyllaDB at [nodes]: …",
        // "… run `corelay schema apply`", a bucket_size mismatch).
        StoreKind::Scylla => match (cluster, Store::open_scylla(&config.scylla)?) {
            // In a cluster Redis assigns the offsets and keeps the recent window; ScyllaDB
            // keeps everything (see store::cluster).
            (Some(c), Store::Scylla(durable)) => Store::cluster(c, durable),
            (_, store) => store,
        },
        StoreKind::Redis => match cluster {
            Some(c) => Store::redis(c),
            None => return Err(ServeError::RedisStoreWithoutRedis),
        },
    })
}

/// What every shard shares: the configuration, counters for `shards` shards, the
/// authenticator, the connect limiter, this process's message id prefix.
fn context(config: Config, auth: Authenticator, shards: usize) -> Context {
    let mut prefix = [0u8; 4];
    crate::ids::random_bytes(&mut prefix);
    let connect_limiter = crate::connect_limit::ConnectLimiter::new(
        config.limits.connect_rate_per_ip,
        config.limits.connect_burst_per_ip,
    );
    Context {
        metrics: Arc::new(Metrics::new(shards)),
        connect_limiter,
        auth,
        config,
        id_prefix: u32::from_ne_bytes(prefix),
        draining: AtomicBool::new(false),
    }
}
