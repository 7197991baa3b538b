//! Between hosts: Redis. Offsets, pub/sub, idempotent sends, presence and recent history of
//! a cluster of corelay hosts, through one Redis (standalone, or one that serves sharded
//! pub/sub).
//!
//! [`redis::RedisCluster`] is the one value a process holds (`Clone + Send + Sync`; its
//! connections live on the [tokio bridge](crate::bridge)). Each shard wraps it in a
//! [`shard_link::ShardLink`], which runs the hot path on the shard's own connections to
//! Redis (TCP, TLS or a Unix socket). The rooms' home shards call:
//!
//! - [`ShardLink::publish_batch`](shard_link::ShardLink::publish_batch) runs the publish
//!   script: dedupe by `cid`, next offset, append to the room's stream, PUBLISH; Redis's
//!   order is the offset order on every host.
//! - [`ShardLink::subscribe`](shard_link::ShardLink::subscribe) /
//!   [`unsubscribe`](shard_link::ShardLink::unsubscribe) a room's channel; each shard reads
//!   its own [`ClusterEvent`] stream, returned by
//!   [`ShardLink::start`](shard_link::ShardLink::start).
//! - presence: [`presence_join`](redis::RedisCluster::presence_join),
//!   [`presence_leave`](redis::RedisCluster::presence_leave),
//!   [`presence_list`](redis::RedisCluster::presence_list). A host that stops refreshing
//!   (killed, or cut off from Redis) expires after `presence_ttl`; the next presence script
//!   run in that room by any host reaps it and publishes, once, the offline event of each
//!   of its users who is present through no live host. Every host refreshes the rooms it
//!   has users in every `presence_ttl / 3`, so the offline events go out within about
//!   `presence_ttl · 4/3` after a host dies, with no sweep over the cluster's other rooms.
//! - typing: [`publish_typing`](redis::RedisCluster::publish_typing) sends a typing notice
//!   on the room's channel, fire and forget (no offset, nothing stored).
//! - [`check()`] for `corelay check`.
//!
//! The history of a room lives in the same Redis stream the publish script writes;
//! [`crate::store::redis::RedisStore`] reads it through the same connection.
//!
//! # Keys
//!
//! Every key and channel of one room carries the room as a Redis Cluster hash tag
//! (`{room}`), so they all live on one slot and one script can touch them all:
//!
//! | key | type | what |
//! |---|---|---|
//! | `corelay:{room}:offset` | string | the room's latest offset (INCR); never expires |
//! | `corelay:{room}:stream` | stream | recent messages; entry id `<offset>-0`, fields `id user text ts [cid]`; trimmed by count (`MAXLEN ~`) and age |
//! | `corelay:{room}:cid:<len(user)>:<user>:<cid>` | string | `<offset>:<ts>:<id>`, the first ack of an idempotent send; expires after the dedupe window |
//! | `corelay:{room}:presence:<host>` | hash | user → display name, of the users connected through that host; kept 3 × `presence_ttl` unless refreshed (so that a reap finds the users of an expired host) |
//! | `corelay:{room}:presence:hosts` | zset | host → expiry time (Redis clock, ms): now + `presence_ttl` at each refresh |
//! | `corelay:{room}:reaped:<host>` | set | users of an expired host that a reap announced offline; deleted when the host refreshes again (it announces them online), else kept an hour |
//! | channel `corelay:{room}` | pub/sub | `m` + message JSON (offset order), `p` + presence JSON, `t` + typing JSON (volatile) |
//! | channel `corelay:ping:<host>` | pub/sub | this host's round-trip probe |
//!
//! The user id is length-prefixed in the dedupe key so that user `a:b` with cid `c` and user
//! `a` with cid `b:c` cannot share a key.
//!
//! Redis must keep its data (AOF or RDB persistence, `maxmemory-policy noeviction`): the
//! offset counter is the room's sequence for the whole cluster. A counter that is lost while
//! the stream survives heals itself (the script never goes below the stream's last entry),
//! and a host never gets an offset at or below the newest it delivered (the home shard passes
//! it as a floor with each message, [`ShardLink::publish_batch`](shard_link::ShardLink::publish_batch)).

use std::fmt;
use std::time::Duration;

use crate::config::Config;
use crate::history::StoredMessage;

mod check;
mod publish;
pub mod redis;
mod resp;
mod scripts;
pub mod shard_link;
mod tls;
pub(crate) mod wire;

pub use check::{check, CheckReport, CheckStep};

/// A message to publish: everything but the offset, which the publish script assigns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// The room it is sent to.
    pub room: String,
    /// The sender's user id.
    pub user: String,
    /// The text (UTF-8).
    pub text: String,
    /// The client's idempotency key, if any.
    pub cid: Option<String>,
    /// Server time of acceptance, ms since the Unix epoch.
    pub ts: u64,
    /// The message's globally unique id.
    pub id: String,
}

impl NewMessage {
    /// The stored form of this message at `offset`.
    pub fn at(&self, offset: u64) -> StoredMessage {
        StoredMessage {
            room: self.room.clone(),
            offset,
            id: self.id.clone(),
            user: self.user.clone(),
            text: self.text.clone(),
            ts: self.ts,
            cid: self.cid.clone(),
        }
    }
}

/// What the sender is acked with: `{ok, id, offset, ts}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The message's offset in its room.
    pub offset: u64,
    /// The message's id.
    pub id: String,
    /// The message's server time (ms since the epoch).
    pub ts: u64,
}

/// What publishing one message gave ([`ShardLink::publish_batch`](shard_link::ShardLink::publish_batch)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// The message got the next offset, was added to the room's stream and published.
    Stored(StoredMessage),
    /// The same user already sent this `cid` to this room within the dedupe window: this is
    /// the first send's ack, unchanged; nothing was stored or published this time.
    Duplicate(Ack),
}

impl Published {
    /// The ack to send back, whichever the outcome.
    pub fn ack(&self) -> Ack {
        match self {
            Published::Stored(m) => Ack {
                offset: m.offset,
                id: m.id.clone(),
                ts: m.ts,
            },
            Published::Duplicate(a) => a.clone(),
        }
    }
}

/// One user present in a room, cluster-wide.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PresenceEntry {
    /// The user id.
    pub user: String,
    /// The display name, when the user has one.
    pub name: Option<String>,
}

/// What a shard reads from its [`ShardLink`](shard_link::ShardLink)'s event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// A message published to a room this shard subscribed to (by any host, this one
    /// included), in the room's offset order.
    Message(StoredMessage),
    /// A user came online in a room (their first connection on any host) or went offline
    /// (their last one left), as announced by `host`. A home shard ignores its own host's
    /// announcements (it told its local members already).
    Presence {
        /// The room.
        room: String,
        /// The user id.
        user: String,
        /// Display name, if known.
        name: Option<String>,
        /// `true`: came online; `false`: went offline.
        online: bool,
        /// The announcing host's id ([`RedisCluster::host_id`](redis::RedisCluster::host_id)).
        host: String,
    },
    /// A user is typing in a room, as announced by `host` (volatile: no offset, never
    /// stored, dropped when Redis is down). A home shard ignores its own host's notices
    /// (it told its local members already).
    Typing {
        /// The room.
        room: String,
        /// The user id.
        user: String,
        /// The announcing host's id.
        host: String,
    },
    /// The pub/sub link to Redis is down (`reason` says why): messages published meanwhile
    /// are not delivered live. Sends fail with `unavailable` until [`ClusterEvent::Reconnected`].
    Down {
        /// Why the link went down, for the log.
        reason: String,
    },
    /// The link is back and every subscribed room is subscribed again. Messages published
    /// while it was down were not delivered: compare each subscribed room's latest offset
    /// (from the store) with the last one delivered, and deliver the gap from the store.
    Reconnected,
}

/// Why a Redis call failed. The text says what to do where there is something to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// Redis cannot be reached or the connection was lost; nothing was done. The protocol's
    /// `unavailable`.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis did not answer in time. A publish that timed out was not applied unless Redis
    /// ran it within the first half of the timeout and only its reply was late (the script
    /// refuses to run after that deadline), so a retry with the same `cid` is always safe.
    #[error("redis timeout: {0}")]
    Timeout(String),
    /// Redis refused the credentials, or the ACL user lacks a permission.
    #[error("redis refused access: {0}")]
    Auth(String),
    /// The TLS handshake failed (unknown CA, wrong host name, plain-text server, …).
    #[error("redis TLS: {0}")]
    Tls(String),
    /// The configuration is wrong (bad URL, unreadable certificate file, …).
    #[error("redis configuration: {0}")]
    Config(String),
    /// Redis answered with an error (out of memory, read-only replica, …).
    #[error("redis error: {0}")]
    Server(String),
    /// Redis answered something this code cannot decode (a corrupt entry, a foreign key).
    #[error("unexpected data from redis: {0}")]
    Protocol(String),
    /// [`RedisCluster::close`](redis::RedisCluster::close) was called.
    #[error("redis client is closed")]
    Closed,
}

impl ClusterError {
    /// Whether retrying later can succeed without changing the configuration: Redis is
    /// not reachable or did not answer in time. Refused credentials, TLS and configuration
    /// errors are not transient.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ClusterError::Unavailable(_) | ClusterError::Timeout(_)
        )
    }
}

/// How to reach Redis and how the cluster layer behaves. `RedisOptions::new(url)` gives the
/// defaults.
#[derive(Clone)]
pub struct RedisOptions {
    /// `redis://[user[:password]@]host[:port][/db]` or `rediss://…` for TLS (config
    /// `redis.url`; see [`url_from_env`] for the seed's `REDIS_*` variables).
    pub url: String,
    /// Sharded pub/sub (SSUBSCRIBE / SPUBLISH, Redis ≥ 7) instead of the classic one
    /// (`redis.sharded`).
    pub sharded: bool,
    /// PEM file of the CA(s) that signed the server's certificate (`redis.tls_ca_file`);
    /// unset: the system's trust store.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate, when the server asks for one (`redis.tls_cert_file`).
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// PEM private key of `tls_cert_file` (`redis.tls_key_file`).
    pub tls_key_file: Option<std::path::PathBuf>,
    /// This host's id in presence keys and events; unique per process (random by default).
    pub host_id: String,
    /// Limit on one connection attempt, TLS and AUTH included (`redis.connect_timeout`).
    pub connect_timeout: Duration,
    /// Limit on one call, from the shard's point of view (`redis.command_timeout`).
    pub command_timeout: Duration,
    /// How often the pub/sub link is probed with a round trip (`redis.ping_interval`); the
    /// link counts as down when an echo is later than `command_timeout`.
    pub ping_interval: Duration,
    /// First delay between reconnect attempts; doubled after every failure, with jitter.
    pub reconnect_min: Duration,
    /// Longest delay between reconnect attempts.
    pub reconnect_max: Duration,
    /// How long a `cid` makes a send idempotent (`limits.dedupe_window`).
    pub dedupe_window: Duration,
    /// Most messages kept per room stream, approximately (`MAXLEN ~`; 0: unbounded)
    /// (`history.max_len`).
    pub history_max_len: u64,
    /// Oldest message kept per room stream (`history.max_age`; `None`: no age limit).
    pub history_max_age: Option<Duration>,
    /// How long a host's presence survives without a refresh (`presence.ttl`); refreshed
    /// every third of it.
    pub presence_ttl: Duration,
}

impl RedisOptions {
    /// The defaults, for `url`: classic pub/sub, system CAs, a random host id, 2 s connect
    /// and command timeouts, a probe every second, reconnects from 100 ms to 5 s, a 10 min
    /// dedupe window, 10 000 messages per room stream without an age limit, 30 s presence.
    pub fn new(url: impl Into<String>) -> RedisOptions {
        RedisOptions {
            url: url.into(),
            sharded: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            host_id: random_hex(8),
            connect_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_secs(2),
            ping_interval: Duration::from_secs(1),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            dedupe_window: Duration::from_secs(600),
            history_max_len: 10_000,
            history_max_age: None,
            presence_ttl: Duration::from_secs(30),
        }
    }

    /// The cluster layer's options from the configuration's `[redis]`, `[history]`,
    /// `[presence]` and `limits.dedupe_window` settings; `None` when `redis.url` is unset
    /// (single host). Lives here rather than in `config` so that `config` needs nothing
    /// from the cluster layer.
    pub fn from_config(config: &Config) -> Option<RedisOptions> {
        let url = config.redis.url.as_ref()?;
        let mut o = RedisOptions::new(url.clone());
        o.sharded = config.redis.sharded;
        o.tls_ca_file = config.redis.tls_ca_file.clone();
        o.tls_cert_file = config.redis.tls_cert_file.clone();
        o.tls_key_file = config.redis.tls_key_file.clone();
        o.connect_timeout = config.redis.connect_timeout.0;
        o.command_timeout = config.redis.command_timeout.0;
        o.ping_interval = config.redis.ping_interval.0;
        o.dedupe_window = config.limits.dedupe_window.0;
        o.history_max_len = config.history.max_len;
        o.history_max_age = config.history.max_age.map(|d| d.0);
        o.presence_ttl = config.presence.ttl.0;
        Some(o)
    }

    /// The URL without its password, for logs and messages.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// PUBLISH, or SPUBLISH with sharded pub/sub.
    pub(crate) fn publish_command(&self) -> &'static str {
        if self.sharded {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// SUBSCRIBE or SSUBSCRIBE (`subscribe`), else UNSUBSCRIBE or SUNSUBSCRIBE, as
    /// `sharded` says.
    pub(crate) fn subscribe_command(&self, subscribe: bool) -> &'static str {
        match (self.sharded, subscribe) {
            (false, true) => "SUBSCRIBE",
            (false, false) => "UNSUBSCRIBE",
            (true, true) => "SSUBSCRIBE",
            (true, false) => "SUNSUBSCRIBE",
        }
    }
}

impl fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &self.redacted_url())
            .field("sharded", &self.sharded)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("host_id", &self.host_id)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("ping_interval", &self.ping_interval)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("dedupe_window", &self.dedupe_window)
            .field("history_max_len", &self.history_max_len)
            .field("history_max_age", &self.history_max_age)
            .field("presence_ttl", &self.presence_ttl)
            .finish()
    }
}

/// The Redis URL the seed's environment describes: `REDIS_HOST` (unset or empty: `None`),
/// `REDIS_PORT` (default 6379), `REDIS_PASSWORD` (optional), `REDIS_DB` (default 0).
pub fn url_from_env() -> Result<Option<String>, ClusterError> {
    url_from_vars(|name| std::env::var(name).ok())
}

/// [`url_from_env`] with the variables looked up by `var` (for tests and other sources).
///
/// The password is percent-encoded; an IPv6 host is bracketed. A port or db that is not a
/// number is a [`ClusterError::Config`] naming the variable.
pub fn url_from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<String>, ClusterError> {
    let Some(host) = var("REDIS_HOST").filter(|h| !h.trim().is_empty()) else {
        return Ok(None);
    };
    let host = host.trim();
    let port = match var("REDIS_PORT").filter(|p| !p.trim().is_empty()) {
        None => 6379,
        Some(p) => p
            .trim()
            .parse::<u16>()
            .map_err(|_| ClusterError::Config(format!("REDIS_PORT={p:?} is not a port number")))?,
    };
    let db = match var("REDIS_DB").filter(|d| !d.trim().is_empty()) {
        None => 0,
        Some(d) => d.trim().parse::<u32>().map_err(|_| {
            ClusterError::Config(format!("REDIS_DB={d:?} is not a database number"))
        })?,
    };
    let auth = match var("REDIS_PASSWORD").filter(|p| !p.is_empty()) {
        None => String::new(),
        Some(p) => format!(":{}@", percent_encode(&p)),
    };
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    Ok(Some(format!("redis://{auth}{host}:{port}/{db}")))
}

/// Percent-encodes everything but RFC 3986 unreserved characters (for URL user info).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `url` with the password (if any) replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rfind('@') {
        Some(at) => {
            let (userinfo, hostport) = authority.split_at(at);
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_owned()
            };
            format!("{scheme}://{masked}{hostport}{tail}")
        }
        None => url.to_owned(),
    }
}

/// `n` random bytes as lowercase hex.
pub(crate) fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    crate::ids::random_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Key and channel names. All of one room's share the `{room}` hash tag.
pub(crate) mod keys {
    /// The room's offset counter.
    pub fn offset(room: &str) -> String {
        format!("corelay:{{{room}}}:offset")
    }

    /// The room's message stream.
    pub fn stream(room: &str) -> String {
        format!("corelay:{{{room}}}:stream")
    }

    /// The dedupe key of `(user, cid)` in the room (the user is length-prefixed).
    pub fn cid(room: &str, user: &str, cid: &str) -> String {
        format!("corelay:{{{room}}}:cid:{}:{user}:{cid}", user.len())
    }

    /// One host's presence hash in the room.
    pub fn presence(room: &str, host: &str) -> String {
        format!("corelay:{{{room}}}:presence:{host}")
    }

    /// The prefix of the room's presence hashes (the script appends the host id).
    pub fn presence_prefix(room: &str) -> String {
        format!("corelay:{{{room}}}:presence:")
    }

    /// The room's zset of hosts with presence, scored by expiry.
    pub fn presence_hosts(room: &str) -> String {
        format!("corelay:{{{room}}}:presence:hosts")
    }

    /// The users a reap of `host` announced offline in the room (see the presence scripts).
    pub fn reaped(room: &str, host: &str) -> String {
        format!("corelay:{{{room}}}:reaped:{host}")
    }

    /// The prefix of the room's reaped sets (the script appends the host id).
    pub fn reaped_prefix(room: &str) -> String {
        format!("corelay:{{{room}}}:reaped:")
    }

    /// The room's pub/sub channel.
    pub fn channel(room: &str) -> String {
        format!("corelay:{{{room}}}")
    }

    /// The room a channel name belongs to, if it is a room channel.
    pub fn room_of_channel(channel: &[u8]) -> Option<&str> {
        let inner = channel.strip_prefix(b"corelay:{")?.strip_suffix(b"}")?;
        std::str::from_utf8(inner).ok()
    }

    /// A host's private round-trip probe channel.
    pub fn ping(host: &str) -> String {
        format!("corelay:ping:{host}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn url_from_seed_variables() {
        assert_eq!(url_from_vars(vars(&[])), Ok(None));
        assert_eq!(url_from_vars(vars(&[("REDIS_HOST", " ")])), Ok(None));
        assert_eq!(
            url_from_vars(vars(&[("REDIS_HOST", "redis.internal")])),
            Ok(Some("redis://redis.internal:6379/0".into()))
        );
        assert_eq!(
            url_from_vars(vars(&[
                ("REDIS_HOST", "10.0.0.5"),
                ("REDIS_PORT", "6380"),
                ("REDIS_PASSWORD", "p@ss:w/rd %"),
                ("REDIS_DB", "3"),
            ])),
            Ok(Some(
                "redis://:p%40ss%3Aw%2Frd%20%25@10.0.0.5:6380/3".into()
            ))
        );
        assert_eq!(
            url_from_vars(vars(&[("REDIS_HOST", "::1")])),
            Ok(Some("redis://[::1]:6379/0".into()))
        );
        let err = url_from_vars(vars(&[("REDIS_HOST", "h"), ("REDIS_PORT", "x")]));
        assert!(matches!(err, Err(ClusterError::Config(ref m)) if m.contains("REDIS_PORT")));
        let err = url_from_vars(vars(&[("REDIS_HOST", "h"), ("REDIS_DB", "-1")]));
        assert!(matches!(err, Err(ClusterError::Config(ref m)) if m.contains("REDIS_DB")));
    }

    #[test]
    fn the_url_password_is_percent_decoded_by_the_client() {
        let url = url_from_vars(vars(&[
            ("REDIS_HOST", "127.0.0.1"),
            ("REDIS_PASSWORD", "p@ss:w/rd %"),
        ]))
        .expect("url")
        .expect("some");
        let info = ::redis::IntoConnectionInfo::into_connection_info(url.as_str()).expect("parse");
        assert_eq!(info.redis_settings().password(), Some("p@ss:w/rd %"));
        assert_eq!(info.redis_settings().db(), 0);
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("redis://:secret@h:1/2"),
            "redis://:***@h:1/2".to_owned()
        );
        assert_eq!(
            redact_url("rediss://user:secret@h:1"),
            "rediss://user:***@h:1".to_owned()
        );
        assert_eq!(redact_url("redis://user@h"), "redis://user@h".to_owned());
        assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0".to_owned());
        let opts = RedisOptions::new("redis://:hunter2@h");
        assert!(!format!("{opts:?}").contains("hunter2"));
    }

    #[test]
    fn options_from_config() {
        let c = Config::from_toml_and_env("", Vec::new()).unwrap();
        assert!(RedisOptions::from_config(&c).is_none());
        let c = Config::from_toml_and_env(
            "[redis]\nurl = \"redis://:pw@h:1/0\"\ncommand_timeout = \"500ms\"\n[history]\nmax_age = \"1d\"",
            [
                ("CORELAY_REDIS_SHARDED", "true"),
                ("CORELAY_PRESENCE_TTL", "10s"),
                ("CORELAY_HISTORY_MAX_LEN", "50"),
                ("CORELAY_REDIS_TLS_CA_FILE", "/etc/ca.pem"),
                ("CORELAY_LIMITS_DEDUPE_WINDOW", "30s"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>(),
        )
        .unwrap();
        let o = RedisOptions::from_config(&c).unwrap();
        assert_eq!(o.url, "redis://:pw@h:1/0");
        assert!(o.sharded);
        assert_eq!(o.command_timeout, Duration::from_millis(500));
        assert_eq!(o.presence_ttl, Duration::from_secs(10));
        assert_eq!(o.history_max_len, 50);
        assert_eq!(o.history_max_age, Some(Duration::from_secs(86_400)));
        assert_eq!(o.dedupe_window, Duration::from_secs(30));
        assert_eq!(
            o.tls_ca_file.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
    }

    #[test]
    fn keys_share_the_room_hash_tag() {
        assert_eq!(keys::offset("r1"), "corelay:{r1}:offset");
        assert_eq!(keys::stream("r1"), "corelay:{r1}:stream");
        assert_eq!(keys::channel("r1"), "corelay:{r1}");
        assert_eq!(keys::cid("r1", "a:b", "c"), "corelay:{r1}:cid:3:a:b:c");
        assert_ne!(keys::cid("r1", "a:b", "c"), keys::cid("r1", "a", "b:c"));
        assert_eq!(keys::room_of_channel(b"corelay:{r1}"), Some("r1"));
        assert_eq!(keys::room_of_channel(b"corelay:ping:x"), None);
    }
}
