//! Fuzzes the chunked transfer coding decoder of request bodies
//! (`corelay::transport::chunked::ChunkedDecoder`) on its own, differentially: the same
//! bytes decoded in one piece and split into pieces of 1–256 bytes must give the same
//! answer.
//!
//! Input: byte 0 picks the piece size (`1 + byte % 256`), byte 1 the size limit
//! (`byte * 16` content bytes); the rest is the body as a client would send it (possibly
//! followed by the next request's bytes).
//!
//! Checks: no panic, no hang; split or whole, the same result (error, more needed, or
//! complete after the same number of bytes) and the same content; a complete body's end
//! is within the input; content kept never exceeds the limit unless `too_large` says so.

#![no_main]

use corelay::transport::chunked::{ChunkError, ChunkedDecoder};
use libfuzzer_sys::fuzz_target;

/// The decoder's answer over `input` fed `step` bytes at a time: `Ok(Some(end))` with the
/// body's end in `input`, `Ok(None)` when more is needed, or the error; and the content.
fn decode(input: &[u8], step: usize, max: usize) -> (Result<Option<usize>, ChunkError>, Vec<u8>, bool) {
    let mut decoder = ChunkedDecoder::new(max);
    let mut out = Vec::new();
    let mut at = 0;
    while at < input.len() {
        let piece = &input[at..(at + step).min(input.len())];
        match decoder.decode(piece, &mut out) {
            Ok(Some(n)) => {
                assert!(n <= piece.len(), "took {n} of a {} byte piece", piece.len());
                return (Ok(Some(at + n)), out, decoder.too_large());
            }
            Ok(None) => at += piece.len(),
            Err(e) => return (Err(e), out, decoder.too_large()),
        }
    }
    (Ok(None), out, decoder.too_large())
}

fuzz_target!(|data: &[u8]| {
    let (Some(&step), Some(&limit)) = (data.first(), data.get(1)) else {
        return;
    };
    let input = &data[2..];
    let max = usize::from(limit) * 16;
    let step = 1 + usize::from(step) % 256;
    let (whole, whole_out, whole_large) = decode(input, input.len().max(1), max);
    let (split, split_out, split_large) = decode(input, step, max);
    assert_eq!(whole.is_ok(), split.is_ok(), "{whole:?} vs {split:?}");
    if let (Ok(a), Ok(b)) = (&whole, &split) {
        assert_eq!(a, b, "the body ends at the same byte however it is split");
        if a.is_some() {
            assert_eq!(whole_large, split_large);
            if !whole_large {
                assert_eq!(whole_out, split_out, "the same content however it is split");
                assert!(whole_out.len() <= max, "kept {} over a limit of {max}", whole_out.len());
            }
        }
    }
});
