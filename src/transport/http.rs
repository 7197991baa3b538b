//! Just enough HTTP/1.1 for corelay's one port: read a request head (httparse), split
//! the query, and write simple responses. Bodies are read only where a route needs one.

use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use thiserror::Error;

use super::chunked::{ChunkError, ChunkedDecoder};

/// Bodies up to this size are read and discarded when refused as too large.
const DRAIN_LIMIT: usize = 1 << 20;

/// The largest request head accepted.
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// A parsed request head. Its `Debug` hides credentials (`Authorization`, `Cookie`).
#[derive(Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(n, v)| match n.as_str() {
                "authorization" | "cookie" | "proxy-authorization" => (n.as_str(), "<redacted>"),
                _ => (n.as_str(), v.as_str()),
            })
            .collect();
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &self.query)
            .field("headers", &headers)
            .finish()
    }
}

impl Request {
    /// The first header with this (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header contains `token` (case-insensitive).
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The first value of a query parameter, percent-decoded.
    pub fn query_param(&self, key: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == key).then(|| percent_decode(v))
        })
    }

    /// Whether the client wants the connection kept open after the answer.
    pub fn keep_alive(&self) -> bool {
        !self.header_has_token("connection", "close")
    }
}

/// Why a request could not be read.
#[derive(Debug, Error)]
pub enum HttpError {
    #[error("request head over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("request body too large")]
    BodyTooLarge,
    #[error("connection closed")]
    Closed,
    #[error("request body not received within {0:?}")]
    TimedOut(std::time::Duration),
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// [`read_framed_body`] within `limit` (on a glommio executor): a client that stalls in
/// the middle of its body gets [`HttpError::TimedOut`] instead of holding the connection.
pub async fn read_framed_body_within<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    framing: BodyFraming,
    max: usize,
    limit: std::time::Duration,
) -> Result<Vec<u8>, HttpError> {
    let read = read_framed_body(io, buf, framing, max);
    match glommio::timer::timeout(limit, async { Ok(read.await) }).await {
        Ok(result) => result,
        Err(_) => Err(HttpError::TimedOut(limit)),
    }
}

/// Reads one request head. `buf` holds bytes already read; on return it holds what
/// followed the head (a body, or the first WebSocket frames).
pub async fn read_request<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Request, HttpError> {
    let mut chunk = [0u8; 2048];
    loop {
        if let Some((req, used)) = parse_head(buf)? {
            buf.drain(..used);
            return Ok(req);
        }
        if buf.len() >= MAX_HEAD {
            return Err(HttpError::HeadTooLarge);
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(HttpError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let headers = req
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    Ok(Some((
        Request {
            method: req.method.unwrap_or("GET").to_string(),
            path: path.to_string(),
            query: query.to_string(),
            headers,
        },
        used,
    )))
}

/// Reads a request body of `len` bytes (`buf` holds what was read past the head).
/// Bodies over `max` are refused before they are read.
pub async fn read_body<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    len: usize,
    max: usize,
) -> Result<Vec<u8>, HttpError> {
    let mut chunk = [0u8; 4096];
    if len > max {
        // Read a moderately large body to the end so the client sees the 413 rather than
        // a reset; a huge one is not worth reading.
        if len <= DRAIN_LIMIT {
            let mut seen = buf.len();
            buf.clear();
            while seen < len {
                let n = io.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                seen += n;
            }
        }
        return Err(HttpError::BodyTooLarge);
    }
    while buf.len() < len {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(HttpError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let rest = buf.split_off(len);
    Ok(std::mem::replace(buf, rest))
}

/// How a request's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// Neither `Content-Length` nor `Transfer-Encoding`: no body.
    None,
    /// `Content-Length: n`.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

impl Request {
    /// How this request's body is delimited. A transfer coding other than a lone
    /// `chunked`, a `Content-Length` beside it, or an invalid or conflicting
    /// `Content-Length` is malformed: the body's end could not be found safely.
    pub fn body_framing(&self) -> Result<BodyFraming, HttpError> {
        let codings: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n == "transfer-encoding")
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        let lengths: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n == "content-length")
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .collect();
        if !codings.is_empty() {
            if !lengths.is_empty() {
                return Err(HttpError::Malformed(
                    "both Transfer-Encoding and Content-Length".into(),
                ));
            }
            return match codings.as_slice() {
                [c] if c.eq_ignore_ascii_case("chunked") => Ok(BodyFraming::Chunked),
                _ => Err(HttpError::Malformed(
                    "unsupported Transfer-Encoding (only chunked is)".into(),
                )),
            };
        }
        let Some(first) = lengths.first() else {
            return Ok(BodyFraming::None);
        };
        let valid = |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
        if !lengths.iter().all(|v| valid(v) && v == first) {
            return Err(HttpError::Malformed("invalid Content-Length".into()));
        }
        first
            .parse()
            .map(BodyFraming::Length)
            .map_err(|_| HttpError::Malformed("invalid Content-Length".into()))
    }
}

/// Reads a request body framed as `framing`, at most `max` bytes of content: a
/// `Content-Length` body as [`read_body`] does, a chunked one through
/// [`ChunkedDecoder`]. A larger body is [`HttpError::BodyTooLarge`] either way.
pub async fn read_framed_body<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    framing: BodyFraming,
    max: usize,
) -> Result<Vec<u8>, HttpError> {
    match framing {
        BodyFraming::None => Ok(Vec::new()),
        BodyFraming::Length(len) => read_body(io, buf, len, max).await,
        BodyFraming::Chunked => read_chunked_body(io, buf, max).await,
    }
}

/// Reads a chunked body (`buf` holds what was read past the head; on return it holds
/// what followed the body). Over `max` bytes, the rest of a moderately large body is
/// read and dropped so the client sees the answer rather than a reset.
async fn read_chunked_body<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<Vec<u8>, HttpError> {
    let mut decoder = ChunkedDecoder::new(max);
    let mut body = Vec::new();
    let mut chunk = [0u8; 4096];
    // Bytes read while over the limit.
    let mut drained = 0usize;
    loop {
        match decoder.decode(buf, &mut body) {
            Ok(Some(used)) => {
                buf.drain(..used);
                if decoder.too_large() {
                    return Err(HttpError::BodyTooLarge);
                }
                return Ok(body);
            }
            Ok(None) => buf.clear(),
            Err(ChunkError::Malformed(why)) if decoder.too_large() => {
                tracing::debug!(why, "malformed chunked body past the size limit");
                return Err(HttpError::BodyTooLarge);
            }
            Err(ChunkError::Malformed(why)) => {
                return Err(HttpError::Malformed(format!("chunked body: {why}")))
            }
        }
        if decoder.too_large() {
            body = Vec::new();
            if drained >= DRAIN_LIMIT {
                return Err(HttpError::BodyTooLarge);
            }
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(if decoder.too_large() {
                HttpError::BodyTooLarge
            } else {
                HttpError::Closed
            });
        }
        if decoder.too_large() {
            drained += n;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Decodes `%XX` escapes and `+` in a query value; invalid escapes are kept as they are.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let pair = &bytes[i + 1..i + 3];
                let hex = pair
                    .iter()
                    .all(u8::is_ascii_hexdigit)
                    .then(|| std::str::from_utf8(pair).ok())
                    .flatten();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The reason phrase for the status codes corelay sends.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// A complete response, ready to write.
pub fn response(status: u16, content_type: &str, body: &[u8], keep_alive: bool) -> Vec<u8> {
    response_with_headers(status, content_type, &[], body, keep_alive)
}

/// [`response`] with extra header lines (each ending in `\r\n`, e.g. CORS or
/// `Retry-After`) right after the status line.
pub fn response_with_headers(
    status: u16,
    content_type: &str,
    extra: &[&str],
    body: &[u8],
    keep_alive: bool,
) -> Vec<u8> {
    response_cached(status, content_type, "no-store", extra, body, keep_alive)
}

/// [`response_with_headers`] with a `Cache-Control` of the caller's choice: `no-store`
/// for anything dynamic, a lifetime for the static pages and their scripts.
pub fn response_cached(
    status: u16,
    content_type: &str,
    cache_control: &str,
    extra: &[&str],
    body: &[u8],
    keep_alive: bool,
) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status)).into_bytes();
    for lines in extra {
        out.extend_from_slice(lines.as_bytes());
    }
    out.extend_from_slice(
        format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: {cache_control}\r\nConnection: {}\r\n\r\n",
            body.len(),
            if keep_alive { "keep-alive" } else { "close" },
        )
        .as_bytes(),
    );
    out.extend_from_slice(body);
    out
}

/// Writes a JSON response.
pub async fn write_json<W: AsyncWrite + Unpin>(
    io: &mut W,
    status: u16,
    body: &[u8],
    keep_alive: bool,
) -> std::io::Result<()> {
    io.write_all(&response(status, "application/json", body, keep_alive))
        .await?;
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    #[test]
    fn reads_head_and_keeps_the_rest() {
        let raw = b"GET /socket.io/?EIO=4&transport=websocket&x=a%20b HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\nNEXT".to_vec();
        let mut io = futures::io::Cursor::new(raw);
        let mut buf = Vec::new();
        let req = block_on(read_request(&mut io, &mut buf)).unwrap();
        assert_eq!(req.path, "/socket.io/");
        assert_eq!(req.query_param("EIO").as_deref(), Some("4"));
        assert_eq!(req.query_param("x").as_deref(), Some("a b"));
        assert_eq!(req.query_param("nope"), None);
        assert!(req.header_has_token("connection", "upgrade"));
        assert_eq!(req.header("upgrade"), Some("websocket"));
        assert_eq!(buf, b"NEXT");
    }

    #[test]
    fn refuses_garbage_and_huge_heads() {
        let mut buf = Vec::new();
        let mut io = futures::io::Cursor::new(b"\x00\x01\x02 garbage\r\n\r\n".to_vec());
        assert!(matches!(
            block_on(read_request(&mut io, &mut buf)),
            Err(HttpError::Malformed(_))
        ));
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.extend(vec![b'a'; MAX_HEAD + 10]);
        let mut io = futures::io::Cursor::new(huge);
        let mut buf = Vec::new();
        assert!(matches!(
            block_on(read_request(&mut io, &mut buf)),
            Err(HttpError::HeadTooLarge)
        ));
    }

    #[test]
    fn debug_hides_credentials() {
        let raw = b"POST /api/rooms/a/messages HTTP/1.1\r\nAuthorization: Bearer k3y-s3cret\r\nCookie: s=c00kie\r\nX-A: b\r\n\r\n".to_vec();
        let mut io = futures::io::Cursor::new(raw);
        let req = block_on(read_request(&mut io, &mut Vec::new())).unwrap();
        let shown = format!("{req:?}");
        assert!(
            !shown.contains("k3y-s3cret") && !shown.contains("c00kie"),
            "{shown}"
        );
        assert!(
            shown.contains("x-a") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    #[test]
    fn body_framing_from_headers() {
        let framing = |headers: &[(&str, &str)]| {
            Request {
                method: "POST".into(),
                path: "/".into(),
                query: String::new(),
                headers: headers
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect(),
            }
            .body_framing()
            .ok()
        };
        assert_eq!(framing(&[]), Some(BodyFraming::None));
        assert_eq!(
            framing(&[("content-length", " 12 ")]),
            Some(BodyFraming::Length(12))
        );
        assert_eq!(
            framing(&[("content-length", "3, 3")]),
            Some(BodyFraming::Length(3))
        );
        assert_eq!(
            framing(&[("transfer-encoding", "Chunked")]),
            Some(BodyFraming::Chunked)
        );
        for bad in [
            vec![("content-length", "abc")],
            vec![("content-length", "-1")],
            vec![("content-length", "1"), ("content-length", "2")],
            vec![("transfer-encoding", "gzip, chunked")],
            vec![("transfer-encoding", "chunked, identity")],
            vec![("transfer-encoding", "chunked"), ("content-length", "1")],
        ] {
            assert_eq!(framing(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reads_chunked_bodies_from_a_stream() {
        let raw = b"5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n".to_vec();
        let mut buf = raw[..3].to_vec();
        let mut io = futures::io::Cursor::new(raw[3..].to_vec());
        let body = block_on(read_framed_body(
            &mut io,
            &mut buf,
            BodyFraming::Chunked,
            100,
        ))
        .unwrap();
        assert_eq!(body, b"hello");
        assert_eq!(buf, b"GET / HTTP/1.1\r\n");
        // A chunked body read from `raw` alone, at most `max` bytes.
        let chunked = |raw: &[u8], max: usize| {
            let mut io = futures::io::Cursor::new(raw.to_vec());
            block_on(read_framed_body(
                &mut io,
                &mut Vec::new(),
                BodyFraming::Chunked,
                max,
            ))
        };
        // An incomplete body on a closed stream ends the request.
        assert!(matches!(chunked(b"5\r\nhel", 100), Err(HttpError::Closed)));
        // Over the limit: read to the end, then refused.
        assert!(matches!(
            chunked(b"5\r\nhello\r\n0\r\n\r\n", 4),
            Err(HttpError::BodyTooLarge)
        ));
        assert!(matches!(
            chunked(b"5\r\nhel!o\r\nZ\r\n", 100),
            Err(HttpError::Malformed(_))
        ));
    }

    #[test]
    fn percent_decoding_is_lenient() {
        assert_eq!(percent_decode("a%2Fb+c"), "a/b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%+f"), "% f");
    }
}
