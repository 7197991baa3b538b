//! A WebSocket session's two tasks: the reader (this task: frames in, handled through the
//! handler, until the session ends or moves to another shard) and the writer beside it
//! (the outbound queue out, batched into as few writes as possible). Also the upgrade of a
//! polling session (`2probe` / `3probe`, then `5`).

use std::future::poll_fn;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use futures::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use glommio::net::TcpStream;
use tracing::Instrument as _;

use super::conn::{CloseReason, Flow, Transport};
use super::engine;
use super::handshake::Handshake;
use super::host::Host;
use super::session::Session;
use super::websocket::{self, FrameReader, Message};
use crate::metrics::ShardMetrics;
use crate::protocol::engineio::{self, OpenPayload};

/// Largest batch of queued frames written with one syscall.
const WRITE_BATCH: usize = 256 * 1024;

/// The largest write buffer an idle connection keeps between batches.
const KEPT_BUFFER: usize = 16 * 1024;

/// A WebSocket upgrade, ready to run.
pub(super) struct Upgrade {
    pub(super) stream: TcpStream,
    pub(super) key: String,
    pub(super) leftover: Vec<u8>,
    /// The polling session being upgraded, or `None` for a new session.
    pub(super) session: Option<Rc<Session>>,
    /// The request's path, for the handler's `on_open` of a new session.
    pub(super) path: String,
    /// What the connect hook may see of the request (a new session, hook on).
    pub(super) handshake: Option<Box<Handshake>>,
}

/// Runs a WebSocket until it ends: a new session, or the upgrade of a polling one
/// (`2probe` / `3probe`, then `5`). Everything after the session is known runs in the
/// session's span.
pub(super) async fn run_websocket<H: Host>(host: Rc<H>, upgrade: Upgrade) {
    let Upgrade {
        mut stream,
        key,
        leftover,
        session: upgrading,
        path,
        handshake,
    } = upgrade;
    if stream
        .write_all(&websocket::upgrade_response(&key))
        .await
        .is_err()
    {
        return;
    }
    let eio = &host.ctx().config.engineio;
    let mut reader = FrameReader::new(eio.max_payload, &leftover);
    drop((key, leftover));
    let session = match upgrading {
        Some(session) => {
            let probed = probe(&session, &mut stream, &mut reader)
                .instrument(session.span.clone())
                .await;
            if !probed {
                if session.transport() == Transport::Upgrading {
                    session.set_transport(Transport::Polling);
                }
                return;
            }
            session.attach_socket(stream.as_raw_fd());
            session.set_transport(Transport::WebSocket);
            session.wake();
            session
                .span
                .in_scope(|| tracing::debug!("upgraded to websocket"));
            session
        }
        None => {
            let session = host.open_session(Transport::WebSocket);
            session.set_handshake(handshake);
            host.handler().on_open(&*host, &session, &path);
            session.attach_socket(stream.as_raw_fd());
            let open = engineio::encode_open(&OpenPayload {
                sid: &session.sid,
                upgrades: &[],
                ping_interval: eio.ping_interval,
                ping_timeout: eio.ping_timeout,
                max_payload: eio.max_payload,
            });
            session.push(websocket::text_frame(&open), false);
            session
        }
    };
    let span = session.span.clone();
    read_loop(host, session, stream, reader)
        .instrument(span)
        .await;
}

/// Reads the client's frames until the session ends or moves to another shard, with a
/// writer task beside it.
pub(crate) async fn read_loop<H: Host>(
    host: Rc<H>,
    session: Rc<Session>,
    stream: TcpStream,
    mut reader: FrameReader,
) {
    let (mut reader_half, writer_half) = stream.split();
    let writer = glommio::spawn_local(
        write_loop(session.clone(), writer_half).instrument(session.span.clone()),
    );
    let mut moving = false;
    loop {
        let msg = match reader.next(&mut reader_half).await {
            Ok(m) => m,
            Err(e) => {
                match e.close_code() {
                    Some(code) => {
                        tracing::debug!(error = %e, "closing connection");
                        ShardMetrics::inc(&host.stats().protocol_errors);
                        session.close(CloseReason::Protocol(code));
                    }
                    None => session.close(CloseReason::Gone),
                }
                break;
            }
        };
        session.set_movable(true);
        let flow = match msg {
            Message::Text(data) => engine::on_text(&*host, &session, data),
            Message::Binary(data) => engine::on_binary(&*host, &session, data),
            Message::Ping(payload) => {
                session.push(websocket::pong_frame(&payload), false);
                Flow::Continue
            }
            Message::Pong => Flow::Continue,
            Message::Close => Flow::Close(CloseReason::Protocol(websocket::close_code::NORMAL)),
        };
        session.set_movable(false);
        if let Flow::Close(reason) = flow {
            if matches!(reason, CloseReason::Protocol(c) if c != websocket::close_code::NORMAL) {
                ShardMetrics::inc(&host.stats().protocol_errors);
            }
            session.close(reason);
            break;
        }
        if session.is_closing() {
            break;
        }
        // A connection that moves (a chat member's first join, put off) stops reading here;
        // the bytes read past this frame travel with it.
        if host.handler().ready_to_move(&*host, &session, &mut reader) {
            moving = true;
            break;
        }
    }
    if moving && !session.is_closing() {
        session.stop_writer();
        writer.await;
        host.handler().move_away(&*host, &session);
        // Dropping the read half closes this shard's descriptor; the duplicate lives on.
    } else {
        host.close_session(&session);
        writer.await;
    }
}

/// The upgrade probe on a new WebSocket for a polling session. True once the client
/// sent `5` (upgrade); false if the probe failed (the polling session goes on).
async fn probe(session: &Rc<Session>, stream: &mut TcpStream, reader: &mut FrameReader) -> bool {
    loop {
        let Ok(msg) = reader.next(stream).await else {
            return false;
        };
        match msg {
            Message::Text(t) if t == b"2probe" => {
                if stream
                    .write_all(&websocket::text_frame(b"3probe"))
                    .await
                    .is_err()
                {
                    return false;
                }
                // Release the pending polling GET with a noop so the client can pause polling.
                session.set_transport(Transport::Upgrading);
                session.wake();
            }
            Message::Text(t) if t == b"5" && session.transport() == Transport::Upgrading => {
                return !session.is_closing();
            }
            Message::Ping(p) => {
                if stream.write_all(&websocket::pong_frame(&p)).await.is_err() {
                    return false;
                }
            }
            _ => {
                tracing::debug!("unexpected packet during upgrade");
                let _ = stream
                    .write_all(&websocket::close_frame(websocket::close_code::PROTOCOL))
                    .await;
                return false;
            }
        }
    }
}

/// Writes whatever is queued, batching frames into one write, until the session closes.
async fn write_loop(session: Rc<Session>, mut io: WriteHalf<TcpStream>) {
    let mut buf = Vec::new();
    loop {
        poll_fn(|cx| session.poll_ready(cx)).await;
        if session.queue().is_moving() {
            // The rest of the queue travels with the connection; the socket stays open.
            return;
        }
        buf.clear();
        let closing = {
            let mut out = session.queue();
            out.drain_into(&mut buf, WRITE_BATCH);
            out.closing().is_some() && out.is_empty()
        };
        let failed = !buf.is_empty() && io.write_all(&buf).await.is_err();
        session.queue().written();
        if failed {
            session.close(CloseReason::Gone);
            break;
        }
        if closing {
            break;
        }
        // A batch buffer is kept only while the connection is busy: 2,000 idle ones
        // holding 256 KiB each would be 500 MiB that no budget counts.
        if buf.capacity() > WRITE_BATCH * 2
            || (buf.capacity() > KEPT_BUFFER && session.queue().is_empty())
        {
            buf = Vec::new();
        }
    }
    let _ = io.flush().await;
    session.cut();
}
