//! [`RedisOptions`]: how to reach Redis and how the cluster layer behaves, from the
//! configuration or the seed's `REDIS_*` variables; and Redis URLs without their password.

use std::fmt;
use std::time::Duration;

use super::{random_hex, ClusterError};
use crate::config::Config;

/// How to reach Redis and how the cluster layer behaves. `RedisOptions::new(url)` gives the
/// defaults.
#[derive(Clone)]
pub struct RedisOptions {
    /// `redis://[user[:password]@]host[:port][/db]` or `rediss://…` for TLS (config
    /// `redis.url`; see [`url_from_env`] for the seed's `REDIS_*` variables).
    pub url: String,
    /// Sharded pub/sub (SSUBSCRIBE / SPUBLISH, Redis ≥ 7) instead of the classic one
    /// (`redis.sharded`). Set by [`RedisCluster`](super::redis::RedisCluster) when the
    /// server is a Redis Cluster, whatever the configuration says.
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
    /// While sends keep coming, a home sends its batch at most once per window
    /// (`redis.batch_window`): Redis's cost is mostly per script call, not per message.
    pub batch_window: Duration,
    /// The key prefix of `@socket.io/redis-emitter` emits to read and deliver
    /// (`emitter.prefix` when `emitter.enabled`); `None`: not read.
    pub emitter_prefix: Option<String>,
}

impl RedisOptions {
    /// The defaults, for `url`: classic pub/sub, system CAs, a random host id, 2 s connect
    /// and command timeouts, a probe every second, reconnects from 100 ms to 1 s (a healed Redis is found within a second; the jitter spreads the hosts' attempts), a 10 min
    /// dedupe window, 10 000 messages per room stream without an age limit, 30 s presence,
    /// a 1 ms batch window.
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
            reconnect_max: Duration::from_secs(1),
            dedupe_window: Duration::from_secs(600),
            history_max_len: 10_000,
            history_max_age: None,
            presence_ttl: Duration::from_secs(30),
            batch_window: Duration::from_millis(1),
            emitter_prefix: None,
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
        o.batch_window = config.redis.batch_window.0;
        o.emitter_prefix = config
            .emitter
            .enabled
            .then(|| config.emitter.prefix.clone());
        Some(o)
    }

    /// The URL without its password, for logs and messages.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// PUBLISH, or SPUBLISH with sharded pub/sub.
    pub(crate) fn publish_command(&self) -> &'static str {
        publish_command(self.sharded)
    }

    /// SUBSCRIBE or SSUBSCRIBE (`subscribe`), else UNSUBSCRIBE or SUNSUBSCRIBE, as
    /// `sharded` says.
    pub(crate) fn subscribe_command(&self, subscribe: bool) -> &'static str {
        subscribe_command(self.sharded, subscribe)
    }
}

/// PUBLISH, or SPUBLISH with sharded pub/sub (`sharded`).
pub(crate) fn publish_command(sharded: bool) -> &'static str {
    if sharded {
        "SPUBLISH"
    } else {
        "PUBLISH"
    }
}

/// SUBSCRIBE or SSUBSCRIBE (`subscribe`), else UNSUBSCRIBE or SUNSUBSCRIBE, classic or
/// sharded (`sharded`).
pub(crate) fn subscribe_command(sharded: bool, subscribe: bool) -> &'static str {
    match (sharded, subscribe) {
        (false, true) => "SUBSCRIBE",
        (false, false) => "UNSUBSCRIBE",
        (true, true) => "SSUBSCRIBE",
        (true, false) => "SUNSUBSCRIBE",
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
            .field("batch_window", &self.batch_window)
            .field("emitter_prefix", &self.emitter_prefix)
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
}
