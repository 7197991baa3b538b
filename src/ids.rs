//! Identifiers: Engine.IO session ids that name their shard, and message ids that
//! sort by time and are unique across processes.

use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

const B32: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Fills `buf` from the kernel's CSPRNG (sids must not be guessable).
pub fn random_bytes(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // getrandom cannot fail on a supported kernel; fall back to the clock rather than panic.
            let t = now_ms().wrapping_mul(0x9E37_79B9_7F4A_7C15);
            for (i, b) in buf[filled..].iter_mut().enumerate() {
                *b = (t >> ((i % 8) * 8)) as u8;
            }
            return;
        }
    }
}

/// Milliseconds since the Unix epoch (message `ts`).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A new Engine.IO sid: two hex digits naming the shard, then 18 random base64url characters.
pub fn new_sid(shard: usize) -> String {
    let mut raw = [0u8; 18];
    random_bytes(&mut raw);
    let mut sid = format!("{:02x}", shard & 0xff);
    sid.extend(raw.iter().map(|b| B64URL[(b & 63) as usize] as char));
    sid
}

/// The shard a sid names, if it is one of ours.
pub fn shard_of_sid(sid: &str) -> Option<usize> {
    usize::from_str_radix(sid.get(..2)?, 16).ok()
}

/// Makes message ids: 26 characters of Crockford base32 (ULID layout): 48 bits of
/// milliseconds, then 80 bits of process-random prefix, shard and a counter, so ids sort
/// by time and never repeat within or across processes.
pub struct MessageIds {
    prefix: u32,
    shard: u8,
    counter: Cell<u64>,
}

impl MessageIds {
    /// An id source for one shard; `prefix` should be random per process.
    pub fn new(prefix: u32, shard: usize) -> MessageIds {
        MessageIds {
            prefix,
            shard: shard as u8,
            counter: Cell::new(0),
        }
    }

    /// The next id for a message accepted at `ts` ms.
    pub fn next(&self, ts: u64) -> String {
        let c = self.counter.get().wrapping_add(1);
        self.counter.set(c);
        let hi = u128::from(ts & 0xFFFF_FFFF_FFFF) << 80;
        let lo = (u128::from(self.prefix) << 48)
            | (u128::from(self.shard) << 40)
            | u128::from(c & 0xFF_FFFF_FFFF);
        let v = hi | lo;
        (0..26)
            .map(|i| B32[((v >> (125 - i * 5)) & 31) as usize] as char)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sids_name_their_shard_and_differ() {
        let a = new_sid(1);
        let b = new_sid(1);
        assert_eq!(a.len(), 20);
        assert_ne!(a, b);
        assert_eq!(shard_of_sid(&a), Some(1));
        assert_eq!(shard_of_sid(&new_sid(13)), Some(13));
        assert_eq!(shard_of_sid("zz"), None);
    }

    #[test]
    fn message_ids_sort_by_time_then_sequence() {
        let ids = MessageIds::new(7, 0);
        let a = ids.next(1000);
        let b = ids.next(1000);
        let c = ids.next(2000);
        assert_eq!(a.len(), 26);
        assert!(a < b && b < c, "{a} {b} {c}");
        let other = MessageIds::new(8, 0).next(1000);
        assert_ne!(a, other);
    }
}
