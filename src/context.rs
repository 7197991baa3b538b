//! What every shard of the process shares read-only, behind one `Arc`: the configuration,
//! the authenticator, the metrics, and the drain flag. A leaf: the transport, chat and the
//! shard runtime all read it, and it imports none of them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::connect_limit::ConnectLimiter;
use crate::metrics::Metrics;

/// The process-wide context of every shard.
pub struct Context {
    pub config: Config,
    pub auth: Authenticator,
    pub metrics: Arc<Metrics>,
    /// Random per process: keeps message ids unique across hosts.
    pub id_prefix: u32,
    /// Set by the first SIGTERM/SIGINT: shards stop accepting, finish what is in
    /// flight, close connections with 1012 and stop.
    pub draining: AtomicBool,
    /// New sessions per source address (`limits.connect_rate_per_ip`), for every shard.
    pub connect_limiter: ConnectLimiter,
}

impl Context {
    /// Whether the process is draining (it accepts no new work).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}
