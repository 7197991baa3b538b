//! What the application's backend may see of the request that opened a session (the
//! connect hook: PROTOCOL.md, "Hooks"): a few of its headers and the peer's address.
//! Kept only when `hooks.connect` is on; otherwise a session keeps nothing of its request.

use std::net::SocketAddr;

use super::http::Request;

/// The request headers the connect hook is told.
pub const HANDSHAKE_HEADERS: [&str; 4] = ["cookie", "authorization", "origin", "user-agent"];

/// The parts of a session's opening request the connect hook is told.
#[derive(Clone, Default)]
pub struct Handshake {
    /// Those of [`HANDSHAKE_HEADERS`] the request had (lower-case names).
    pub headers: Vec<(&'static str, String)>,
    pub remote_addr: Option<SocketAddr>,
}

impl Handshake {
    /// The handshake of `req`, from `peer`.
    pub fn new(req: &Request, peer: Option<SocketAddr>) -> Handshake {
        Handshake {
            headers: HANDSHAKE_HEADERS
                .iter()
                .filter_map(|&name| req.header(name).map(|v| (name, v.to_string())))
                .collect(),
            remote_addr: peer,
        }
    }
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Cookies and credentials stay out of logs.
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| *n).collect();
        f.debug_struct("Handshake")
            .field("headers", &names)
            .field("remote_addr", &self.remote_addr)
            .finish()
    }
}
