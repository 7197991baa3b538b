//! Engine.IO long-polling: a GET takes every packet queued for the session (joined by
//! the record separator `\x1e`, binary as `b<base64>`), waiting until there is one; a
//! POST brings the client's packets. One GET and one POST at a time per session.

use std::future::poll_fn;
use std::rc::Rc;
use std::task::Poll;

use base64::Engine as _;
use bytes::Bytes;

use super::conn::Flow;
use super::conn::{CloseReason, Transport};
use super::engine;
use super::host::Host;
use super::session::Session;
use crate::protocol::engineio::HandshakeError;

/// The record separator between packets in a polling payload.
const SEPARATOR: u8 = 0x1e;

/// How long a polling session the client closed stays known for a GET that was sent
/// before the close but arrives after it.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// A polling answer: status, content type, body.
pub struct PollAnswer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl PollAnswer {
    fn text(body: impl Into<Vec<u8>>) -> PollAnswer {
        PollAnswer {
            status: 200,
            content_type: "text/plain; charset=UTF-8",
            body: body.into(),
        }
    }

    /// An Engine.IO error answer (HTTP 400 with the JSON body).
    pub fn error(e: HandshakeError) -> PollAnswer {
        PollAnswer {
            status: 400,
            content_type: "application/json",
            body: e.body().into_bytes(),
        }
    }
}

/// Appends one queued WebSocket frame to a polling payload as an Engine.IO packet.
/// Returns false for frames that have no polling form (WebSocket pongs).
fn append_packet(out: &mut Vec<u8>, frame: &Bytes) -> bool {
    let Some((opcode, payload)) = split_server_frame(frame) else {
        return false;
    };
    if !out.is_empty() {
        out.push(SEPARATOR);
    }
    match opcode {
        0x1 => out.extend_from_slice(payload),
        0x2 => {
            out.push(b'b');
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(payload)
                    .as_bytes(),
            );
        }
        0x8 => out.push(b'1'),
        _ => {
            if out.last() == Some(&SEPARATOR) {
                out.pop();
            }
            return false;
        }
    }
    true
}

/// Splits an unmasked server frame into its opcode and payload.
fn split_server_frame(frame: &[u8]) -> Option<(u8, &[u8])> {
    let opcode = frame.first()? & 0x0f;
    let at = match frame.get(1)? & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    Some((opcode, frame.get(at..)?))
}

/// A GET: waits for packets, then returns all that fit in `max_payload`.
pub async fn get<H: Host>(host: &H, session: &Rc<Session>) -> PollAnswer {
    match session.transport() {
        Transport::WebSocket => return PollAnswer::error(HandshakeError::BadRequest),
        Transport::Upgrading => return PollAnswer::text("6"),
        Transport::Polling => {}
    }
    if !session.start_get() {
        // Two GETs at once: Engine.IO closes the session; the first GET gets `1`.
        host.end_session(session, CloseReason::Protocol(1008));
        return PollAnswer::error(HandshakeError::BadRequest);
    }
    poll_fn(|cx| {
        if session.transport() != Transport::Polling {
            Poll::Ready(())
        } else {
            session.poll_ready(cx)
        }
    })
    .await;
    session.end_get();
    if session.transport() != Transport::Polling {
        // The client is upgrading: release this GET with a noop.
        return PollAnswer::text("6");
    }
    let max = host.ctx().config.engineio.max_payload;
    let mut body = Vec::new();
    let closing = {
        let mut out = session.queue();
        while let Some(frame) = out.pop() {
            append_packet(&mut body, &frame);
            if body.len() >= max {
                break;
            }
        }
        out.closing().is_some() && out.is_empty()
    };
    if closing {
        // A close the server decided ends with `1` (its close frame); one the client
        // asked for (`Gone`) just releases the GET with a noop.
        host.close_session(session);
    }
    if body.is_empty() {
        body.push(b'6');
    }
    PollAnswer::text(body)
}

/// A POST: the client's packets.
pub fn post<H: Host>(host: &H, session: &Rc<Session>, body: Vec<u8>) -> PollAnswer {
    if session.transport() == Transport::WebSocket {
        return PollAnswer::error(HandshakeError::BadRequest);
    }
    if session.is_closing() {
        // Closed by the client, kept only for a GET still on its way (see below).
        return PollAnswer::error(HandshakeError::SessionIdUnknown);
    }
    if !session.start_post() {
        host.end_session(session, CloseReason::Protocol(1008));
        return PollAnswer::error(HandshakeError::BadRequest);
    }
    let mut flow = Flow::Continue;
    for packet in body.split(|&b| b == SEPARATOR) {
        flow = match packet.first() {
            Some(b'b') => match base64::engine::general_purpose::STANDARD.decode(&packet[1..]) {
                Ok(data) => engine::on_binary(host, session, data),
                Err(_) => Flow::Close(CloseReason::Protocol(1002)),
            },
            _ => engine::on_text(host, session, packet.to_vec()),
        };
        if flow != Flow::Continue {
            break;
        }
    }
    session.end_post();
    if let Flow::Close(reason) = flow {
        // A close packet from the client (`Protocol(1000)`) ends the session quietly: a
        // pending GET gets a noop. A bad packet ends it too, and the POST gets a 400.
        let bad = matches!(reason, CloseReason::Protocol(code) if code != 1000);
        if bad {
            host.end_session(session, reason);
            return PollAnswer::error(HandshakeError::BadRequest);
        }
        if session.get_waiting() {
            host.end_session(session, CloseReason::Gone);
        } else {
            // No GET waits yet, but one the client sent before its close may be on its way:
            // it can reach another shard first and be handed over here after this POST. The
            // session leaves its rooms now and stays known for a short grace: the next GET
            // gets the noop and forgets it (a later one gets "Session ID unknown"), and the
            // sweeper forgets it when the grace is over.
            session.close(CloseReason::Gone);
            // For the layer above the session has ended (it leaves its rooms).
            if session.take_end_notice() {
                host.handler().on_close(host, session);
            }
            let mut t = session.timers();
            t.close_deadline = Some(std::time::Instant::now() + CLOSE_GRACE);
            session.set_timers(t);
        }
    }
    PollAnswer::text("ok")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::websocket::{close_frame, encode_frame, text_frame};
    use tungstenite::protocol::frame::coding::{Data, OpCode};

    #[test]
    fn frames_become_polling_packets() {
        let mut out = Vec::new();
        assert!(append_packet(&mut out, &text_frame(b"42[\"a\"]")));
        assert!(append_packet(
            &mut out,
            &encode_frame(OpCode::Data(Data::Binary), &[1, 2, 3])
        ));
        assert!(append_packet(&mut out, &text_frame(&vec![b'x'; 300])));
        assert!(append_packet(&mut out, &close_frame(1000)));
        let parts: Vec<&[u8]> = out.split(|&b| b == SEPARATOR).collect();
        assert_eq!(parts[0], b"42[\"a\"]");
        assert_eq!(parts[1], b"bAQID");
        assert_eq!(parts[2].len(), 300);
        assert_eq!(parts[3], b"1");
    }
}
