//! Fuzzes corelay's HTTP/1.1 request reading (`corelay::transport::http`): the request
//! head parser behind `read_request` (httparse, path/query split, header lower-casing),
//! the query and header accessors the routes use, `read_framed_body` (a Content-Length
//! or chunked body, as `body_framing` says), and `percent_decode`.
//!
//! Input: byte 0 picks how many bytes each read returns (1..=256, or everything at
//! once), so heads split across reads are covered; the rest is the raw request as a
//! client would send it.
//!
//! Checks: no panic, no hang; a parsed request's path has no `?`, header names are
//! lower case, the bytes left in the buffer are exactly what followed the head.

#![no_main]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use corelay::transport::http::{
    percent_decode, read_framed_body, read_request, BodyFraming, MAX_HEAD,
};
use futures::executor::block_on;
use futures::io::AsyncRead;
use libfuzzer_sys::fuzz_target;

/// An `AsyncRead` over a byte slice that returns at most `step` bytes per read.
struct Chunked<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(n))
    }
}

/// Query keys and headers corelay's routes look at.
const QUERY_KEYS: [&str; 8] = [
    "EIO",
    "transport",
    "sid",
    "t",
    "before",
    "after",
    "limit",
    "b64",
];
const HEADERS: [&str; 7] = [
    "host",
    "connection",
    "upgrade",
    "origin",
    "authorization",
    "content-length",
    "sec-websocket-key",
];

fuzz_target!(|input: &[u8]| {
    let Some((&mode, raw)) = input.split_first() else {
        return;
    };
    let step = if mode == 0 {
        usize::MAX
    } else {
        usize::from(mode)
    };
    let mut io = Chunked { data: raw, step };
    let mut buf = Vec::new();
    if let Ok(req) = block_on(read_request(&mut io, &mut buf)) {
        assert!(
            !req.path.contains('?'),
            "path keeps the query: {:?}",
            req.path
        );
        assert!(
            req.headers
                .iter()
                .all(|(n, _)| !n.bytes().any(|b| b.is_ascii_uppercase())),
            "header names are not lower-cased"
        );
        // What is left after the head is a suffix of the input.
        let consumed = raw.len() - io.data.len();
        assert!(consumed <= raw.len() && buf.len() <= consumed);
        assert_eq!(&raw[consumed - buf.len()..consumed], &buf[..]);
        for key in QUERY_KEYS {
            let _ = req.query_param(key);
        }
        for name in HEADERS {
            let _ = req.header(name);
            let _ = req.header_has_token(name, "upgrade");
        }
        let _ = req.keep_alive();
        // The body as the routes read it: Content-Length or chunked (ChunkedDecoder).
        if let Ok(framing) = req.body_framing() {
            if let Ok(body) = block_on(read_framed_body(&mut io, &mut buf, framing, MAX_HEAD)) {
                assert!(body.len() <= MAX_HEAD, "a body over the limit was accepted");
                if let BodyFraming::Length(len) = framing {
                    assert_eq!(body.len(), len);
                }
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(raw) {
        let decoded = percent_decode(text);
        // Decoding never makes a string longer than its input, apart from U+FFFD
        // replacement characters for invalid UTF-8 (3 bytes for at most 3 input bytes).
        assert!(decoded.len() <= text.len() * 3);
    }
});
