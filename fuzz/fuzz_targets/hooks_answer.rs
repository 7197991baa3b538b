//! Fuzzes what the application's backend answers a hook (`corelay::hooks`): the HTTP
//! answer as it arrives (`hooks::http::read_answer`, split over reads of 1–256 bytes),
//! then its body through each hook's answer parser (`hooks::answer::{connect, verdict,
//! rpc}`).
//!
//! Byte 0 is the read size (`1 + byte % 256`); the rest is the raw answer, and is also
//! given to the answer parsers as a body on its own (so that they are reached without a
//! valid HTTP head too).
//!
//! Checks: no panic and no hang; an accepted body is at most `hooks::MAX_BODY` bytes;
//! an accepted connect answer has a 1–128 byte user; an accepted rpc error is an object.

#![no_main]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use corelay::hooks::answer::{self, ConnectAnswer, RpcAnswer};
use corelay::hooks::{http, MAX_BODY};
use futures::io::AsyncRead;
use libfuzzer_sys::fuzz_target;

/// Hands out the input `step` bytes at a time, then the end of the stream.
struct Pieces<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Pieces<'_> {
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

/// Every answer parser on `body`, with the checks on what they accept.
fn parse_body(body: &[u8]) {
    if let Ok(ConnectAnswer::Accept { user, .. }) = answer::connect(body) {
        assert!((1..=128).contains(&user.len()));
    }
    let _ = answer::verdict(body);
    if let Ok(RpcAnswer::Error(e)) = answer::rpc(body) {
        assert!(e.is_object());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let mut stream = Pieces {
        data: rest,
        step: 1 + step as usize,
    };
    if let Ok(a) = futures::executor::block_on(http::read_answer(&mut stream)) {
        assert!(a.body.len() <= MAX_BODY);
        parse_body(&a.body);
    }
    parse_body(rest);
});
