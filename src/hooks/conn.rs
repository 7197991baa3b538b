//! One connection to the backend: plain TCP or TLS over a glommio `TcpStream`
//! (futures-io), opened to the configured host and port.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs as _};
use std::time::Instant;

use glommio::net::TcpStream;

use super::Backend;

/// A connection's byte stream, with or without TLS (never a Unix socket here).
pub use crate::stream::Stream;

/// A connection to the backend; between calls it waits in its shard's pool.
pub struct Conn {
    pub stream: Stream,
    /// Since when it has waited in the pool.
    pub idle_since: Instant,
}

impl Conn {
    /// Opens a connection to the backend (DNS, TCP, TLS). The caller bounds the time.
    pub async fn open(backend: &Backend) -> io::Result<Conn> {
        let addrs = resolve(&backend.url.host, backend.url.port).await?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => {
                    tcp.set_nodelay(true).map_err(io::Error::from)?;
                    let stream = match &backend.tls {
                        None => Stream::Plain(tcp),
                        Some(tls) => {
                            let connector = futures_rustls::TlsConnector::from(tls.config.clone());
                            let s = connector.connect(tls.server_name.clone(), tcp).await?;
                            Stream::Tls(Box::new(s))
                        }
                    };
                    return Ok(Conn {
                        stream,
                        idle_since: Instant::now(),
                    });
                }
                Err(e) => last = io::Error::from(e),
            }
        }
        Err(last)
    }
}

/// The addresses of `host`: an IP literal as it is; a name through the system resolver on
/// the executor's blocking thread (`getaddrinfo` blocks, and must not stall the shard),
/// once per new connection since connections are kept alive.
async fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let host = host.to_string();
    glommio::executor()
        .spawn_blocking(move || (host.as_str(), port).to_socket_addrs().map(Vec::from_iter))
        .await
}
