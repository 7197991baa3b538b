//! Fuzzes the chat event parser (`corelay::chat::events::parse_event`): the JSON data of
//! a Socket.IO EVENT (`["message", {"room": …, "text": …}]`), parsed in place by
//! simd-json, then validated (room names, text size, `cid`, `since`, history paging).
//!
//! Checks: no panic; an accepted request respects the limits (room name rules, text at
//! most `max_text_bytes`, `cid` 1–64 bytes, history limit 1–100); every string it
//! returns is valid UTF-8; where serde_json also reads the input (and it has no duplicate
//! keys), the text simd-json decoded is the same (escapes, surrogate pairs); and the message a server would echo
//! (`write_message_json` with the parsed fields) is valid JSON that reads back equal.

#![no_main]

use corelay::chat::events::{
    parse_event, validate_room, write_message_json, ChatRequest, Parsed, PayloadLimits,
};
use corelay::store::StoredMessage;
use libfuzzer_sys::fuzz_target;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::collections::HashSet;

/// Deserializes any JSON value, and fails on an object with a duplicate key at any depth.
struct NoDuplicateKeys;

impl<'de> Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeysVisitor)
    }
}

struct NoDuplicateKeysVisitor;

impl<'de> Visitor<'de> for NoDuplicateKeysVisitor {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_i64<E>(self, _: i64) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_u64<E>(self, _: u64) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_f64<E>(self, _: f64) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_str<E>(self, _: &str) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_unit<E>(self) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NoDuplicateKeys, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(NoDuplicateKeys)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NoDuplicateKeys, A::Error> {
        let mut keys = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !keys.insert(key) {
                return Err(de::Error::custom("duplicate key"));
            }
            map.next_value::<NoDuplicateKeys>()?;
        }
        Ok(NoDuplicateKeys)
    }
}

const LIMITS: PayloadLimits = PayloadLimits {
    max_text_bytes: 4096,
};

fn utf8(s: &str) {
    assert!(std::str::from_utf8(s.as_bytes()).is_ok());
}

fuzz_target!(|data: &[u8]| {
    let mut scratch = data.to_vec();
    let Ok(Parsed::Request(req)) = parse_event(&mut scratch, LIMITS) else {
        return;
    };
    utf8(req.room());
    assert!(
        validate_room(req.room()).is_ok(),
        "accepted room {:?}",
        req.room()
    );
    match &req {
        ChatRequest::Message { room, text, cid } => {
            utf8(text);
            assert!(text.len() <= LIMITS.max_text_bytes);
            if let Some(c) = cid {
                utf8(c);
                assert!((1..=64).contains(&c.len()));
            }
            // simd-json and serde_json must agree on what the text says. Only without
            // duplicate keys: JSON leaves their meaning open (simd-json's small objects
            // keep the first, serde_json the last).
            if serde_json::from_slice::<NoDuplicateKeys>(data).is_err() {
                return;
            }
            if let Ok(serde_json::Value::Array(args)) =
                serde_json::from_slice::<serde_json::Value>(data)
            {
                if let Some(t) = args
                    .get(1)
                    .and_then(|p| p.get("text"))
                    .and_then(|t| t.as_str())
                {
                    assert_eq!(
                        t, text,
                        "simd-json and serde_json decode the text differently"
                    );
                }
            }
            // The frame the home shard would fan out reads back as the same message.
            let m = StoredMessage {
                room: room.clone(),
                offset: 1,
                id: "01JX0000000000000000000000".to_string(),
                user: "alice".to_string(),
                text: text.clone(),
                ts: 1_764_000_000_000,
                cid: cid.clone(),
            };
            let mut out = Vec::new();
            write_message_json(&mut out, &m);
            let back: serde_json::Value =
                serde_json::from_slice(&out).expect("write_message_json wrote invalid JSON");
            assert_eq!(back["text"].as_str(), Some(text.as_str()));
            assert_eq!(back["room"].as_str(), Some(room.as_str()));
        }
        ChatRequest::Join { token, .. } => {
            if let Some(t) = token {
                utf8(t);
            }
        }
        ChatRequest::History { limit, .. } => {
            assert!((1..=100).contains(limit), "history limit {limit}");
        }
        ChatRequest::Leave { .. } | ChatRequest::Typing { .. } | ChatRequest::Presence { .. } => {}
    }
});
