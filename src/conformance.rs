//! Conformance mode (`corelay serve --conformance`, never for production): the server
//! behaves like the Socket.IO reference test server, so the official Engine.IO v4 and
//! Socket.IO v5 protocol test suites (and our equivalents of them) can run against it.
//!
//! - `/engine.io/`: raw Engine.IO; every message packet is echoed back as it came.
//! - `/socket.io/`: namespaces `/` and `/custom`; on connect the server emits `auth`
//!   with the handshake's auth payload; `message` is emitted back as `message-back`
//!   with the same arguments (binary attachments included); `message-with-ack` is acked
//!   with the same arguments.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::rc::Rc;

use tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::protocol::socketio::{self, PacketKind};
use crate::transport::conn::{CloseReason, Flow};
use crate::transport::engine::EngineHandler;
use crate::transport::host::Host;
use crate::transport::session::Session;
use crate::transport::websocket::{close_code, encode_frame, text_frame};

/// The namespaces the reference server serves.
const NAMESPACES: [&str; 2] = ["/", "/custom"];

/// The reference test server as an [`EngineHandler`]: it keeps its per-session state
/// itself, keyed by session id, so production sessions carry none of it.
#[derive(Debug, Default)]
pub struct Conformance {
    /// Sessions opened on `/engine.io/`: raw Engine.IO echo.
    raw: RefCell<HashSet<u64>>,
    /// Socket.IO sessions' namespaces and binary packets being assembled.
    echo: RefCell<HashMap<u64, EchoState>>,
}

impl<H: Host> EngineHandler<H> for Conformance {
    fn serves_path(&self, path: &str) -> bool {
        is_raw_echo_path(path)
    }

    fn on_open(&self, _host: &H, session: &Rc<Session>, path: &str) {
        if is_raw_echo_path(path) {
            self.raw.borrow_mut().insert(session.id);
        }
    }

    fn on_message(&self, host: &H, session: &Rc<Session>, data: Vec<u8>) -> Flow {
        if self.raw.borrow().contains(&session.id) {
            let mut packet = Vec::with_capacity(data.len() + 1);
            packet.push(b'4');
            packet.extend_from_slice(&data);
            echo_engineio_text(session, &packet);
            return Flow::Continue;
        }
        let mut echo = self.echo.borrow_mut();
        let state = echo.entry(session.id).or_default();
        on_socketio(host.shard_id(), session, state, &data)
    }

    fn on_binary(&self, _host: &H, session: &Rc<Session>, data: Vec<u8>) -> Flow {
        if self.raw.borrow().contains(&session.id) {
            echo_engineio_binary(session, &data);
            return Flow::Continue;
        }
        let mut echo = self.echo.borrow_mut();
        on_binary(session, echo.entry(session.id).or_default(), data)
    }

    fn on_close(&self, _host: &H, session: &Rc<Session>) {
        self.raw.borrow_mut().remove(&session.id);
        self.echo.borrow_mut().remove(&session.id);
    }
}

/// The reference server's raw Engine.IO path.
fn is_raw_echo_path(path: &str) -> bool {
    path == "/engine.io/" || path == "/engine.io"
}

/// One Socket.IO session's state: its namespaces, and a binary packet being assembled
/// (its header and the attachments so far).
#[derive(Debug, Default)]
struct EchoState {
    /// Namespaces this client connected to.
    connected: Vec<String>,
    pending: Option<PendingBinary>,
}

#[derive(Debug)]
struct PendingBinary {
    kind: PacketKind,
    namespace: String,
    ack_id: Option<u64>,
    expected: usize,
    json: Vec<u8>,
    attachments: Vec<Vec<u8>>,
}

const PROTOCOL_ERROR: Flow = Flow::Close(CloseReason::Protocol(close_code::PROTOCOL));

/// `/engine.io/`: echo a message packet as it came.
fn echo_engineio_text(session: &Session, packet: &[u8]) {
    session.push(text_frame(packet), false);
}

/// `/engine.io/`: echo a binary packet as it came.
fn echo_engineio_binary(session: &Session, data: &[u8]) {
    session.push(encode_frame(OpCode::Data(Data::Binary), data), false);
}

fn prefix(out: &mut Vec<u8>, kind: u8, attachments: usize, namespace: &str, ack_id: Option<u64>) {
    out.push(b'4');
    out.push(kind);
    if attachments > 0 {
        let _ = write!(out, "{attachments}-");
    }
    if namespace != "/" {
        out.extend_from_slice(namespace.as_bytes());
        out.push(b',');
    }
    if let Some(id) = ack_id {
        let _ = write!(out, "{id}");
    }
}

/// The event's arguments after its name, as raw JSON (`["message",1,"2"]` → `1,"2"`).
fn args_after_name(json: &[u8]) -> Option<Vec<u8>> {
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    let arr = v.as_array()?;
    arr.first()?.as_str()?;
    let rest: Vec<String> = arr[1..].iter().map(|a| a.to_string()).collect();
    Some(rest.join(",").into_bytes())
}

fn event_name(json: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    Some(v.as_array()?.first()?.as_str()?.to_string())
}

/// Answers one event (with its attachments) the way the reference server does.
fn answer(
    session: &Session,
    namespace: &str,
    kind: PacketKind,
    ack_id: Option<u64>,
    json: &[u8],
    attachments: &[Vec<u8>],
) -> Flow {
    let binary = matches!(kind, PacketKind::BinaryEvent);
    let (Some(name), Some(args)) = (event_name(json), args_after_name(json)) else {
        return PROTOCOL_ERROR;
    };
    let mut out = Vec::with_capacity(json.len() + 32);
    match name.as_str() {
        "message" => {
            prefix(
                &mut out,
                if binary { b'5' } else { b'2' },
                attachments.len(),
                namespace,
                None,
            );
            out.extend_from_slice(b"[\"message-back\"");
            if !args.is_empty() {
                out.push(b',');
                out.extend_from_slice(&args);
            }
            out.push(b']');
        }
        "message-with-ack" => {
            let Some(id) = ack_id else {
                return Flow::Continue;
            };
            prefix(
                &mut out,
                if binary { b'6' } else { b'3' },
                attachments.len(),
                namespace,
                Some(id),
            );
            out.push(b'[');
            out.extend_from_slice(&args);
            out.push(b']');
        }
        _ => return Flow::Continue,
    }
    session.push(text_frame(&out), false);
    for a in attachments {
        session.push(encode_frame(OpCode::Data(Data::Binary), a), false);
    }
    Flow::Continue
}

/// `/socket.io/` in conformance mode: one Socket.IO packet.
fn on_socketio(shard: usize, session: &Rc<Session>, state: &mut EchoState, data: &[u8]) -> Flow {
    if state.pending.is_some() {
        return PROTOCOL_ERROR;
    }
    let packet = match socketio::parse(data) {
        Ok(p) => p,
        Err(_) => return PROTOCOL_ERROR,
    };
    let namespace = packet.namespace.to_string();
    match packet.kind {
        PacketKind::Connect => {
            if !NAMESPACES.contains(&namespace.as_str()) {
                session.push(
                    text_frame(&socketio::encode_connect_error(
                        &namespace,
                        "Invalid namespace",
                    )),
                    false,
                );
                return Flow::Continue;
            }
            let auth: serde_json::Value = if packet.data.is_empty() {
                serde_json::json!({})
            } else {
                match serde_json::from_slice(packet.data) {
                    Ok(v @ serde_json::Value::Object(_)) => v,
                    _ => return PROTOCOL_ERROR,
                }
            };
            let sid = crate::ids::new_sid(shard);
            let mut out = Vec::new();
            prefix(&mut out, b'0', 0, &namespace, None);
            let _ = write!(out, "{{\"sid\":\"{sid}\"}}");
            session.push(text_frame(&out), false);
            let mut event = Vec::new();
            prefix(&mut event, b'2', 0, &namespace, None);
            let _ = write!(event, "[\"auth\",{auth}]");
            session.push(text_frame(&event), false);
            if !state.connected.contains(&namespace) {
                state.connected.push(namespace);
            }
            session.connected();
            Flow::Continue
        }
        PacketKind::Disconnect => {
            state.connected.retain(|n| *n != namespace);
            Flow::Continue
        }
        PacketKind::Event | PacketKind::BinaryEvent => {
            // The payload must be an array whose first element is the event name.
            let valid = serde_json::from_slice::<serde_json::Value>(packet.data)
                .ok()
                .and_then(|v| v.as_array().and_then(|a| a.first().map(|f| f.is_string())))
                .unwrap_or(false);
            if !valid {
                return PROTOCOL_ERROR;
            }
            if packet.kind == PacketKind::BinaryEvent && packet.attachments > 0 {
                state.pending = Some(PendingBinary {
                    kind: packet.kind,
                    namespace,
                    ack_id: packet.ack_id,
                    expected: packet.attachments,
                    json: packet.data.to_vec(),
                    attachments: Vec::new(),
                });
                return Flow::Continue;
            }
            if !state.connected.contains(&namespace) {
                return Flow::Continue;
            }
            answer(
                session,
                &namespace,
                packet.kind,
                packet.ack_id,
                packet.data,
                &[],
            )
        }
        PacketKind::Ack | PacketKind::BinaryAck | PacketKind::ConnectError => Flow::Continue,
    }
}

/// A binary attachment in conformance mode.
fn on_binary(session: &Rc<Session>, state: &mut EchoState, data: Vec<u8>) -> Flow {
    let Some(pending) = state.pending.as_mut() else {
        return PROTOCOL_ERROR;
    };
    pending.attachments.push(data);
    if pending.attachments.len() < pending.expected {
        return Flow::Continue;
    }
    let Some(p) = state.pending.take() else {
        return PROTOCOL_ERROR;
    };
    if !state.connected.contains(&p.namespace) {
        return Flow::Continue;
    }
    answer(
        session,
        &p.namespace,
        p.kind,
        p.ack_id,
        &p.json,
        &p.attachments,
    )
}
