//! A host for transport tests: shard 0 of 2, a session map, a handler that records the
//! Engine.IO messages it gets, and a record of the connections handed over and the
//! requests routed outside Engine.IO. Nothing of chat.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::LocalBoxFuture;
use glommio::net::TcpStream;
use glommio::{LocalExecutorBuilder, Placement};

use super::conn::{CloseReason, Flow, Timers, Transport};
use super::connection::Handoff;
use super::engine::EngineHandler;
use super::host::{Host, Routed};
use super::http::Request;
use super::session::Session;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::connect_limit::ConnectLimiter;
use crate::context::Context;
use crate::metrics::Metrics;

/// The shards of the test process; the host is shard 0.
pub const SHARDS: usize = 2;

/// Runs `test` on a glommio executor small enough for an 8 MiB memlock limit.
pub fn on_glommio<F: Future<Output = ()>>(test: impl FnOnce() -> F) {
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(256 << 10)
        .make()
        .expect("a glommio executor")
        .run(test());
}

/// A context with `config`, dev-mode authentication and no connect limit.
pub fn context(config: Config) -> Context {
    Context {
        metrics: Arc::new(Metrics::new(SHARDS)),
        connect_limiter: ConnectLimiter::new(0.0, 0.0),
        auth: Authenticator::new(None),
        config,
        id_prefix: 7,
        draining: AtomicBool::new(false),
    }
}

/// What the handler was told, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Open { session: u64, path: String },
    Message { session: u64, data: Vec<u8> },
    Binary { session: u64, data: Vec<u8> },
    Close { session: u64 },
}

/// A handler that records what it is told. A message `close` asks for a protocol close.
#[derive(Default)]
pub struct Recording {
    pub seen: RefCell<Vec<Seen>>,
}

impl EngineHandler<TestHost> for Recording {
    fn on_open(&self, _host: &TestHost, session: &Rc<Session>, path: &str) {
        self.seen.borrow_mut().push(Seen::Open {
            session: session.id,
            path: path.to_string(),
        });
    }

    fn on_message(&self, _host: &TestHost, session: &Rc<Session>, data: Vec<u8>) -> Flow {
        let flow = if data == b"close" {
            Flow::Close(CloseReason::Protocol(1002))
        } else {
            Flow::Continue
        };
        self.seen.borrow_mut().push(Seen::Message {
            session: session.id,
            data,
        });
        flow
    }

    fn on_binary(&self, _host: &TestHost, session: &Rc<Session>, data: Vec<u8>) -> Flow {
        self.seen.borrow_mut().push(Seen::Binary {
            session: session.id,
            data,
        });
        Flow::Continue
    }

    fn on_close(&self, _host: &TestHost, session: &Rc<Session>) {
        self.seen.borrow_mut().push(Seen::Close {
            session: session.id,
        });
    }
}

/// A connection handed to another shard: the owner, the request, the socket.
pub struct HandedOver {
    pub owner: usize,
    pub handoff: Handoff,
    pub fd: OwnedFd,
}

/// Shard 0 of [`SHARDS`] as the transport sees it.
pub struct TestHost {
    pub ctx: Context,
    pub handler: Recording,
    pub sessions: RefCell<HashMap<String, Rc<Session>>>,
    next: Cell<u64>,
    pub handed: RefCell<Vec<HandedOver>>,
    pub routed: RefCell<Vec<String>>,
}

impl TestHost {
    /// A host with the default configuration.
    pub fn new() -> Rc<TestHost> {
        TestHost::with(Config::default())
    }

    /// A host with `config`.
    pub fn with(config: Config) -> Rc<TestHost> {
        Rc::new(TestHost {
            ctx: context(config),
            handler: Recording::default(),
            sessions: RefCell::new(HashMap::new()),
            next: Cell::new(1),
            handed: RefCell::new(Vec::new()),
            routed: RefCell::new(Vec::new()),
        })
    }

    /// What the handler was told so far (taken).
    pub fn seen(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.handler.seen.borrow_mut())
    }
}

impl Host for TestHost {
    fn ctx(&self) -> &Context {
        &self.ctx
    }

    fn shard_id(&self) -> usize {
        0
    }

    fn shard_count(&self) -> usize {
        SHARDS
    }

    fn handler(&self) -> &dyn EngineHandler<Self> {
        &self.handler
    }

    fn open_session(&self, transport: Transport) -> Rc<Session> {
        let id = self.next.get();
        self.next.set(id + 1);
        let now = Instant::now();
        let eio = &self.ctx.config.engineio;
        let timers = Timers {
            next_ping: now + Duration::from_millis(eio.ping_interval),
            pong_deadline: None,
            connect_deadline: Some(now + eio.connect_timeout.0),
            close_deadline: None,
        };
        let session = Rc::new(Session::new(
            id,
            crate::ids::new_sid(0),
            transport,
            (
                &self.ctx.config.limits,
                Rc::new(super::budget::ShardBudget::new(0)),
            ),
            timers,
            tracing::Span::none(),
        ));
        self.sessions
            .borrow_mut()
            .insert(session.sid.clone(), session.clone());
        session
    }

    fn session_by_sid(&self, sid: &str) -> Option<Rc<Session>> {
        self.sessions.borrow().get(sid).cloned()
    }

    fn close_session(&self, session: &Rc<Session>) {
        if session.take_end_notice() {
            self.handler.on_close(self, session);
        }
        self.sessions.borrow_mut().remove(&session.sid);
    }

    fn end_session(&self, session: &Rc<Session>, reason: CloseReason) {
        session.close(reason);
        if session.transport() != Transport::WebSocket {
            self.close_session(session);
        }
    }

    fn end_if_overdue(&self, session: &Rc<Session>, now: Instant) -> bool {
        let late = session.timers().pong_deadline.is_some_and(|d| now >= d);
        if late {
            self.end_session(session, CloseReason::Timeout);
        }
        late
    }

    fn hand_over(&self, owner: usize, fd: OwnedFd, handoff: Handoff) {
        self.handed
            .borrow_mut()
            .push(HandedOver { owner, handoff, fd });
    }

    fn route<'a>(
        &'a self,
        req: &'a Request,
        _io: &'a mut TcpStream,
        _buf: &'a mut Vec<u8>,
    ) -> LocalBoxFuture<'a, Routed> {
        Box::pin(async move {
            self.routed.borrow_mut().push(req.path.clone());
            Routed::dynamic(
                200,
                "text/plain",
                format!("routed {}", req.path).into_bytes(),
                true,
            )
        })
    }
}
