//! The chunked transfer coding of request bodies (RFC 9112 §7.1), decoded as bytes arrive:
//! Node's `http.request` without a length, and some proxies, send bodies this way. Chunk
//! sizes go through `httparse::parse_chunk_size`; what it lets through (an empty size,
//! extensions outside the grammar) is checked here, and the trailer section is bounded.

use thiserror::Error;

/// The longest chunk-size line (size, extensions, CRLF) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// The longest trailer section (every trailer field and the final CRLF) accepted.
const MAX_TRAILER: usize = 8192;
/// The most trailer fields accepted.
const MAX_TRAILER_FIELDS: usize = 32;

/// Why a chunked body could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChunkError {
    /// The body is not valid chunked coding (RFC 9112 §7.1).
    #[error("{0}")]
    Malformed(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading a chunk-size line into `line`.
    Size,
    /// Inside a chunk's data, this many bytes to go.
    Data(u64),
    /// After a chunk's data: the CRLF, this many of its bytes seen.
    DataEnd(u8),
    /// After the last chunk: the trailer section, read into `line`.
    Trailer,
    /// The body is complete.
    Done,
}

/// An incremental decoder of the chunked transfer coding (RFC 9112 §7.1): feed it the
/// bytes as they arrive, in pieces of any size. Chunk sizes are parsed by
/// [`httparse::parse_chunk_size`]; extensions must follow the RFC's grammar and
/// trailers are parsed as header fields, then dropped. Past the size limit it goes on
/// decoding (to find the body's end) but keeps nothing more, and says so through
/// [`ChunkedDecoder::too_large`].
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    line: Vec<u8>,
    /// Content bytes decoded so far.
    len: u64,
    max: u64,
    too_large: bool,
}

impl ChunkedDecoder {
    /// A decoder for a body of at most `max` content bytes.
    pub fn new(max: usize) -> ChunkedDecoder {
        ChunkedDecoder {
            state: ChunkState::Size,
            line: Vec::new(),
            len: 0,
            max: max as u64,
            too_large: false,
        }
    }

    /// Whether the content went over the size limit (a chunk's size says so before
    /// its data is read). What `out` got is then incomplete and to be dropped.
    pub fn too_large(&self) -> bool {
        self.too_large
    }

    /// Decodes `input`, appending content to `out`. `Some(n)` once the body is
    /// complete, `n` being how many bytes of `input` it took (the rest belongs to the
    /// next request); `None` when all of `input` was taken and more is needed.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Option<usize>, ChunkError> {
        let mut at = 0;
        while at < input.len() {
            match self.state {
                ChunkState::Size => {
                    let rest = &input[at..];
                    let end = rest.iter().position(|&b| b == b'\n');
                    let take = end.map_or(rest.len(), |i| i + 1);
                    if self.line.len() + take > MAX_CHUNK_LINE {
                        return Err(ChunkError::Malformed("chunk-size line too long"));
                    }
                    self.line.extend_from_slice(&rest[..take]);
                    at += take;
                    if end.is_some() {
                        let size = chunk_size_line(&self.line)?;
                        self.line.clear();
                        if self.len.saturating_add(size) > self.max {
                            self.too_large = true;
                        }
                        self.state = if size == 0 {
                            ChunkState::Trailer
                        } else {
                            ChunkState::Data(size)
                        };
                    }
                }
                ChunkState::Data(left) => {
                    let take = (input.len() - at).min(usize::try_from(left).unwrap_or(usize::MAX));
                    if !self.too_large {
                        out.extend_from_slice(&input[at..at + take]);
                    }
                    at += take;
                    self.len = self.len.saturating_add(take as u64);
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd(0)
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataEnd(seen) => {
                    let expected = if seen == 0 { b'\r' } else { b'\n' };
                    if input[at] != expected {
                        return Err(ChunkError::Malformed("chunk data not followed by CRLF"));
                    }
                    at += 1;
                    self.state = if seen == 0 {
                        ChunkState::DataEnd(1)
                    } else {
                        ChunkState::Size
                    };
                }
                ChunkState::Trailer => {
                    if self.line.len() >= MAX_TRAILER {
                        return Err(ChunkError::Malformed("trailer section too long"));
                    }
                    self.line.push(input[at]);
                    at += 1;
                    if self.line == b"\r\n" || self.line.ends_with(b"\r\n\r\n") {
                        check_trailer(&self.line)?;
                        self.line = Vec::new();
                        self.state = ChunkState::Done;
                    } else if self.line.len() == 2 && self.line[0] == b'\r' {
                        return Err(ChunkError::Malformed("last chunk not followed by CRLF"));
                    }
                }
                ChunkState::Done => break,
            }
        }
        Ok((self.state == ChunkState::Done).then_some(at))
    }
}

/// The size on a complete chunk-size line (ending in `\n`), checked by httparse and
/// then against the RFC's grammar for what httparse lets through (an empty size, any
/// bytes in extensions).
fn chunk_size_line(line: &[u8]) -> Result<u64, ChunkError> {
    const BAD: ChunkError = ChunkError::Malformed("invalid chunk size");
    let size = match httparse::parse_chunk_size(line) {
        Ok(httparse::Status::Complete((used, size))) if used == line.len() => size,
        Ok(_) => return Err(ChunkError::Malformed("chunk-size line not ended by CRLF")),
        Err(_) => return Err(BAD),
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(BAD);
    }
    // parse_chunk_size accepted the line, so it ends in CRLF.
    let ext = &line[digits..line.len() - 2];
    if !valid_chunk_ext(ext) {
        return Err(ChunkError::Malformed("invalid chunk extension"));
    }
    Ok(size)
}

/// `*( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] )`, with trailing
/// whitespace tolerated (RFC 9112 §7.1.1).
fn valid_chunk_ext(ext: &[u8]) -> bool {
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while ext.get(*i).is_some_and(|&b| b == b' ' || b == b'\t') {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i == ext.len() {
            return true;
        }
        if ext[i] != b';' {
            return false;
        }
        i += 1;
        skip_ws(&mut i);
        let name = token_len(&ext[i..]);
        if name == 0 {
            return false;
        }
        i += name;
        skip_ws(&mut i);
        if ext.get(i) == Some(&b'=') {
            i += 1;
            skip_ws(&mut i);
            let value = match ext.get(i) {
                Some(b'"') => quoted_string_len(&ext[i..]),
                _ => token_len(&ext[i..]),
            };
            if value == 0 {
                return false;
            }
            i += value;
        }
    }
}

/// The length of the token at the start of `s` (RFC 9110 §5.6.2), 0 if none.
fn token_len(s: &[u8]) -> usize {
    s.iter()
        .take_while(|&&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        .count()
}

/// The length of the quoted string at the start of `s` (RFC 9110 §5.6.4), 0 if none.
fn quoted_string_len(s: &[u8]) -> usize {
    let mut i = 1;
    while let Some(&b) = s.get(i) {
        match b {
            b'"' => return i + 1,
            b'\\' => match s.get(i + 1) {
                Some(&q) if q == b'\t' || q == b' ' || (0x21..=0x7e).contains(&q) || q >= 0x80 => {
                    i += 2
                }
                _ => return 0,
            },
            b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff => i += 1,
            _ => return 0,
        }
    }
    0
}

/// Checks a complete trailer section (fields, then an empty line) as header fields.
fn check_trailer(section: &[u8]) -> Result<(), ChunkError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILER_FIELDS];
    match httparse::parse_headers(section, &mut fields) {
        Ok(httparse::Status::Complete((used, _))) if used == section.len() => Ok(()),
        _ => Err(ChunkError::Malformed("invalid trailer section")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces cut at `cuts`: the content and the bytes left over.
    fn decode_split(
        input: &[u8],
        cuts: &[usize],
        max: usize,
    ) -> Result<(Vec<u8>, Vec<u8>, bool), ChunkError> {
        let mut d = ChunkedDecoder::new(max);
        let mut out = Vec::new();
        let mut bounds = vec![0];
        bounds.extend_from_slice(cuts);
        bounds.push(input.len());
        for w in bounds.windows(2) {
            let piece = &input[w[0]..w[1]];
            if let Some(used) = d.decode(piece, &mut out)? {
                let rest = [&piece[used..], &input[w[1]..]].concat();
                return Ok((out, rest, d.too_large()));
            }
        }
        Err(ChunkError::Malformed("incomplete"))
    }

    const CHUNKED: &[u8] =
        b"4;a=b ; c=\"q\\\"x\"\r\nRust\r\nA\r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\nNEXT";

    #[test]
    fn chunked_bodies_decode_whatever_the_split() {
        let whole = decode_split(CHUNKED, &[], 1000).unwrap();
        assert_eq!(whole, (b"Rust0123456789".to_vec(), b"NEXT".to_vec(), false));
        for i in 0..=CHUNKED.len() {
            assert_eq!(
                decode_split(CHUNKED, &[i], 1000).unwrap(),
                whole,
                "cut at {i}"
            );
            for j in i..=CHUNKED.len() {
                assert_eq!(
                    decode_split(CHUNKED, &[i, j], 1000).unwrap(),
                    whole,
                    "cuts at {i}, {j}"
                );
            }
        }
        // One byte at a time.
        let every: Vec<usize> = (1..CHUNKED.len()).collect();
        assert_eq!(decode_split(CHUNKED, &every, 1000).unwrap(), whole);
        // No trailer, upper-case hex, an empty body.
        assert_eq!(
            decode_split(b"1A\r\n", &[], 100).unwrap_err(),
            ChunkError::Malformed("incomplete")
        );
        let body = [b"1A\r\n".as_slice(), &[b'z'; 26], b"\r\n0\r\n\r\n"].concat();
        assert_eq!(decode_split(&body, &[], 100).unwrap().0, vec![b'z'; 26]);
        assert_eq!(
            decode_split(b"0\r\n\r\n", &[], 100).unwrap(),
            (vec![], vec![], false)
        );
    }

    #[test]
    fn chunked_bodies_over_the_limit_are_read_to_their_end() {
        let body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\nNEXT";
        assert_eq!(
            decode_split(body, &[], 11).unwrap(),
            (b"hello world".to_vec(), b"NEXT".to_vec(), false)
        );
        for i in 0..=body.len() {
            let (_, rest, too_large) = decode_split(body, &[i], 10).unwrap();
            assert!(too_large, "cut at {i}");
            assert_eq!(rest, b"NEXT");
        }
        // The size line alone tells: a huge chunk is over before any of its data.
        let mut d = ChunkedDecoder::new(1000);
        assert_eq!(d.decode(b"fffffffff\r\n", &mut Vec::new()), Ok(None));
        assert!(d.too_large());
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        let long_ext = format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(MAX_CHUNK_LINE));
        let long_trailer = format!("0\r\nX: {}\r\n\r\n", "v".repeat(MAX_TRAILER));
        for bad in [
            b"g\r\nx\r\n0\r\n\r\n".as_slice(),
            b"\r\n",
            b";a\r\n",
            b" 1\r\nx\r\n0\r\n\r\n",
            b"-1\r\nx\r\n0\r\n\r\n",
            b"0x1\r\nx\r\n0\r\n\r\n",
            b"1\nx\r\n0\r\n\r\n",
            b"1\rx\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"1\r\nxy\r\n0\r\n\r\n",
            b"1\r\nx\n0\r\n\r\n",
            b"1;\r\nx\r\n0\r\n\r\n",
            b"1;=v\r\nx\r\n0\r\n\r\n",
            b"1;a=\r\nx\r\n0\r\n\r\n",
            b"1;a=\"open\r\nx\r\n0\r\n\r\n",
            b"1;a b\r\nx\r\n0\r\n\r\n",
            b"1;a\x00\r\nx\r\n0\r\n\r\n",
            b"1;a=b,c\r\nx\r\n0\r\n\r\n",
            b"0\r\nXY\r\n\r\n",
            b"0\r\n\rX",
            b"0\r\nno colon\r\n\r\n",
            b"0\r\n: empty name\r\n\r\n",
            long_ext.as_bytes(),
            long_trailer.as_bytes(),
        ] {
            let shown = String::from_utf8_lossy(&bad[..bad.len().min(40)]).into_owned();
            assert!(
                matches!(decode_split(bad, &[], 1000), Err(ChunkError::Malformed(m)) if m != "incomplete"),
                "{shown:?} should be refused"
            );
            // Byte by byte, the same.
            let every: Vec<usize> = (1..bad.len()).collect();
            assert!(
                matches!(decode_split(bad, &every, 1000), Err(ChunkError::Malformed(m)) if m != "incomplete"),
                "{shown:?} byte by byte should be refused"
            );
        }
    }
}
