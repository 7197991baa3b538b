//! One TCP connection: HTTP requests until it upgrades to WebSocket, then a reader
//! (this task) and a writer task sharing the session's outbound queue.

use std::future::poll_fn;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use glommio::net::TcpStream;

use super::http::{self, HttpError, Request};
use super::websocket::{self, FrameReader, Message};
use crate::chat::handler::{self, Flow};
use crate::chat::session::{CloseReason, Session};
use crate::metrics::ShardMetrics;
use crate::protocol::engineio::{self, HandshakeError, OpenPayload, PacketType};
use crate::shard::Shard;

/// Largest batch of queued frames written with one syscall.
const WRITE_BATCH: usize = 256 * 1024;

/// What to do with a request.
enum Route {
    Respond {
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
    },
    Upgrade {
        key: String,
    },
}

impl Route {
    fn json(status: u16, body: impl Into<Vec<u8>>) -> Route {
        Route::Respond {
            status,
            content_type: "application/json",
            body: body.into(),
        }
    }

    fn eio_error(e: HandshakeError) -> Route {
        Route::json(400, e.body())
    }
}

/// Serves a freshly accepted TCP connection to its end.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let req = match http::read_request(&mut stream, &mut buf).await {
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
                tracing::debug!(shard = shard.id, %why, "malformed HTTP request");
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
        };
        if req.path.starts_with("/api/") {
            let answer = super::api::handle(&shard, &req, &mut stream, &mut buf).await;
            let consumed = req.method == "GET" || answer.status == 201;
            let keep_alive = req.keep_alive() && consumed;
            let resp = http::response(answer.status, "application/json", &answer.body, keep_alive);
            if stream.write_all(&resp).await.is_err() || !keep_alive {
                return;
            }
            continue;
        }
        let has_body = req
            .header("content-length")
            .is_some_and(|v| v.trim() != "0")
            || req.header("transfer-encoding").is_some();
        let keep_alive = req.keep_alive() && !has_body;
        match route(&shard, &req) {
            Route::Upgrade { key } => {
                run_websocket(shard, stream, &key, buf).await;
                return;
            }
            Route::Respond {
                status,
                content_type,
                body,
            } => {
                let resp = http::response(status, content_type, &body, keep_alive);
                if stream.write_all(&resp).await.is_err() || !keep_alive {
                    return;
                }
            }
        }
    }
}

fn route(shard: &Shard, req: &Request) -> Route {
    let eio_path = shard.ctx.config.server.path.as_str();
    let path = req.path.as_str();
    if path == eio_path || path == eio_path.trim_end_matches('/') {
        return engineio_route(req);
    }
    match (req.method.as_str(), path) {
        ("GET", "/healthz") => {
            let (status, body) = health(shard);
            Route::json(status, body)
        }
        ("GET", "/metrics") => Route::Respond {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: shard.ctx.metrics.render_prometheus(true).into_bytes(),
        },
        _ => Route::json(
            404,
            r#"{"error":{"code":"not_found","message":"no such route"}}"#,
        ),
    }
}

fn engineio_route(req: &Request) -> Route {
    if req.query_param("EIO").as_deref() != Some("4") {
        return Route::eio_error(HandshakeError::UnsupportedProtocolVersion);
    }
    match req.query_param("transport").as_deref() {
        Some("websocket") => {}
        Some("polling") => {
            // Long-polling is not served yet: clients must use transports: ["websocket"].
            return Route::eio_error(HandshakeError::TransportUnknown);
        }
        _ => return Route::eio_error(HandshakeError::TransportUnknown),
    }
    if req.query_param("sid").is_some() {
        // An upgrade from a polling session; there are none without polling.
        return Route::eio_error(HandshakeError::SessionIdUnknown);
    }
    if req.method != "GET" {
        return Route::eio_error(HandshakeError::BadHandshakeMethod);
    }
    let key = req.header("sec-websocket-key");
    let is_upgrade = req.header_has_token("upgrade", "websocket")
        && req.header_has_token("connection", "upgrade")
        && req.header("sec-websocket-version") == Some("13");
    match key {
        Some(key) if is_upgrade && !key.is_empty() => Route::Upgrade {
            key: key.trim().to_string(),
        },
        _ => Route::eio_error(HandshakeError::BadRequest),
    }
}

/// The `/healthz` body: per-shard counts from the shared counters.
fn health(shard: &Shard) -> (u16, Vec<u8>) {
    use std::sync::atomic::Ordering::Relaxed;
    let m = &shard.ctx.metrics;
    let shards: Vec<serde_json::Value> = m
        .shards
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({
                "shard": i,
                "connections": s.connections.load(Relaxed),
                "rooms": s.home_rooms.load(Relaxed),
            })
        })
        .collect();
    let body = serde_json::json!({
        "status": "ok",
        "shards": shards,
        "connections": m.connections(),
        "rooms": m.rooms(),
        "redis": null,
        "store": {"ok": true},
    });
    (200, body.to_string().into_bytes())
}

/// Runs an upgraded WebSocket connection until it ends.
async fn run_websocket(shard: Rc<Shard>, mut stream: TcpStream, key: &str, leftover: Vec<u8>) {
    if stream
        .write_all(&websocket::upgrade_response(key))
        .await
        .is_err()
    {
        return;
    }
    let session = shard.open_session(stream.as_raw_fd());
    let eio = &shard.ctx.config.engineio;
    let open = engineio::encode_open(&OpenPayload {
        sid: &session.sid,
        upgrades: &[],
        ping_interval: eio.ping_interval,
        ping_timeout: eio.ping_timeout,
        max_payload: eio.max_payload,
    });
    session.push(websocket::text_frame(&open), false);

    let (mut reader_half, writer_half) = stream.split();
    let writer = glommio::spawn_local(write_loop(session.clone(), writer_half));
    let mut reader = FrameReader::new(eio.max_payload, &leftover);
    let mut state = handler::ConnState::default();
    loop {
        let msg = match reader.next(&mut reader_half).await {
            Ok(m) => m,
            Err(e) => {
                match e.close_code() {
                    Some(code) => {
                        tracing::debug!(shard = shard.id, sid = %session.sid, error = %e, "closing connection");
                        ShardMetrics::inc(&shard.stats().protocol_errors);
                        session.close(CloseReason::Protocol(code));
                    }
                    None => session.close(CloseReason::Gone),
                }
                break;
            }
        };
        let flow = match msg {
            Message::Text(data) => on_engineio_text(&shard, &session, &mut state, data),
            Message::Binary(data) => handler::on_binary(&shard, &session, &mut state, data),
            Message::Ping(payload) => {
                session.push(
                    websocket::encode_frame(
                        tungstenite::protocol::frame::coding::OpCode::Control(
                            tungstenite::protocol::frame::coding::Control::Pong,
                        ),
                        &payload,
                    ),
                    false,
                );
                Flow::Continue
            }
            Message::Pong => Flow::Continue,
            Message::Close => Flow::Close(CloseReason::Protocol(websocket::close_code::NORMAL)),
        };
        if let Flow::Close(reason) = flow {
            if matches!(reason, CloseReason::Protocol(c) if c != websocket::close_code::NORMAL) {
                ShardMetrics::inc(&shard.stats().protocol_errors);
            }
            session.close(reason);
            break;
        }
        if session.is_closing() {
            break;
        }
    }
    shard.close_session(&session);
    writer.await;
}

/// Handles one Engine.IO text packet.
fn on_engineio_text(
    shard: &Shard,
    session: &Rc<Session>,
    state: &mut handler::ConnState,
    mut data: Vec<u8>,
) -> Flow {
    let Some(packet) = engineio::parse_text(&data) else {
        tracing::debug!(shard = shard.id, sid = %session.sid, "invalid Engine.IO packet");
        return Flow::Close(CloseReason::Protocol(websocket::close_code::PROTOCOL));
    };
    match packet.kind {
        PacketType::Pong => {
            let mut t = session.timers.get();
            t.pong_deadline = None;
            t.next_ping =
                Instant::now() + Duration::from_millis(shard.ctx.config.engineio.ping_interval);
            session.timers.set(t);
            Flow::Continue
        }
        PacketType::Ping => {
            let mut reply = data.clone();
            reply[0] = PacketType::Pong.as_byte();
            session.push(websocket::text_frame(&reply), false);
            Flow::Continue
        }
        PacketType::Message => {
            data.remove(0);
            handler::on_socketio(shard, session, state, data)
        }
        PacketType::Close => Flow::Close(CloseReason::Protocol(websocket::close_code::NORMAL)),
        PacketType::Noop | PacketType::Upgrade => Flow::Continue,
        PacketType::Open => Flow::Close(CloseReason::Protocol(websocket::close_code::PROTOCOL)),
    }
}

/// Writes whatever is queued, batching frames into one write, until the session closes.
async fn write_loop(session: Rc<Session>, mut io: WriteHalf<TcpStream>) {
    let mut buf = Vec::new();
    loop {
        poll_fn(|cx| session.poll_ready(cx)).await;
        buf.clear();
        let closing = {
            let mut out = session.out.borrow_mut();
            out.drain_into(&mut buf, WRITE_BATCH);
            out.closing().is_some() && out.is_empty()
        };
        if !buf.is_empty() && io.write_all(&buf).await.is_err() {
            session.close(CloseReason::Gone);
            break;
        }
        if closing {
            break;
        }
        if buf.capacity() > WRITE_BATCH * 2 {
            buf = Vec::new();
        }
    }
    let _ = io.flush().await;
    session.cut();
}
