//! Redis clients built from [`RedisOptions`]: the URL, RESP2 or RESP3, and the TLS files
//! for `rediss://`; the same at another node of a Redis Cluster ([`build_client_at`]); the
//! Redis Cluster client of the command connection ([`build_cluster_client`]); and the
//! [`ShardTarget`] each shard connects to by itself. Here because both the process's link
//! and `corelay check` build clients the same way.

use std::path::PathBuf;

use redis::{
    Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, ProtocolVersion,
    RedisConnectionInfo,
};
use rustls::pki_types::ServerName;

use crate::cluster::resp::Tls;
use crate::cluster::topology::NodeAddr;
use crate::cluster::{redact_url, ClusterError, RedisOptions};

/// Where and how a shard connects to Redis by itself (see [`crate::cluster::shard_link`]), worked
/// out once from the URL and the TLS options when the cluster is connected.
#[derive(Clone)]
pub(crate) struct ShardTarget {
    pub addr: ShardAddr,
    /// AUTH and SELECT settings.
    pub info: RedisConnectionInfo,
}

/// The address part of a [`ShardTarget`].
#[derive(Clone)]
pub(crate) enum ShardAddr {
    /// A host name or IP address and a port; TLS settings for `rediss://`.
    Tcp {
        host: String,
        port: u16,
        tls: Option<Tls>,
    },
    /// A Unix socket's path.
    Unix(PathBuf),
}

impl ShardTarget {
    /// The target of `client`'s URL, with TLS settings from `opts` for `rediss://` (the same
    /// CA and client certificate files). Fails on TLS settings that cannot be used.
    pub(super) fn new(client: &Client, opts: &RedisOptions) -> Result<ShardTarget, ClusterError> {
        let info = client.get_connection_info();
        let addr = match info.addr() {
            ConnectionAddr::Tcp(host, port) => ShardAddr::Tcp {
                host: host.clone(),
                port: *port,
                tls: None,
            },
            ConnectionAddr::TcpTls { host, port, .. } => {
                let server_name = ServerName::try_from(host.clone()).map_err(|e| {
                    ClusterError::Config(format!("redis host {host:?} for TLS: {e}"))
                })?;
                ShardAddr::Tcp {
                    host: host.clone(),
                    port: *port,
                    tls: Some(Tls {
                        config: crate::cluster::tls::client_config(opts)?,
                        server_name,
                    }),
                }
            }
            ConnectionAddr::Unix(path) => ShardAddr::Unix(path.clone()),
            other => {
                return Err(ClusterError::Config(format!(
                    "unsupported redis address {other}"
                )))
            }
        };
        Ok(ShardTarget {
            addr,
            info: info.redis_settings().clone(),
        })
    }
}

impl ShardTarget {
    /// The same target (credentials, database, TLS settings) at another node of a Redis
    /// Cluster. Over TLS the node's certificate must carry the address the cluster
    /// announces for it (an IP address, or a host name with `cluster-announce-hostname`),
    /// as for the process's own cluster client.
    pub(crate) fn at_node(&self, node: &crate::cluster::topology::NodeAddr) -> ShardTarget {
        let tls = match &self.addr {
            ShardAddr::Tcp { tls, .. } => tls.clone().map(|mut tls| {
                if let Ok(name) = ServerName::try_from(node.host.clone()) {
                    tls.server_name = name;
                }
                tls
            }),
            ShardAddr::Unix(_) => None,
        };
        ShardTarget {
            addr: ShardAddr::Tcp {
                host: node.host.clone(),
                port: node.port,
                tls,
            },
            info: self.info.clone(),
        }
    }
}

/// Builds a client for `opts` (RESP3 when `resp3`), with the TLS files when `rediss://`.
pub(crate) fn build_client(opts: &RedisOptions, resp3: bool) -> Result<Client, ClusterError> {
    build_client_at(opts, resp3, None)
}

/// [`build_client`] for `node` of a Redis Cluster instead of the URL's host: the same
/// credentials and TLS files. Over TLS the node's certificate must carry the address the
/// cluster announces for it (see [`build_cluster_client`]).
pub(crate) fn build_client_at(
    opts: &RedisOptions,
    resp3: bool,
    node: Option<&NodeAddr>,
) -> Result<Client, ClusterError> {
    let target = redact_url(&opts.url);
    let (info, tls) = connection_info(opts, resp3)?;
    let info = match node {
        Some(node) => at_node(info, node, &target)?,
        None => info,
    };
    let certificates = if tls { tls_certificates(opts)? } else { None };
    match certificates {
        None => Client::open(info).map_err(|e| ClusterError::Config(format!("{target}: {e}"))),
        Some(certs) => Client::build_with_tls(info, certs)
            .map_err(|e| ClusterError::Config(format!("TLS settings for {target}: {e}"))),
    }
}

/// Retries of one command on a Redis Cluster (after MOVED, ASK, TRYAGAIN, CLUSTERDOWN, a lost
/// node), spaced 10 to 250 ms apart: a redirect is followed at once, and a slot with no
/// reachable master answers [`ClusterError::Unavailable`] within about half a second
/// rather than using up `command_timeout`.
const CLUSTER_RETRIES: u32 = 5;

/// A Redis Cluster client for `opts` (RESP2): commands go to the master of their key's slot,
/// follow MOVED and ASK, and the slot map is read again when the cluster says it changed.
/// Seeds: the URL's node, then `known` (the nodes last seen), so that a new connection can
/// be made while the URL's node is down.
///
/// The client builds every node's address from what the cluster announces, so over TLS each
/// node's certificate must carry that address (an IP address unless the cluster announces
/// host names: `cluster-announce-hostname`, `cluster-preferred-endpoint-type hostname`).
pub(crate) fn build_cluster_client(
    opts: &RedisOptions,
    known: &[NodeAddr],
) -> Result<redis::cluster::ClusterClient, ClusterError> {
    let target = redact_url(&opts.url);
    let (info, tls) = connection_info(opts, false)?;
    if matches!(info.addr(), ConnectionAddr::Unix(_)) {
        return Err(ClusterError::Config(format!(
            "redis.url {target} is a Unix socket, but the server is a Redis Cluster, whose \
             nodes are reached over TCP: give one node's TCP address"
        )));
    }
    let mut seeds = vec![info.clone()];
    for node in known {
        let seed = at_node(info.clone(), node, &target)?;
        if !seeds.iter().any(|s| s.addr() == seed.addr()) {
            seeds.push(seed);
        }
    }
    let mut builder = redis::cluster::ClusterClientBuilder::new(seeds)
        .connection_timeout(opts.connect_timeout)
        .response_timeout(opts.command_timeout)
        .retries(CLUSTER_RETRIES)
        .min_retry_wait(10)
        .max_retry_wait(250);
    if tls {
        if let Some(certs) = tls_certificates(opts)? {
            builder = builder.certs(certs);
        }
    }
    builder
        .build()
        .map_err(|e| ClusterError::Config(format!("redis cluster at {target}: {e}")))
}

/// The connection info of `opts.url` (RESP3 when `resp3`), and whether it is TLS. Refuses
/// `#insecure`, and TLS files without `rediss://`.
fn connection_info(
    opts: &RedisOptions,
    resp3: bool,
) -> Result<(ConnectionInfo, bool), ClusterError> {
    let target = redact_url(&opts.url);
    let info = opts
        .url
        .as_str()
        .into_connection_info()
        .map_err(|e| ClusterError::Config(format!("bad redis.url {target}: {e}")))?;
    let settings = info.redis_settings().clone();
    let settings = if resp3 {
        settings.set_protocol(ProtocolVersion::RESP3)
    } else {
        settings.set_protocol(ProtocolVersion::RESP2)
    };
    let info = info.set_redis_settings(settings);
    let tls = match info.addr() {
        ConnectionAddr::TcpTls { insecure: true, .. } => {
            return Err(ClusterError::Config(format!(
                "redis.url {target} asks for #insecure (no certificate check), which corelay \
                 does not do: give the CA that signed the server's certificate in \
                 redis.tls_ca_file instead"
            )))
        }
        ConnectionAddr::TcpTls { .. } => true,
        _ => false,
    };
    let files = [&opts.tls_ca_file, &opts.tls_cert_file, &opts.tls_key_file];
    if !tls && files.iter().any(|f| f.is_some()) {
        return Err(ClusterError::Config(format!(
            "TLS files are set but redis.url {target} is not rediss://"
        )));
    }
    if tls {
        // rustls needs a process-wide crypto provider; only `ring` is compiled in.
        // Installing it again (another client, another test) is refused harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    Ok((info, tls))
}

/// `info` with its address moved to `node` (TLS kept as it is).
fn at_node(
    info: ConnectionInfo,
    node: &NodeAddr,
    target: &str,
) -> Result<ConnectionInfo, ClusterError> {
    let addr = match info.addr() {
        ConnectionAddr::Tcp(..) => ConnectionAddr::Tcp(node.host.clone(), node.port),
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: node.host.clone(),
            port: node.port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        other => {
            return Err(ClusterError::Config(format!(
                "redis.url {target} ({other}) cannot name a Redis Cluster node"
            )))
        }
    };
    Ok(info.set_addr(addr))
}

/// The CA and client certificate files of `opts` for the redis client; `None` when none is
/// set (the system's trust store, no client certificate).
fn tls_certificates(opts: &RedisOptions) -> Result<Option<redis::TlsCertificates>, ClusterError> {
    let files = [&opts.tls_ca_file, &opts.tls_cert_file, &opts.tls_key_file];
    if files.iter().all(|f| f.is_none()) {
        return Ok(None);
    }
    let read = |path: &std::path::PathBuf, what: &str| {
        std::fs::read(path).map_err(|e| {
            ClusterError::Config(format!("cannot read {what} {}: {e}", path.display()))
        })
    };
    let root_cert = opts
        .tls_ca_file
        .as_ref()
        .map(|p| read(p, "redis.tls_ca_file"))
        .transpose()?;
    let client_tls = match (&opts.tls_cert_file, &opts.tls_key_file) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert, "redis.tls_cert_file")?,
            client_key: read(key, "redis.tls_key_file")?,
        }),
        _ => {
            return Err(ClusterError::Config(
                "redis.tls_cert_file and redis.tls_key_file go together".into(),
            ))
        }
    };
    Ok(Some(redis::TlsCertificates {
        client_tls,
        root_cert,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_insecure_tls_url_is_refused_with_the_way_out() {
        let mut opts = RedisOptions::new("rediss://localhost:6380/#insecure");
        let err = build_client(&opts, false).expect_err("refused");
        let text = err.to_string();
        assert!(matches!(err, ClusterError::Config(_)), "{err:?}");
        assert!(
            text.contains("#insecure") && text.contains("redis.tls_ca_file"),
            "{text}"
        );
        opts.url = "rediss://localhost:6380/".into();
        assert!(build_client(&opts, false).is_ok());
    }

    #[test]
    fn a_tls_file_without_rediss_is_refused() {
        let mut opts = RedisOptions::new("redis://127.0.0.1:1");
        opts.tls_ca_file = Some("/nonexistent".into());
        assert!(matches!(
            build_client(&opts, false),
            Err(ClusterError::Config(_))
        ));
        let mut opts = RedisOptions::new("rediss://127.0.0.1:1");
        opts.tls_ca_file = Some("/nonexistent/ca.pem".into());
        let err = build_client(&opts, false)
            .map(|_| ())
            .expect_err("unreadable");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        assert!(matches!(
            build_client(&RedisOptions::new("http://x"), false),
            Err(ClusterError::Config(_))
        ));
    }
}
