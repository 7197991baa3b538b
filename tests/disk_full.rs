//! A full disk under the embedded store: sends get `unavailable` (nothing half-stored),
//! the connection stays, history still reads, /healthz says the store is not ok.
//! Needs root to mount a small tmpfs; says so and skips otherwise.

mod common;

use std::process::Command;

use common::{token, Server, WsClient};
use serde_json::json;

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn disk_full_gives_unavailable_and_reads_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(dir.path())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        println!("skipped: mounting a tmpfs needs root");
        return;
    }
    let _mount = Mount(dir.path().to_path_buf());
    let data = dir.path().join("data");
    let server = Server::start_with(
        &[
            ("CORELAY_LIMITS_SEND_RATE", "100000"),
            ("CORELAY_LIMITS_SEND_BURST", "100000"),
        ],
        &["--store", "embedded", "--data-dir", data.to_str().unwrap()],
        true,
    );
    let mut c = WsClient::connect(server.port, &token("filler", Some(&["*"])));
    assert_eq!(c.emit_ack("join", json!({"room": "full"}))["ok"], true);
    let text = "f".repeat(4000);
    let mut last_ok = 0u64;
    let mut refused = None;
    for i in 0..20_000 {
        let ack = c.emit_ack(
            "message",
            json!({"room": "full", "text": text, "cid": format!("c{i}")}),
        );
        if ack["ok"] == true {
            let offset = ack["offset"].as_u64().unwrap();
            assert_eq!(offset, last_ok + 1, "offsets stay contiguous");
            last_ok = offset;
        } else {
            refused = Some(ack);
            break;
        }
    }
    let refused = refused.expect("the disk never filled");
    assert_eq!(refused["error"]["code"], "unavailable", "{refused}");
    assert!(last_ok > 0);
    // Still connected; reads still work and end at the last acked message.
    let hist = c.emit_ack("history", json!({"room": "full", "limit": 1}));
    assert_eq!(hist["messages"][0]["offset"], last_ok, "{hist}");
    let again = c.emit_ack("message", json!({"room": "full", "text": "more"}));
    assert_eq!(again["error"]["code"], "unavailable");
    assert_eq!(server.health()["store"]["ok"], false);
}
