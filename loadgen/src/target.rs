//! Targets (`host:port`, optionally `ws://` or `http://`), the loopback-only rule, and the
//! spreading of connections over source addresses in 127.0.0.0/8.

use anyhow::{bail, Context};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

/// One server endpoint to connect to.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Resolved address.
    pub addr: SocketAddr,
    /// The WebSocket URL, `ws://host:port<path>?EIO=4&transport=websocket`.
    pub url: String,
}

impl Endpoint {
    /// Parses `host:port`, `ws://host:port` or `http://host:port` (a trailing `/` allowed)
    /// and resolves it. Non-loopback addresses are refused unless `allow_remote`.
    pub fn parse(spec: &str, path: &str, allow_remote: bool) -> anyhow::Result<Endpoint> {
        let hostport = spec
            .trim()
            .trim_start_matches("ws://")
            .trim_start_matches("http://")
            .trim_end_matches('/');
        if hostport.is_empty() || hostport.contains('/') {
            bail!("bad target {spec:?}: expected host:port");
        }
        let addrs: Vec<SocketAddr> = hostport
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve target {spec:?} (expected host:port)"))?
            .collect();
        let addr = *addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .with_context(|| format!("target {spec:?} resolves to no address"))?;
        if !allow_remote {
            if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
                bail!(
                    "target {spec:?} resolves to {bad}, which is not a loopback address; \
                     pass --allow-remote to load a remote server"
                );
            }
        }
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        let path = if path.ends_with('/') {
            path
        } else {
            format!("{path}/")
        };
        Ok(Endpoint {
            addr,
            url: format!("ws://{hostport}{path}?EIO=4&transport=websocket"),
        })
    }
}

/// Parses a list of targets; each argument may itself be comma-separated.
pub fn parse_targets(
    specs: &[String],
    path: &str,
    allow_remote: bool,
) -> anyhow::Result<Vec<Endpoint>> {
    let mut out = Vec::new();
    for spec in specs.iter().flat_map(|s| s.split(',')) {
        if !spec.trim().is_empty() {
            out.push(Endpoint::parse(spec, path, allow_remote)?);
        }
    }
    if out.is_empty() {
        bail!("no target given");
    }
    Ok(out)
}

/// Picks source addresses for connections: with `n` > 0, connection `i` binds
/// 127.0.0.(2 + i mod n), so that each address has its own ephemeral ports.
#[derive(Debug, Clone)]
pub struct Sources {
    n: u32,
}

/// About 28k ephemeral ports exist per (source, destination) pair by default; stay below.
pub const CONNS_PER_SOURCE: usize = 20_000;

impl Sources {
    /// `requested` addresses (at most 253), or with `None` enough for `connections`
    /// (none at all below [`CONNS_PER_SOURCE`]). Only IPv4 loopback targets get sources.
    pub fn new(requested: Option<u32>, connections: usize, targets: &[Endpoint]) -> Sources {
        let loopback_v4 = targets
            .iter()
            .all(|t| matches!(t.addr.ip(), IpAddr::V4(ip) if ip.is_loopback()));
        let n = match requested {
            _ if !loopback_v4 => 0,
            Some(n) => n.min(253),
            None if connections <= CONNS_PER_SOURCE => 0,
            None => connections.div_ceil(CONNS_PER_SOURCE).min(253) as u32,
        };
        Sources { n }
    }

    /// How many source addresses are in use (0: the kernel's choice).
    pub fn count(&self) -> u32 {
        self.n
    }

    /// The source address for connection `i`, if any.
    pub fn for_conn(&self, i: usize) -> Option<Ipv4Addr> {
        if self.n == 0 {
            return None;
        }
        let host = 2 + (i as u32 % self.n);
        Some(Ipv4Addr::new(127, 0, 0, host as u8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t = parse_targets(
            &["127.0.0.1:8080,ws://127.0.0.1:8081/".into()],
            "/socket.io/",
            false,
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            t[1].url,
            "ws://127.0.0.1:8081/socket.io/?EIO=4&transport=websocket"
        );
        let t = parse_targets(&["localhost:9".into()], "chat", false).unwrap();
        assert!(t[0].url.ends_with("/chat/?EIO=4&transport=websocket"));
    }

    #[test]
    fn refuses_remote() {
        let e = Endpoint::parse("10.1.2.3:80", "/socket.io/", false).unwrap_err();
        assert!(e.to_string().contains("--allow-remote"));
        assert!(Endpoint::parse("10.1.2.3:80", "/socket.io/", true).is_ok());
        assert!(Endpoint::parse("nonsense", "/socket.io/", false).is_err());
    }

    #[test]
    fn sources() {
        let t = parse_targets(&["127.0.0.1:1".into()], "/", false).unwrap();
        assert_eq!(Sources::new(None, 1000, &t).count(), 0);
        assert_eq!(Sources::new(None, 50_000, &t).count(), 3);
        let s = Sources::new(Some(2), 10, &t);
        assert_eq!(s.for_conn(0), Some(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(s.for_conn(3), Some(Ipv4Addr::new(127, 0, 0, 3)));
        assert_eq!(Sources::new(Some(999), 10, &t).count(), 253);
        assert_eq!(Sources::new(Some(0), 10, &t).for_conn(1), None);
    }
}
