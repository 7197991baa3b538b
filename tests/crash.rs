//! SIGKILL mid-burst: every acked message survives at its acked offset, offsets stay
//! contiguous, and retrying the unacked `cid`s stores each exactly once.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{token, Server, WsClient};
use serde_json::{json, Value};

const SENDERS: usize = 4;
const KILL_AFTER_ACKS: usize = 400;

fn start(data: &std::path::Path) -> Server {
    Server::start_with(
        &[
            ("CORELAY_LIMITS_SEND_RATE", "100000"),
            ("CORELAY_LIMITS_SEND_BURST", "100000"),
        ],
        &["--store", "embedded", "--data-dir", data.to_str().unwrap()],
        true,
    )
}

/// Every message of the room, oldest first, paging through history.
fn read_all(c: &mut WsClient, room: &str) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    loop {
        let after = all.last().map_or(0, |m| m["offset"].as_u64().unwrap());
        let page = c.emit_ack(
            "history",
            json!({"room": room, "after": after, "limit": 100}),
        );
        let msgs = page["messages"].as_array().unwrap().clone();
        if msgs.is_empty() {
            return all;
        }
        all.extend(msgs);
    }
}

#[test]
fn acked_messages_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(&data);
    let port = server.port;
    // cid → (offset, text) for every ack; every cid that was sent.
    let acked: Arc<Mutex<HashMap<String, (u64, String)>>> = Arc::default();
    let sent: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let total_acks = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for t in 0..SENDERS {
        let (acked, sent, total_acks) = (acked.clone(), sent.clone(), total_acks.clone());
        threads.push(std::thread::spawn(move || {
            let mut c = WsClient::connect(port, &token(&format!("sender{t}"), Some(&["*"])));
            assert_eq!(c.emit_ack("join", json!({"room": "crash"}))["ok"], true);
            let mut n = 0u64;
            'burst: loop {
                let mut window = Vec::new();
                for _ in 0..16 {
                    n += 1;
                    let cid = format!("t{t}-{n}");
                    let text = format!("message {n} from sender {t}");
                    let id = 1000 + n;
                    c.send_text(&format!(
                        "42{id}{}",
                        json!(["message", {"room": "crash", "text": text, "cid": cid}])
                    ));
                    sent.lock().unwrap().push((cid.clone(), text.clone()));
                    window.push((id, cid, text));
                }
                for (id, cid, text) in window {
                    match c.try_wait_ack(id) {
                        Ok(ack) if ack["ok"] == true => {
                            acked
                                .lock()
                                .unwrap()
                                .insert(cid, (ack["offset"].as_u64().unwrap(), text));
                            total_acks.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => break 'burst, // the server died
                    }
                }
            }
        }));
    }
    while total_acks.load(Ordering::SeqCst) < KILL_AFTER_ACKS {
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(server); // SIGKILL, mid-burst
    for t in threads {
        t.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let sent = sent.lock().unwrap().clone();
    assert!(acked.len() >= KILL_AFTER_ACKS);
    assert!(
        sent.len() > acked.len(),
        "the kill should leave some sends unacked"
    );

    let server = start(&data);
    let mut reader = WsClient::connect(server.port, &token("reader", Some(&["*"])));
    assert_eq!(
        reader.emit_ack("join", json!({"room": "crash"}))["ok"],
        true
    );
    let history = read_all(&mut reader, "crash");
    let by_offset: BTreeMap<u64, &Value> = history
        .iter()
        .map(|m| (m["offset"].as_u64().unwrap(), m))
        .collect();
    // Offsets are 1..=n without gaps.
    let offsets: Vec<u64> = by_offset.keys().copied().collect();
    assert_eq!(offsets, (1..=history.len() as u64).collect::<Vec<_>>());
    // Every acked message is there, at its acked offset, unchanged.
    for (cid, (offset, text)) in &acked {
        let m = by_offset
            .get(offset)
            .unwrap_or_else(|| panic!("acked offset {offset} lost"));
        assert_eq!(m["cid"], *cid);
        assert_eq!(m["text"], *text);
    }

    // Retry every send: acked ones get their first ack back; unacked ones are stored once.
    let mut retrier = WsClient::connect(server.port, &token("retrier", Some(&["*"])));
    assert_eq!(
        retrier.emit_ack("join", json!({"room": "crash"}))["ok"],
        true
    );
    // The same user must retry: cid dedupe is per user.
    let mut per_sender: HashMap<String, WsClient> = HashMap::new();
    for (cid, text) in &sent {
        let user = format!("sender{}", &cid[1..cid.find('-').unwrap()]);
        let c = per_sender.entry(user.clone()).or_insert_with(|| {
            let mut c = WsClient::connect(server.port, &token(&user, Some(&["*"])));
            assert_eq!(c.emit_ack("join", json!({"room": "crash"}))["ok"], true);
            c
        });
        let ack = c.emit_ack(
            "message",
            json!({"room": "crash", "text": text, "cid": cid}),
        );
        assert_eq!(ack["ok"], true, "{ack}");
        if let Some((offset, _)) = acked.get(cid) {
            assert_eq!(
                ack["offset"], *offset,
                "a retried acked cid must get its first ack"
            );
        }
    }
    let history = read_all(&mut retrier, "crash");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in &history {
        *seen
            .entry(m["cid"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), sent.len(), "every sent cid is stored");
    assert!(seen.values().all(|&n| n == 1), "a cid stored twice");
    let offsets: Vec<u64> = history
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, (1..=sent.len() as u64).collect::<Vec<_>>());
}
