//! Senders and receivers in one room around a fault, and what every fault test checks.
//!
//! Receivers join first (before any message) and read until they have every offset the
//! senders got acked. Each sender sends `user:n` with cid `user:n`, paced, and retries a
//! send (same cid) until it is acked: refused (`unavailable`), lost connection or no
//! connection alike. [`Outcome::check`] then asserts: offsets acked once each and
//! contiguous from 1, every receiver got every one exactly once and in order with the
//! acked text, and the history holds exactly them. Times are kept for recovery and p99.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::chat::{ChatClient, SendError};
use super::outcome::Outcome;

/// One acked send.
#[derive(Clone, Debug)]
pub struct Sent {
    /// Its text (also its cid).
    pub text: String,
    /// The offset the ack gave.
    pub offset: u64,
    /// When it was first tried.
    pub first_try: Instant,
    /// When the ack came.
    pub acked: Instant,
    /// How many tries it took.
    pub tries: u32,
    /// Whether an earlier try had stored it (its ack was lost, and the retry with the
    /// same cid got the first ack back: its `ts` is older than the last try).
    pub deduped: bool,
}

/// How one try of a send ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Try {
    /// Acked ok.
    Acked,
    /// Refused with `unavailable`.
    Refused,
    /// No connection, or it ended (or went quiet) before the ack.
    Lost,
}

/// What one sender did.
#[derive(Debug, Default)]
pub struct SenderLog {
    /// Its acked sends, in order.
    pub sent: Vec<Sent>,
    /// Every try: when, and how it ended.
    pub tries: Vec<(Instant, Try)>,
}

/// Senders and receivers running; [`Run::finish`] stops them.
pub struct Run {
    stop: Arc<AtomicBool>,
    last: Arc<AtomicU64>,
    senders: Vec<JoinHandle<SenderLog>>,
    receivers: Vec<JoinHandle<ChatClient>>,
    room: String,
}

impl Run {
    /// Starts receivers (`(addr, user)`), waits until each has joined, then starts the
    /// senders, each sending one message every `pace`.
    pub fn start(
        room: &str,
        senders: &[(SocketAddr, &str)],
        receivers: &[(SocketAddr, &str)],
        pace: Duration,
    ) -> Run {
        let stop = Arc::new(AtomicBool::new(false));
        let last = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = mpsc::channel();
        let receivers: Vec<_> = receivers
            .iter()
            .map(|&(addr, user)| {
                let (stop, last, ready) = (stop.clone(), last.clone(), ready_tx.clone());
                let mut c = ChatClient::new(addr, user, room);
                std::thread::spawn(move || {
                    c.ensure().expect("receiver joins");
                    let _ = ready.send(());
                    let mut done_by = None;
                    loop {
                        c.pump(Duration::from_millis(200));
                        if !stop.load(Ordering::SeqCst) {
                            continue;
                        }
                        let target = last.load(Ordering::SeqCst);
                        if target != 0 && c.distinct() as u64 >= target {
                            return c;
                        }
                        let by = *done_by.get_or_insert(Instant::now() + Duration::from_secs(20));
                        if Instant::now() > by {
                            return c;
                        }
                    }
                })
            })
            .collect();
        for _ in 0..receivers.len() {
            ready_rx
                .recv_timeout(Duration::from_secs(20))
                .expect("receivers ready");
        }
        let senders = senders
            .iter()
            .map(|&(addr, user)| {
                let stop = stop.clone();
                let (user, room) = (user.to_owned(), room.to_owned());
                std::thread::spawn(move || {
                    send_loop(ChatClient::new(addr, &user, &room), &user, pace, &stop)
                })
            })
            .collect();
        Run {
            stop,
            last,
            senders,
            receivers,
            room: room.to_owned(),
        }
    }

    /// Stops sending, waits for every sender to have its last message acked and every
    /// receiver to have all of them (at most 20 s more), reads the room's history at
    /// `history_at`, and gathers what happened.
    pub fn finish(self, history_at: SocketAddr) -> Outcome {
        self.stop.store(true, Ordering::SeqCst);
        let senders: Vec<SenderLog> = self
            .senders
            .into_iter()
            .map(|h| h.join().expect("sender"))
            .collect();
        let last = senders
            .iter()
            .flat_map(|s| s.sent.iter().map(|m| m.offset))
            .max()
            .unwrap_or(0);
        self.last.store(last, Ordering::SeqCst);
        let receivers: Vec<ChatClient> = self
            .receivers
            .into_iter()
            .map(|h| h.join().expect("receiver"))
            .collect();
        let mut reader = ChatClient::new(history_at, "auditor", &self.room);
        let history = reader.history();
        Outcome {
            senders,
            receivers,
            history,
        }
    }
}

fn send_loop(mut c: ChatClient, user: &str, pace: Duration, stop: &AtomicBool) -> SenderLog {
    let mut log = SenderLog::default();
    let mut n = 0u32;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let text = format!("{user}:{n}");
        let first_try = Instant::now();
        let mut tries = 0;
        loop {
            tries += 1;
            let at = Instant::now();
            let wall_ms = corelay::ids::now_ms();
            match c.send(&text, &text) {
                Ok(ack) if ack["ok"] == true => {
                    log.tries.push((at, Try::Acked));
                    log.sent.push(Sent {
                        text: text.clone(),
                        offset: ack["offset"].as_u64().expect("offset"),
                        first_try,
                        acked: Instant::now(),
                        tries,
                        deduped: tries > 1 && ack["ts"].as_u64().is_some_and(|ts| ts < wall_ms),
                    });
                    break;
                }
                Ok(ack) => {
                    assert_eq!(ack["error"]["code"], "unavailable", "{ack}");
                    log.tries.push((at, Try::Refused));
                }
                Err(SendError::Down(_) | SendError::Lost) => log.tries.push((at, Try::Lost)),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(pace);
    }
    log
}
