//! `[hooks]`: the application's backend asked synchronously (PROTOCOL.md, "Hooks"), and
//! the backend's URL as the hooks client needs it. Every hook is off by default.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::HumanDuration;

/// What a hook that fails (no answer in time, not 2xx, not the expected JSON) means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Refuse what the hook was asked about (the default: a backend that is down lets
    /// nobody in rather than everybody).
    #[default]
    Deny,
    /// Go on as if the hook were off.
    Allow,
}

/// The `[hooks]` section: where the backend is, how to sign, and which hooks are on.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HooksConfig {
    /// The backend's base URL, `http://host[:port][/path]` or `https://…`; each hook is a
    /// `POST {url}/{hook}`.
    pub url: Option<String>,
    /// HMAC-SHA256 key of the `X-Corelay-Signature` header (unset: requests are unsigned).
    pub secret: Option<String>,
    /// Limit on one whole call (waiting for a connection, connecting, TLS, the answer).
    pub timeout: HumanDuration,
    pub on_failure: OnFailure,
    /// Ask the backend about a CONNECT that carries no valid JWT.
    pub connect: bool,
    /// Ask the backend about a join the user's grants and room token do not allow.
    pub join: bool,
    /// Ask the backend about every message before it takes an offset.
    pub publish: bool,
    /// Forward client events that are not chat events to the backend.
    pub rpc: bool,
    /// Connections each shard keeps to the backend at most; a call waits for a free one.
    pub max_connections: usize,
    /// PEM CA file for an `https://` backend (unset: the system's trust store).
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            url: None,
            secret: None,
            timeout: HumanDuration(Duration::from_secs(2)),
            on_failure: OnFailure::Deny,
            connect: false,
            join: false,
            publish: false,
            rpc: false,
            max_connections: 16,
            tls_ca_file: None,
        }
    }
}

impl std::fmt::Debug for HooksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HooksConfig")
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("timeout", &self.timeout)
            .field("on_failure", &self.on_failure)
            .field("connect", &self.connect)
            .field("join", &self.join)
            .field("publish", &self.publish)
            .field("rpc", &self.rpc)
            .field("max_connections", &self.max_connections)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

impl HooksConfig {
    /// Whether any hook is on (the hooks client exists only then).
    pub fn any(&self) -> bool {
        self.connect || self.join || self.publish || self.rpc
    }

    /// The checks serde cannot make: a hook on needs a URL, the URL must parse, the
    /// timeout and the connection bound must be positive.
    pub(super) fn validate(&self) -> Result<(), String> {
        if let Some(url) = &self.url {
            BackendUrl::parse(url).map_err(|e| format!("hooks.url {url:?}: {e}"))?;
        } else if self.any() {
            return Err("a hook is on (hooks.connect, join, publish or rpc) but hooks.url is not set (CORELAY_HOOKS_URL)".into());
        }
        if self.timeout.0.is_zero() {
            return Err("hooks.timeout must be positive".into());
        }
        if self.max_connections == 0 {
            return Err("hooks.max_connections must be at least 1".into());
        }
        if self.secret.as_deref() == Some("") {
            return Err(
                "hooks.secret must not be empty (leave it unset for unsigned calls)".into(),
            );
        }
        Ok(())
    }
}

/// The backend's base URL, split the way an HTTP/1.1 client needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendUrl {
    /// `https://`.
    pub tls: bool,
    /// Host name or IP literal (IPv6 without its brackets).
    pub host: String,
    pub port: u16,
    /// The path prefix, without a trailing `/` (empty for the root).
    pub path: String,
}

impl BackendUrl {
    /// Parses `http(s)://host[:port][/path]`; no user info, query or fragment.
    pub fn parse(url: &str) -> Result<BackendUrl, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else {
            return Err("must start with http:// or https://".into());
        };
        if rest.contains(['?', '#', '@', ' ']) {
            return Err("no user info, query, fragment or spaces".into());
        }
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = split_host_port(authority)?;
        let port = match port {
            Some(p) => p.parse().map_err(|_| format!("bad port {p:?}"))?,
            None if tls => 443,
            None => 80,
        };
        if host.is_empty() {
            return Err("no host".into());
        }
        Ok(BackendUrl {
            tls,
            host: host.to_string(),
            port,
            path: path.trim_end_matches('/').to_string(),
        })
    }

    /// The `Host` header's value.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match (self.tls, self.port) {
            (true, 443) | (false, 80) => host,
            _ => format!("{host}:{}", self.port),
        }
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(authority: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed [ in host")?;
        return match after {
            "" => Ok((host, None)),
            p => p
                .strip_prefix(':')
                .map(|p| (host, Some(p)))
                .ok_or_else(|| "junk after ]".to_string()),
        };
    }
    Ok(match authority.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = BackendUrl::parse("http://127.0.0.1:3000/hooks/").unwrap();
        assert_eq!((u.tls, u.port, u.path.as_str()), (false, 3000, "/hooks"));
        assert_eq!(u.authority(), "127.0.0.1:3000");
        let u = BackendUrl::parse("https://api.example").unwrap();
        assert_eq!((u.tls, u.port, u.path.as_str()), (true, 443, ""));
        assert_eq!(u.authority(), "api.example");
        let u = BackendUrl::parse("http://[::1]:81").unwrap();
        assert_eq!((u.host.as_str(), u.authority()), ("::1", "[::1]:81".into()));
        for bad in [
            "ftp://x",
            "http://",
            "http://x:99999",
            "http://u:p@x",
            "http://x/?a",
            "x",
        ] {
            assert!(BackendUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
