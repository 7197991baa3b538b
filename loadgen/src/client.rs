//! One Socket.IO client connection over WebSocket: TCP connect (optionally from a chosen
//! source address), WebSocket upgrade, Engine.IO open, Socket.IO CONNECT, then frames.

use crate::codec::{self, EioPacket, SioKind};
use crate::target::Endpoint;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout_at;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

/// Each connection's WebSocket read buffer (see [`Conn::open`]).
const READ_BUFFER_BYTES: usize = 8 * 1024;

/// Why a connection could not be opened. [`ConnectError::kind`] names it for error counts.
#[derive(Debug)]
pub enum ConnectError {
    /// Out of file descriptors (EMFILE / ENFILE).
    FdLimit,
    /// No local port left for this source address (EADDRNOTAVAIL).
    NoPorts,
    /// TCP connect failed.
    Tcp(std::io::Error),
    /// The server refused the upgrade with HTTP 429: too many new sessions from this
    /// source address (corelay's `limits.connect_rate_per_ip`). A run that hits it does not
    /// measure what it meant to, so it gets its own name.
    RateLimited,
    /// The WebSocket upgrade failed.
    WebSocket(String),
    /// The server refused the Socket.IO CONNECT (`44{...}`).
    Refused(String),
    /// The server sent something that is not the expected handshake.
    Protocol(String),
    /// The handshake did not finish in time.
    Timeout,
}

impl ConnectError {
    /// A short name for error counts.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::FdLimit => "connect_fd_limit",
            ConnectError::NoPorts => "connect_no_ports",
            ConnectError::Tcp(_) => "connect_tcp",
            ConnectError::RateLimited => "connect_rate_limited",
            ConnectError::WebSocket(_) => "connect_ws",
            ConnectError::Refused(_) => "connect_refused",
            ConnectError::Protocol(_) => "connect_protocol",
            ConnectError::Timeout => "connect_timeout",
        }
    }

    fn from_io(e: std::io::Error) -> ConnectError {
        match e.raw_os_error() {
            Some(libc::EMFILE) | Some(libc::ENFILE) => ConnectError::FdLimit,
            Some(libc::EADDRNOTAVAIL) => ConnectError::NoPorts,
            _ => ConnectError::Tcp(e),
        }
    }

    /// A failed WebSocket upgrade: HTTP 429 is the server's session rate limit.
    fn from_upgrade(e: tokio_tungstenite::tungstenite::Error) -> ConnectError {
        match &e {
            tokio_tungstenite::tungstenite::Error::Http(resp) if resp.status().as_u16() == 429 => {
                ConnectError::RateLimited
            }
            _ => ConnectError::WebSocket(e.to_string()),
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::FdLimit => write!(
                f,
                "out of file descriptors (EMFILE): raise `ulimit -n` or use fewer connections"
            ),
            ConnectError::NoPorts => write!(
                f,
                "no ephemeral port left (EADDRNOTAVAIL): use more --source-addrs"
            ),
            ConnectError::Tcp(e) => write!(f, "TCP connect failed: {e}"),
            ConnectError::RateLimited => write!(
                f,
                "the server refused new sessions from this source address (HTTP 429): wait \
                 for its limit to refill, spread connections with --source-addrs, or raise \
                 the server's limit (corelay: limits.connect_rate_per_ip / connect_burst_per_ip)"
            ),
            ConnectError::WebSocket(e) => write!(f, "WebSocket upgrade failed: {e}"),
            ConnectError::Refused(m) => write!(f, "Socket.IO CONNECT refused: {m}"),
            ConnectError::Protocol(m) => write!(f, "unexpected handshake: {m}"),
            ConnectError::Timeout => write!(f, "handshake timed out"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// A frame read from a connection, already split by Engine.IO type.
#[derive(Debug)]
pub enum Incoming {
    /// An Engine.IO message frame, holding a Socket.IO packet.
    Packet(Packet),
    /// An Engine.IO ping with its payload: answer with [`codec::encode_pong`].
    Ping(String),
    /// Anything else worth no action (pongs, noops, binary frames, WebSocket pings).
    Other,
}

/// The frame of an Engine.IO message (`4...`), kept as received (no copy).
#[derive(Debug, Clone)]
pub struct Packet(Utf8Bytes);

impl Packet {
    /// The Socket.IO packet text (the frame without its Engine.IO type).
    pub fn text(&self) -> &str {
        self.0.as_str().get(1..).unwrap_or("")
    }
}

/// An open, connected Socket.IO client.
pub struct Conn {
    ws: WebSocketStream<TcpStream>,
    next_id: u64,
    /// The Socket.IO session id from the CONNECT ack.
    pub sid: String,
}

#[derive(Deserialize)]
struct OpenBody {
    #[serde(default)]
    sid: String,
}

/// Opens a TCP connection to `addr`, from `source` when given.
async fn tcp_connect(
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
) -> Result<TcpStream, ConnectError> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(ConnectError::from_io)?;
    sock.set_nonblocking(true).map_err(ConnectError::from_io)?;
    if let Some(src) = source {
        // Let connect() pick the port for the (source, destination) pair, not bind():
        // that is what lets one source address serve many destinations.
        let one: libc::c_int = 1;
        // SAFETY: a valid socket fd and a c_int option value of the right size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(&SocketAddr::new(src.into(), 0).into())
            .map_err(ConnectError::from_io)?;
    }
    let std_stream: std::net::TcpStream = sock.into();
    let stream = TcpSocket::from_std_stream(std_stream)
        .connect(addr)
        .await
        .map_err(ConnectError::from_io)?;
    stream.set_nodelay(true).map_err(ConnectError::from_io)?;
    Ok(stream)
}

impl Conn {
    /// Connects and completes the Socket.IO handshake with `auth_json` as CONNECT payload,
    /// within `timeout`. Returns the connection and the time the handshake took.
    pub async fn open(
        ep: &Endpoint,
        source: Option<Ipv4Addr>,
        auth_json: &str,
        timeout: Duration,
    ) -> Result<(Conn, Duration), ConnectError> {
        let start = Instant::now();
        let deadline = tokio::time::Instant::from_std(start + timeout);
        let fut = async {
            let stream = tcp_connect(ep.addr, source).await?;
            // tungstenite zero-fills its read buffer up to `read_buffer_size` before every
            // read (128 KiB by default). Chat frames are ~150 bytes, so a small buffer cuts
            // that memset, which was 19% of the loadgen's CPU at 360,000 deliveries/s, and
            // 120 KiB of memory per connection; larger frames still arrive over several reads.
            let config = WebSocketConfig::default()
                .read_buffer_size(READ_BUFFER_BYTES)
                .max_message_size(Some(16 << 20))
                .max_frame_size(Some(16 << 20));
            let (ws, _resp) =
                tokio_tungstenite::client_async_with_config(ep.url.as_str(), stream, Some(config))
                    .await
                    .map_err(ConnectError::from_upgrade)?;
            let mut conn = Conn {
                ws,
                next_id: 1,
                sid: String::new(),
            };
            conn.handshake(auth_json).await?;
            Ok::<Conn, ConnectError>(conn)
        };
        match timeout_at(deadline, fut).await {
            Ok(Ok(conn)) => Ok((conn, start.elapsed())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ConnectError::Timeout),
        }
    }

    async fn handshake(&mut self, auth_json: &str) -> Result<(), ConnectError> {
        // Engine.IO open.
        loop {
            let text = self.next_text().await.map_err(ConnectError::Protocol)?;
            match codec::decode_eio(&text) {
                Ok(EioPacket::Open(body)) => {
                    serde_json::from_str::<OpenBody>(body)
                        .map_err(|e| ConnectError::Protocol(format!("bad open packet: {e}")))?;
                    break;
                }
                Ok(EioPacket::Noop) => continue,
                _ => {
                    return Err(ConnectError::Protocol(format!(
                        "expected open, got {text:.80}"
                    )))
                }
            }
        }
        self.send(codec::encode_connect(auth_json))
            .await
            .map_err(ConnectError::Protocol)?;
        // Socket.IO CONNECT ack (or error).
        loop {
            let text = self.next_text().await.map_err(ConnectError::Protocol)?;
            match codec::decode_eio(&text) {
                Ok(EioPacket::Ping(p)) => {
                    let pong = codec::encode_pong(p);
                    self.send(pong).await.map_err(ConnectError::Protocol)?;
                }
                Ok(EioPacket::Message(m)) => {
                    let p =
                        codec::decode_sio(m).map_err(|e| ConnectError::Protocol(e.to_string()))?;
                    match p.kind {
                        SioKind::Connect => {
                            let body: OpenBody = serde_json::from_str(p.data).map_err(|e| {
                                ConnectError::Protocol(format!("bad CONNECT ack: {e}"))
                            })?;
                            self.sid = body.sid;
                            return Ok(());
                        }
                        SioKind::ConnectError => {
                            let msg = serde_json::from_str::<Value>(p.data)
                                .ok()
                                .and_then(|v| {
                                    v.get("message").and_then(|m| m.as_str()).map(str::to_owned)
                                })
                                .unwrap_or_else(|| p.data.to_string());
                            return Err(ConnectError::Refused(msg));
                        }
                        _ => continue,
                    }
                }
                Ok(EioPacket::Close) => return Err(ConnectError::Protocol("closed".into())),
                _ => continue,
            }
        }
    }

    /// Reads the next text frame (WebSocket control and binary frames are skipped).
    async fn next_text(&mut self) -> Result<String, String> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
                Some(Ok(Message::Close(_))) | None => return Err("connection closed".into()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.to_string()),
            }
        }
    }

    /// Sends one text frame.
    pub async fn send(&mut self, text: String) -> Result<(), String> {
        self.ws
            .send(Message::text(text))
            .await
            .map_err(|e| e.to_string())
    }

    /// The socket's fd, for [`crate::backlog`] to watch its receive queue.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.ws.get_ref().as_raw_fd()
    }

    /// The next ack id for an emit.
    pub fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Reads the next frame. `Ok(None)` means the server closed the session (WebSocket
    /// close, Engine.IO close, end of stream). Cancel-safe: it only reads.
    pub async fn recv(&mut self) -> Result<Option<Incoming>, String> {
        let text = match self.ws.next().await {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | None => return Ok(None),
            Some(Ok(_)) => return Ok(Some(Incoming::Other)),
            Some(Err(e)) => return Err(e.to_string()),
        };
        match codec::decode_eio(text.as_str()) {
            Ok(EioPacket::Ping(p)) => Ok(Some(Incoming::Ping(p.to_owned()))),
            Ok(EioPacket::Message(_)) => Ok(Some(Incoming::Packet(Packet(text)))),
            Ok(EioPacket::Close) => Ok(None),
            Ok(_) => Ok(Some(Incoming::Other)),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Answers a ping.
    pub async fn pong(&mut self, payload: &str) -> Result<(), String> {
        self.send(codec::encode_pong(payload)).await
    }

    /// Emits `event` with `payload` and waits up to `timeout` for its ack, answering pings
    /// and dropping other packets meanwhile. Returns the ack's first argument.
    pub async fn request(
        &mut self,
        event: &str,
        payload: &Value,
        timeout: Duration,
    ) -> Result<Value, String> {
        let id = self.take_id();
        let frame = codec::encode_event(Some(id), event, payload).map_err(|e| e.to_string())?;
        self.send(frame).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let incoming = timeout_at(deadline, self.recv())
                .await
                .map_err(|_| format!("{event} ack timed out"))??;
            match incoming {
                None => return Err("connection closed".into()),
                Some(Incoming::Packet(p)) => {
                    if let Some(v) = parse_ack(p.text(), id) {
                        return Ok(v);
                    }
                }
                Some(Incoming::Ping(p)) => self.pong(&p).await?,
                Some(Incoming::Other) => {}
            }
        }
    }

    /// Closes the WebSocket politely (best effort, bounded by `timeout`).
    pub async fn close(mut self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.ws.close(None)).await;
    }
}

/// If `packet` is the ack for `id`, its first argument.
pub fn parse_ack(packet: &str, id: u64) -> Option<Value> {
    let p = codec::decode_sio(packet).ok()?;
    if p.kind != SioKind::Ack || p.id != Some(id) {
        return None;
    }
    match serde_json::from_str::<Value>(p.data) {
        Ok(Value::Array(mut items)) if !items.is_empty() => Some(items.swap_remove(0)),
        _ => Some(Value::Null),
    }
}

/// The error code of an ack (`None` for `{ok:true}`; `"bad_ack"` for a malformed one).
pub fn ack_error(ack: &Value) -> Option<String> {
    if ack.get("ok").and_then(Value::as_bool) == Some(true) {
        return None;
    }
    Some(
        ack.pointer("/error/code")
            .and_then(Value::as_str)
            .unwrap_or("bad_ack")
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn acks() {
        assert_eq!(
            parse_ack("33[{\"ok\":true,\"offset\":4}]", 3),
            Some(json!({"ok": true, "offset": 4}))
        );
        assert_eq!(parse_ack("33[{\"ok\":true}]", 4), None);
        assert_eq!(parse_ack("2[\"message\",{}]", 3), None);
        assert_eq!(parse_ack("33garbage", 3), Some(Value::Null));
        assert_eq!(ack_error(&json!({"ok": true})), None);
        assert_eq!(
            ack_error(&json!({"ok": false, "error": {"code": "rate_limited"}})).as_deref(),
            Some("rate_limited")
        );
        assert_eq!(ack_error(&Value::Null).as_deref(), Some("bad_ack"));
    }
}
