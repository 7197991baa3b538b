//! Engine.IO packets from a client, whichever transport brought them: pong, ping
//! (and the upgrade probe), close and noop are the transport's own; a message goes up to
//! the layer above through [`EngineHandler`].

use std::rc::Rc;
use std::time::{Duration, Instant};

use super::conn::{CloseReason, Flow};
use super::host::Host;
use super::session::Session;
use super::websocket::FrameReader;
use super::websocket::{close_code, text_frame};
use crate::protocol::engineio::{self, PacketType};

/// The layer above the transport: what a session's Engine.IO messages mean. Chat
/// implements it for production; `conformance` implements it for the official protocol
/// suites. The shard runtime picks one at start, so the production path carries no branch
/// and no state for the other.
pub trait EngineHandler<H> {
    /// Whether Engine.IO requests on `path` are served too, besides `server.path`.
    fn serves_path(&self, _path: &str) -> bool {
        false
    }

    /// A session opened by a request on `path`.
    fn on_open(&self, host: &H, session: &Rc<Session>, path: &str);

    /// An Engine.IO message packet's body (the type byte taken off): a Socket.IO packet.
    fn on_message(&self, host: &H, session: &Rc<Session>, data: Vec<u8>) -> Flow;

    /// A binary Engine.IO message (a Socket.IO attachment).
    fn on_binary(&self, host: &H, session: &Rc<Session>, data: Vec<u8>) -> Flow;

    /// After a WebSocket frame was handled: whether the reader must stop because the
    /// connection moves to another shard. `reader` holds the bytes read past that frame,
    /// which travel with the connection.
    fn ready_to_move(&self, _host: &H, _session: &Rc<Session>, _reader: &mut FrameReader) -> bool {
        false
    }

    /// The reader stopped for a move and the writer finished: hand the connection over.
    fn move_away(&self, _host: &H, _session: &Rc<Session>) {}

    /// The session ended on this shard: once per session, whichever way it ended.
    fn on_close(&self, host: &H, session: &Rc<Session>);
}

/// Handles one Engine.IO text packet.
pub fn on_text<H: Host>(host: &H, session: &Rc<Session>, mut data: Vec<u8>) -> Flow {
    let Some(packet) = engineio::parse_text(&data) else {
        tracing::debug!("invalid Engine.IO packet");
        return Flow::Close(CloseReason::Protocol(close_code::PROTOCOL));
    };
    match packet.kind {
        PacketType::Pong => {
            let mut t = session.timers();
            t.pong_deadline = None;
            t.next_ping =
                Instant::now() + Duration::from_millis(host.ctx().config.engineio.ping_interval);
            session.set_timers(t);
            Flow::Continue
        }
        PacketType::Ping => {
            let mut reply = data.clone();
            reply[0] = PacketType::Pong.as_byte();
            session.push(text_frame(&reply), false);
            Flow::Continue
        }
        PacketType::Message => {
            data.remove(0);
            host.handler().on_message(host, session, data)
        }
        PacketType::Close => Flow::Close(CloseReason::Protocol(close_code::NORMAL)),
        PacketType::Noop | PacketType::Upgrade => Flow::Continue,
        PacketType::Open => Flow::Close(CloseReason::Protocol(close_code::PROTOCOL)),
    }
}

/// Handles one binary packet (a Socket.IO attachment).
pub fn on_binary<H: Host>(host: &H, session: &Rc<Session>, data: Vec<u8>) -> Flow {
    host.handler().on_binary(host, session, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::conn::Transport;
    use crate::transport::testing::{on_glommio, Seen, TestHost};

    /// The payloads of the frames queued for the session's client (taken).
    fn queued(session: &Session) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(frame) = session.queue().pop() {
            assert_eq!(frame[0], 0x81, "a final text frame");
            out.push(frame[2..].to_vec());
        }
        out
    }

    #[test]
    fn a_ping_probe_is_answered_with_a_pong_probe() {
        on_glommio(|| async {
            let host = TestHost::new();
            let session = host.open_session(Transport::WebSocket);
            assert_eq!(
                on_text(&*host, &session, b"2probe".to_vec()),
                Flow::Continue
            );
            assert_eq!(on_text(&*host, &session, b"2".to_vec()), Flow::Continue);
            assert_eq!(queued(&session), [b"3probe".to_vec(), b"3".to_vec()]);
            assert!(host.seen().is_empty(), "pings are the transport's own");
        });
    }

    #[test]
    fn a_pong_clears_the_pong_deadline_and_schedules_the_next_ping() {
        on_glommio(|| async {
            let host = TestHost::new();
            let session = host.open_session(Transport::WebSocket);
            let before = Instant::now();
            let mut t = session.timers();
            t.pong_deadline = Some(before + Duration::from_millis(5));
            t.next_ping = before;
            session.set_timers(t);
            assert_eq!(on_text(&*host, &session, b"3".to_vec()), Flow::Continue);
            let t = session.timers();
            assert!(t.pong_deadline.is_none());
            let interval = Duration::from_millis(host.ctx().config.engineio.ping_interval);
            assert!(
                t.next_ping >= before + interval,
                "the next ping is an interval away"
            );
            assert!(t.next_ping <= Instant::now() + interval);
            assert!(queued(&session).is_empty());
        });
    }

    #[test]
    fn messages_go_up_without_their_type_byte() {
        on_glommio(|| async {
            let host = TestHost::new();
            let session = host.open_session(Transport::WebSocket);
            assert_eq!(
                on_text(&*host, &session, b"42[\"a\"]".to_vec()),
                Flow::Continue
            );
            assert_eq!(on_binary(&*host, &session, vec![1, 2]), Flow::Continue);
            assert_eq!(
                host.seen(),
                [
                    Seen::Message {
                        session: session.id,
                        data: b"2[\"a\"]".to_vec()
                    },
                    Seen::Binary {
                        session: session.id,
                        data: vec![1, 2]
                    },
                ]
            );
            // The handler's answer is the transport's.
            assert_eq!(
                on_text(&*host, &session, b"4close".to_vec()),
                Flow::Close(CloseReason::Protocol(close_code::PROTOCOL))
            );
        });
    }

    #[test]
    fn close_noop_and_bad_packets() {
        on_glommio(|| async {
            let host = TestHost::new();
            let session = host.open_session(Transport::WebSocket);
            let protocol = Flow::Close(CloseReason::Protocol(close_code::PROTOCOL));
            assert_eq!(
                on_text(&*host, &session, b"1".to_vec()),
                Flow::Close(CloseReason::Protocol(close_code::NORMAL))
            );
            assert_eq!(on_text(&*host, &session, b"6".to_vec()), Flow::Continue);
            assert_eq!(on_text(&*host, &session, b"5".to_vec()), Flow::Continue);
            assert_eq!(on_text(&*host, &session, b"0".to_vec()), protocol);
            assert_eq!(on_text(&*host, &session, b"".to_vec()), protocol);
            assert_eq!(on_text(&*host, &session, b"x".to_vec()), protocol);
            assert!(queued(&session).is_empty());
            assert!(host.seen().is_empty());
        });
    }
}
