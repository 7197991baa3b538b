//! Test helper: machines on their own addresses. A [`Net`] is a Linux bridge in the test's
//! network namespace (with the first address of a private /24, what the test's own
//! clients use) and N namespaces, each joined to the bridge by a veth pair and given the
//! next address. Commands run inside a namespace ([`Net::spawn`]); a namespace can be cut
//! from an address with a blackhole route and healed ([`Net::cut`], [`Net::heal`]).
//! Everything is removed when the [`Net`] is dropped, also when the test panics.
//!
//! Needs root and `ip` ([`available`]); tests skip with a clear message otherwise.
//! Each [`Net`] takes a /24 of 10.213.0.0/16 of its own (from the pid and a counter,
//! skipping any already in use), so tests may run in parallel.
//!
//! Also here: a TCP fault proxy owned by the test ([`proxy`]) and a reconnecting chat
//! client ([`chat`]), and senders and receivers run around a fault with the checks every
//! fault test makes ([`run`]).
#![allow(dead_code)]

pub mod chat;
pub mod outcome;
pub mod proxy;
pub mod run;

use std::io::{BufRead, BufReader, Read};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Whether this process can make namespaces and bridges: root, with `ip` installed, and
/// allowed to (a container may say no): found out once by making and removing a probe.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return false;
        }
        let pid = std::process::id();
        let (ns, br) = (format!("crn{pid:x}xprobe"), format!("crb{pid:x}xp"));
        let ok = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let can = ok(&["netns", "add", &ns]) && ok(&["link", "add", &br, "type", "bridge"]);
        ip_quiet(&["netns", "del", &ns]);
        ip_quiet(&["link", "del", &br]);
        can
    })
}

/// Returns true (after printing why) when the test must be skipped.
pub fn skip() -> bool {
    if available() {
        return false;
    }
    eprintln!("skipped: needs root and ip netns");
    true
}

static NEXT_NET: AtomicU32 = AtomicU32::new(0);

/// Runs `ip` with `args`; panics with its error output when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `ip` with `args`, ignoring failure (cleanup).
fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Removes namespaces and bridges an earlier test process left (killed before its
/// [`Net`] was dropped): those named for a pid that no longer runs.
fn sweep_stale() {
    let dead = |name: &str, prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.split('x').next())
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
            .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    let list = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    for line in list(&["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if dead(name, "crn") {
            ip_quiet(&["netns", "del", name]);
        }
    }
    for line in list(&["-o", "link", "show", "type", "bridge"]).lines() {
        let name = line.split(':').nth(1).unwrap_or("").trim();
        if dead(name, "crb") {
            ip_quiet(&["link", "del", name]);
        }
    }
}

/// A bridge and namespaces on it, removed on drop.
pub struct Net {
    /// The bridge's name (in the test's namespace).
    pub bridge: String,
    /// The namespaces' names, in order.
    pub names: Vec<String>,
    /// The /24's third octet: addresses are 10.213.`octet`.x.
    pub octet: u8,
}

impl Net {
    /// A bridge with 10.213.o.1 and `n` namespaces with 10.213.o.2, .3, …
    pub fn new(n: usize) -> Net {
        let pid = std::process::id();
        let seq = NEXT_NET.fetch_add(1, Ordering::Relaxed);
        sweep_stale();
        // Names carry the pid (hex, at most 6 digits) so that a later run can tell what a
        // killed test left behind; interface names must stay within 15 bytes.
        let tag = format!("{pid:x}x{seq}");
        let used = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-o", "-4", "addr"])
                .output()
                .expect("ip addr")
                .stdout,
        )
        .into_owned();
        let octet = (0..254u32)
            .map(|k| ((pid.wrapping_mul(7) + seq * 37 + k) % 254 + 1) as u8)
            .find(|o| !used.contains(&format!("10.213.{o}.")))
            .expect("a free 10.213.x.0/24");
        let mut net = Net {
            bridge: format!("crb{tag}"),
            names: Vec::new(),
            octet,
        };
        ip(&["link", "add", &net.bridge, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.gateway()),
            "dev",
            &net.bridge,
        ]);
        ip(&["link", "set", &net.bridge, "up"]);
        for i in 0..n {
            let ns = format!("crn{tag}x{i}");
            let (outer, inner) = (format!("crv{tag}o{i}"), format!("crv{tag}i{i}"));
            ip(&["netns", "add", &ns]);
            net.names.push(ns.clone());
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ]);
            ip(&["link", "set", &outer, "master", &net.bridge, "up"]);
            ip(&["link", "set", &inner, "netns", &ns]);
            let addr = format!("{}/24", net.addr(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &inner]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    /// The address of namespace `i`.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.octet, 2 + i as u8)
    }

    /// The bridge's address: where the test's own sockets (clients, proxies) come from.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.octet, 1)
    }

    /// Cuts namespace `i` from `to`: a blackhole route, so nothing it sends there leaves.
    pub fn cut(&self, i: usize, to: Ipv4Addr) {
        let dst = format!("{to}/32");
        ip(&["-n", &self.names[i], "route", "add", "blackhole", &dst]);
    }

    /// Removes the blackhole route [`Net::cut`] added.
    pub fn heal(&self, i: usize, to: Ipv4Addr) {
        let dst = format!("{to}/32");
        ip(&["-n", &self.names[i], "route", "del", "blackhole", &dst]);
    }

    /// Starts `program args…` inside namespace `i` (killed with the [`NsProcess`], or by
    /// the kernel when the starting thread dies). Waits until a line of its output
    /// contains `ready` (or, when `ready` is empty, does not wait).
    pub fn spawn(
        &self,
        i: usize,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
        ready: &str,
    ) -> NsProcess {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.names[i], program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        // SAFETY: prctl is async-signal-safe; see common_redis for the reason.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("ip netns exec");
        let (tx, rx) = mpsc::channel();
        let tag = format!(
            "{}@{}",
            program.rsplit('/').next().unwrap_or(program),
            self.addr(i)
        );
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let (tx, tag) = (tx.clone(), tag.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("[{tag}] {line}");
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.is_empty() {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.contains(ready) => break,
                Ok(_) => {}
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("{tag} exited during start: {status}");
                    }
                    assert!(Instant::now() < deadline, "{tag} did not start in time");
                }
            }
        }
        NsProcess { child, output: rx }
    }

    /// `redis-server` on port 6379 of namespace `i`, no persistence.
    pub fn redis(&self, i: usize) -> NsProcess {
        let dir = std::env::temp_dir();
        let addr = self.addr(i).to_string();
        self.spawn(
            i,
            "redis-server",
            &[
                "--bind",
                &addr,
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--dir",
                &dir.to_string_lossy(),
            ],
            &[],
            "Ready to accept connections",
        )
    }

    /// `corelay serve` on `addr(i):port`, one shard, Redis at `redis`, the test secret
    /// (a server on a non-loopback address needs one), and extra environment.
    pub fn corelay(&self, i: usize, port: u16, redis: &str, env: &[(&str, &str)]) -> NsProcess {
        let listen = format!("{}:{port}", self.addr(i));
        let mut all = vec![
            ("CORELAY_JWT_SECRET", crate::common::SECRET),
            ("RUST_LOG", "warn"),
        ];
        all.extend_from_slice(env);
        self.spawn(
            i,
            env!("CARGO_BIN_EXE_corelay"),
            &[
                "serve", "--listen", &listen, "--shards", "1", "--redis", redis, "--store", "redis",
            ],
            &all,
            "listening on",
        )
    }
    /// The seed's Node server (`loadgen/peer/server.js`, one process of peer-N) on
    /// `addr(i):port`, Redis at `redis`, the test secret, history kept and replayed in full.
    pub fn peer(&self, i: usize, port: u16, redis: &str) -> NsProcess {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/loadgen/peer/server.js");
        let host = self.addr(i).to_string();
        let port = port.to_string();
        self.spawn(
            i,
            "node",
            &[
                script,
                "--host",
                &host,
                "--port",
                &port,
                "--redis",
                redis,
                "--secret",
                crate::common::SECRET,
            ],
            &[("HISTORY_CAP", "100000"), ("MAX_REPLAY", "100000")],
            "listening on",
        )
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of each veth pair, and with it the other.
        for ns in &self.names {
            ip_quiet(&["netns", "del", ns]);
        }
        ip_quiet(&["link", "del", &self.bridge]);
    }
}

/// A process in a namespace, killed on drop.
pub struct NsProcess {
    child: Child,
    /// Its output lines (stdout and stderr), also echoed to the test's stderr.
    pub output: mpsc::Receiver<String>,
}

impl NsProcess {
    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
