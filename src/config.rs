//! Configuration: one TOML file, overridden by `CORELAY_<SECTION>_<KEY>` environment
//! variables, overridden in turn by command-line flags (applied by `main`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use thiserror::Error;

use crate::history::Durability;

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
    pub presence: PresenceConfig,
    pub store: StoreConfig,
    pub scylla: ScyllaConfig,
    pub log: LogConfig,
}

/// Where and how the process listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Shards (one per core when unset).
    pub shards: Option<usize>,
    /// Pin shard i to core i (the default) when there is one shard per CPU the process
    /// may use. Turn it off when other busy processes share the host: a pinned shard
    /// cannot move away from them, and its connections wait.
    pub pin_shards: bool,
    /// Move a WebSocket connection to the home shard of the first room it joins, so that
    /// room's traffic stays on one core (`transport::follow`). On by default.
    pub follow_rooms: bool,
    pub data_dir: PathBuf,
    /// The Engine.IO path, `/socket.io/` by default.
    pub path: String,
    /// glommio's registered-buffer memory per shard; must stay under the memlock limit.
    pub io_memory: usize,
    /// Origins allowed to use the polling transport from a browser (CORS, with
    /// credentials); `"*"` allows any. None by default. A list, or one comma-separated string.
    #[serde(deserialize_with = "string_or_list")]
    pub cors_origins: Vec<String>,
    /// How long a drain (SIGTERM/SIGINT) may take before the process exits anyway.
    pub shutdown_timeout: HumanDuration,
    /// Test-only: behave like the Socket.IO reference test server (`serve --conformance`).
    pub conformance: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shards: None,
            pin_shards: true,
            follow_rooms: true,
            data_dir: PathBuf::from("./data"),
            path: "/socket.io/".to_string(),
            io_memory: 512 * 1024,
            cors_origins: Vec::new(),
            shutdown_timeout: HumanDuration(Duration::from_secs(10)),
            conformance: false,
        }
    }
}

/// Engine.IO session timing and size limits, as announced in the open packet.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineIoConfig {
    /// Milliseconds between server pings.
    pub ping_interval: u64,
    /// Milliseconds to wait for the pong.
    pub ping_timeout: u64,
    /// Largest packet accepted, in bytes; a larger WebSocket frame closes the connection.
    pub max_payload: usize,
    /// How long a new session may take to send its Socket.IO CONNECT.
    pub connect_timeout: HumanDuration,
}

impl Default for EngineIoConfig {
    fn default() -> Self {
        EngineIoConfig {
            ping_interval: 25_000,
            ping_timeout: 20_000,
            max_payload: 1_000_000,
            connect_timeout: HumanDuration(Duration::from_secs(45)),
        }
    }
}

/// Secrets; never logged.
#[derive(Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 secret for client JWTs; unset = dev mode.
    pub jwt_secret: Option<String>,
    /// Bearer key for `/api/...`; unset = the API is refused.
    pub api_key: Option<String>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| "<set>"))
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// Per-connection limits that keep one client from hurting the others.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_text_bytes: usize,
    pub max_rooms_per_conn: usize,
    /// How long a `cid` makes a retry idempotent.
    pub dedupe_window: HumanDuration,
    /// Sustained sends per second per connection (token bucket refill).
    pub send_rate: f64,
    /// Sends a connection may burst above the rate.
    pub send_burst: f64,
    /// Frames a connection's outbound queue holds before it counts as a slow consumer.
    pub outbound_queue: usize,
    /// Bytes a connection's outbound queue holds before it counts as a slow consumer.
    pub outbound_queue_bytes: usize,
    /// Sessions the whole process serves; a new one past it gets a clean HTTP 503.
    pub max_connections: u64,
    /// Time a client has to send a complete HTTP request head (slow-loris guard), and the
    /// longest an idle keep-alive HTTP connection is kept.
    pub handshake_timeout: HumanDuration,
    /// Socket.IO connections one user may hold at once in this process (0: unlimited);
    /// a CONNECT past it gets `too_many_connections`.
    pub max_connections_per_user: u32,
    /// New Engine.IO sessions per second one source address may open, sustained
    /// (0: no limit); past it the handshake gets HTTP 429.
    pub connect_rate_per_ip: f64,
    /// New sessions one source address may open at once above `connect_rate_per_ip`
    /// (0: no limit).
    pub connect_burst_per_ip: f64,
    /// Messages a shard may have queued toward one other shard before it refuses work that
    /// clients start there (sends, joins, presence: `unavailable`; typing is dropped).
    /// Answers and deliveries of work already accepted always go: dropping them would lose
    /// an acked message or a leave.
    pub mesh_outbox: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_text_bytes: 4096,
            max_rooms_per_conn: 100,
            dedupe_window: HumanDuration(Duration::from_secs(600)),
            send_rate: 20.0,
            send_burst: 40.0,
            outbound_queue: 1024,
            outbound_queue_bytes: 4 << 20,
            max_connections: 100_000,
            handshake_timeout: HumanDuration(Duration::from_secs(10)),
            max_connections_per_user: 64,
            connect_rate_per_ip: 100.0,
            connect_burst_per_ip: 20_000.0,
            mesh_outbox: 4096,
        }
    }
}

/// Replay limits for `join {since}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    pub max_replay: usize,
    /// Most messages kept per room in the Redis store (approximate; 0: unbounded).
    pub max_len: u64,
    /// Oldest message kept per room in the Redis store (unset: no age limit).
    pub max_age: Option<HumanDuration>,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            max_replay: 1000,
            max_len: 10_000,
            max_age: None,
        }
    }
}

/// Cluster-wide presence (`[presence]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// How long a host's presence records survive without a refresh (a dead host's users
    /// stop counting after this).
    pub ttl: HumanDuration,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            ttl: HumanDuration(Duration::from_secs(30)),
        }
    }
}

/// Redis between hosts; `url` unset = single-host mode.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    pub url: Option<String>,
    /// Sharded pub/sub (SSUBSCRIBE/SPUBLISH, Redis >= 7, Redis Cluster).
    pub sharded: bool,
    /// PEM CA file for `rediss://` (unset: the system's trust store).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate, when the server asks for one.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Limit on one connection attempt (TLS and AUTH included).
    pub connect_timeout: HumanDuration,
    /// Limit on one Redis call.
    pub command_timeout: HumanDuration,
    /// How often the pub/sub link is probed with a round trip.
    pub ping_interval: HumanDuration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            sharded: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            connect_timeout: HumanDuration(Duration::from_secs(2)),
            command_timeout: HumanDuration(Duration::from_secs(2)),
            ping_interval: HumanDuration(Duration::from_secs(1)),
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("RedisConfig")
            .field("url", &self.url.as_ref().map(|_| "<set>"))
            .field("sharded", &self.sharded)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("ping_interval", &self.ping_interval)
            .finish()
    }
}

/// Which history backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Embedded,
    Memory,
    Redis,
    Scylla,
}

/// History store selection and durability.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// `fsync` (default): ack after the batch is synced; `buffered`: after the OS has it.
    pub durability: Durability,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Embedded,
            durability: Durability::Fsync,
        }
    }
}

/// The ScyllaDB history store (`[scylla]`, used when `store.kind = "scylla"`).
///
/// `bucket_size` is part of the data layout: every host must use the same value, and it
/// must never change once the keyspace holds messages (the store checks it at open).
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScyllaConfig {
    /// Contact points, `host:port`: a list, or one comma-separated string.
    #[serde(deserialize_with = "string_or_list")]
    pub nodes: Vec<String>,
    /// The keyspace holding corelay's tables (`corelay schema apply` creates it).
    pub keyspace: String,
    /// Consistency of every read and write.
    pub consistency: ScyllaConsistency,
    /// Client-side limit on one request, retries included.
    pub request_timeout: HumanDuration,
    /// Retries of a failed idempotent request (all of corelay's are) within that limit.
    pub retries: u32,
    /// Login, when the cluster requires authentication.
    pub username: Option<String>,
    /// Password for `username`; never logged.
    pub password: Option<String>,
    /// Offsets per partition of a room's stream: bucket = offset / bucket_size.
    pub bucket_size: u64,
}

impl Default for ScyllaConfig {
    fn default() -> Self {
        ScyllaConfig {
            nodes: vec!["127.0.0.1:9042".to_string()],
            keyspace: "corelay".to_string(),
            consistency: ScyllaConsistency::LocalQuorum,
            request_timeout: HumanDuration(Duration::from_secs(2)),
            retries: 2,
            username: None,
            password: None,
            bucket_size: 1000,
        }
    }
}

impl std::fmt::Debug for ScyllaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScyllaConfig")
            .field("nodes", &self.nodes)
            .field("keyspace", &self.keyspace)
            .field("consistency", &self.consistency)
            .field("request_timeout", &self.request_timeout)
            .field("retries", &self.retries)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field("bucket_size", &self.bucket_size)
            .finish()
    }
}

/// A CQL consistency level, as written in the configuration (`local_quorum`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScyllaConsistency {
    /// `ANY` (writes only).
    Any,
    /// `ONE`.
    One,
    /// `TWO`.
    Two,
    /// `THREE`.
    Three,
    /// `QUORUM`: a majority of all replicas.
    Quorum,
    /// `ALL`.
    All,
    /// `LOCAL_QUORUM` (default): a majority of the local datacenter's replicas.
    LocalQuorum,
    /// `EACH_QUORUM` (writes only).
    EachQuorum,
    /// `LOCAL_ONE`.
    LocalOne,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Logging options (`RUST_LOG` picks the level).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// A duration written as seconds (`600`) or with a unit (`"500ms"`, `"30s"`, `"10m"`, `"1h"`, `"7d"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// Parses `"500ms"`, `"30s"`, `"10m"`, `"1h"`, `"7d"` or bare seconds.
    pub fn parse(s: &str) -> Result<HumanDuration, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration (try 30s, 10m, 1h)"))?;
        let d = match unit.trim() {
            "" | "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            "d" => Duration::from_secs(n * 86_400),
            other => return Err(format!("unknown duration unit {other:?} in {s:?}")),
        };
        Ok(HumanDuration(d))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(HumanDuration(Duration::from_secs(s))),
            Raw::Text(t) => HumanDuration::parse(&t).map_err(serde::de::Error::custom),
        }
    }
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

const SECTIONS: &[&str] = &[
    "server", "engineio", "auth", "limits", "history", "redis", "presence", "store", "scylla",
    "log",
];

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

    /// Parses TOML text and applies `CORELAY_*` variables from `env` (testable without a process environment).
    pub fn from_toml_and_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        let mut overrides: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("CORELAY_") else {
                continue;
            };
            let key = match rest {
                "JWT_SECRET" => "AUTH_JWT_SECRET",
                "API_KEY" => "AUTH_API_KEY",
                other => other,
            }
            .to_ascii_lowercase();
            overrides.insert(key, value);
        }
        for (key, raw) in overrides {
            let Some((section, field)) = key.split_once('_') else {
                continue;
            };
            if !SECTIONS.contains(&section) || field.is_empty() {
                continue; // Not ours (e.g. CORELAY_BIN, CORELAY_TEST_SCYLLA).
            }
            let value = env_value(&raw);
            let entry = table
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => {
                    t.insert(field.to_string(), value);
                }
                _ => return Err(ConfigError::Invalid(format!("[{section}] must be a table"))),
            }
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values serde cannot check alone.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.server.shards == Some(0) {
            return bad("server.shards must be at least 1".into());
        }
        if !self.server.path.starts_with('/') {
            return bad(format!(
                "server.path must start with '/', got {:?}",
                self.server.path
            ));
        }
        if self.engineio.ping_interval == 0 || self.engineio.ping_timeout == 0 {
            return bad("engineio.ping_interval and ping_timeout must be positive".into());
        }
        if self.engineio.max_payload < 1024 {
            return bad("engineio.max_payload must be at least 1024 bytes".into());
        }
        let l = &self.limits;
        if l.max_text_bytes == 0 || l.max_rooms_per_conn == 0 {
            return bad("limits.max_text_bytes and max_rooms_per_conn must be positive".into());
        }
        if !(l.send_rate > 0.0 && l.send_burst >= 1.0) {
            return bad("limits.send_rate must be > 0 and limits.send_burst >= 1".into());
        }
        if l.mesh_outbox == 0 {
            return bad("limits.mesh_outbox must be at least 1".into());
        }
        if l.outbound_queue < 8 || l.outbound_queue_bytes < 64 * 1024 {
            return bad(
                "limits.outbound_queue must be >= 8 and outbound_queue_bytes >= 65536".into(),
            );
        }
        if !(l.connect_rate_per_ip >= 0.0 && l.connect_rate_per_ip <= MAX_CONNECT_RATE) {
            return bad(format!(
                "limits.connect_rate_per_ip must be between 0 (off) and {MAX_CONNECT_RATE}"
            ));
        }
        let burst = l.connect_burst_per_ip;
        if !(burst == 0.0 || (1.0..=MAX_CONNECT_BURST).contains(&burst)) {
            return bad(format!(
                "limits.connect_burst_per_ip must be 0 (off) or between 1 and {MAX_CONNECT_BURST}"
            ));
        }
        if self.history.max_replay == 0 {
            return bad("history.max_replay must be positive".into());
        }
        if self.redis.command_timeout.0.is_zero()
            || self.redis.connect_timeout.0.is_zero()
            || self.redis.ping_interval.0.is_zero()
        {
            return bad(
                "redis.connect_timeout, command_timeout and ping_interval must be positive".into(),
            );
        }
        if self.presence.ttl.0 < Duration::from_secs(1) {
            return bad("presence.ttl must be at least 1s".into());
        }
        if let Some(secret) = &self.auth.jwt_secret {
            if secret.len() < 16 {
                return bad("auth.jwt_secret must be at least 16 bytes".into());
            }
        }
        Ok(())
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

/// A list of strings given as a TOML array or as one comma-separated string.
fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        One(String),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::List(v) => v,
        Raw::One(s) => s
            .split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect(),
    })
}

/// An environment value as TOML when it parses as a scalar TOML value, else as a string.
fn env_value(raw: &str) -> toml::Value {
    let parsed: Result<toml::Table, _> = format!("v = {raw}").parse();
    match parsed.ok().and_then(|mut t| t.remove("v")) {
        Some(v @ (toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_))) => v,
        _ => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_protocol() {
        let c = Config::from_toml_and_env("", env(&[])).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.engineio.ping_interval, 25_000);
        assert_eq!(c.engineio.max_payload, 1_000_000);
        assert_eq!(c.limits.max_text_bytes, 4096);
        assert_eq!(c.limits.max_rooms_per_conn, 100);
        assert_eq!(c.limits.dedupe_window.0, Duration::from_secs(600));
        assert_eq!(c.limits.max_connections_per_user, 64);
        assert_eq!(c.limits.connect_rate_per_ip, 100.0);
        assert_eq!(c.limits.connect_burst_per_ip, 20_000.0);
        assert_eq!(c.history.max_replay, 1000);
        assert_eq!(c.store.kind, StoreKind::Embedded);
        assert!(c.redis.url.is_none());
        assert!(c.server.pin_shards);
    }

    #[test]
    fn file_then_env() {
        let c = Config::from_toml_and_env(
            "[limits]\nmax_text_bytes = 10\nsend_rate = 3\n[server]\nlisten = \"127.0.0.1:9000\"",
            env(&[
                ("CORELAY_LIMITS_MAX_TEXT_BYTES", "20"),
                ("CORELAY_JWT_SECRET", "0123456789abcdef0123"),
                ("CORELAY_LIMITS_DEDUPE_WINDOW", "30s"),
                ("CORELAY_STORE_KIND", "memory"),
                ("CORELAY_SERVER_PIN_SHARDS", "false"),
                ("CORELAY_TEST_SCYLLA", "ignored"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.limits.max_text_bytes, 20);
        assert_eq!(c.limits.send_rate, 3.0);
        assert_eq!(c.server.listen.port(), 9000);
        assert_eq!(c.auth.jwt_secret.as_deref(), Some("0123456789abcdef0123"));
        assert_eq!(c.limits.dedupe_window.0, Duration::from_secs(30));
        assert_eq!(c.store.kind, StoreKind::Memory);
        assert!(!c.server.pin_shards);
    }

    #[test]
    fn errors_are_clear() {
        let e = Config::from_toml_and_env("[limits]\nmax_txt = 1", env(&[])).unwrap_err();
        assert!(e.to_string().contains("max_txt"), "{e}");
        let e = Config::from_toml_and_env("[server]\nshards = 0", env(&[])).unwrap_err();
        assert!(e.to_string().contains("server.shards"), "{e}");
        let e = Config::from_toml_and_env("", env(&[("CORELAY_STORE_KIND", "mongo")])).unwrap_err();
        assert!(e.to_string().contains("mongo"), "{e}");
        let e =
            Config::from_toml_and_env("[limits]\nconnect_rate_per_ip = -1", env(&[])).unwrap_err();
        assert!(e.to_string().contains("connect_rate_per_ip"), "{e}");
        let e = Config::from_toml_and_env(
            "[limits]\nconnect_rate_per_ip = 5\nconnect_burst_per_ip = 0.5",
            env(&[]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("connect_burst_per_ip"), "{e}");
        let e = Config::from_toml_and_env("[server\n", env(&[])).unwrap_err();
        assert!(e.to_string().starts_with("invalid configuration"), "{e}");
    }

    #[test]
    fn cluster_keys() {
        let c = Config::from_toml_and_env("", env(&[])).unwrap();
        assert_eq!(c.history.max_len, 10_000);
        assert_eq!(c.history.max_age, None);
        assert_eq!(c.presence.ttl.0, Duration::from_secs(30));
        let c = Config::from_toml_and_env(
            "[redis]\nurl = \"redis://:pw@h:1/0\"\ncommand_timeout = \"500ms\"\n[history]\nmax_age = \"1d\"",
            env(&[
                ("CORELAY_REDIS_SHARDED", "true"),
                ("CORELAY_PRESENCE_TTL", "10s"),
                ("CORELAY_HISTORY_MAX_LEN", "50"),
                ("CORELAY_REDIS_TLS_CA_FILE", "/etc/ca.pem"),
            ]),
        )
        .unwrap();
        // `cluster::RedisOptions::from_config` turns these into the cluster layer's options
        // (tested there).
        assert!(c.redis.sharded);
        assert_eq!(c.redis.command_timeout.0, Duration::from_millis(500));
        assert_eq!(c.presence.ttl.0, Duration::from_secs(10));
        assert_eq!(c.history.max_len, 50);
        assert_eq!(
            c.history.max_age.map(|d| d.0),
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(
            c.redis.tls_ca_file.as_deref(),
            Some(Path::new("/etc/ca.pem"))
        );
        assert!(!format!("{c:?}").contains(":pw@"));
        let e = Config::from_toml_and_env("[presence]\nttl = \"0s\"", env(&[])).unwrap_err();
        assert!(e.to_string().contains("presence.ttl"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(
            HumanDuration::parse("1h").unwrap().0,
            Duration::from_secs(3600)
        );
        assert_eq!(
            HumanDuration::parse("250ms").unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!(
            HumanDuration::parse("12").unwrap().0,
            Duration::from_secs(12)
        );
        assert!(HumanDuration::parse("soon").is_err());
        assert!(HumanDuration::parse("5y").is_err());
    }
}
