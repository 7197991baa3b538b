//! The configuration's sections (`[server]`, `[limits]`, …): one struct each, with its
//! defaults, and the enums their fields take.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::HumanDuration;
use crate::history::Durability;

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
    /// The chat page at `/`: unset = on in dev mode only; `true`/`false` force it.
    pub demo_page: Option<bool>,
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
            demo_page: None,
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
    /// Time a client has to send a complete HTTP request head, and again its body
    /// (slow-loris guard), and the longest an idle keep-alive HTTP connection is kept.
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
    /// Bytes the whole process may hold in its queues (0: no bound), split evenly over
    /// shards: connections' outbound queues, what homes hold, messages between shards,
    /// held packets, polling bodies, emits (`transport::budget`). Past half a shard's part,
    /// sends, joins and presence are refused with `unavailable`; past three quarters the
    /// connections holding the most are cut as slow consumers.
    pub memory_budget: usize,
    /// The kernel's send buffer of each client socket, in bytes (`SO_SNDBUF`; 0: the
    /// kernel's default, autotuned up to `net.ipv4.tcp_wmem`'s maximum, often 4 MiB). The
    /// budget does not see what the kernel holds: a bounded buffer keeps a slow consumer's
    /// backlog in its outbound queue, where `outbound_queue_bytes` and the budget act on it.
    pub socket_send_buffer: usize,
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
            // 256 MiB: with the rest of the process (~80 MiB at 20,000 idle connections,
            // the store's caches) it stays under 300-400 MiB of RSS, and it still holds a
            // 4 MiB backlog for 64 connections at once, or 13 KiB for each of 20,000.
            memory_budget: 256 << 20,
            // 256 KiB: ~1,000 chat frames, and 2.5 MB/s per connection at 100 ms of
            // round trip; in a flood at 3x capacity the kernel's autotuned 4 MiB per socket
            // held the backlog where the budget could not see it (and delivery p50 was 7 s
            // instead of 1.5 s: docs/bench/journal.md, 2026-12-08).
            socket_send_buffer: 256 << 10,
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

/// Emits from existing Node services through `@socket.io/redis-emitter` on the shared
/// Redis (`[emitter]`): read from its channels and delivered to rooms' members as they are.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmitterConfig {
    /// Read and deliver them (off by default; needs `redis.url`).
    pub enabled: bool,
    /// The emitter's `key` option: its channels are `<prefix>#/#…`.
    pub prefix: String,
}

impl Default for EmitterConfig {
    fn default() -> Self {
        EmitterConfig {
            enabled: false,
            prefix: "socket.io".to_string(),
        }
    }
}

/// Redis between hosts; `url` unset = single-host mode.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    pub url: Option<String>,
    /// Sharded pub/sub (SSUBSCRIBE/SPUBLISH, Redis >= 7); always on with a Redis Cluster.
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
    /// While sends keep coming, a home sends its publish batch to Redis at most once per
    /// window, so that one script call carries many messages (0: as soon as the previous
    /// batch is answered). A send after a quiet spell goes at once.
    pub batch_window: HumanDuration,
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
            batch_window: HumanDuration(Duration::from_millis(1)),
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
            .field("batch_window", &self.batch_window)
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
