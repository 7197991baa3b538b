//! A room member during a fan-out run: sends when the pacer says so, reads deliveries and
//! acks, checks order, and feeds the run-wide counters and histograms.

use crate::client::{Conn, Incoming};
use crate::clock::Clock;
use crate::codec::{self, SioKind};
use crate::stats::{Counters, Errors, OrderReport, OrderTracker, SharedHist};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// What the members of one run share.
pub struct RunCtx {
    /// Clock of the send timestamps.
    pub clock: Clock,
    /// Start of the measured window (Unix ns).
    pub window_start_ns: u64,
    /// End of the measured window (Unix ns, exclusive).
    pub window_end_ns: u64,
    /// Counters.
    pub counters: Counters,
    /// Send → ack latency of window messages.
    pub ack_hist: SharedHist,
    /// Send → delivery latency of window messages at measured receivers.
    pub delivery_hist: SharedHist,
    /// How late the loadgen wrote each window message, against its scheduled time: the
    /// loadgen's own share of the ack and delivery latency on the sending side.
    pub send_lag_hist: SharedHist,
    /// Errors by kind.
    pub errors: Arc<Errors>,
    /// Highest acked offset per room (for the history scenario's checks).
    pub room_latest: Vec<AtomicU64>,
    /// Message text is padded to at least this many bytes.
    pub text_bytes: usize,
}

impl RunCtx {
    /// Whether a message sent at `t_ns` belongs to the measured window.
    pub fn in_window(&self, t_ns: u64) -> bool {
        t_ns >= self.window_start_ns && t_ns < self.window_end_ns
    }
}

/// An order from the pacer.
#[derive(Debug, Clone, Copy)]
pub enum Cmd {
    /// Send one message stamped with this (scheduled) time, Unix ns.
    Send {
        /// The scheduled send time.
        t_ns: u64,
    },
}

/// Who a member is.
#[derive(Debug, Clone)]
pub struct Member {
    /// Member index (its user is `lg-<idx>`); rides in message texts as `s=`.
    pub idx: usize,
    /// Room index.
    pub room_idx: usize,
    /// Room name.
    pub room: Arc<str>,
    /// Measured members in the room, this one included.
    pub members: u64,
    /// The room's latest offset at join.
    pub join_offset: u64,
}

/// What a member reports when it stops.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    /// Order violations seen by this member.
    pub order: OrderReport,
    /// The connection was lost before the end.
    pub disconnected: bool,
}

/// The fields of a sent message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Scheduled send time, Unix ns.
    pub t_ns: u64,
    /// Sender's member index.
    pub sender: usize,
    /// Sender's sequence number.
    pub seq: u64,
}

impl Stamp {
    /// The text `t=<ns>;s=<sender>;n=<seq>;`, padded with `.` to `min_len` bytes.
    pub fn to_text(&self, min_len: usize) -> String {
        let mut s = format!("t={};s={};n={};", self.t_ns, self.sender, self.seq);
        if s.len() < min_len {
            s.extend(std::iter::repeat_n('.', min_len - s.len()));
        }
        s
    }

    /// Parses a text made by [`Stamp::to_text`].
    pub fn parse(text: &str) -> Option<Stamp> {
        let mut t = None;
        let mut s = None;
        let mut n = None;
        for part in text.split(';').take(3) {
            let (k, v) = part.split_once('=')?;
            match k {
                "t" => t = v.parse().ok(),
                "s" => s = v.parse().ok(),
                "n" => n = v.parse().ok(),
                _ => return None,
            }
        }
        Some(Stamp {
            t_ns: t?,
            sender: s?,
            seq: n?,
        })
    }
}

#[derive(Serialize)]
struct Outgoing<'a> {
    room: &'a str,
    text: &'a str,
}

#[derive(Deserialize)]
struct Delivery<'a> {
    #[serde(borrow)]
    room: Cow<'a, str>,
    offset: u64,
    #[serde(borrow)]
    text: Cow<'a, str>,
}

#[derive(Deserialize)]
struct AckBody {
    #[serde(default)]
    ok: bool,
    offset: Option<u64>,
    error: Option<AckErr>,
}

#[derive(Deserialize)]
struct AckErr {
    code: String,
}

async fn next_cmd(cmds: &mut Option<mpsc::Receiver<Cmd>>) -> Option<Cmd> {
    match cmds {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

struct State {
    m: Member,
    ctx: Arc<RunCtx>,
    order: OrderTracker,
    pending: HashMap<u64, (u64, bool)>,
    lat_batch: Vec<u64>,
    seq: u64,
}

impl State {
    fn on_packet(&mut self, text: &str) -> Result<(), &'static str> {
        let p = codec::decode_sio(text).map_err(|_| "bad_packet")?;
        match p.kind {
            SioKind::Event if codec::event_name(p.data) == Some("message") => {
                let (_, d): (IgnoredAny, Delivery<'_>) =
                    serde_json::from_str(p.data).map_err(|_| "bad_delivery")?;
                self.ctx.counters.deliveries_total.fetch_add(1, Relaxed);
                if *d.room != *self.m.room {
                    return Err("foreign_room");
                }
                self.order.on_delivery(d.offset);
                let stamp = Stamp::parse(&d.text).ok_or("foreign_message")?;
                if stamp.sender == self.m.idx {
                    return Err("self_delivery");
                }
                if self.ctx.in_window(stamp.t_ns) {
                    self.ctx.counters.on_window_delivery();
                    let now = self.ctx.clock.now_ns();
                    self.lat_batch.push(now.saturating_sub(stamp.t_ns) / 1000);
                    if self.lat_batch.len() >= 64 {
                        self.ctx.delivery_hist.record_all(&self.lat_batch);
                        self.lat_batch.clear();
                    }
                }
                Ok(())
            }
            SioKind::Ack => {
                let Some((t_ns, in_window)) = p.id.and_then(|id| self.pending.remove(&id)) else {
                    return Err("unknown_ack");
                };
                let (body,): (AckBody,) = serde_json::from_str(p.data).map_err(|_| "bad_ack")?;
                let members = self.m.members;
                if body.ok {
                    self.ctx.counters.on_ack(in_window, true, members);
                    if in_window {
                        let now = self.ctx.clock.now_ns();
                        self.ctx.ack_hist.record(now.saturating_sub(t_ns) / 1000);
                    }
                    if let Some(off) = body.offset {
                        self.order.on_own_ack(off);
                        if let Some(l) = self.ctx.room_latest.get(self.m.room_idx) {
                            l.fetch_max(off, Relaxed);
                        }
                    }
                    Ok(())
                } else {
                    self.ctx.counters.on_ack(in_window, false, members);
                    let code = body
                        .error
                        .map(|e| e.code)
                        .unwrap_or_else(|| "bad_ack".into());
                    self.ctx.errors.add(&format!("ack_{code}"));
                    Ok(())
                }
            }
            SioKind::Disconnect => Err("server_disconnect"),
            _ => Ok(()),
        }
    }

    fn send_frame(&mut self, id: u64, t_ns: u64) -> Result<String, &'static str> {
        self.seq += 1;
        let stamp = Stamp {
            t_ns,
            sender: self.m.idx,
            seq: self.seq,
        };
        let text = stamp.to_text(self.ctx.text_bytes);
        let frame = codec::encode_event(
            Some(id),
            "message",
            &Outgoing {
                room: &self.m.room,
                text: &text,
            },
        )
        .map_err(|_| "encode")?;
        let in_window = self.ctx.in_window(t_ns);
        self.ctx.counters.on_send(in_window, self.m.members);
        self.pending.insert(id, (t_ns, in_window));
        Ok(frame)
    }
}

/// Runs a member until `stop` turns true (or its connection is lost).
pub async fn run(
    mut conn: Conn,
    m: Member,
    ctx: Arc<RunCtx>,
    mut cmds: Option<mpsc::Receiver<Cmd>>,
    mut stop: watch::Receiver<bool>,
) -> Outcome {
    let mut st = State {
        order: OrderTracker::new(m.join_offset),
        m,
        ctx,
        pending: HashMap::new(),
        lat_batch: Vec::with_capacity(64),
        seq: 0,
    };
    let mut disconnected = false;
    // One wait for the stop, kept across iterations: a fresh one per frame registered and
    // dropped a waiter on every delivery (3.5% of the loadgen's CPU at capacity).
    let stopped = super::stopped(&mut stop);
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            cmd = next_cmd(&mut cmds) => match cmd {
                Some(Cmd::Send { t_ns }) => {
                    let id = conn.take_id();
                    match st.send_frame(id, t_ns) {
                        Ok(frame) => {
                            if conn.send(frame).await.is_err() {
                                st.ctx.errors.add("send_failed");
                                disconnected = true;
                                break;
                            }
                            if st.ctx.in_window(t_ns) {
                                let late = st.ctx.clock.now_ns().saturating_sub(t_ns);
                                st.ctx.send_lag_hist.record(late / 1000);
                            }
                        }
                        Err(kind) => st.ctx.errors.add(kind),
                    }
                }
                None => cmds = None,
            },
            frame = conn.recv() => match frame {
                Ok(Some(Incoming::Packet(p))) => {
                    // The frame was `4` + this text.
                    let bytes = crate::backlog::frame_bytes(p.text().len() + 1);
                    st.ctx.counters.bytes_in.fetch_add(bytes, Relaxed);
                    if let Err(kind) = st.on_packet(p.text()) {
                        st.ctx.errors.add(kind);
                        if kind == "server_disconnect" {
                            disconnected = true;
                            break;
                        }
                    }
                }
                Ok(Some(Incoming::Ping(p))) => {
                    if conn.pong(&p).await.is_err() {
                        st.ctx.errors.add("send_failed");
                        disconnected = true;
                        break;
                    }
                }
                Ok(Some(Incoming::Other)) => {}
                Ok(None) => {
                    st.ctx.errors.add("disconnected");
                    disconnected = true;
                    break;
                }
                Err(_) => {
                    st.ctx.errors.add("read_error");
                    disconnected = true;
                    break;
                }
            },
        }
    }
    st.ctx.delivery_hist.record_all(&st.lat_batch);
    let missing = st.pending.values().filter(|(_, w)| *w).count() as u64;
    st.ctx.errors.add_n("ack_missing", missing);
    if !disconnected {
        conn.close(Duration::from_millis(500)).await;
    }
    Outcome {
        order: st.order.report(),
        disconnected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trip() {
        let s = Stamp {
            t_ns: 1_700_000_000_123_456_789,
            sender: 42,
            seq: 7,
        };
        let text = s.to_text(0);
        assert_eq!(text, "t=1700000000123456789;s=42;n=7;");
        assert_eq!(Stamp::parse(&text), Some(s));
        let padded = s.to_text(100);
        assert_eq!(padded.len(), 100);
        assert_eq!(Stamp::parse(&padded), Some(s));
        assert_eq!(Stamp::parse("hello"), None);
        assert_eq!(Stamp::parse("t=1;s=x;n=1;"), None);
        assert_eq!(Stamp::parse("t=1;s=2"), None);
    }
}
