//! One TCP connection: HTTP requests (health, metrics, API, Engine.IO polling) until it
//! upgrades to WebSocket, then a reader (this task) and a writer task sharing the
//! session's outbound queue.
//!
//! A request naming a session (`sid`) that another shard owns is handed over: the socket
//! is duplicated and sent, with the request already read, to the owning shard, which
//! serves the connection from then on. No session map is shared between shards.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;

use futures::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use tracing::Instrument as _;

use super::budget::Queue;
use super::conn::{CloseReason, Transport};
use super::handshake::Handshake;
use super::host::Host;
use super::http::{self, HttpError, Request};
use super::polling;
use super::session::Session;
use super::websocket;
use super::ws_task::{run_websocket, Upgrade};
use crate::connect_limit::RetryAfter;
use crate::metrics::ShardMetrics;
use crate::protocol::engineio::{self, HandshakeError, OpenPayload};

/// A request read on another shard and handed to this one with its socket.
#[derive(Debug)]
pub struct Handoff {
    pub request: Request,
    pub leftover: Vec<u8>,
}

/// Serves a freshly accepted TCP connection to its end.
pub async fn serve<H: Host>(host: Rc<H>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    cap_send_buffer(&stream, host.ctx().config.limits.socket_send_buffer);
    serve_requests(host, stream, None).await;
}

/// Sets the kernel's send buffer of a client socket (`limits.socket_send_buffer`; 0 leaves
/// the kernel's). A descriptor handed to another shard keeps it.
fn cap_send_buffer(stream: &TcpStream, bytes: usize) {
    if bytes == 0 {
        return;
    }
    // SAFETY: the descriptor is the stream's, open for as long as `stream` is borrowed.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    if let Err(e) = socket2::SockRef::from(&fd).set_send_buffer_size(bytes) {
        tracing::debug!(error = %e, "setting SO_SNDBUF failed");
    }
}

/// Serves a connection another shard handed over (`fd` is a duplicate this shard owns).
pub async fn adopt<H: Host>(host: Rc<H>, fd: OwnedFd, handoff: Handoff) {
    let stream = stream_from(fd);
    serve_requests(host, stream, Some(handoff)).await;
}

async fn serve_requests<H: Host>(host: Rc<H>, mut stream: TcpStream, mut first: Option<Handoff>) {
    let mut buf = Vec::new();
    loop {
        let req = match first.take() {
            Some(h) => {
                buf = h.leftover;
                h.request
            }
            None => match read_request_in_time(&*host, &mut stream, &mut buf).await {
                Ok(r) => r,
                Err(HttpError::HeadTooLarge) => {
                    let _ = stream
                        .write_all(&http::response(
                            431,
                            "text/plain",
                            b"request head too large\n",
                            false,
                        ))
                        .await;
                    return;
                }
                Err(HttpError::Malformed(why)) => {
                    tracing::debug!(shard = host.shard_id(), %why, "malformed HTTP request");
                    let _ = stream
                        .write_all(&http::response(
                            400,
                            "text/plain",
                            b"malformed request\n",
                            false,
                        ))
                        .await;
                    return;
                }
                Err(_) => return,
            },
        };

        let eio_path = host.ctx().config.server.path.as_str();
        let routed = if req.path == eio_path
            || req.path == eio_path.trim_end_matches('/')
            || host.handler().serves_path(&req.path)
        {
            match engineio_request(&*host, stream, req, buf).await {
                Next::Http(s, b) => {
                    stream = s;
                    buf = b;
                    continue;
                }
                Next::Upgrade(upgrade) => {
                    // A task of its own: this HTTP task's state (request, buffers) is
                    // freed instead of living as long as the WebSocket does.
                    glommio::spawn_local(run_websocket(host, upgrade)).detach();
                    return;
                }
                Next::Done => return,
            }
        } else {
            host.route(&req, &mut stream, &mut buf).await
        };
        let keep_alive = req.keep_alive() && routed.consumed;
        let resp = http::response_cached(
            routed.status,
            routed.content_type,
            routed.cache_control,
            &[routed.headers],
            &routed.body,
            keep_alive,
        );
        if stream.write_all(&resp).await.is_err() || !keep_alive {
            return;
        }
    }
}

/// Reads a request head within `limits.handshake_timeout` (an idle or slow client is
/// dropped quietly).
async fn read_request_in_time<H: Host>(
    host: &H,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Request, HttpError> {
    let limit = host.ctx().config.limits.handshake_timeout.0;
    let read = http::read_request(stream, buf);
    match glommio::timer::timeout(limit, async { Ok(read.await) }).await {
        Ok(result) => result,
        Err(_) => Err(HttpError::Closed),
    }
}

/// Whether the process already serves `limits.max_connections` sessions.
fn at_capacity<H: Host>(host: &H) -> bool {
    host.ctx().metrics.connections() >= host.ctx().config.limits.max_connections
}

/// Takes a new session from the connection's source address's bucket
/// (`limits.connect_rate_per_ip`).
fn admit_source<H: Host>(host: &H, stream: &TcpStream) -> Result<(), RetryAfter> {
    let limiter = &host.ctx().connect_limiter;
    if !limiter.enabled() {
        return Ok(());
    }
    // A socket without a peer address is already gone; its request fails on its own.
    let Ok(peer) = stream.peer_addr() else {
        return Ok(());
    };
    limiter
        .check(peer.ip(), std::time::Instant::now())
        .inspect_err(|retry| {
            tracing::debug!(
                shard = host.shard_id(),
                peer = %peer.ip(),
                retry_after_ms = retry.0.as_millis() as u64,
                "new session refused: connect rate of its address"
            );
        })
}

/// The 503 for a new session past the connection limit.
const AT_CAPACITY: &[u8] = br#"{"error":{"code":"unavailable","message":"the server is at its connection limit; try another host or later"}}"#;

/// The CORS headers for a request's Origin, when that origin is allowed.
fn cors_headers<H: Host>(host: &H, req: &Request) -> String {
    let Some(origin) = req.header("origin") else {
        return String::new();
    };
    let allowed = &host.ctx().config.server.cors_origins;
    if !allowed.iter().any(|o| o == "*" || o == origin) {
        return String::new();
    }
    format!("Access-Control-Allow-Origin: {origin}\r\nAccess-Control-Allow-Credentials: true\r\nVary: Origin\r\n")
}

/// What follows an Engine.IO request.
enum Next {
    /// Serve the next HTTP request on this connection.
    Http(TcpStream, Vec<u8>),
    /// Switch the connection to WebSocket.
    Upgrade(Upgrade),
    /// The connection is closed or handed to another shard.
    Done,
}

/// Handles a request on the Engine.IO path.
async fn engineio_request<H: Host>(
    host: &H,
    mut stream: TcpStream,
    req: Request,
    mut buf: Vec<u8>,
) -> Next {
    let cors = cors_headers(host, &req);
    // Every response carries the CORS headers (none unless the origin is allowed).
    let respond_with = |status: u16, content_type: &str, extra: &str, body: &[u8], keep_alive| {
        http::response_with_headers(status, content_type, &[extra, &cors], body, keep_alive)
    };
    let respond = |status: u16, content_type: &str, body: &[u8], keep_alive: bool| {
        respond_with(status, content_type, "", body, keep_alive)
    };
    if req.method == "OPTIONS" {
        let resp = respond_with(
            204,
            "text/plain",
            &preflight(&cors, &req),
            b"",
            req.keep_alive(),
        );
        if stream.write_all(&resp).await.is_err() || !req.keep_alive() {
            return Next::Done;
        }
        return Next::Http(stream, buf);
    }
    let outcome: (u16, &str, Vec<u8>) = 'answer: {
        if req.query_param("EIO").as_deref() != Some("4") {
            break 'answer reject(HandshakeError::UnsupportedProtocolVersion);
        }
        let transport = req.query_param("transport");
        let transport = match transport.as_deref() {
            Some("websocket") => Transport::WebSocket,
            Some("polling") => Transport::Polling,
            _ => break 'answer reject(HandshakeError::TransportUnknown),
        };
        let Some(sid) = req.query_param("sid") else {
            match new_session(host, stream, buf, &req, transport, &cors).await {
                Step::Answer(s, b, answer) => {
                    (stream, buf) = (s, b);
                    break 'answer answer;
                }
                Step::Next(next) => return next,
            }
        };
        // An existing session: is it ours?
        match crate::ids::shard_of_sid(&sid) {
            Some(owner) if owner < host.shard_count() && owner != host.shard_id() => {
                hand_over(host, owner, &stream, req, buf);
                return Next::Done;
            }
            Some(owner) if owner == host.shard_id() => {}
            _ => break 'answer reject(HandshakeError::SessionIdUnknown),
        }
        match existing_session(host, stream, buf, &req, &sid, transport, &cors).await {
            Step::Answer(s, b, answer) => {
                (stream, buf) = (s, b);
                answer
            }
            Step::Next(next) => return next,
        }
    };
    let (status, content_type, body) = outcome;
    // A refused WebSocket upgrade ends the connection (the client expects no more HTTP).
    let upgrade_attempt = req.header_has_token("upgrade", "websocket");
    let keep_alive =
        req.keep_alive() && !upgrade_attempt && (req.method != "POST" || status == 200);
    let resp = respond(status, content_type, &body, keep_alive);
    if stream.write_all(&resp).await.is_err() || !keep_alive {
        return Next::Done;
    }
    Next::Http(stream, buf)
}

/// The Engine.IO error answer: HTTP 400 with the JSON error body.
fn reject(e: HandshakeError) -> (u16, &'static str, Vec<u8>) {
    (400, "application/json", e.body().into_bytes())
}

/// What a request on a session of this shard came to.
enum Step {
    /// Answer it (status, content type, body); the connection goes on serving requests.
    Answer(TcpStream, Vec<u8>, (u16, &'static str, Vec<u8>)),
    /// The connection is upgraded, or closed.
    Next(Next),
}

/// A request for a new session: refused past the connection limit or the source's rate,
/// else a WebSocket upgrade or a polling session's open packet.
async fn new_session<H: Host>(
    host: &H,
    mut stream: TcpStream,
    buf: Vec<u8>,
    req: &Request,
    transport: Transport,
    cors: &str,
) -> Step {
    if req.method != "GET" {
        return Step::Answer(stream, buf, reject(HandshakeError::BadHandshakeMethod));
    }
    if at_capacity(host) || host.ctx().is_draining() {
        let answer = (503, "application/json", AT_CAPACITY.to_vec());
        return Step::Answer(stream, buf, answer);
    }
    if let Err(retry) = admit_source(host, &stream) {
        ShardMetrics::inc(&host.stats().connect_rate_limited);
        let _ = stream.write_all(&too_many_sessions(retry, cors)).await;
        return Step::Next(Next::Done);
    }
    // Kept for the connect hook only: otherwise a session keeps nothing of its request.
    let handshake = host
        .ctx()
        .config
        .hooks
        .connect
        .then(|| Box::new(Handshake::new(req, stream.peer_addr().ok())));
    if transport == Transport::WebSocket {
        return match websocket_key(req) {
            Some(key) => Step::Next(Next::Upgrade(Upgrade {
                stream,
                key,
                leftover: buf,
                session: None,
                path: req.path.clone(),
                handshake,
            })),
            None => Step::Answer(stream, buf, reject(HandshakeError::BadRequest)),
        };
    }
    let open = open_polling_session(host, &req.path, handshake);
    Step::Answer(stream, buf, (200, "text/plain; charset=UTF-8", open))
}

/// A request naming a session this shard owns: a WebSocket for it (its upgrade, or a
/// second one), a polling GET or a polling POST.
async fn existing_session<H: Host>(
    host: &H,
    mut stream: TcpStream,
    mut buf: Vec<u8>,
    req: &Request,
    sid: &str,
    transport: Transport,
    cors: &str,
) -> Step {
    let Some(session) = host.session_by_sid(sid) else {
        return Step::Answer(stream, buf, reject(HandshakeError::SessionIdUnknown));
    };
    // A polling session whose pong is overdue ends now, not at the sweeper's next
    // tick: a request after pingInterval + pingTimeout finds it gone.
    if session.transport() == Transport::Polling
        && host.end_if_overdue(&session, std::time::Instant::now())
    {
        return Step::Answer(stream, buf, reject(HandshakeError::SessionIdUnknown));
    }
    if transport == Transport::WebSocket {
        let Some(key) = websocket_key(req) else {
            return Step::Answer(stream, buf, reject(HandshakeError::BadRequest));
        };
        if session.transport() != Transport::Polling {
            accept_and_close(&mut stream, &key).await;
            return Step::Next(Next::Done);
        }
        return Step::Next(Next::Upgrade(Upgrade {
            stream,
            key,
            leftover: buf,
            session: Some(session),
            path: req.path.clone(),
            handshake: None,
        }));
    }
    let answer = match req.method.as_str() {
        "GET" => match poll_get(host, &session, &mut stream, &mut buf).await {
            Some(a) => (a.status, a.content_type, a.body),
            None => return Step::Next(Next::Done),
        },
        "POST" => match poll_post(host, &session, req, &mut stream, &mut buf).await {
            Posted::Answer(a) => (a.status, a.content_type, a.body),
            Posted::Bad => reject(HandshakeError::BadRequest),
            Posted::TooLarge => {
                let body = HandshakeError::BadRequest.body();
                let resp = http::response_with_headers(
                    413,
                    "application/json",
                    &["", cors],
                    body.as_bytes(),
                    false,
                );
                let _ = stream.write_all(&resp).await;
                return Step::Next(Next::Done);
            }
            Posted::Gone => return Step::Next(Next::Done),
        },
        _ => reject(HandshakeError::BadHandshakeMethod),
    };
    Step::Answer(stream, buf, answer)
}

/// The CORS preflight's headers (none unless the origin is allowed).
fn preflight(cors: &str, req: &Request) -> String {
    if cors.is_empty() {
        return String::new();
    }
    format!(
        "Access-Control-Allow-Methods: GET, POST, OPTIONS\r\nAccess-Control-Allow-Headers: {}\r\nAccess-Control-Max-Age: 86400\r\n",
        req.header("access-control-request-headers").unwrap_or("content-type")
    )
}

/// The 429 for a new session past its source address's rate, with `Retry-After`.
fn too_many_sessions(retry: RetryAfter, cors: &str) -> Vec<u8> {
    http::response_with_headers(
        429,
        "application/json",
        &[&format!("Retry-After: {}\r\n", retry.secs()), cors],
        &engineio::error_body(
            HandshakeError::Forbidden,
            "Too many new connections from this address; retry later",
        ),
        false,
    )
}

/// Opens a polling session: registered, told to the handler, answered with the open packet.
fn open_polling_session<H: Host>(
    host: &H,
    path: &str,
    handshake: Option<Box<Handshake>>,
) -> Vec<u8> {
    let eio = &host.ctx().config.engineio;
    let session = host.open_session(Transport::Polling);
    session.set_handshake(handshake);
    host.handler().on_open(host, &session, path);
    engineio::encode_open(&OpenPayload {
        sid: &session.sid,
        upgrades: &["websocket"],
        ping_interval: eio.ping_interval,
        ping_timeout: eio.ping_timeout,
        max_payload: eio.max_payload,
    })
}

/// Another WebSocket for a session that is upgrading or upgraded: like the reference
/// server, complete the handshake and close that new socket (1000); the session's own
/// transport goes on.
async fn accept_and_close(stream: &mut TcpStream, key: &str) {
    let mut refused = websocket::upgrade_response(key);
    refused.extend_from_slice(&websocket::close_frame(websocket::close_code::NORMAL));
    let _ = stream.write_all(&refused).await;
    let _ = stream.flush().await;
}

/// A polling GET: waits for packets, watching the connection. A client that gives up on
/// its GET ends the session (as Engine.IO does): `None`.
async fn poll_get<H: Host>(
    host: &H,
    session: &Rc<Session>,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Option<polling::PollAnswer> {
    let get = std::pin::pin!(polling::get(host, session).instrument(session.span.clone()));
    let gone = std::pin::pin!(client_gone(stream, buf));
    match futures::future::select(get, gone).await {
        futures::future::Either::Left((a, _)) => Some(a),
        futures::future::Either::Right(_) => {
            host.end_session(session, CloseReason::Gone);
            None
        }
    }
}

/// What came of a polling POST.
enum Posted {
    /// The packets were handled: this is the answer.
    Answer(polling::PollAnswer),
    /// The body's framing or coding is malformed (400; its end is unknown).
    Bad,
    /// The body is over `engineio.max_payload`: the session is ended (413).
    TooLarge,
    /// The connection closed before the body's end.
    Gone,
}

/// A polling POST: reads the body (`Content-Length` or chunked) and hands its packets up.
async fn poll_post<H: Host>(
    host: &H,
    session: &Rc<Session>,
    req: &Request,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Posted {
    let framing = match req.body_framing() {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(shard = host.shard_id(), error = %e, "polling POST refused");
            return Posted::Bad;
        }
    };
    let config = &host.ctx().config;
    let (max, limit) = (
        config.engineio.max_payload,
        config.limits.handshake_timeout.0,
    );
    // The body counts in the shard's budget while it is read and its packets are handed
    // up (a send's text then counts in the home's queue until answered): from the start
    // when its length is known, else once read.
    let budget = session.budget();
    let mut charge = match framing {
        http::BodyFraming::Length(n) if n <= max => Some(budget.charge(Queue::Polling, n)),
        _ => None,
    };
    match http::read_framed_body_within(stream, buf, framing, max, limit).await {
        Ok(body) => {
            charge.get_or_insert_with(|| budget.charge(Queue::Polling, body.len()));
            Posted::Answer(session.span.in_scope(|| polling::post(host, session, body)))
        }
        Err(HttpError::BodyTooLarge) => {
            host.end_session(session, CloseReason::Gone);
            Posted::TooLarge
        }
        Err(HttpError::Malformed(why)) => {
            tracing::debug!(shard = host.shard_id(), %why, "polling POST refused");
            Posted::Bad
        }
        Err(_) => Posted::Gone,
    }
}

/// Resolves when the client closes its side of the connection. Bytes that arrive
/// meanwhile (a pipelined request) are kept in `buf` and watching stops.
async fn client_gone(stream: &mut TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 1024];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => {}
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            std::future::pending::<()>().await;
        }
    }
}

/// The key of a valid WebSocket upgrade request.
fn websocket_key(req: &Request) -> Option<String> {
    let is_upgrade = req.method == "GET"
        && req.header_has_token("upgrade", "websocket")
        && req.header_has_token("connection", "upgrade")
        && req.header("sec-websocket-version") == Some("13");
    let key = req.header("sec-websocket-key")?.trim();
    (is_upgrade && !key.is_empty()).then(|| key.to_string())
}

/// Sends the connection, with the request already read, to the shard that owns its session.
fn hand_over<H: Host>(
    host: &H,
    owner: usize,
    stream: &TcpStream,
    request: Request,
    leftover: Vec<u8>,
) {
    let Some(fd) = duplicate(stream.as_raw_fd()) else {
        return;
    };
    host.hand_over(owner, fd, Handoff { request, leftover });
}

/// A descriptor of our own for the same socket, to hand to another shard (`None`, with a
/// warning, when the process is out of descriptors).
pub(crate) fn duplicate(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: `fd` is a connection's socket, open until its stream is dropped, which the
    // caller still holds.
    let socket = unsafe { BorrowedFd::borrow_raw(fd) };
    socket
        .try_clone_to_owned()
        .inspect_err(
            |e| tracing::warn!(error = %e, "dup failed; a connection cannot change shards"),
        )
        .ok()
}

/// A glommio stream on a socket handed over from another shard.
pub(crate) fn stream_from(fd: OwnedFd) -> TcpStream {
    // SAFETY: `fd` is an open TCP socket owned by the caller, whose ownership moves into
    // the stream.
    unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) }
}

#[cfg(test)]
mod tests;
