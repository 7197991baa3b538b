//! Test helper: a real `redis-server` on a free loopback port, in its own temporary
//! directory, stopped (SIGKILL) when the [`RedisServer`] is dropped — also when the test
//! panics. No mocks. As a last resort the kernel kills a server when the thread that
//! (re)started it exits (`PR_SET_PDEATHSIG`), so even a hung test leaves none behind.
//!
//! `redis-server` must be installed (Debian package `redis-server`; `scripts/test.sh`
//! installs it). TLS servers need `openssl` to make their certificates.
//!
//! Also what the cluster tests share: clients ([`connect`], [`connect_hosts`], with
//! [`fast_opts`]), shards on glommio executors ([`on_shard_blocking`], [`start_shard`]),
//! messages to publish ([`msg`]), publishing one through a shard's link ([`publish_one`])
//! and what publishing gave ([`stored`], [`offset`]), and, on a shard, waiting for events
//! ([`next_event`], [`wait_event`], [`wait_down`], [`wait_reconnected`], [`wait_message`],
//! [`offsets`]) or a condition ([`eventually`]).
//!
//! A Redis Cluster made of such servers (for corelay on a Redis Cluster, and its harness
//! test `redis_cluster_harness.rs`): [`cluster::RedisClusterProcs`].
//!
//! Not every test crate uses every helper, hence `allow(dead_code)`.
#![allow(dead_code)]

pub mod cluster;

use std::io::Read as _;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use corelay::cluster::shard_link::ShardLink;
use corelay::cluster::{ClusterError, ClusterEvent, NewMessage, Published};
use corelay::store::StoredMessage;
use futures::channel::mpsc::UnboundedReceiver;
use futures::StreamExt as _;

/// How long a server may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A running `redis-server`, killed on drop.
pub struct RedisServer {
    /// The port it listens on (the TLS port for a TLS server).
    pub port: u16,
    /// Its working directory (AOF files, log).
    pub dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
    starts: u32,
    tls: bool,
}

/// A free TCP port on loopback (free when asked; the server binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Runs one command (any argument types: keys may be bytes) with a blocking client on a
/// fresh connection to `url`: the reply, or the server's error text. What
/// [`RedisServer::cmd`] and the cluster helpers send their commands with.
pub fn query<A: redis::ToRedisArgs>(url: &str, args: &[A]) -> Result<redis::Value, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    query_on(&client, args)
}

/// [`query`] through a client already built: for a client that needs more than a URL,
/// such as one trusting a TLS cluster's test CA ([`cluster::RedisClusterProcs::cmd`]).
pub fn query_on<A: redis::ToRedisArgs>(
    client: &redis::Client,
    args: &[A],
) -> Result<redis::Value, String> {
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    let mut cmd = redis::Cmd::new();
    for a in args {
        cmd.arg(a);
    }
    cmd.query::<redis::Value>(&mut con)
        .map_err(|e| e.to_string())
}

/// The path of Redis's program `name` (`redis-server`, or `redis-cli` for the cluster
/// helpers), or a panic that says how to get it.
fn redis_bin(name: &str) -> String {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let candidate = format!("{dir}/{name}");
        if Path::new(&candidate).exists() {
            return candidate;
        }
    }
    panic!("{name} not found: apt-get install redis-server redis-tools (scripts/test.sh does it)");
}

impl RedisServer {
    /// A plain server with no persistence.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// A plain server with extra command-line options (e.g. `["--requirepass", "pw"]`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        RedisServer::launch(extra, false)
    }

    /// A server that keeps its data across [`RedisServer::restart`] (AOF, fsync always).
    pub fn start_persistent() -> RedisServer {
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
    }

    /// A TLS-only server (`--port 0 --tls-port P`) with `tls`'s server certificate, not
    /// asking clients for certificates unless `extra` says so.
    pub fn start_tls(tls: &TlsFiles, extra: &[&str]) -> RedisServer {
        let mut args = tls.server_args();
        if !extra.contains(&"--tls-auth-clients") {
            args.extend(["--tls-auth-clients".into(), "no".into()]);
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        RedisServer::launch(&refs, true)
    }

    fn launch(extra: &[&str], tls: bool) -> RedisServer {
        RedisServer::launch_on(extra, tls, free_port)
    }

    /// Starts a server on a port `pick_port` gives (cluster nodes need one whose bus port,
    /// port + 10000, is free too: see [`cluster`]).
    fn launch_on(extra: &[&str], tls: bool, pick_port: fn() -> u16) -> RedisServer {
        let mut last_log = String::new();
        // A port picked free may be taken before redis binds it: try a few.
        for _ in 0..5 {
            let mut server = RedisServer {
                port: pick_port(),
                dir: tempfile::tempdir().expect("tempdir"),
                args: extra.iter().map(|s| (*s).to_owned()).collect(),
                child: None,
                starts: 0,
                tls,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(log) => last_log = log,
            }
        }
        panic!("redis-server did not start:\n{last_log}");
    }

    /// Starts the process on `self.port` and waits until it is ready; on failure the log.
    fn spawn(&mut self) -> Result<(), String> {
        self.starts += 1;
        let log = self.dir.path().join(format!("redis-{}.log", self.starts));
        let mut cmd = Command::new(redis_bin("redis-server"));
        cmd.arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .arg("--save")
            .arg("")
            .arg("--daemonize")
            .arg("no")
            .arg("--protected-mode")
            .arg("no");
        if self.tls {
            cmd.arg("--port")
                .arg("0")
                .arg("--tls-port")
                .arg(self.port.to_string());
        } else {
            cmd.arg("--port")
                .arg(self.port.to_string())
                .arg("--unixsocket")
                .arg(self.socket_path())
                .arg("--unixsocketperm")
                .arg("700");
        }
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe. If the thread that started the server dies
        // (a test thread that panicked past its guards, or the whole test process), the
        // kernel kills the server: no redis-server outlives its test.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run redis-server: {e}"))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Ready to accept connections")
                && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                self.child = Some(child);
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("redis-server exited ({status}):\n{text}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "redis-server not ready after {READY_TIMEOUT:?}:\n{text}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where a plain server also listens: a Unix socket in its directory (the same one
    /// across restarts).
    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// `unix://<socket path>` (a plain server's Unix socket).
    pub fn unix_url(&self) -> String {
        assert!(!self.tls, "a TLS server has no Unix socket here");
        format!("unix://{}", self.socket_path().display())
    }

    /// `redis://127.0.0.1:<port>` (or `rediss://localhost:<port>` for a TLS server, the
    /// name its certificate carries).
    pub fn url(&self) -> String {
        if self.tls {
            format!("rediss://localhost:{}", self.port)
        } else {
            format!("redis://127.0.0.1:{}", self.port)
        }
    }

    /// The URL with credentials and a db index.
    pub fn url_with(&self, userinfo: &str, db: u32) -> String {
        let scheme_host = if self.tls {
            format!("rediss://{userinfo}@localhost")
        } else {
            format!("redis://{userinfo}@127.0.0.1")
        };
        format!("{scheme_host}:{}/{db}", self.port)
    }

    /// SIGKILLs the server and waits for it (no-op when not running).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, with the same options and directory.
    pub fn restart(&mut self) {
        self.kill();
        // The port was just released; the kernel may need a moment (TIME_WAIT is fine for
        // listening sockets with SO_REUSEADDR, which redis sets).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(log) if Instant::now() > deadline => panic!("restart failed:\n{log}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// SIGSTOPs the server: it keeps its sockets but answers nothing.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONTs a paused server.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        let child = self.child.as_ref().expect("server running");
        // SAFETY: kill(2) with our own child's pid.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({sig}) failed");
    }

    /// Runs one command with a blocking client (setup and inspection in tests): the
    /// reply, or the server's error text.
    pub fn cmd(&self, url: &str, args: &[&str]) -> Result<redis::Value, String> {
        query(url, args)
    }

    /// Creates (or resets) ACL user `user` with password `password`, limited to what
    /// corelay needs: keys and channels `corelay:*` and the read, write, pub/sub, scripting
    /// and connection commands, plus TIME. `admin_url` is a URL with admin rights.
    pub fn add_corelay_user(&self, admin_url: &str, user: &str, password: &str) {
        let pw = format!(">{password}");
        self.cmd(
            admin_url,
            &[
                "ACL",
                "SETUSER",
                user,
                "reset",
                "on",
                &pw,
                "resetkeys",
                "~corelay:*",
                "resetchannels",
                "&corelay:*",
                "-@all",
                "+@read",
                "+@write",
                "+@pubsub",
                "+@scripting",
                "+@connection",
                "+time",
            ],
        )
        .expect("ACL SETUSER");
    }

    /// The server's log so far (all starts).
    pub fn log(&self) -> String {
        let mut out = String::new();
        for n in 1..=self.starts {
            if let Ok(mut f) = std::fs::File::open(self.dir.path().join(format!("redis-{n}.log"))) {
                let _ = f.read_to_string(&mut out);
            }
        }
        out
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A stopped process dies of SIGKILL too; SIGCONT first anyway, harmless.
            // SAFETY: kill(2) with our own child's pid.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGCONT);
            }
        }
        self.kill();
    }
}

/// A throwaway CA, a server certificate for `localhost` / 127.0.0.1 signed by it, and a
/// client certificate signed by it, made with the `openssl` command.
pub struct TlsFiles {
    /// Where the files are (removed on drop).
    pub dir: tempfile::TempDir,
    /// The CA certificate (PEM): what clients trust.
    pub ca_cert: PathBuf,
    /// The server's certificate (PEM).
    pub server_cert: PathBuf,
    /// The server's key (PEM).
    pub server_key: PathBuf,
    /// A client certificate (PEM) for servers that ask for one.
    pub client_cert: PathBuf,
    /// The client certificate's key (PEM).
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// `redis-server`'s options for serving with these files (certificate, key, CA):
    /// what a TLS server ([`RedisServer::start_tls`]) and a TLS cluster node
    /// ([`cluster::RedisClusterProcs::start_tls`]) both start from.
    pub fn server_args(&self) -> Vec<String> {
        vec![
            "--tls-cert-file".into(),
            self.server_cert.display().to_string(),
            "--tls-key-file".into(),
            self.server_key.display().to_string(),
            "--tls-ca-cert-file".into(),
            self.ca_cert.display().to_string(),
        ]
    }

    /// Generates the files, or `Err` saying why it cannot (no `openssl`).
    pub fn generate() -> Result<TlsFiles, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let p = |name: &str| dir.path().join(name);
        let openssl = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .map_err(|e| format!("cannot run openssl: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "openssl {args:?} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        };
        std::fs::write(
            p("server.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .map_err(|e| e.to_string())?;
        std::fs::write(
            p("client.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
             extendedKeyUsage=clientAuth\n",
        )
        .map_err(|e| e.to_string())?;
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=corelay test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ])?;
        for who in ["server", "client"] {
            let (key, csr, crt, ext) = (
                format!("{who}.key"),
                format!("{who}.csr"),
                format!("{who}.crt"),
                format!("{who}.ext"),
            );
            let subj = if who == "server" {
                "/CN=localhost".to_owned()
            } else {
                "/CN=corelay test client".to_owned()
            };
            openssl(&[
                "req", "-newkey", "rsa:2048", "-nodes", "-subj", &subj, "-keyout", &key, "-out",
                &csr,
            ])?;
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &crt,
                "-extfile",
                &ext,
            ])?;
        }
        Ok(TlsFiles {
            ca_cert: p("ca.crt"),
            server_cert: p("server.crt"),
            server_key: p("server.key"),
            client_cert: p("client.crt"),
            client_key: p("client.key"),
            dir,
        })
    }
}

/// Runs `body` on its own thread and fails the test if it takes longer than `limit` (the
/// body's own panics are passed on). Keep the [`RedisServer`]s outside the body, so that a
/// timeout drops them with the test.
pub fn within<T: Send + 'static>(limit: Duration, body: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("bounded-test-body".into())
        .spawn(move || {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
            let _ = tx.send(out);
        })
        .expect("spawn the test body");
    match rx.recv_timeout(limit) {
        Ok(Ok(out)) => {
            let _ = handle.join();
            out
        }
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("test body still running after {limit:?}"),
    }
}

/// Cluster options for `url` with short timeouts, so that failures show quickly in tests.
pub fn fast_opts(url: &str) -> corelay::cluster::RedisOptions {
    let mut o = corelay::cluster::RedisOptions::new(url);
    o.connect_timeout = Duration::from_secs(1);
    o.command_timeout = Duration::from_secs(1);
    o.ping_interval = Duration::from_millis(100);
    o.reconnect_min = Duration::from_millis(50);
    o.reconnect_max = Duration::from_millis(500);
    o.presence_ttl = Duration::from_millis(1500);
    o
}

/// A connected cluster client on `bridge`; panics when Redis cannot be reached.
pub fn connect(
    o: corelay::cluster::RedisOptions,
    bridge: &corelay::bridge::Bridge,
) -> corelay::cluster::redis::RedisCluster {
    futures::executor::block_on(corelay::cluster::redis::RedisCluster::connect(
        o,
        bridge.clone(),
    ))
    .expect("connect to redis")
}

/// `N` hosts of one cluster on `bridge`: a connected client each, with options `o` but a
/// host id of its own (presence tells hosts apart by it).
pub fn connect_hosts<const N: usize>(
    o: &corelay::cluster::RedisOptions,
    bridge: &corelay::bridge::Bridge,
) -> [corelay::cluster::redis::RedisCluster; N] {
    std::array::from_fn(|i| {
        let mut own = o.clone();
        own.host_id = format!("{}h{i}", o.host_id);
        connect(own, bridge)
    })
}

/// Runs the future `body` makes on a fresh glommio executor, like a shard, and returns
/// its output. A panic on the shard goes on in the caller, with its own message.
pub fn on_shard_blocking<G, F, T>(body: G) -> T
where
    G: FnOnce() -> F + Send + 'static,
    F: std::future::Future<Output = T> + 'static,
    T: Send + 'static,
{
    match start_shard(body).join() {
        Ok(out) => out,
        Err(glommio::GlommioError::BuilderError(glommio::BuilderErrorKind::ThreadPanic(p))) => {
            std::panic::resume_unwind(p)
        }
        Err(e) => panic!("the shard's thread: {e}"),
    }
}

/// Starts the future `body` makes on a fresh glommio executor, like a shard, without
/// waiting for it: several shards run side by side; `join` gives each one's output.
pub fn start_shard<G, F, T>(body: G) -> glommio::ExecutorJoinHandle<T>
where
    G: FnOnce() -> F + Send + 'static,
    F: std::future::Future<Output = T> + 'static,
    T: Send + 'static,
{
    glommio::LocalExecutorBuilder::default()
        .io_memory(512 * 1024)
        .spawn(body)
        .expect("start a glommio executor")
}

/// Message ids unique within the test process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A message from `user` to `room`, sent now, with a fresh id.
pub fn msg(room: &str, user: &str, text: &str, cid: Option<&str>) -> NewMessage {
    NewMessage {
        room: room.to_owned(),
        user: user.to_owned(),
        text: text.to_owned(),
        cid: cid.map(str::to_owned),
        ts: corelay::ids::now_ms(),
        id: format!("id{:06}", NEXT_ID.fetch_add(1, Ordering::Relaxed)),
    }
}

/// Publishes `m` alone, with no floor, through `link` (as a shard does: one batch of one
/// message); its result (on the link's glommio executor).
pub async fn publish_one(link: &ShardLink, m: NewMessage) -> Result<Published, ClusterError> {
    link.publish_batch(vec![(m, 0)])
        .await
        .pop()
        .expect("a result for the one message")
}

/// The message a publish stored; panics on a duplicate.
pub fn stored(p: Published) -> StoredMessage {
    match p {
        Published::Stored(m) => m,
        Published::Duplicate(a) => panic!("expected a new message, got the duplicate of {a:?}"),
    }
}

/// The offset a publish got; panics on an error or a duplicate.
pub fn offset(r: Result<Published, ClusterError>) -> u64 {
    match r {
        Ok(Published::Stored(m)) => m.offset,
        other => panic!("expected a stored message, got {other:?}"),
    }
}

/// The next event of a shard's stream within `limit`, or `None` (on a glommio executor).
pub async fn next_event(
    rx: &mut UnboundedReceiver<ClusterEvent>,
    limit: Duration,
) -> Option<ClusterEvent> {
    let timer = glommio::timer::Timer::new(limit);
    match futures::future::select(rx.next(), timer).await {
        futures::future::Either::Left((event, _)) => event,
        futures::future::Either::Right(_) => None,
    }
}

/// Skips events until one matches `want`; panics after `limit` (`what` names the event).
pub async fn wait_event(
    rx: &mut UnboundedReceiver<ClusterEvent>,
    limit: Duration,
    what: &str,
    want: impl Fn(&ClusterEvent) -> bool,
) -> ClusterEvent {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_event(rx, left).await {
            Some(ev) if want(&ev) => return ev,
            Some(_) => {}
            None => panic!("no {what} within {limit:?}"),
        }
    }
}

/// Skips events until [`ClusterEvent::Down`]; panics after 5 s.
pub async fn wait_down(rx: &mut UnboundedReceiver<ClusterEvent>) -> ClusterEvent {
    wait_event(rx, Duration::from_secs(5), "Down", |e| {
        matches!(e, ClusterEvent::Down { .. })
    })
    .await
}

/// Skips events until [`ClusterEvent::Reconnected`]; panics after 10 s.
pub async fn wait_reconnected(rx: &mut UnboundedReceiver<ClusterEvent>) {
    wait_event(rx, Duration::from_secs(10), "Reconnected", |e| {
        *e == ClusterEvent::Reconnected
    })
    .await;
}

/// Skips events until a message of `room`, and returns it; panics after 3 s.
pub async fn wait_message(rx: &mut UnboundedReceiver<ClusterEvent>, room: &str) -> StoredMessage {
    let what = format!("message of {room}");
    match wait_event(
        rx,
        Duration::from_secs(3),
        &what,
        |e| matches!(e, ClusterEvent::Message(m) if m.room == room),
    )
    .await
    {
        ClusterEvent::Message(m) => m,
        other => unreachable!("{other:?} matched a message"),
    }
}

/// The offsets of the next `n` events, all messages of `room` (anything else panics),
/// each within 5 s.
pub async fn offsets(rx: &mut UnboundedReceiver<ClusterEvent>, room: &str, n: usize) -> Vec<u64> {
    let mut got = Vec::new();
    while got.len() < n {
        match next_event(rx, Duration::from_secs(5)).await {
            Some(ClusterEvent::Message(m)) if m.room == room => got.push(m.offset),
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!("only {} of {n} messages of {room}", got.len()),
        }
    }
    got
}

/// Polls `cond` every 10 ms (on a glommio executor) until it holds or `limit` passes;
/// whether it held. For states no event announces.
pub async fn eventually(limit: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond().await {
            return true;
        }
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    cond().await
}
