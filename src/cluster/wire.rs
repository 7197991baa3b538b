//! What travels through Redis, in both directions: the payloads on a room's channel (a
//! message `m…`, a presence event `p…`, a typing notice `t…`) and their decoding into
//! [`ClusterEvent`]s, and the pieces of Redis replies (strings, numbers, dedupe records).
//!
//! A message's payload is built by the publish script around the offset it assigns:
//! [`message_payload_parts`] gives the JSON before and after it.

use redis::Value;

use super::{Ack, ClusterError, ClusterEvent, NewMessage};
use crate::history::StoredMessage;

/// The wire form of a presence event on a room channel (after the `p` tag).
#[derive(serde::Serialize, serde::Deserialize)]
struct PresenceWire {
    room: String,
    user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    online: bool,
    host: String,
}

/// The wire form of a typing notice on a room channel (after the `t` tag).
#[derive(serde::Serialize, serde::Deserialize)]
struct TypingWire<'a> {
    #[serde(borrow)]
    room: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    user: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    host: std::borrow::Cow<'a, str>,
}

/// Decodes a room channel's payload: `m` + message JSON, `p` + presence JSON, or `t` +
/// typing JSON. An event of another room than the channel's is refused.
pub(crate) fn decode_event(room: &str, payload: &[u8]) -> Result<ClusterEvent, String> {
    let of_room = |kind: &str, got: &str| {
        if got == room {
            Ok(())
        } else {
            Err(format!(
                "{kind} for room {got:?} on the channel of {room:?}"
            ))
        }
    };
    match payload.split_first() {
        Some((b'm', json)) => {
            let m: StoredMessage = serde_json::from_slice(json).map_err(|e| e.to_string())?;
            of_room("message", &m.room)?;
            Ok(ClusterEvent::Message(m))
        }
        Some((b'p', json)) => {
            let p: PresenceWire = serde_json::from_slice(json).map_err(|e| e.to_string())?;
            of_room("presence", &p.room)?;
            Ok(ClusterEvent::Presence {
                room: p.room,
                user: p.user,
                name: p.name,
                online: p.online,
                host: p.host,
            })
        }
        Some((b't', json)) => {
            let t: TypingWire<'_> = serde_json::from_slice(json).map_err(|e| e.to_string())?;
            of_room("typing", &t.room)?;
            Ok(ClusterEvent::Typing {
                room: t.room.into_owned(),
                user: t.user.into_owned(),
                host: t.host.into_owned(),
            })
        }
        _ => Err("unknown payload tag".into()),
    }
}

/// The message's channel payload around its offset: `m{"room":…,"offset":` and
/// `,"id":…,"user":…,"text":…,"ts":…[,"cid":…]}` (the script puts the offset between).
pub(crate) fn message_payload_parts(m: &NewMessage) -> Result<(String, String), ClusterError> {
    let j = |s: &str| serde_json::to_string(s).map_err(|e| ClusterError::Protocol(e.to_string()));
    let prefix = format!("m{{\"room\":{},\"offset\":", j(&m.room)?);
    let mut suffix = format!(
        ",\"id\":{},\"user\":{},\"text\":{},\"ts\":{}",
        j(&m.id)?,
        j(&m.user)?,
        j(&m.text)?,
        m.ts
    );
    if let Some(cid) = &m.cid {
        suffix.push_str(",\"cid\":");
        suffix.push_str(&j(cid)?);
    }
    suffix.push('}');
    Ok((prefix, suffix))
}

/// A presence event's channel payload.
pub(crate) fn presence_payload(
    room: &str,
    user: &str,
    name: Option<&str>,
    online: bool,
    host: &str,
) -> Result<String, ClusterError> {
    let wire = PresenceWire {
        room: room.to_owned(),
        user: user.to_owned(),
        name: name.map(str::to_owned),
        online,
        host: host.to_owned(),
    };
    serde_json::to_string(&wire)
        .map(|j| format!("p{j}"))
        .map_err(|e| ClusterError::Protocol(e.to_string()))
}

/// A typing notice's channel payload; `None` if it cannot be written.
pub(crate) fn typing_payload(room: &str, user: &str, host: &str) -> Option<Vec<u8>> {
    let wire = TypingWire {
        room: room.into(),
        user: user.into(),
        host: host.into(),
    };
    let mut payload = b"t".to_vec();
    serde_json::to_writer(&mut payload, &wire).ok()?;
    Some(payload)
}

/// The bytes of a string-like reply value.
pub(crate) fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        _ => None,
    }
}

/// The parts of a reply as text (invalid UTF-8 replaced), for an error message.
pub(crate) fn lossy(parts: &[Vec<u8>]) -> Vec<std::borrow::Cow<'_, str>> {
    parts.iter().map(|p| String::from_utf8_lossy(p)).collect()
}

/// An array reply of strings.
pub(crate) fn strings(v: Value) -> Result<Vec<Vec<u8>>, ClusterError> {
    match v {
        Value::Array(items) | Value::Set(items) => items
            .into_iter()
            .map(|i| bytes(i).ok_or_else(|| ClusterError::Protocol("expected a string".into())))
            .collect(),
        Value::Nil => Ok(Vec::new()),
        other => Err(ClusterError::Protocol(format!(
            "expected an array, got {other:?}"
        ))),
    }
}

/// UTF-8 text of a reply part.
pub(crate) fn utf8(b: Vec<u8>, what: &str) -> Result<String, ClusterError> {
    String::from_utf8(b).map_err(|_| ClusterError::Protocol(format!("{what} is not UTF-8")))
}

/// A decimal number reply part.
pub(crate) fn parse_u64(b: Option<&Vec<u8>>, what: &str) -> Result<u64, ClusterError> {
    b.and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| ClusterError::Protocol(format!("{what} is not a number")))
}

/// A dedupe key's value, `<offset>:<ts>:<id>`.
pub(crate) fn parse_ack(v: &[u8]) -> Result<Ack, ClusterError> {
    let bad = || ClusterError::Protocol("malformed dedupe record".into());
    let s = std::str::from_utf8(v).map_err(|_| bad())?;
    let mut parts = s.splitn(3, ':');
    let offset = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let ts = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let id = parts.next().ok_or_else(bad)?.to_owned();
    Ok(Ack { offset, id, ts })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_message(cid: Option<&str>) -> NewMessage {
        NewMessage {
            room: "r.1".into(),
            user: "ü\"ser".into(),
            text: "line\n\"quoted\" \\ 🎉".into(),
            cid: cid.map(str::to_owned),
            ts: 1_700_000_000_123,
            id: "01ABC".into(),
        }
    }

    #[test]
    fn message_payload_decodes_to_the_stored_message() {
        for cid in [None, Some(""), Some("c:1")] {
            let m = new_message(cid);
            let (prefix, suffix) = message_payload_parts(&m).expect("parts");
            let payload = format!("{prefix}{}{suffix}", 18_446_744_073_709_551_615u64);
            let event = decode_event("r.1", payload.as_bytes()).expect("decode");
            assert_eq!(event, ClusterEvent::Message(m.at(u64::MAX)));
        }
        assert!(decode_event("other", b"m{\"room\":\"r.1\"}").is_err());
        assert!(decode_event("r.1", b"x{}").is_err());
        assert!(decode_event("r.1", b"").is_err());
        assert!(decode_event("r.1", b"m{not json").is_err());
    }

    #[test]
    fn presence_payload_round_trip() {
        let p = presence_payload("r", "u", Some("N"), true, "h1").expect("payload");
        assert_eq!(
            decode_event("r", p.as_bytes()),
            Ok(ClusterEvent::Presence {
                room: "r".into(),
                user: "u".into(),
                name: Some("N".into()),
                online: true,
                host: "h1".into()
            })
        );
    }

    #[test]
    fn typing_payload_is_told_apart_by_its_tag() {
        let payload = typing_payload("r", "ü\"s/er", "h1").expect("payload");
        assert_eq!(
            decode_event("r", &payload),
            Ok(ClusterEvent::Typing {
                room: "r".into(),
                user: "ü\"s/er".into(),
                host: "h1".into()
            })
        );
        assert!(decode_event("other", &payload).is_err());
        assert!(decode_event("r", b"t{\"room\":\"r\"}").is_err());
    }

    #[test]
    fn presence_payload_from_the_reap_script_decodes() {
        // What Redis's cjson writes: any key order, `/` escaped, no name.
        let p = br#"p{"online":false,"host":"h\/2","user":"a\"b","room":"r"}"#;
        assert_eq!(
            decode_event("r", p),
            Ok(ClusterEvent::Presence {
                room: "r".into(),
                user: "a\"b".into(),
                name: None,
                online: false,
                host: "h/2".into()
            })
        );
    }

    #[test]
    fn acks_parse_with_colons_in_the_id() {
        assert_eq!(
            parse_ack(b"12:1700:id:with:colons"),
            Ok(Ack {
                offset: 12,
                id: "id:with:colons".into(),
                ts: 1700
            })
        );
        assert!(parse_ack(b"x:1:id").is_err());
        assert!(parse_ack(b"1:2").is_err());
    }
}
