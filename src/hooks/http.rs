//! The HTTP/1.1 of a hook call: the request written out, and the answer read back with a
//! `Content-Length`, a chunked body (the transport's decoder) or a body up to the close,
//! at most [`MAX_BODY`] bytes. Only what a JSON POST needs; anything else is a failure.

use futures::io::{AsyncRead, AsyncReadExt as _};

use super::Failure;
use crate::transport::chunked::ChunkedDecoder;

/// Largest answer body accepted; a larger one is a failure.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest answer head (status line and headers) accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Most header fields in an answer.
const MAX_HEADERS: usize = 64;
/// Bytes asked of the socket at a time.
const READ_CHUNK: usize = 8 * 1024;

/// A `POST` of a JSON body, with the extra header lines given (each ending in CRLF).
pub fn post(host: &str, path: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: corelay\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A 2xx answer's body, and whether its connection may carry another call.
#[derive(Debug)]
pub struct Answer {
    pub body: Vec<u8>,
    pub reusable: bool,
}

/// How the body of an answer ends.
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// Reads one answer. `Err(Failure::Closed)` when the connection ended (or was reset)
/// before any byte of it: a kept-alive connection the backend had closed, on which the
/// call may be tried again.
pub async fn read_answer<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Answer, Failure> {
    let mut buf = Vec::with_capacity(READ_CHUNK);
    let (status, framing, mut reusable, head_len) = loop {
        let read = read_more(stream, &mut buf).await;
        if read.is_err() && buf.is_empty() {
            // Reset before any byte of the answer: as good as closed.
            return Err(Failure::Closed);
        }
        if read? == 0 {
            return Err(if buf.is_empty() {
                Failure::Closed
            } else {
                Failure::Http("connection closed inside the answer's head")
            });
        }
        if let Some(head) = parse_head(&buf)? {
            break head;
        }
        if buf.len() > MAX_HEAD {
            return Err(Failure::Http("answer head too large"));
        }
    };
    match status {
        200..=299 => {}
        300..=399 => return Err(Failure::Redirect(status)),
        _ => return Err(Failure::Status(status)),
    }
    let rest = buf.split_off(head_len);
    let body = match framing {
        Framing::Length(n) if n > MAX_BODY => return Err(Failure::TooLarge),
        Framing::Length(n) => {
            let mut body = rest;
            while body.len() < n {
                if read_more(stream, &mut body).await? == 0 {
                    return Err(Failure::Http("connection closed inside the body"));
                }
            }
            if body.len() > n {
                // Bytes after the answer: nothing was asked for them.
                reusable = false;
                body.truncate(n);
            }
            body
        }
        Framing::Chunked => {
            let mut decoder = ChunkedDecoder::new(MAX_BODY);
            let mut body = Vec::new();
            let mut input = rest;
            loop {
                let done = decoder
                    .decode(&input, &mut body)
                    .map_err(|_| Failure::Http("malformed chunked body"))?;
                if decoder.too_large() {
                    return Err(Failure::TooLarge);
                }
                if let Some(used) = done {
                    reusable &= used == input.len();
                    break body;
                }
                input.clear();
                if read_more(stream, &mut input).await? == 0 {
                    return Err(Failure::Http("connection closed inside the body"));
                }
            }
        }
        Framing::UntilClose => {
            reusable = false;
            let mut body = rest;
            while read_more(stream, &mut body).await? > 0 {
                if body.len() > MAX_BODY {
                    return Err(Failure::TooLarge);
                }
            }
            body
        }
    };
    if body.len() > MAX_BODY {
        return Err(Failure::TooLarge);
    }
    Ok(Answer { body, reusable })
}

/// Appends what the socket has (up to [`READ_CHUNK`] bytes); 0 at its end.
async fn read_more<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<usize, Failure> {
    let at = buf.len();
    buf.resize(at + READ_CHUNK, 0);
    let n = stream.read(&mut buf[at..]).await;
    buf.truncate(at + *n.as_ref().unwrap_or(&0));
    n.map_err(Failure::Io)
}

/// The status, framing, keep-alive and head length of a complete head; `None` while
/// the head is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<(u16, Framing, bool, usize)>, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Failure::Http("malformed answer head")),
    };
    let status = response.code.unwrap_or(0);
    let mut reusable = response.version == Some(1);
    let mut framing = Framing::UntilClose;
    for h in response.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse()
                .map_err(|_| Failure::Http("bad Content-Length"))?;
            if !matches!(framing, Framing::Chunked) {
                framing = Framing::Length(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("chunked") {
                return Err(Failure::Http("unsupported Transfer-Encoding"));
            }
            framing = Framing::Chunked;
        } else if h.name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            reusable = false;
        }
    }
    if matches!(status, 204 | 304) {
        framing = Framing::Length(0);
    }
    Ok(Some((status, framing, reusable, head_len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> Result<Answer, Failure> {
        let mut input = futures::io::Cursor::new(bytes.to_vec());
        futures::executor::block_on(read_answer(&mut input))
    }

    #[test]
    fn answers_by_length_chunked_and_close() {
        let a = read(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((a.body.as_slice(), a.reusable), (&b"{}"[..], true));
        let a = read(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n1\r\n}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((a.body.as_slice(), a.reusable), (&b"{}"[..], true));
        let a = read(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"ok\":true}").unwrap();
        assert_eq!(
            (a.body.as_slice(), a.reusable),
            (&b"{\"ok\":true}"[..], false)
        );
    }

    #[test]
    fn failures() {
        assert!(matches!(read(b""), Err(Failure::Closed)));
        assert!(matches!(
            read(b"HTTP/1.1 302 Found\r\nLocation: /x\r\n\r\n"),
            Err(Failure::Redirect(302))
        ));
        assert!(matches!(
            read(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"),
            Err(Failure::Status(500))
        ));
        let big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert!(matches!(read(big.as_bytes()), Err(Failure::TooLarge)));
        let mut chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n20000\r\n".to_vec();
        chunked.extend(vec![b'a'; 0x20000]);
        assert!(matches!(read(&chunked), Err(Failure::TooLarge)));
        let mut close = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        close.extend(vec![b'a'; MAX_BODY + 10]);
        assert!(matches!(read(&close), Err(Failure::TooLarge)));
        assert!(matches!(
            read(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}"),
            Err(Failure::Http(_))
        ));
        assert!(matches!(read(b"garbage\r\n\r\n"), Err(Failure::Http(_))));
    }
}
