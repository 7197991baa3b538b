//! Graceful drain on SIGTERM under traffic: acks in flight are sent, every acked message
//! is durable, clients see close code 1012, the process exits 0 in time. A second
//! signal exits at once.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{token, ReadEnd, Server, WsClient};
use serde_json::json;

fn start(data: &std::path::Path, extra: &[(&str, &str)]) -> Server {
    let mut env = vec![
        ("CORELAY_LIMITS_SEND_RATE", "100000"),
        ("CORELAY_LIMITS_SEND_BURST", "100000"),
    ];
    env.extend_from_slice(extra);
    Server::start_with(
        &env,
        &["--store", "embedded", "--data-dir", data.to_str().unwrap()],
        true,
    )
}

#[test]
fn sigterm_drains_under_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = start(&data, &[]);
    let port = server.port;
    let mut listener = WsClient::connect(port, &token("listener", Some(&["*"])));
    assert_eq!(listener.emit_ack("join", json!({"room": "d"}))["ok"], true);
    let sender = std::thread::spawn(move || {
        let mut c = WsClient::connect(port, &token("sender", Some(&["*"])));
        assert_eq!(c.emit_ack("join", json!({"room": "d"}))["ok"], true);
        let mut acked: HashMap<u64, String> = HashMap::new();
        let mut id = 0u64;
        'run: loop {
            let first = id + 1;
            for _ in 0..20 {
                id += 1;
                c.send_text(&format!(
                    "42{id}{}",
                    json!(["message", {"room": "d", "text": format!("m{id}")}])
                ));
            }
            for ack_id in first..=id {
                match c.try_wait_ack(ack_id) {
                    Ok(ack) if ack["ok"] == true => {
                        acked.insert(ack["offset"].as_u64().unwrap(), format!("m{ack_id}"));
                    }
                    Ok(ack) => assert_eq!(ack["error"]["code"], "unavailable", "{ack}"),
                    Err(_) => break 'run,
                }
            }
        }
        let close = c.expect_closed(Duration::from_secs(5));
        (acked, close)
    });
    // Let traffic flow for a while, reading as a live client does: a listener that stopped
    // reading would be cut as a slow consumer before the drain, and never see the 1012.
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        match listener.recv_frame(Duration::from_millis(50)) {
            Ok(f) => assert_ne!(f.opcode, 0x8, "closed before the drain"),
            Err(ReadEnd::Timeout) => {}
            Err(ReadEnd::Closed) => panic!("the listener was closed before the drain"),
        }
    }
    let signalled = Instant::now();
    server.signal(libc::SIGTERM);
    // The listener sees the 1012 close frame.
    let mut code = None;
    loop {
        match listener.recv_frame(Duration::from_secs(5)) {
            Ok(f) if f.opcode == 0x8 => {
                code = Some(u16::from_be_bytes([f.payload[0], f.payload[1]]));
                break;
            }
            Ok(_) => {}
            Err(ReadEnd::Closed) => break,
            Err(ReadEnd::Timeout) => panic!("no close from a draining server"),
        }
    }
    assert_eq!(code, Some(1012));
    assert_eq!(server.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(signalled.elapsed() < Duration::from_secs(10));
    let (acked, _) = sender.join().unwrap();
    assert!(acked.len() > 20, "traffic was flowing: {}", acked.len());
    // New connections are refused while/after draining.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());

    // Every acked message is durable.
    let server = start(&data, &[]);
    let mut reader = WsClient::connect(server.port, &token("reader", Some(&["*"])));
    let joined = reader.emit_ack("join", json!({"room": "d", "since": 0}));
    let latest = joined["offset"].as_u64().unwrap();
    assert!(latest >= acked.len() as u64);
    for (offset, text) in &acked {
        let page = reader.emit_ack(
            "history",
            json!({"room": "d", "after": offset - 1, "limit": 1}),
        );
        assert_eq!(page["messages"][0]["text"], *text, "offset {offset}");
    }
}

#[test]
fn second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(&dir.path().join("data"), &[]);
    let _client = WsClient::connect(server.port, &token("idle", Some(&["*"])));
    // A drain takes at least ~75 ms (it lets acks in the mesh land before closing), so a
    // second signal right behind the first must cut it short: exit code 1, not 0.
    server.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(10));
    server.signal(libc::SIGINT);
    assert_eq!(server.wait_exit(Duration::from_secs(3)), Some(1));
}

#[test]
fn systemd_is_told_ready_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut server = start(
        &dir.path().join("data"),
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 from the server");
    assert_eq!(&buf[..n], b"READY=1");
    server.signal(libc::SIGTERM);
    let n = sock.recv(&mut buf).expect("STOPPING=1 from the server");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert_eq!(server.wait_exit(Duration::from_secs(10)), Some(0));
}
