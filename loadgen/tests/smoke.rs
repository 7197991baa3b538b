//! Smoke test against the real corelay binary: `fanout` for ~3 s at a modest rate must see
//! zero loss and zero order violations; `connect` must open and hold every connection;
//! `plot` must draw the histogram files the runs wrote.
//!
//! The server binary comes from `CORELAY_BIN` (e.g. `target/debug/corelay`); without it the
//! tests print a note and pass.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const SECRET: &str = "0123456789abcdef0123";

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn corelay_bin() -> Option<PathBuf> {
    match std::env::var_os("CORELAY_BIN") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            println!("skipped: set CORELAY_BIN to the corelay server binary to run this test");
            None
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lg-smoke-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn start_server(bin: &Path, dir: &Path) -> Server {
    start_server_with(bin, dir, &[])
}

/// Starts corelay with extra environment (`CORELAY_…` settings).
fn start_server_with(bin: &Path, dir: &Path, env: &[(&str, &str)]) -> Server {
    let port = free_port();
    let mut child = Command::new(bin)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--shards",
            "2",
            "--store",
            "memory",
            "--data-dir",
        ])
        .arg(dir.join("data"))
        .current_dir(dir)
        .env("CORELAY_JWT_SECRET", SECRET)
        .env("CORELAY_LIMITS_SEND_RATE", "100000")
        .env("CORELAY_LIMITS_SEND_BURST", "100000")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start corelay");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("listening on") {
                let _ = tx.send(());
            }
        }
    });
    let server = Server { child, port };
    rx.recv_timeout(Duration::from_secs(30))
        .expect("corelay did not print `listening on` within 30 s");
    server
}

/// Runs the load generator; returns the JSON of its last stdout line.
fn loadgen(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_corelay-loadgen"))
        .args(args)
        .output()
        .expect("run corelay-loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "loadgen failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {stdout}"))
}

#[test]
fn fanout_connect_and_plot_against_corelay() {
    let Some(bin) = corelay_bin() else { return };
    let dir = scratch("fanout");
    let server = start_server(&bin, &dir);
    let target = format!("127.0.0.1:{}", server.port);
    let pid = server.child.id().to_string();
    let hdr = dir.join("fanout.hdr");
    let svg = dir.join("fanout.svg");

    let v = loadgen(&[
        "fanout",
        "--target",
        &target,
        "--secret",
        SECRET,
        "-c",
        "60",
        "--room-size",
        "6",
        "--rate",
        "300",
        "--warmup",
        "1s",
        "--duration",
        "3s",
        "--grace",
        "1s",
        "--server-pid",
        &pid,
        "--hdr-out",
        hdr.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
        "--no-progress",
    ]);
    println!("fanout: {v}");
    assert_eq!(v["scenario"], "fanout");
    assert_eq!(v["connected"], 60);
    let sent = v["sent"].as_u64().unwrap();
    assert!(sent >= 800, "sent {sent} of ~900");
    assert_eq!(v["acked"].as_u64(), Some(sent));
    assert_eq!(v["expected"].as_u64(), Some(sent * 5));
    assert_eq!(v["received"], v["expected"]);
    assert_eq!(v["loss"], 0, "loss: {v}");
    assert_eq!(v["order_violations"], 0, "order: {v}");
    assert_eq!(v["errors"], 0, "errors: {}", v["error_kinds"]);
    assert!(v["delivery_p99_ms"].as_f64().unwrap() > 0.0);
    assert!(v["server_rss_kib"].as_u64().unwrap() > 0);
    // The loadgen's own share of the latency is measured, and at this light load small.
    let send_lag_p99 = v["send_lag_p99_ms"].as_f64().expect("send_lag_p99_ms");
    assert!(
        (0.0..=v["ack_p99_ms"].as_f64().unwrap()).contains(&send_lag_p99),
        "send lag {send_lag_p99} ms is part of the ack latency: {v}"
    );
    assert!(v["loadgen_unread_kib_max"].as_f64().expect("unread") >= 0.0);
    assert!(v["loadgen_lag_ms"].as_f64().expect("loadgen_lag_ms") >= 0.0);
    assert!(hdr.exists() && svg.exists());

    let v = loadgen(&[
        "connect",
        "--target",
        &target,
        "--secret",
        SECRET,
        "-c",
        "100",
        "--hold",
        "1s",
        "--server-pid",
        &pid,
        "--hdr-out",
        dir.join("connect.hdr").to_str().unwrap(),
        "--no-progress",
    ]);
    println!("connect: {v}");
    assert_eq!(v["connected"], 100);
    assert_eq!(v["disconnects"], 0);
    assert_eq!(v["errors"], 0, "errors: {}", v["error_kinds"]);
    assert!(v["connect_p99_ms"].as_f64().unwrap() > 0.0);
    assert!(v["kib_per_connection"].is_number());

    let both = dir.join("both.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_corelay-loadgen"))
        .arg("plot")
        .arg(&hdr)
        .arg(dir.join("connect.hdr"))
        .arg("--out")
        .arg(&both)
        .output()
        .expect("run plot");
    assert!(out.status.success());
    let text = std::fs::read_to_string(&both).unwrap();
    assert_eq!(text.matches("<polyline").count(), 2);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refuses_remote_targets_and_bad_secrets() {
    let out = Command::new(env!("CARGO_BIN_EXE_corelay-loadgen"))
        .args(["fanout", "--target", "192.0.2.1:80", "--no-progress"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-remote"));

    let Some(bin) = corelay_bin() else { return };
    let dir = scratch("auth");
    let server = start_server(&bin, &dir);
    let out = Command::new(env!("CARGO_BIN_EXE_corelay-loadgen"))
        .args(["fanout", "--target", &format!("127.0.0.1:{}", server.port)])
        .args([
            "--secret",
            "wrong-secret-wrong-secret",
            "-c",
            "4",
            "-m",
            "2",
            "-d",
            "1s",
        ])
        .args(["--no-progress"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unauthorized"), "{stderr}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server that refuses new sessions (HTTP 429, its per-address limit) gets a named error
/// kind and a message that says which limit, not a generic upgrade failure.
#[test]
fn connect_names_the_servers_rate_limit() {
    let Some(bin) = corelay_bin() else { return };
    let dir = scratch("ratelimit");
    let server = start_server_with(
        &bin,
        &dir,
        &[
            ("CORELAY_LIMITS_CONNECT_RATE_PER_IP", "1"),
            ("CORELAY_LIMITS_CONNECT_BURST_PER_IP", "5"),
        ],
    );
    let out = Command::new(env!("CARGO_BIN_EXE_corelay-loadgen"))
        .args(["connect", "--target"])
        .arg(format!("127.0.0.1:{}", server.port))
        .args([
            "--secret",
            SECRET,
            "-c",
            "20",
            "--hold",
            "1s",
            "--no-progress",
        ])
        .output()
        .expect("run corelay-loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("last line is not JSON ({e}): {stdout}"));
    let connected = v["connected"].as_u64().unwrap();
    let limited = v["error_kinds"]["connect_rate_limited"]
        .as_u64()
        .unwrap_or(0);
    assert!((5..=7).contains(&connected), "the burst lets ~5 in: {v}");
    assert_eq!(connected + limited, 20, "every refusal is named: {v}");
    assert!(
        stderr.contains("HTTP 429") && stderr.contains("connect_rate_per_ip"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
