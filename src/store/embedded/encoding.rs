//! The on-disk encoding (see *Layout* in the module docs): message and cid keys that keep
//! rooms apart and sort by offset, and the hand-encoded message value, decoded with bounds
//! checks so damaged data is `Corrupt`, never a panic.

use crate::history::{StoreError, StoredMessage};

/// Longest room, user or cid the key encoding accepts (fjall keys are at most 64 KiB).
pub(super) const MAX_KEY_PART: usize = 16 * 1024;
/// First byte of every encoded message value.
const VALUE_VERSION: u8 = 1;

/// The key prefix of a room's stream: `u16-BE len | room`. `None` for a room too long to
/// have been stored.
pub(super) fn room_prefix(room: &str) -> Option<Vec<u8>> {
    if room.len() > MAX_KEY_PART {
        return None;
    }
    let len = u16::try_from(room.len()).ok()?;
    let mut key = Vec::with_capacity(2 + room.len() + 8);
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(room.as_bytes());
    Some(key)
}

/// A message's key: its room's prefix, then the offset big-endian.
pub(super) fn message_key(prefix: &[u8], offset: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + 8);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&offset.to_be_bytes());
    key
}

/// The cid index key of `(room, user, cid)`. `None` if a part is too long to be stored.
pub(super) fn cid_key(room: &str, user: &str, cid: &str) -> Option<Vec<u8>> {
    let mut key = room_prefix(room)?;
    if user.len() > MAX_KEY_PART || cid.len() > MAX_KEY_PART {
        return None;
    }
    let user_len = u16::try_from(user.len()).ok()?;
    key.extend_from_slice(&user_len.to_be_bytes());
    key.extend_from_slice(user.as_bytes());
    key.extend_from_slice(cid.as_bytes());
    Some(key)
}

/// The offset at the end of a message key, checking that the key is the room's.
pub(super) fn key_offset(prefix: &[u8], key: &[u8]) -> Result<u64, StoreError> {
    key.strip_prefix(prefix)
        .and_then(|rest| <[u8; 8]>::try_from(rest).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt(format!("malformed message key of {} bytes", key.len())))
}

/// Encodes what of a message is not in its key:
/// `version u8 | ts u64-LE | id (u16-LE len) | user (u16-LE len) | has_cid u8 | [cid (u16-LE len)] | text (rest)`.
pub(super) fn encode_value(m: &StoredMessage) -> Result<Vec<u8>, StoreError> {
    let short = |what: &str, s: &str| -> Result<[u8; 2], StoreError> {
        if s.len() > MAX_KEY_PART {
            return Err(StoreError::Invalid(format!(
                "{what} of message {}#{} is {} bytes, more than {MAX_KEY_PART}",
                m.room,
                m.offset,
                s.len()
            )));
        }
        u16::try_from(s.len())
            .map(u16::to_le_bytes)
            .map_err(|_| StoreError::Invalid(format!("{what} too long")))
    };
    if u32::try_from(m.text.len()).is_err() {
        return Err(StoreError::Invalid(format!(
            "text of message {}#{} is too long",
            m.room, m.offset
        )));
    }
    let cid_len = m.cid.as_ref().map_or(0, |c| 2 + c.len());
    let mut v =
        Vec::with_capacity(1 + 8 + 4 + m.id.len() + m.user.len() + 1 + cid_len + m.text.len());
    v.push(VALUE_VERSION);
    v.extend_from_slice(&m.ts.to_le_bytes());
    v.extend_from_slice(&short("id", &m.id)?);
    v.extend_from_slice(m.id.as_bytes());
    v.extend_from_slice(&short("user", &m.user)?);
    v.extend_from_slice(m.user.as_bytes());
    match &m.cid {
        Some(cid) => {
            v.push(1);
            v.extend_from_slice(&short("cid", cid)?);
            v.extend_from_slice(cid.as_bytes());
        }
        None => v.push(0),
    }
    v.extend_from_slice(m.text.as_bytes());
    Ok(v)
}

/// A cursor over an encoded value; every read is bounds-checked.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).and_then(|b| b.first().copied())
    }

    fn u64_le(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    }

    fn short_str(&mut self) -> Option<String> {
        let len = self
            .take(2)
            .and_then(|b| <[u8; 2]>::try_from(b).ok())
            .map(u16::from_le_bytes)?;
        let bytes = self.take(usize::from(len))?;
        String::from_utf8(bytes.to_vec()).ok()
    }
}

/// Reads an encoded value back; anything unexpected is `Corrupt`, never a panic.
pub(super) fn decode_value(room: &str, offset: u64, v: &[u8]) -> Result<StoredMessage, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("message {room}#{offset}: {what}"));
    let mut c = Cursor { rest: v };
    if c.u8() != Some(VALUE_VERSION) {
        return Err(corrupt("unknown value version"));
    }
    let ts = c.u64_le().ok_or_else(|| corrupt("truncated ts"))?;
    let id = c.short_str().ok_or_else(|| corrupt("bad id"))?;
    let user = c.short_str().ok_or_else(|| corrupt("bad user"))?;
    let cid = match c.u8() {
        Some(0) => None,
        Some(1) => Some(c.short_str().ok_or_else(|| corrupt("bad cid"))?),
        _ => return Err(corrupt("bad cid flag")),
    };
    let text = String::from_utf8(c.rest.to_vec()).map_err(|_| corrupt("text is not UTF-8"))?;
    Ok(StoredMessage {
        room: room.to_owned(),
        offset,
        id,
        user,
        text,
        ts,
        cid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(cid: Option<&str>) -> StoredMessage {
        StoredMessage {
            room: "r".into(),
            offset: 7,
            id: "01HX".into(),
            user: "alice".into(),
            text: "héllo".into(),
            ts: 1_700_000_000_000,
            cid: cid.map(str::to_owned),
        }
    }

    #[test]
    fn value_round_trips() {
        for m in [msg(None), msg(Some("c-1"))] {
            let v = encode_value(&m).expect("encodes");
            assert_eq!(decode_value("r", 7, &v).expect("decodes"), m);
        }
    }

    #[test]
    fn damaged_values_are_corrupt_not_panics() {
        let v = encode_value(&msg(Some("c-1"))).expect("encodes");
        for cut in 0..v.len() - "héllo".len() {
            let e = decode_value("r", 7, &v[..cut]).expect_err("truncated value must fail");
            assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
        }
        let mut bad = v.clone();
        bad[0] = 9;
        assert!(matches!(
            decode_value("r", 7, &bad),
            Err(StoreError::Corrupt(_))
        ));
        let mut bad = encode_value(&msg(None)).expect("encodes");
        let last = bad.len() - 1;
        bad[last] = 0xff; // text no longer UTF-8
        assert!(matches!(
            decode_value("r", 7, &bad),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn keys_keep_prefix_rooms_apart() {
        let a = room_prefix("a").expect("short");
        let ab = room_prefix("ab").expect("short");
        assert!(!message_key(&ab, 1).starts_with(&a));
        assert_eq!(key_offset(&a, &message_key(&a, 42)).expect("ok"), 42);
        assert!(key_offset(&a, &message_key(&ab, 42)).is_err());
    }
}
