//! The feed's wire form: a batch `{"events":[…]}` of message events, as PROTOCOL.md
//! ("Feed") gives them.

use crate::history::StoredMessage;

/// One message as the feed tells it.
#[derive(serde::Serialize)]
struct MessageEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    room: &'a str,
    offset: u64,
    id: &'a str,
    user: &'a str,
    text: &'a str,
    ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cid: Option<&'a str>,
}

/// A batch body being built: `{"events":[` … `]}`.
pub struct Batch {
    body: Vec<u8>,
    events: usize,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Batch {
        let mut body = Vec::with_capacity(4096);
        body.extend_from_slice(br#"{"events":["#);
        Batch { body, events: 0 }
    }

    /// Adds one message's event.
    pub fn push(&mut self, m: &StoredMessage) {
        if self.events > 0 {
            self.body.push(b',');
        }
        let event = MessageEvent {
            kind: "message",
            room: &m.room,
            offset: m.offset,
            id: &m.id,
            user: &m.user,
            text: &m.text,
            ts: m.ts,
            cid: m.cid.as_deref(),
        };
        // Writing strings and numbers into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.body, &event);
        self.events += 1;
    }

    /// How many events it holds.
    pub fn len(&self) -> usize {
        self.events
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// Its body so far, in bytes (without the closing `]}`).
    pub fn bytes(&self) -> usize {
        self.body.len()
    }

    /// The finished body.
    pub fn finish(mut self) -> Vec<u8> {
        self.body.extend_from_slice(b"]}");
        self.body
    }
}

impl Default for Batch {
    fn default() -> Self {
        Batch::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_the_protocols_json() {
        let mut b = Batch::new();
        assert!(b.is_empty());
        b.push(&StoredMessage {
            room: "r".into(),
            offset: 7,
            id: "X".into(),
            user: "ann".into(),
            text: "hi \"you\"".into(),
            ts: 12,
            cid: Some("c1".into()),
        });
        b.push(&StoredMessage {
            room: "r".into(),
            offset: 8,
            id: "Y".into(),
            user: "bob".into(),
            text: String::new(),
            ts: 13,
            cid: None,
        });
        assert_eq!(b.len(), 2);
        let body: serde_json::Value = serde_json::from_slice(&b.finish()).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"events": [
                {"type": "message", "room": "r", "offset": 7, "id": "X", "user": "ann",
                 "text": "hi \"you\"", "ts": 12, "cid": "c1"},
                {"type": "message", "room": "r", "offset": 8, "id": "Y", "user": "bob",
                 "text": "", "ts": 13},
            ]})
        );
    }
}
