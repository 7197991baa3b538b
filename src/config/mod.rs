//! Configuration: one TOML file, overridden by `CORELAY_<SECTION>_<KEY>` environment
//! variables, overridden in turn by command-line flags (applied by `main`).
//!
//! The sections' structs are in `sections`, durations as written in `duration`, the
//! environment overrides in `env`, the backend's hooks in `hooks`, the checks serde cannot make in `validate`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

mod duration;
mod env;
mod feed;
mod hooks;
mod sections;
#[cfg(test)]
mod tests;
mod validate;

pub use duration::HumanDuration;
pub use feed::FeedConfig;
pub use hooks::{BackendUrl, HooksConfig, OnFailure};
pub use sections::{
    AuthConfig, EmitterConfig, EngineIoConfig, HistoryConfig, LimitsConfig, LogConfig, LogFormat,
    PresenceConfig, RedisConfig, ScyllaConfig, ScyllaConsistency, ServerConfig, StoreConfig,
    StoreKind,
};

/// Everything the server can be told; every field has a default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub engineio: EngineIoConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub history: HistoryConfig,
    pub redis: RedisConfig,
    pub emitter: EmitterConfig,
    pub presence: PresenceConfig,
    pub store: StoreConfig,
    pub scylla: ScyllaConfig,
    pub log: LogConfig,
    pub hooks: HooksConfig,
    pub feed: FeedConfig,
}

/// A configuration the server cannot run with; the message says what to fix.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The highest `limits.connect_rate_per_ip` (the limiter's clock ticks every 10 µs).
pub const MAX_CONNECT_RATE: f64 = 100_000.0;
/// The highest `limits.connect_burst_per_ip`.
pub const MAX_CONNECT_BURST: f64 = 1_000_000.0;

impl Config {
    /// Loads the file (if any), then applies the environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
            None => String::new(),
        };
        Config::from_toml_and_env(&text, std::env::vars())
    }

    /// Switches to conformance mode: the reference test server's timings and CORS.
    pub fn enable_conformance(&mut self) {
        self.server.conformance = true;
        self.engineio.ping_interval = 300;
        self.engineio.ping_timeout = 200;
        self.engineio.max_payload = 1_000_000;
        self.engineio.connect_timeout = HumanDuration(Duration::from_millis(1000));
        self.server.cors_origins = vec!["*".to_string()];
    }

    /// The number of shards to run: configured, or one per available core.
    pub fn shard_count(&self) -> usize {
        self.server.shards.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }
}
