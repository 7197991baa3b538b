//! Test helpers: start the real `corelay` binary on a free port, and a small blocking
//! WebSocket client that speaks Engine.IO / Socket.IO byte by byte.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use corelay::auth::Authenticator;
use corelay::transport::websocket::client_frame;
use serde_json::Value;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

/// The JWT secret test servers run with.
pub const SECRET: &str = "test-secret-0123456789abcdef";

/// A running `corelay serve`, killed on drop.
pub struct Server {
    pub port: u16,
    child: Child,
    pub output: mpsc::Receiver<String>,
    /// What it printed before its ready line (start-up warnings).
    pub startup: Vec<String>,
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// Starts a server with `--shards 2`, the memory store, the test secret and `env`.
    pub fn start(env: &[(&str, &str)]) -> Server {
        Server::start_with(env, &["--store", "memory"], true)
    }

    /// Starts a server with extra args; `secret` false runs it in dev mode.
    pub fn start_with(env: &[(&str, &str)], args: &[&str], secret: bool) -> Server {
        Server::start_sharded(2, env, args, secret)
    }

    /// Starts a server with `shards` shards and extra args.
    pub fn start_sharded(
        shards: usize,
        env: &[(&str, &str)],
        args: &[&str],
        secret: bool,
    ) -> Server {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_corelay"));
        cmd.args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--shards",
            &shards.to_string(),
        ])
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("CORELAY_JWT_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if secret {
            cmd.env("CORELAY_JWT_SECRET", SECRET);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start corelay");
        let (tx, rx) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("[server] {line}");
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut startup = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.contains("listening on") => break,
                Ok(line) => startup.push(line),
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("corelay exited during start: {status}");
                    }
                    assert!(Instant::now() < deadline, "corelay did not start in time");
                }
            }
        }
        Server {
            port,
            child,
            output: rx,
            startup,
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the server, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// GET a path; returns status and body.
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.port, path)
    }

    /// The /healthz JSON.
    pub fn health(&self) -> Value {
        let (status, body) = self.get("/healthz");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Open connections per shard, from /healthz.
    pub fn connections_per_shard(&self) -> Vec<u64> {
        self.health()["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["connections"].as_u64().unwrap())
            .collect()
    }

    /// A metric's value summed over its label sets, from /metrics.
    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics");
        body.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| {
                let rest = &l[name.len()..];
                rest.starts_with(' ') || rest.starts_with('{')
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split(' ').nth(1).unwrap().parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Mints a connect token with the test secret.
pub fn token(sub: &str, rooms: Option<&[&str]>) -> String {
    let rooms: Option<Vec<String>> = rooms.map(|r| r.iter().map(|s| s.to_string()).collect());
    Authenticator::new(Some(SECRET))
        .mint(sub, None, rooms.as_deref(), 3600)
        .unwrap()
}

/// One server frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The payload as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// Why a read ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadEnd {
    Timeout,
    Closed,
}

/// A blocking WebSocket client with byte-level control.
pub struct WsClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
    next_ack: u64,
    /// Events received while waiting for something else.
    pub events: Vec<Value>,
    /// Acks received while waiting for another one (acks may come in any order).
    acks: std::collections::HashMap<u64, Value>,
    pub answer_pings: bool,
}

const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

impl WsClient {
    /// Opens `/socket.io/?EIO=4&transport=websocket` and reads the open packet.
    pub fn open(port: u16) -> (WsClient, Value) {
        let mut c = WsClient::handshake(port, "/socket.io/?EIO=4&transport=websocket")
            .expect("websocket upgrade");
        let open = c.recv_frame(Duration::from_secs(5)).expect("open packet");
        let text = open.text();
        assert!(text.starts_with('0'), "expected open packet, got {text}");
        let json = serde_json::from_str(&text[1..]).unwrap();
        (c, json)
    }

    /// Performs the upgrade on `path`; Err carries the HTTP answer when it is not 101.
    pub fn handshake(port: u16, path: &str) -> Result<WsClient, String> {
        WsClient::handshake_at(([127, 0, 0, 1], port).into(), path)
    }

    /// [`WsClient::handshake`] to any address; a connection that fails or does not
    /// complete within 5 s is an `Err` too (a host cut off by a fault test).
    pub fn handshake_at(addr: std::net::SocketAddr, path: &str) -> Result<WsClient, String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_nodelay(true).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .map_err(|e| format!("write the upgrade: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).unwrap_or(0) == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let head_text = String::from_utf8_lossy(&head).into_owned();
        if !head_text.starts_with("HTTP/1.1 101") {
            let mut rest = String::new();
            let _ = stream.read_to_string(&mut rest);
            return Err(format!("{head_text}{rest}"));
        }
        assert!(
            head_text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "{head_text}"
        );
        Ok(WsClient {
            stream,
            buf: Vec::new(),
            next_ack: 0,
            events: Vec::new(),
            acks: std::collections::HashMap::new(),
            answer_pings: true,
        })
    }

    /// Opens and completes the Socket.IO CONNECT with `{"token": …}`.
    pub fn connect(port: u16, token: &str) -> WsClient {
        let (mut c, _) = WsClient::open(port);
        c.send_text(&format!("40{{\"token\":\"{token}\"}}"));
        let reply = c.recv_text(Duration::from_secs(5)).unwrap();
        assert!(reply.starts_with("40{\"sid\":"), "CONNECT refused: {reply}");
        c
    }

    /// Sends a masked text frame.
    pub fn send_text(&mut self, text: &str) {
        self.send_raw(&client_frame(
            OpCode::Data(Data::Text),
            true,
            text.as_bytes(),
            MASK,
        ));
    }

    /// Sends a masked binary frame.
    pub fn send_binary(&mut self, data: &[u8]) {
        self.send_raw(&client_frame(OpCode::Data(Data::Binary), true, data, MASK));
    }

    /// Writes raw bytes; errors are ignored (the server may have closed).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// The next frame, within `timeout`.
    pub fn recv_frame(&mut self, timeout: Duration) -> Result<Frame, ReadEnd> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadEnd::Timeout);
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ReadEnd::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ReadEnd::Timeout)
                }
                Err(_) => return Err(ReadEnd::Closed),
            }
        }
    }

    /// The next text packet, answering Engine.IO pings on the way. A close frame ends it.
    pub fn recv_text(&mut self, timeout: Duration) -> Result<String, ReadEnd> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = self.recv_frame(left)?;
            match frame.opcode {
                0x1 => {
                    let text = frame.text();
                    if text == "2" && self.answer_pings {
                        self.send_text("3");
                        continue;
                    }
                    return Ok(text);
                }
                0x8 => return Err(ReadEnd::Closed),
                _ => continue,
            }
        }
    }

    /// Emits an event with an ack id and waits for its ack; other events are kept in `events`.
    pub fn emit_ack(&mut self, event: &str, payload: Value) -> Value {
        let id = self.emit(event, payload);
        self.wait_ack(id)
    }

    /// Emits an event with an ack id, without waiting: its ack comes to [`WsClient::wait_ack`].
    pub fn emit(&mut self, event: &str, payload: Value) -> u64 {
        self.next_ack += 1;
        let id = self.next_ack;
        let packet = format!("42{id}{}", serde_json::json!([event, payload]));
        self.send_text(&packet);
        id
    }

    /// Waits for the ack with this id.
    pub fn wait_ack(&mut self, id: u64) -> Value {
        self.try_wait_ack(id)
            .unwrap_or_else(|e| panic!("no ack {id}: {e:?}"))
    }

    /// Waits for the ack with this id; `Err` if the connection ended or went quiet.
    pub fn try_wait_ack(&mut self, id: u64) -> Result<Value, ReadEnd> {
        loop {
            if let Some(v) = self.acks.remove(&id) {
                return Ok(v);
            }
            let text = self.recv_text(Duration::from_secs(5))?;
            if let Some(rest) = text.strip_prefix("43") {
                let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                let got: u64 = rest[..digits].parse().unwrap();
                let arr: Value = serde_json::from_str(&rest[digits..]).unwrap();
                self.acks.insert(got, arr[0].clone());
                continue;
            }
            self.keep_event(&text);
        }
    }

    fn keep_event(&mut self, text: &str) {
        if let Some(json) = text.strip_prefix("42") {
            if let Ok(v) = serde_json::from_str(json) {
                self.events.push(v);
            }
        }
    }

    /// The next event `[name, payload]` (from those kept first).
    pub fn next_event(&mut self, timeout: Duration) -> Result<Value, ReadEnd> {
        if !self.events.is_empty() {
            return Ok(self.events.remove(0));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.recv_text(deadline.saturating_duration_since(Instant::now()))?;
            if let Some(json) = text.strip_prefix("42") {
                return Ok(serde_json::from_str(json).unwrap());
            }
        }
    }

    /// Reads until the server closes; returns the close code if a close frame came.
    pub fn expect_closed(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.recv_frame(deadline.saturating_duration_since(Instant::now())) {
                Ok(f) if f.opcode == 0x8 => {
                    return f.payload.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]))
                }
                Ok(_) => continue,
                Err(ReadEnd::Closed) => return None,
                Err(ReadEnd::Timeout) => panic!("server did not close the connection"),
            }
        }
    }

    /// Sends a masked control frame.
    pub fn send_control(&mut self, control: Control, payload: &[u8]) {
        self.send_raw(&client_frame(OpCode::Control(control), true, payload, MASK));
    }
}

/// Parses one unmasked server frame.
fn parse_server_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let (len, at) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            (
                u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                10,
            )
        }
        n => (n as usize, 2),
    };
    if buf.len() < at + len {
        return None;
    }
    Some((
        Frame {
            opcode,
            payload: buf[at..at + len].to_vec(),
        },
        at + len,
    ))
}

/// An HTTP answer: status, raw head, body.
pub struct HttpAnswer {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl HttpAnswer {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on a new connection (`Connection: close`).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpAnswer {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut req = head.into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    HttpAnswer {
        status,
        head,
        body: raw[split + 4..].to_vec(),
    }
}

/// A polling client: each request on its own connection, so the kernel spreads them
/// over the shards (exercising the hand-over to the session's shard).
pub struct PollClient {
    pub port: u16,
    pub sid: String,
}

impl PollClient {
    /// The polling handshake; returns the client and the open packet's JSON.
    pub fn open(port: u16) -> (PollClient, Value) {
        let a = http(port, "GET", "/socket.io/?EIO=4&transport=polling", &[], b"");
        assert_eq!(a.status, 200, "{}", a.text());
        let text = a.text();
        assert!(text.starts_with('0'), "{text}");
        let open: Value = serde_json::from_str(&text[1..]).unwrap();
        let sid = open["sid"].as_str().unwrap().to_string();
        (PollClient { port, sid }, open)
    }

    fn path(&self) -> String {
        format!("/socket.io/?EIO=4&transport=polling&sid={}", self.sid)
    }

    /// POSTs packets (joined with the record separator).
    pub fn post(&self, packets: &[&str]) -> HttpAnswer {
        let body = packets.join("\u{1e}");
        http(
            self.port,
            "POST",
            &self.path(),
            &[("Content-Type", "text/plain;charset=UTF-8")],
            body.as_bytes(),
        )
    }

    /// GETs the queued packets.
    pub fn get(&self) -> HttpAnswer {
        http(self.port, "GET", &self.path(), &[], b"")
    }

    /// GETs and splits the payload into packets.
    pub fn get_packets(&self) -> Vec<String> {
        let a = self.get();
        assert_eq!(a.status, 200, "{}", a.text());
        a.text().split('\u{1e}').map(str::to_string).collect()
    }
}

impl Server {
    /// Sends a signal to the server process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid() as i32, sig);
        }
    }

    /// Waits for the process to exit; its exit code (None if killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `body` in the chunked transfer coding, cut into chunks of `size` bytes, the first
/// with a chunk extension, ending with a trailer field.
pub fn chunked(body: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, piece) in body.chunks(size.max(1)).enumerate() {
        let ext = if i == 0 { ";name=\"v a l\"" } else { "" };
        out.extend_from_slice(format!("{:X}{ext}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
    out
}

/// Sends raw request bytes on a new connection in `pieces` (cut at these offsets, a
/// short pause between them, so the server reads them separately), then reads until the
/// server closes the connection or `timeout` passes. Each answer on the connection, in order.
pub fn raw_exchange(port: u16, raw: &[u8], cuts: &[usize], timeout: Duration) -> Vec<HttpAnswer> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut at = 0;
    for &cut in cuts.iter().chain(std::iter::once(&raw.len())) {
        s.write_all(&raw[at..cut]).unwrap();
        at = cut;
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    parse_answers(&got)
}

/// Splits bytes read from a connection into HTTP answers (each with a `Content-Length`).
pub fn parse_answers(mut raw: &[u8]) -> Vec<HttpAnswer> {
    let mut answers = Vec::new();
    while let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let body_end = (split + 4 + len).min(raw.len());
        answers.push(HttpAnswer {
            status,
            head,
            body: raw[split + 4..body_end].to_vec(),
        });
        raw = &raw[body_end..];
    }
    answers
}
