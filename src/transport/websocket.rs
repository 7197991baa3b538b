//! WebSocket (RFC 6455) on the server side: the upgrade answer, reading client frames
//! (masked, maybe fragmented) with a size limit enforced before buffering, and encoding
//! server frames once so the same bytes can go to every recipient.

use std::io::{self, Cursor};

use bytes::Bytes;
use futures::io::{AsyncRead, AsyncReadExt};
use thiserror::Error;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Close codes the server sends.
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The peer broke the protocol (bad packet, ping timeout).
    pub const PROTOCOL: u16 = 1002;
    /// Text that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// Policy violation (e.g. a slow consumer).
    pub const POLICY: u16 = 1008;
    /// A message over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The server is restarting: reconnect (elsewhere).
    pub const RESTART: u16 = 1012;
}

/// The `Sec-WebSocket-Accept` value for a client's key.
pub fn accept_key(client_key: &str) -> String {
    tungstenite::handshake::derive_accept_key(client_key.as_bytes())
}

/// The 101 answer that completes the upgrade.
pub fn upgrade_response(client_key: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(client_key)
    )
    .into_bytes()
}

/// Encodes one unmasked server frame (header + payload) as shareable bytes.
pub fn encode_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let header = FrameHeader {
        opcode,
        ..FrameHeader::default()
    };
    let len = payload.len() as u64;
    let mut out = Vec::with_capacity(header.len(len) + payload.len());
    // Formatting into a Vec cannot fail.
    let _ = header.format(len, &mut out);
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// A text frame carrying `payload`.
pub fn text_frame(payload: &[u8]) -> Bytes {
    encode_frame(OpCode::Data(Data::Text), payload)
}

/// A pong answering a client's ping.
pub fn pong_frame(payload: &[u8]) -> Bytes {
    encode_frame(OpCode::Control(Control::Pong), payload)
}

/// A close frame with a status code.
pub fn close_frame(code: u16) -> Bytes {
    encode_frame(OpCode::Control(Control::Close), &code.to_be_bytes())
}

/// One complete message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close,
}

/// Why reading stopped; each ends the connection.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error("message of {0} bytes is over the limit")]
    TooLarge(u64),
    #[error("websocket protocol violation: {0}")]
    Protocol(&'static str),
    #[error("text frame is not UTF-8")]
    InvalidUtf8,
    #[error("connection closed by peer")]
    Eof,
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
}

impl ReadError {
    /// The close code to answer this error with, if the socket is still usable.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            ReadError::TooLarge(_) => Some(close_code::TOO_BIG),
            ReadError::Protocol(_) => Some(close_code::PROTOCOL),
            ReadError::InvalidUtf8 => Some(close_code::INVALID_DATA),
            ReadError::Eof | ReadError::Io(_) => None,
        }
    }
}

/// The read buffer of an idle connection; it grows for larger messages and shrinks back.
const INITIAL_BUFFER: usize = 256;

/// Reads client frames into messages. Keeps a small buffer while idle and grows it
/// only up to the message limit.
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_message: usize,
    partial: Option<(Data, Vec<u8>)>,
}

impl FrameReader {
    /// A reader that refuses messages over `max_message` bytes; `leftover` is what the
    /// HTTP layer read past the upgrade request.
    pub fn new(max_message: usize, leftover: &[u8]) -> FrameReader {
        let mut buf = vec![0; INITIAL_BUFFER.max(leftover.len())];
        buf[..leftover.len()].copy_from_slice(leftover);
        FrameReader {
            buf,
            start: 0,
            end: leftover.len(),
            max_message,
            partial: None,
        }
    }

    /// The bytes read but not parsed yet, taken out (the reader starts over empty);
    /// `None` inside a fragmented message, whose first fragments are already parsed.
    pub fn take_unread(&mut self) -> Option<Vec<u8>> {
        if self.partial.is_some() {
            return None;
        }
        let unread = self.buf[self.start..self.end].to_vec();
        self.start = 0;
        self.end = 0;
        Some(unread)
    }

    /// The next complete message.
    pub async fn next<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> Result<Message, ReadError> {
        loop {
            if let Some(msg) = self.try_parse()? {
                return Ok(msg);
            }
            self.fill(io).await?;
        }
    }

    async fn fill<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> Result<(), ReadError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > 4 * INITIAL_BUFFER {
                // A large message passed; give the memory back while idle.
                self.buf = vec![0; INITIAL_BUFFER];
            }
        } else if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let grown = (self.buf.len() * 2).min(self.max_message + 14);
                if grown <= self.buf.len() {
                    return Err(ReadError::TooLarge(self.buf.len() as u64));
                }
                self.buf.resize(grown, 0);
            }
        }
        let n = io.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(ReadError::Eof);
        }
        self.end += n;
        Ok(())
    }

    /// Parses one frame from the buffer if it is complete; `Ok(None)` when more bytes are needed.
    fn try_parse(&mut self) -> Result<Option<Message>, ReadError> {
        loop {
            let mut cursor = Cursor::new(&self.buf[self.start..self.end]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(None),
                Err(_) => return Err(ReadError::Protocol("bad frame header")),
            };
            let header_len = cursor.position() as usize;
            let buffered = self.partial.as_ref().map_or(0, |(_, b)| b.len()) as u64;
            if len + buffered > self.max_message as u64 {
                return Err(ReadError::TooLarge(len + buffered));
            }
            let Some(mask) = header.mask else {
                return Err(ReadError::Protocol("client frame is not masked"));
            };
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Err(ReadError::Protocol("reserved bits set"));
            }
            let len = len as usize;
            if self.end - self.start < header_len + len {
                if self.start + header_len + len > self.buf.len() {
                    // Make room for the whole frame now that its size is known and allowed.
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                    if header_len + len > self.buf.len() {
                        self.buf.resize(header_len + len, 0);
                    }
                }
                return Ok(None);
            }
            let body_start = self.start + header_len;
            let body = &mut self.buf[body_start..body_start + len];
            unmask(body, mask);
            let payload = body.to_vec();
            self.start = body_start + len;

            match header.opcode {
                OpCode::Control(c) => {
                    if !header.is_final || len > 125 {
                        return Err(ReadError::Protocol("bad control frame"));
                    }
                    return Ok(Some(match c {
                        Control::Close => Message::Close,
                        Control::Ping => Message::Ping(payload),
                        Control::Pong => Message::Pong,
                        Control::Reserved(_) => return Err(ReadError::Protocol("reserved opcode")),
                    }));
                }
                OpCode::Data(Data::Continue) => {
                    let Some((kind, mut acc)) = self.partial.take() else {
                        return Err(ReadError::Protocol("continuation without a start"));
                    };
                    acc.extend_from_slice(&payload);
                    if header.is_final {
                        return finish(kind, acc).map(Some);
                    }
                    self.partial = Some((kind, acc));
                }
                OpCode::Data(kind @ (Data::Text | Data::Binary)) => {
                    if self.partial.is_some() {
                        return Err(ReadError::Protocol("new message inside a fragmented one"));
                    }
                    if header.is_final {
                        return finish(kind, payload).map(Some);
                    }
                    self.partial = Some((kind, payload));
                }
                OpCode::Data(Data::Reserved(_)) => {
                    return Err(ReadError::Protocol("reserved opcode"))
                }
            }
        }
    }
}

fn finish(kind: Data, payload: Vec<u8>) -> Result<Message, ReadError> {
    match kind {
        Data::Text => {
            if std::str::from_utf8(&payload).is_err() {
                return Err(ReadError::InvalidUtf8);
            }
            Ok(Message::Text(payload))
        }
        _ => Ok(Message::Binary(payload)),
    }
}

/// XORs the client's mask over the payload.
fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = buf.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let v = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// Encodes a masked client frame (for tests and the load generator).
pub fn client_frame(opcode: OpCode, is_final: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let header = FrameHeader {
        is_final,
        opcode,
        mask: Some(mask),
        ..FrameHeader::default()
    };
    let mut out = Vec::with_capacity(header.len(payload.len() as u64) + payload.len());
    let _ = header.format(payload.len() as u64, &mut out);
    let start = out.len();
    out.extend_from_slice(payload);
    unmask(&mut out[start..], mask);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    const MASK: [u8; 4] = [1, 2, 3, 4];

    fn read_all(bytes: Vec<u8>, max: usize) -> Vec<Result<Message, String>> {
        let mut io = futures::io::Cursor::new(bytes);
        let mut r = FrameReader::new(max, &[]);
        let mut out = Vec::new();
        loop {
            match block_on(r.next(&mut io)) {
                Ok(m) => out.push(Ok(m)),
                Err(ReadError::Eof) => return out,
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    }

    #[test]
    fn reads_masked_text_and_fragments() {
        let mut bytes = client_frame(OpCode::Data(Data::Text), true, b"40", MASK);
        bytes.extend(client_frame(
            OpCode::Data(Data::Text),
            false,
            b"42[\"a",
            MASK,
        ));
        bytes.extend(client_frame(
            OpCode::Control(Control::Ping),
            true,
            b"p",
            MASK,
        ));
        bytes.extend(client_frame(
            OpCode::Data(Data::Continue),
            true,
            b"\"]",
            MASK,
        ));
        let big = vec![b'x'; 70_000];
        bytes.extend(client_frame(OpCode::Data(Data::Binary), true, &big, MASK));
        let got = read_all(bytes, 100_000);
        assert_eq!(
            got,
            vec![
                Ok(Message::Text(b"40".to_vec())),
                Ok(Message::Ping(b"p".to_vec())),
                Ok(Message::Text(b"42[\"a\"]".to_vec())),
                Ok(Message::Binary(big)),
            ]
        );
    }

    #[test]
    fn refuses_oversized_before_reading_it() {
        // Only the header of a 2 MB frame is present: the limit trips on the header alone.
        let frame = client_frame(OpCode::Data(Data::Text), true, &vec![b'a'; 2_000_000], MASK);
        let got = read_all(frame[..14].to_vec(), 1_000_000);
        assert_eq!(got.len(), 1);
        assert!(got[0].as_ref().unwrap_err().contains("over the limit"));
    }

    #[test]
    fn refuses_unmasked_and_bad_utf8() {
        let unmasked = encode_frame(OpCode::Data(Data::Text), b"40").to_vec();
        assert!(read_all(unmasked, 1000)[0].is_err());
        let bad = client_frame(OpCode::Data(Data::Text), true, &[0xff, 0xfe], MASK);
        assert!(read_all(bad, 1000)[0]
            .as_ref()
            .unwrap_err()
            .contains("UTF-8"));
        let orphan = client_frame(OpCode::Data(Data::Continue), true, b"x", MASK);
        assert!(read_all(orphan, 1000)[0].is_err());
    }

    #[test]
    fn server_frames_are_unmasked() {
        let f = text_frame(b"hello");
        assert_eq!(&f[..], b"\x81\x05hello");
        assert_eq!(&close_frame(1012)[..], b"\x88\x02\x03\xf4");
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
