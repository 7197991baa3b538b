//! What the transport needs from the shard that runs it, declared here so that the
//! transport names no layer above it: the shared context, the sessions the shard keeps,
//! what a session's packets mean ([`EngineHandler`]), the way to hand a socket to another
//! shard, and the routes that are not Engine.IO (`/api/…`, `/healthz`, `/metrics`).

use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Instant;

use futures::future::LocalBoxFuture;
use glommio::net::TcpStream;

use super::conn::{CloseReason, Transport};
use super::connection::Handoff;
use super::engine::EngineHandler;
use super::http::Request;
use super::session::Session;
use crate::context::Context;
use crate::metrics::ShardMetrics;

/// An answer to a request outside Engine.IO: status, content type, body, and whether the
/// request's body was read (the connection can then serve another request).
#[derive(Debug)]
pub struct Routed {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub consumed: bool,
    /// Its `Cache-Control`: `no-store` for anything dynamic (see [`Routed::dynamic`]).
    pub cache_control: &'static str,
    /// Extra header lines, each ending in `\r\n` (a page's security headers), or empty.
    pub headers: &'static str,
}

impl Routed {
    /// An answer that must not be cached (API, health, metrics) and has no extra headers.
    pub fn dynamic(
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
        consumed: bool,
    ) -> Routed {
        Routed {
            status,
            content_type,
            body,
            consumed,
            cache_control: "no-store",
            headers: "",
        }
    }
}

/// The shard as the transport sees it.
pub trait Host: Sized + 'static {
    /// The process-wide context (configuration, metrics, drain flag).
    fn ctx(&self) -> &Context;

    /// This shard's number.
    fn shard_id(&self) -> usize;

    /// How many shards the process runs.
    fn shard_count(&self) -> usize;

    /// This shard's counters.
    fn stats(&self) -> &ShardMetrics {
        &self.ctx().metrics.shards[self.shard_id()]
    }

    /// What the sessions' Engine.IO messages mean.
    fn handler(&self) -> &dyn EngineHandler<Self>;

    /// Registers a new session.
    fn open_session(&self, transport: Transport) -> Rc<Session>;

    /// The session with this Engine.IO sid, if this shard has it.
    fn session_by_sid(&self, sid: &str) -> Option<Rc<Session>>;

    /// Forgets a session that has ended (every way a session ends comes here).
    fn close_session(&self, session: &Rc<Session>);

    /// Closes a session for `reason`; a polling session, which has no socket task to
    /// notice, is forgotten at once.
    fn end_session(&self, session: &Rc<Session>, reason: CloseReason);

    /// Ends a session whose CONNECT or pong is overdue at `now`; true if it did.
    fn end_if_overdue(&self, session: &Rc<Session>, now: Instant) -> bool;

    /// Sends a connection, with the request already read, to the shard that owns its
    /// session (`fd` is a duplicate of its socket).
    fn hand_over(&self, owner: usize, fd: OwnedFd, handoff: Handoff);

    /// Answers a request outside the Engine.IO path; it may read the request's body from
    /// `io` (with `buf` holding what was read past the head).
    fn route<'a>(
        &'a self,
        req: &'a Request,
        io: &'a mut TcpStream,
        buf: &'a mut Vec<u8>,
    ) -> LocalBoxFuture<'a, Routed>;
}
