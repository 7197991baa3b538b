//! A reconnecting chat client for fault tests, built on [`WsClient`]: it connects to a
//! host's address, joins one room with `since` = the last offset it got (so a reconnect
//! replays what it missed), sends with a `cid` (so a retry after a lost ack stores
//! nothing twice), and notices a dead connection by the Engine.IO pings stopping (no
//! frame within the server's `pingInterval + pingTimeout`), or by an ack not coming
//! within 5 s.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{token, ReadEnd, WsClient};

/// How long past the server's `pingInterval + pingTimeout` (from its open packet) a
/// silent connection is kept before it is called dead, as socket.io-client does.
pub const SILENCE_SLACK: Duration = Duration::from_millis(500);

/// Why a send did not give an ack.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made.
    Down(String),
    /// The connection ended or went quiet before the ack.
    Lost,
}

/// One user in one room, on one host, reconnecting as needed.
pub struct ChatClient {
    /// The host (or proxy) it connects to.
    pub addr: SocketAddr,
    user: String,
    room: String,
    ws: Option<WsClient>,
    next_id: u64,
    last_heard: Instant,
    /// No frame for this long means the connection is dead (from the open packet).
    silence: Duration,
    /// Every message it got (live or replayed on join): offset, text, when.
    pub got: Vec<(u64, String, Instant)>,
    /// How many connections it made.
    pub connects: u32,
}

impl ChatClient {
    /// A client for `user` in `room` at `addr`; not connected yet.
    pub fn new(addr: SocketAddr, user: &str, room: &str) -> ChatClient {
        ChatClient {
            addr,
            user: user.to_owned(),
            room: room.to_owned(),
            ws: None,
            next_id: 0,
            last_heard: Instant::now(),
            silence: Duration::from_secs(45),
            got: Vec::new(),
            connects: 0,
        }
    }

    /// The highest offset it got (0 before any): what it joins `since`.
    pub fn last_offset(&self) -> u64 {
        self.got.iter().map(|m| m.0).max().unwrap_or(0)
    }

    /// How many different offsets it got.
    pub fn distinct(&self) -> usize {
        self.got
            .iter()
            .map(|m| m.0)
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    /// Connects and joins if not connected; `Err` says why it could not.
    pub fn ensure(&mut self) -> Result<(), String> {
        if self.ws.is_some() {
            return Ok(());
        }
        let mut ws = WsClient::handshake_at(self.addr, "/socket.io/?EIO=4&transport=websocket")?;
        let open = ws
            .recv_text(Duration::from_secs(5))
            .map_err(|e| format!("open: {e:?}"))?;
        let Some(open) = open.strip_prefix('0') else {
            return Err(format!("expected open, got {open}"));
        };
        let open: Value = serde_json::from_str(open).map_err(|e| format!("open: {e}"))?;
        let ms = |k: &str| open[k].as_u64().unwrap_or(25_000);
        self.silence =
            Duration::from_millis(ms("pingInterval") + ms("pingTimeout")) + SILENCE_SLACK;
        ws.send_text(&format!(
            "40{{\"token\":\"{}\"}}",
            token(&self.user, Some(&["*"]))
        ));
        let reply = ws
            .recv_text(Duration::from_secs(5))
            .map_err(|e| format!("connect: {e:?}"))?;
        if !reply.starts_with("40{\"sid\":") {
            return Err(format!("CONNECT refused: {reply}"));
        }
        self.ws = Some(ws);
        self.last_heard = Instant::now();
        let since = self.last_offset();
        let ack = self
            .call("join", json!({"room": self.room, "since": since}))
            .map_err(|e| format!("join: {e:?}"))?;
        if ack["ok"] != true {
            self.ws = None;
            return Err(format!("join refused: {ack}"));
        }
        assert_ne!(ack["truncated"], true, "replay truncated: {ack}");
        for m in ack["missed"].as_array().cloned().unwrap_or_default() {
            self.record(&m);
        }
        self.connects += 1;
        Ok(())
    }

    /// Sends `text` with `cid`; the ack (which may be an error ack such as `unavailable`).
    pub fn send(&mut self, text: &str, cid: &str) -> Result<Value, SendError> {
        self.ensure().map_err(SendError::Down)?;
        self.call(
            "message",
            json!({"room": self.room, "text": text, "cid": cid}),
        )
    }

    /// Emits `event` and waits for its ack; a lost connection is dropped.
    fn call(&mut self, event: &str, payload: Value) -> Result<Value, SendError> {
        self.next_id += 1;
        let id = self.next_id;
        let ws = self.ws.as_mut().ok_or(SendError::Lost)?;
        ws.send_text(&format!("42{id}{}", json!([event, payload])));
        let res = ws.try_wait_ack(id);
        self.drain_kept();
        match res {
            Ok(v) => {
                self.last_heard = Instant::now();
                Ok(v)
            }
            Err(_) => {
                self.ws = None;
                Err(SendError::Lost)
            }
        }
    }

    /// Moves the events kept while waiting for an ack into `got`.
    fn drain_kept(&mut self) {
        let Some(ws) = self.ws.as_mut() else { return };
        let kept = std::mem::take(&mut ws.events);
        for ev in kept {
            if ev[0] == "message" {
                self.record(&ev[1]);
            }
        }
    }

    fn record(&mut self, m: &Value) {
        if m["room"] != self.room.as_str() {
            return;
        }
        let offset = m["offset"].as_u64().expect("offset");
        let text = m["text"].as_str().expect("text").to_owned();
        self.got.push((offset, text, Instant::now()));
    }

    /// Reads for up to `dur`: messages go to `got`, pings are answered, a closed or silent
    /// connection is dropped, and a dropped one is reconnected.
    pub fn pump(&mut self, dur: Duration) {
        if self.ensure().is_err() {
            std::thread::sleep(dur.min(Duration::from_millis(200)));
            return;
        }
        let deadline = Instant::now() + dur;
        while let Some(ws) = self.ws.as_mut() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match ws.recv_frame(left.min(Duration::from_millis(200))) {
                Ok(f) if f.opcode == 0x1 => {
                    self.last_heard = Instant::now();
                    let text = f.text();
                    if text == "2" {
                        ws.send_text("3");
                    } else if let Some(json) = text.strip_prefix("42") {
                        let ev: Value = serde_json::from_str(json).expect("event json");
                        if ev[0] == "message" {
                            self.record(&ev[1]);
                        }
                    }
                }
                Ok(f) if f.opcode == 0x8 => self.ws = None,
                Ok(_) => self.last_heard = Instant::now(),
                Err(ReadEnd::Closed) => self.ws = None,
                Err(ReadEnd::Timeout) => {
                    if self.last_heard.elapsed() > self.silence {
                        self.ws = None;
                    }
                }
            }
        }
    }
}

impl ChatClient {
    /// The room's whole history, `(offset, text)` oldest first, read with `history`
    /// pages (connecting first if needed).
    pub fn history(&mut self) -> Vec<(u64, String)> {
        self.ensure().expect("connect for history");
        let mut out: Vec<(u64, String)> = Vec::new();
        loop {
            let after = out.last().map_or(0, |m| m.0);
            let h = self
                .call(
                    "history",
                    json!({"room": self.room, "after": after, "limit": 100}),
                )
                .expect("history ack");
            assert_eq!(h["ok"], true, "{h}");
            let page = h["messages"].as_array().expect("messages").clone();
            if page.is_empty() {
                return out;
            }
            for m in page {
                let offset = m["offset"].as_u64().expect("offset");
                out.push((offset, m["text"].as_str().expect("text").to_owned()));
            }
        }
    }
}
