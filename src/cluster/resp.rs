//! [`RespConn`]: one connection to Redis (TCP, TLS over TCP, or a Unix socket) driven by a
//! shard's own glommio executor.
//!
//! The bridge's client (see [`crate::bridge`]) costs two thread hand-overs per call and per
//! pub/sub message; on the hot path (publishing, and the room messages coming back) a
//! shard talks to Redis itself through this connection instead (see
//! [`super::shard_link`]). It speaks RESP2 only.
//!
//! Commands are encoded by the `redis` crate ([`redis::Cmd`]) and replies decoded by it
//! ([`redis::parse_redis_value`]); this module only finds where each reply ends in the
//! byte stream ([`frame_len`]) and moves the bytes.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use futures::io::{AsyncReadExt as _, AsyncWriteExt as _, ReadHalf, WriteHalf};
use glommio::net::{TcpStream, UnixStream};
use redis::{RedisConnectionInfo, RedisError, RedisResult, Value};
use rustls::pki_types::ServerName;

use crate::stream::Stream;

/// The read buffer's first size; it grows for a longer reply.
const READ_CHUNK: usize = 16 * 1024;
/// Deepest nesting of arrays accepted in a reply (Redis's replies here nest two deep).
const MAX_DEPTH: usize = 32;
/// Largest bulk string accepted (Redis's own limit).
const MAX_BULK: i64 = 512 * 1024 * 1024;

/// A connected, authenticated RESP2 connection, in two halves that two tasks can own: a
/// subscriber reads pushes while callers write (un)subscribe commands.
pub(crate) struct RespConn {
    /// Reads replies.
    pub reader: RespReader,
    /// Writes commands.
    pub writer: RespWriter,
}

/// The reading half: buffers bytes and hands out one decoded reply at a time.
pub(crate) struct RespReader {
    half: ReadHalf<Stream>,
    /// Always initialized to its length; `start..end` are the unread bytes.
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// The writing half.
pub(crate) struct RespWriter {
    half: WriteHalf<Stream>,
}

/// How to speak TLS to the server: the client settings and the name its certificate must
/// carry.
#[derive(Clone)]
pub(crate) struct Tls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

/// Where a connection goes.
pub(crate) enum Endpoint<'a> {
    /// A TCP address, with TLS when it says how.
    Tcp {
        addr: SocketAddr,
        tls: Option<&'a Tls>,
    },
    /// A Unix socket's path.
    Unix(&'a Path),
}

impl RespConn {
    /// Connects to `to`, then authenticates and selects the database as `info` says (AUTH,
    /// SELECT) and names the connection `name` (CLIENT SETNAME, so that `CLIENT LIST` tells
    /// whose it is; skipped when the user may not). The caller bounds the time it takes.
    pub async fn connect(
        to: Endpoint<'_>,
        info: &RedisConnectionInfo,
        name: &str,
    ) -> RedisResult<RespConn> {
        let stream = match to {
            Endpoint::Unix(path) => {
                Stream::Unix(UnixStream::connect(path).await.map_err(io::Error::from)?)
            }
            Endpoint::Tcp { addr, tls } => {
                let tcp = TcpStream::connect(addr).await.map_err(io::Error::from)?;
                // Commands are small and latency matters more than packets.
                tcp.set_nodelay(true).map_err(io::Error::from)?;
                match tls {
                    None => Stream::Plain(tcp),
                    Some(tls) => {
                        let connector = futures_rustls::TlsConnector::from(tls.config.clone());
                        let stream = connector.connect(tls.server_name.clone(), tcp).await?;
                        Stream::Tls(Box::new(stream))
                    }
                }
            }
        };
        let (read, write) = stream.split();
        let mut conn = RespConn {
            reader: RespReader {
                half: read,
                buf: vec![0; READ_CHUNK],
                start: 0,
                end: 0,
            },
            writer: RespWriter { half: write },
        };
        if let Some(password) = info.password() {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = info.username() {
                auth.arg(user);
            }
            auth.arg(password);
            conn.call(&auth).await?;
        }
        if info.db() != 0 {
            conn.call(redis::cmd("SELECT").arg(info.db())).await?;
        }
        match conn
            .call(redis::cmd("CLIENT").arg("SETNAME").arg(name))
            .await
        {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {}
            other => {
                // Other refusals (e.g. "max number of clients reached") end the connection.
                other?;
            }
        }
        Ok(conn)
    }

    /// Sends one command and reads its reply; an error reply is an `Err`.
    pub async fn call(&mut self, cmd: &redis::Cmd) -> RedisResult<Value> {
        self.writer.send(&cmd.get_packed_command()).await?;
        self.reader.read().await?.extract_error()
    }
}

impl RespWriter {
    /// Writes already encoded commands (one or many, pipelined) and flushes them.
    pub async fn send(&mut self, packed: &[u8]) -> io::Result<()> {
        self.half.write_all(packed).await?;
        self.half.flush().await
    }

    /// Closes the writing side; the server then closes the connection, which ends the
    /// reader's wait.
    pub async fn close(&mut self) {
        let _ = self.half.close().await;
    }
}

impl RespReader {
    /// The next reply or push, as sent (an error reply is a [`Value::ServerError`]).
    /// Cancel-safe: a read cut short loses no bytes.
    pub async fn read(&mut self) -> RedisResult<Value> {
        loop {
            let unread = &self.buf[self.start..self.end];
            if let Some(len) = frame_len(unread).map_err(protocol_error)? {
                let value = redis::parse_redis_value(&unread[..len]);
                self.start += len;
                if self.start == self.end {
                    (self.start, self.end) = (0, 0);
                }
                return value;
            }
            if self.end == self.buf.len() {
                if self.start > 0 {
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                } else {
                    // A reply longer than the buffer: grow it (zeroed once, not per read).
                    self.buf.resize(self.buf.len() * 2, 0);
                }
            }
            let n = self.half.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "redis closed the connection",
                )
                .into());
            }
            self.end += n;
        }
    }
}

fn protocol_error(detail: String) -> RedisError {
    RedisError::from((
        redis::ErrorKind::Parse,
        "malformed reply from redis",
        detail,
    ))
}

/// The length of the first complete RESP2 value in `buf`, `None` when more bytes are
/// needed, or why the bytes are not RESP2.
pub(crate) fn frame_len(buf: &[u8]) -> Result<Option<usize>, String> {
    frame_end(buf, 0, 0)
}

fn frame_end(buf: &[u8], at: usize, depth: usize) -> Result<Option<usize>, String> {
    if depth > MAX_DEPTH {
        return Err(format!("arrays nested deeper than {MAX_DEPTH}"));
    }
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some(line) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let header = &buf[at + 1..at + line];
    let after = at + line + 2;
    let count = || -> Result<i64, String> {
        std::str::from_utf8(header)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| format!("bad length {:?}", String::from_utf8_lossy(header)))
    };
    match kind {
        b'+' | b'-' | b':' => Ok(Some(after)),
        b'$' => {
            let n = count()?;
            if n < 0 {
                return Ok(Some(after));
            }
            if n > MAX_BULK {
                return Err(format!("bulk string of {n} bytes"));
            }
            let end = after + n as usize + 2;
            Ok((buf.len() >= end).then_some(end))
        }
        b'*' => {
            let n = count()?;
            let mut pos = after;
            for _ in 0..n.max(0) {
                match frame_end(buf, pos, depth + 1)? {
                    Some(end) => pos = end,
                    None => return Ok(None),
                }
            }
            Ok(Some(pos))
        }
        other => Err(format!("unexpected type byte {other:#04x}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_end_where_their_value_ends() {
        let cases: &[(&[u8], usize)] = &[
            (b"+OK\r\n", 5),
            (b"-ERR no\r\n", 9),
            (b":42\r\n", 5),
            (b"$3\r\nabc\r\n", 9),
            (b"$-1\r\n", 5),
            (b"*-1\r\n", 5),
            (b"*0\r\n", 4),
            (b"*2\r\n$2\r\nok\r\n:7\r\n", 16),
            (b"*1\r\n*2\r\n+a\r\n+b\r\n", 16),
            // A bulk string may hold CR LF.
            (b"$4\r\n\r\n\r\n\r\n", 10),
        ];
        for (bytes, len) in cases {
            let mut more = bytes.to_vec();
            more.extend_from_slice(b"+NEXT\r\n");
            assert_eq!(
                frame_len(&more),
                Ok(Some(*len)),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
            assert!(redis::parse_redis_value(&bytes[..*len]).is_ok());
        }
    }

    #[test]
    fn a_cut_frame_needs_more_bytes() {
        let whole = b"*3\r\n$7\r\nmessage\r\n$4\r\nroom\r\n$5\r\nhello\r\n";
        for cut in 0..whole.len() {
            assert_eq!(frame_len(&whole[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(frame_len(whole), Ok(Some(whole.len())));
    }

    #[test]
    fn garbage_is_refused_not_waited_for() {
        assert!(frame_len(b"?what\r\n").is_err());
        assert!(frame_len(b"$x\r\n").is_err());
        assert!(frame_len(b"$999999999999\r\n").is_err());
        let deep = "*1\r\n".repeat(MAX_DEPTH + 2);
        assert!(frame_len(deep.as_bytes()).is_err());
    }
}
