//! Engine.IO packets from a client, whichever transport brought them: pong, ping
//! (and the upgrade probe), message (handed to Socket.IO), close, noop.

use std::rc::Rc;
use std::time::{Duration, Instant};

use super::websocket::{close_code, text_frame};
use crate::chat::handler::{self, Flow};
use crate::chat::session::{CloseReason, Session};
use crate::protocol::engineio::{self, PacketType};
use crate::shard::Shard;

/// Handles one Engine.IO text packet.
pub fn on_text(shard: &Shard, session: &Rc<Session>, mut data: Vec<u8>) -> Flow {
    let Some(packet) = engineio::parse_text(&data) else {
        tracing::debug!("invalid Engine.IO packet");
        return Flow::Close(CloseReason::Protocol(close_code::PROTOCOL));
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
            session.push(text_frame(&reply), false);
            Flow::Continue
        }
        PacketType::Message => {
            if shard.ctx.config.server.conformance {
                if session.raw_echo.get() {
                    crate::conformance::echo_engineio_text(session, &data);
                    return Flow::Continue;
                }
                return crate::conformance::on_socketio(shard, session, &data[1..]);
            }
            data.remove(0);
            let mut parser = session.parser.borrow_mut();
            handler::on_socketio(shard, session, &mut parser, data)
        }
        PacketType::Close => Flow::Close(CloseReason::Protocol(close_code::NORMAL)),
        PacketType::Noop | PacketType::Upgrade => Flow::Continue,
        PacketType::Open => Flow::Close(CloseReason::Protocol(close_code::PROTOCOL)),
    }
}

/// Handles one binary packet (a Socket.IO attachment).
pub fn on_binary(shard: &Shard, session: &Rc<Session>, data: Vec<u8>) -> Flow {
    if shard.ctx.config.server.conformance {
        if session.raw_echo.get() {
            crate::conformance::echo_engineio_binary(session, &data);
            return Flow::Continue;
        }
        return crate::conformance::on_binary(session, data);
    }
    let mut parser = session.parser.borrow_mut();
    handler::on_binary(shard, session, &mut parser, data)
}
