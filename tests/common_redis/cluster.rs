//! Test helper: a real Redis Cluster of [`RedisServer`] nodes (`--cluster-enabled yes`,
//! node timeout 2 s, no persistence), formed with `redis-cli --cluster create`, killed
//! with its nodes on drop. For the tests of corelay on a Redis Cluster: the slot map
//! ([`RedisClusterProcs::master_for_slot`], [`RedisClusterProcs::slot_of`]), a master's
//! failover ([`RedisClusterProcs::kill_node`], [`RedisClusterProcs::wait_failover`]) and
//! a live resharding of one slot ([`RedisClusterProcs::migrate_slot`]), each waited for
//! until every node agrees. A `--requirepass` among the extra options makes a password
//! cluster: every node gets it as `--masterauth` too, and the helpers authenticate.
//! [`RedisClusterProcs::start_tls`] makes a TLS-only cluster (clients, replication and
//! the cluster bus), whose helpers trust the test CA.
//!
//! Ports are at most 55535: a node's cluster bus listens on its port + 10000, which must
//! be a valid port and free too. `redis-cli` must be installed (Debian package
//! `redis-tools`, which `redis-server` depends on; `scripts/test.sh` installs both).

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{query_on, redis_bin, RedisServer, TlsFiles};

/// The cluster's node timeout (ms): a master unreachable this long is failed over.
const NODE_TIMEOUT_MS: &str = "2000";
/// How long forming the cluster, or agreeing again after a change, may take.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a failover may take: the node timeout, then the election (with slack for a
/// loaded machine).
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(15);
/// Keys moved per MIGRATE while migrating a slot.
const MIGRATE_BATCH: usize = 10;
/// A node's port range: its bus port (port + 10000) must stay a valid port.
const LOWEST_PORT: u16 = 30000;
const HIGHEST_PORT: u16 = 55535;
/// Where the next port search starts (0 = not seeded yet).
static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

/// Whether 127.0.0.1:`port` can be bound right now.
fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A port for a cluster node: at most 55535 and free, with its bus port (port + 10000)
/// free too. The search starts at a place that depends on the process and the time, so
/// that test processes running side by side rarely try the same ports.
pub fn free_cluster_port() -> u16 {
    let span = u32::from(HIGHEST_PORT - LOWEST_PORT) + 1;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let seed = (std::process::id().wrapping_mul(7919) ^ nanos) % span + 1;
    let _ = NEXT_PORT.compare_exchange(0, seed, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..span {
        let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        let port = LOWEST_PORT + u16::try_from(n % span).expect("below the span");
        if bindable(port) && bindable(port + 10000) {
            return port;
        }
    }
    panic!("no free port pair (P, P+10000) with P in {LOWEST_PORT}..={HIGHEST_PORT}");
}

/// A cluster node's TLS options on top of [`TlsFiles::server_args`]: TLS only, to
/// replicas and on the cluster bus too, clients not asked for a certificate.
fn tls_node_args(tls: &TlsFiles) -> Vec<String> {
    let mut args = tls.server_args();
    // The cluster bus always asks for a client certificate: the nodes present the client
    // one (the server one is for server authentication only).
    args.extend([
        "--tls-client-cert-file".to_owned(),
        tls.client_cert.display().to_string(),
        "--tls-client-key-file".to_owned(),
        tls.client_key.display().to_string(),
    ]);
    args.extend(
        [
            "--tls-auth-clients",
            "no",
            "--tls-cluster",
            "yes",
            "--tls-replication",
            "yes",
        ]
        .map(str::to_owned),
    );
    args
}

/// `s` percent-encoded for a URL's userinfo (a password with spaces or `@`).
fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The value of `field` in an INFO-style text (`name:value` lines).
fn info_field<'a>(text: &'a str, field: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim_end().strip_prefix(field)?.strip_prefix(':'))
}

/// One line of `CLUSTER NODES`: what a node thinks of one node.
#[derive(Debug, Clone)]
struct NodeLine {
    id: String,
    port: u16,
    flags: Vec<String>,
    /// The master's id, for a replica.
    master: Option<String>,
    /// The slot ranges it serves (inclusive), without the `[slot->-id]` migration marks.
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    /// Parses one line of `CLUSTER NODES`.
    fn parse(line: &str) -> Option<NodeLine> {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            return None;
        }
        let addr = f[1].split('@').next()?;
        let port = addr.rsplit(':').next()?.parse().ok()?;
        let mut slots = Vec::new();
        for s in &f[8..] {
            if s.starts_with('[') {
                continue;
            }
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            slots.push((a.parse().ok()?, b.parse().ok()?));
        }
        Some(NodeLine {
            id: f[0].to_owned(),
            port,
            flags: f[2].split(',').map(str::to_owned).collect(),
            master: (f[3] != "-").then(|| f[3].to_owned()),
            slots,
        })
    }

    /// Whether the node carries `flag` (`myself`, `slave`, `fail`, `handshake`…): what the
    /// settling and failover checks read.
    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// Whether the node is taken for failed (`fail`) or suspected (`fail?`): such a node
    /// is left out of the views compared.
    fn failed(&self) -> bool {
        self.has_flag("fail") || self.has_flag("fail?")
    }
}

/// What a node's view says about the cluster, in a form two views can be compared in:
/// who serves which slots, and which replica follows which master (failed nodes left out).
#[derive(Debug, PartialEq, Eq)]
struct Agreed {
    owners: Vec<(u16, u16, String)>,
    replicas: BTreeMap<String, String>,
}

/// What a killed master served and who its replicas were, for [`RedisClusterProcs::wait_failover`].
#[derive(Debug, Clone)]
struct KilledMaster {
    slots: Vec<(u16, u16)>,
    replicas: Vec<usize>,
}

/// A running Redis Cluster of `redis-server` processes, killed on drop.
pub struct RedisClusterProcs {
    /// The nodes, in the order they were started. `redis-cli --cluster create` picks the
    /// masters and which replica follows which: ask [`RedisClusterProcs::masters`] and
    /// [`RedisClusterProcs::replicas_of`] (roles change on failover).
    pub nodes: Vec<RedisServer>,
    /// Each node's cluster id, by index.
    ids: Vec<String>,
    /// The `--requirepass` the nodes were given, if any.
    password: Option<String>,
    /// The CA certificate (PEM) of a TLS cluster, which the helpers' clients trust.
    ca: Option<Vec<u8>>,
    /// What each killed master served, by index.
    killed: BTreeMap<usize, Option<KilledMaster>>,
}

impl RedisClusterProcs {
    /// Starts `masters * (1 + replicas_per_master)` nodes with `extra_args` on top of the
    /// cluster options, forms the cluster (`masters` ≥ 3, as `redis-cli` wants) and
    /// returns once every node says `cluster_state:ok`, every node agrees on the slot map
    /// and every replica is in sync with its master. With `--requirepass P` among
    /// `extra_args`, nodes also get `--masterauth P`.
    pub fn start(
        masters: usize,
        replicas_per_master: usize,
        extra_args: &[&str],
    ) -> RedisClusterProcs {
        RedisClusterProcs::launch(masters, replicas_per_master, extra_args, None)
    }

    /// [`RedisClusterProcs::start`] (no extra options) speaking TLS only, to clients, to
    /// replicas and on the cluster bus, with `tls`'s certificates: for corelay's
    /// `rediss://` cluster links. Its URLs are `rediss://localhost:P` (the certificate's
    /// name); clients must trust `tls.ca_cert`, and need no certificate of their own.
    pub fn start_tls(
        masters: usize,
        replicas_per_master: usize,
        tls: &TlsFiles,
    ) -> RedisClusterProcs {
        RedisClusterProcs::launch(masters, replicas_per_master, &[], Some(tls))
    }

    /// What [`Self::start`] and [`Self::start_tls`] share: `tls` given, the nodes speak
    /// TLS only.
    fn launch(
        masters: usize,
        replicas_per_master: usize,
        extra_args: &[&str],
        tls: Option<&TlsFiles>,
    ) -> RedisClusterProcs {
        assert!(masters >= 3, "a Redis Cluster needs at least 3 masters");
        let password = extra_args
            .windows(2)
            .find(|w| w[0] == "--requirepass")
            .map(|w| w[1].to_owned());
        let mut args = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-node-timeout",
            NODE_TIMEOUT_MS,
            // Relative to the node's --dir: <dir>/nodes.conf.
            "--cluster-config-file",
            "nodes.conf",
            "--appendonly",
            "no",
            // A replica's first sync starts at once (the default waits 5 s for others).
            "--repl-diskless-sync-delay",
            "0",
        ];
        if let Some(pw) = &password {
            args.extend(["--masterauth", pw.as_str()]);
        }
        let tls_args = tls.map(tls_node_args).unwrap_or_default();
        args.extend(tls_args.iter().map(String::as_str));
        args.extend_from_slice(extra_args);
        let count = masters * (1 + replicas_per_master);
        let nodes = (0..count)
            .map(|_| RedisServer::launch_on(&args, tls.is_some(), free_cluster_port))
            .collect();
        let mut cluster = RedisClusterProcs {
            nodes,
            ids: Vec::new(),
            password,
            ca: tls.map(|t| std::fs::read(&t.ca_cert).expect("read the test CA")),
            killed: BTreeMap::new(),
        };
        cluster.ids = (0..count)
            .map(|i| cluster.text(i, &["CLUSTER", "MYID"]))
            .collect();
        cluster.create(replicas_per_master, tls);
        cluster.wait_settled("the new cluster", SETTLE_TIMEOUT);
        let shape: Vec<usize> = cluster
            .masters()
            .into_iter()
            .map(|m| cluster.replicas_of(m).len())
            .collect();
        assert_eq!(
            shape,
            vec![replicas_per_master; masters],
            "replicas per master of the new cluster"
        );
        cluster
    }

    /// Runs `redis-cli --cluster create` on every node (at most 30 s; over TLS trusting
    /// `tls`'s CA when given); panics with its output when it fails.
    fn create(&self, replicas_per_master: usize, tls: Option<&TlsFiles>) {
        let out_path = self.nodes[0].dir.path().join("cluster-create.out");
        let out = File::create(&out_path).expect("create redis-cli's output file");
        let mut cmd = Command::new(redis_bin("redis-cli"));
        cmd.arg("--cluster").arg("create");
        for i in 0..self.nodes.len() {
            cmd.arg(self.addr(i));
        }
        cmd.arg("--cluster-replicas")
            .arg(replicas_per_master.to_string())
            .arg("--cluster-yes");
        if let Some(pw) = &self.password {
            cmd.arg("-a").arg(pw).arg("--no-auth-warning");
        }
        if let Some(tls) = tls {
            cmd.arg("--tls").arg("--cacert").arg(&tls.ca_cert);
        }
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup redis-cli's output file"))
            .stderr(out);
        let mut child = cmd.spawn().expect("run redis-cli --cluster create");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for redis-cli") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if status.is_none_or(|s| !s.success()) {
            let text = std::fs::read_to_string(&out_path).unwrap_or_default();
            panic!("redis-cli --cluster create failed ({status:?}):\n{text}");
        }
    }

    /// `127.0.0.1:P` of node `i`: how the cluster names its nodes (`CLUSTER SLOTS`,
    /// `redis-cli`), and so how corelay's reports and `/healthz` name them, for tests to
    /// compare with.
    pub fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.nodes[i].port)
    }

    /// `redis://127.0.0.1:P` of node 0 (no credentials; `rediss://localhost:P` for a TLS
    /// cluster, as for every URL below).
    pub fn url(&self) -> String {
        self.node_url(0)
    }

    /// `redis://127.0.0.1:P` of every node, by index.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.node_url(i)).collect()
    }

    /// `redis://127.0.0.1:P` of node `i`.
    pub fn node_url(&self, i: usize) -> String {
        let (scheme, host) = self.scheme_host();
        format!("{scheme}://{host}:{}", self.nodes[i].port)
    }

    /// Node 0's URL with `userinfo` (`:password` or `user:password`, URL-encoded).
    pub fn url_with(&self, userinfo: &str) -> String {
        self.node_url_with(0, userinfo)
    }

    /// Node `i`'s URL with `userinfo` (`:password` or `user:password`, URL-encoded).
    pub fn node_url_with(&self, i: usize, userinfo: &str) -> String {
        let (scheme, host) = self.scheme_host();
        format!("{scheme}://{userinfo}@{host}:{}", self.nodes[i].port)
    }

    /// The scheme and host of the nodes' URLs: `rediss` and `localhost` (the name the test
    /// certificate carries) for a TLS cluster, else `redis` and `127.0.0.1`.
    fn scheme_host(&self) -> (&'static str, &'static str) {
        if self.ca.is_some() {
            ("rediss", "localhost")
        } else {
            ("redis", "127.0.0.1")
        }
    }

    /// The password the nodes require, if any.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// Node `i`'s URL with the password, if any: what the helpers use, and what a test
    /// gives a client that should simply get in.
    pub fn admin_url(&self, i: usize) -> String {
        match &self.password {
            Some(pw) => self.node_url_with(i, &format!(":{}", percent_encode(pw))),
            None => self.node_url(i),
        }
    }

    /// Runs one command on node `i` (authenticated when the cluster has a password; no
    /// redirection is followed): the reply, or the error text (e.g. `MOVED …`).
    pub fn cmd<A: redis::ToRedisArgs>(&self, i: usize, args: &[A]) -> Result<redis::Value, String> {
        let url = self.admin_url(i);
        let client = match &self.ca {
            None => redis::Client::open(url.as_str()),
            Some(ca) => redis::Client::build_with_tls(
                url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            ),
        };
        query_on(&client.map_err(|e| e.to_string())?, args)
    }

    /// Whether node `i` itself holds `key` (`EXISTS`, no redirection followed): to see
    /// that data went to the master serving its slot.
    pub fn holds(&self, i: usize, key: &str) -> bool {
        self.cmd(i, &["EXISTS", key]) == Ok(redis::Value::Int(1))
    }

    /// A command's reply on node `i` as text; panics on an error.
    fn text<A: redis::ToRedisArgs>(&self, i: usize, args: &[A]) -> String {
        let v = self
            .cmd(i, args)
            .unwrap_or_else(|e| panic!("node {i}: command failed: {e}"));
        redis::from_redis_value(v).unwrap_or_else(|e| panic!("node {i}: not text: {e}"))
    }

    /// Node `i`'s cluster id.
    pub fn node_id(&self, i: usize) -> &str {
        &self.ids[i]
    }

    /// The index of the node with cluster id `id`.
    fn index_of(&self, id: &str) -> usize {
        self.ids
            .iter()
            .position(|x| x == id)
            .unwrap_or_else(|| panic!("no node has id {id}"))
    }

    /// Whether node `i`'s process runs (not killed).
    pub fn is_alive(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// The nodes that run, by index.
    fn alive(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.is_alive(i))
            .collect()
    }

    /// Node `i`'s `CLUSTER NODES`, parsed; the error text when it cannot answer.
    fn view(&self, i: usize) -> Result<Vec<NodeLine>, String> {
        let v = self.cmd(i, &["CLUSTER", "NODES"])?;
        let text: String = redis::from_redis_value(v).map_err(|e| e.to_string())?;
        Ok(text.lines().filter_map(NodeLine::parse).collect())
    }

    /// A view in comparable form.
    fn agreed(view: &[NodeLine]) -> Agreed {
        let mut owners = Vec::new();
        let mut replicas = BTreeMap::new();
        for n in view.iter().filter(|n| !n.failed()) {
            owners.extend(n.slots.iter().map(|&(a, b)| (a, b, n.id.clone())));
            if let Some(m) = &n.master {
                replicas.insert(n.id.clone(), m.clone());
            }
        }
        owners.sort();
        Agreed { owners, replicas }
    }

    /// The view of the first node that runs (the one asked about the whole cluster).
    fn current_view(&self) -> Vec<NodeLine> {
        let i = *self.alive().first().expect("a node that runs");
        self.view(i).unwrap_or_else(|e| panic!("node {i}: {e}"))
    }

    /// Why the cluster is not settled yet, or `Ok`: settled means every node that runs
    /// says `cluster_state:ok`, knows every other node that runs as healthy and every
    /// killed one as failed, all have the same slot map and replicas, and every replica
    /// that runs is in sync with its master.
    fn settled(&self) -> Result<(), String> {
        let alive = self.alive();
        let mut first: Option<(usize, Agreed)> = None;
        for &i in &alive {
            let info = self.cmd(i, &["CLUSTER", "INFO"])?;
            let info: String = redis::from_redis_value(info).map_err(|e| e.to_string())?;
            if info_field(&info, "cluster_state") != Some("ok") {
                return Err(format!("node {i}: cluster_state is not ok"));
            }
            let view = self.view(i)?;
            for n in &view {
                let j = self.index_of(&n.id);
                if self.is_alive(j) && (n.failed() || n.has_flag("handshake")) {
                    return Err(format!("node {i} sees node {j} as {:?}", n.flags));
                }
                if !self.is_alive(j) && !n.has_flag("fail") {
                    return Err(format!(
                        "node {i} does not see killed node {j} as failed yet"
                    ));
                }
                if n.has_flag("myself") && n.has_flag("slave") {
                    let master = self.index_of(n.master.as_deref().unwrap_or_default());
                    self.in_sync(i, master)?;
                }
            }
            let agreed = RedisClusterProcs::agreed(&view);
            match &first {
                None => first = Some((i, agreed)),
                Some((f, a)) if *a != agreed => {
                    return Err(format!("nodes {f} and {i} disagree: {a:?} / {agreed:?}"));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// `INFO replication` of node `i`.
    fn replication(&self, i: usize) -> Result<String, String> {
        let v = self.cmd(i, &["INFO", "replication"])?;
        redis::from_redis_value(v).map_err(|e| e.to_string())
    }

    /// Whether replica `r` is in sync with `master`: linked, not loading a full sync,
    /// and it has everything the master had written when asked (a replica just synced
    /// may still lag, and a fresh client's WAIT says nothing about writes MIGRATE made).
    fn in_sync(&self, r: usize, master: usize) -> Result<(), String> {
        let m = self.replication(master)?;
        let written: u64 = info_field(&m, "master_repl_offset")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("node {master} has no master_repl_offset"))?;
        let repl = self.replication(r)?;
        let has: u64 = info_field(&repl, "slave_repl_offset")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if info_field(&repl, "master_link_status") != Some("up")
            || info_field(&repl, "master_sync_in_progress") != Some("0")
            || has < written
        {
            return Err(format!(
                "replica {r} is not in sync with master {master} (offset {has} of {written})"
            ));
        }
        Ok(())
    }

    /// Waits until [`Self::settled`]; panics after `limit` with the last reason (`what`
    /// names the change waited for).
    fn wait_settled(&self, what: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let why = match self.settled() {
                Ok(()) => return,
                Err(why) => why,
            };
            if Instant::now() > deadline {
                panic!("{what}: not settled after {limit:?}: {why}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The nodes that serve slots now (as the first node that runs sees it).
    pub fn masters(&self) -> Vec<usize> {
        let mut out: Vec<usize> = self
            .current_view()
            .iter()
            .filter(|n| !n.failed() && !n.slots.is_empty())
            .map(|n| self.index_of(&n.id))
            .collect();
        out.sort_unstable();
        out
    }

    /// The slot ranges (inclusive) node `i` serves now (as the first node that runs sees
    /// it): to pick slots of one master, e.g. to unassign some of them.
    pub fn slots_of(&self, i: usize) -> Vec<(u16, u16)> {
        self.current_view()
            .into_iter()
            .find(|n| n.id == self.ids[i] && !n.failed())
            .map(|n| n.slots)
            .unwrap_or_default()
    }

    /// For each master (by index, sorted), the first room `<prefix>N` whose slot (that of
    /// its `{room}` hash tag) it serves now: rooms that reach every master, so a test
    /// covers each.
    pub fn room_per_master(&self, prefix: &str) -> Vec<(usize, String)> {
        let masters = self.masters();
        let view = self.current_view();
        let mut rooms = BTreeMap::new();
        for n in 0..100_000 {
            if rooms.len() == masters.len() {
                break;
            }
            let room = format!("{prefix}{n}");
            let owner = RedisClusterProcs::owner(&view, self.slot_of(&room))
                .unwrap_or_else(|| panic!("no master serves the slot of {room}"));
            rooms.entry(self.index_of(owner)).or_insert(room);
        }
        assert_eq!(rooms.len(), masters.len(), "a room for each master");
        rooms.into_iter().collect()
    }

    /// The replicas of master `m` that run (as the first node that runs sees it).
    pub fn replicas_of(&self, m: usize) -> Vec<usize> {
        let mut out: Vec<usize> = self
            .current_view()
            .iter()
            .filter(|n| !n.failed() && n.master.as_deref() == Some(&self.ids[m]))
            .map(|n| self.index_of(&n.id))
            .collect();
        out.sort_unstable();
        out
    }

    /// The node serving `slot` now (as the first node that runs sees it).
    pub fn master_for_slot(&self, slot: u16) -> usize {
        self.master_for_slot_if_any(slot)
            .unwrap_or_else(|| panic!("no healthy master for slot {slot}"))
    }

    /// Like [`Self::master_for_slot`], but `None` while no node that runs answers or
    /// the slot has no healthy master.
    fn master_for_slot_if_any(&self, slot: u16) -> Option<usize> {
        let view = self.view(*self.alive().first()?).ok()?;
        RedisClusterProcs::owner(&view, slot).map(|id| self.index_of(id))
    }

    /// Who serves `slot` in `view`, by id (failed nodes left out).
    fn owner(view: &[NodeLine], slot: u16) -> Option<&str> {
        view.iter()
            .filter(|n| !n.failed())
            .find(|n| n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .map(|n| n.id.as_str())
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`: the `{hash tag}` if it has one).
    pub fn slot_of(&self, key: &str) -> u16 {
        let v = self
            .cmd(self.alive()[0], &["CLUSTER", "KEYSLOT", key])
            .expect("CLUSTER KEYSLOT");
        redis::from_redis_value(v).expect("a slot number")
    }

    /// Waits (at most 10 s) until every replica of master `m` has all `m` wrote: a write
    /// acked without `WAIT` reaches the replicas a moment later, and a test that kills `m`
    /// and then expects the data on the promoted replica must wait for it first.
    pub fn wait_replicated(&self, m: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for r in self.replicas_of(m) {
            while let Err(e) = self.in_sync(r, m) {
                assert!(Instant::now() < deadline, "{e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGKILLs node `i` (no-op when it is not running). For a master, remembers what it
    /// served and its replicas, for [`Self::wait_failover`].
    pub fn kill_node(&mut self, i: usize) {
        if !self.is_alive(i) {
            return;
        }
        let others = self.alive().into_iter().find(|&j| j != i);
        let before = others.and_then(|j| self.view(j).ok()).and_then(|view| {
            let me = view.iter().find(|n| n.id == self.ids[i])?;
            (!me.slots.is_empty()).then(|| KilledMaster {
                slots: me.slots.clone(),
                replicas: view
                    .iter()
                    .filter(|n| n.master.as_deref() == Some(&self.ids[i]))
                    .map(|n| self.index_of(&n.id))
                    .collect(),
            })
        });
        self.killed.insert(i, before);
        self.nodes[i].kill();
    }

    /// Waits (at most 15 s) until a replica of the killed master `old` serves all it
    /// served and the cluster settled again (state ok everywhere, one slot map, replicas
    /// in sync); the new master's index.
    pub fn wait_failover(&self, old: usize) -> usize {
        let killed = match self.killed.get(&old) {
            Some(Some(k)) => k.clone(),
            Some(None) => panic!("node {old} served no slots when it was killed"),
            None => panic!("node {old} was not killed with kill_node"),
        };
        let started = Instant::now();
        let deadline = started + FAILOVER_TIMEOUT;
        let first_slot = killed.slots[0].0;
        loop {
            let new = self.master_for_slot_if_any(first_slot);
            let taken_over = new.is_some_and(|n| killed.replicas.contains(&n));
            if taken_over && self.settled().is_ok() {
                let new = new.expect("checked");
                for &(a, _) in &killed.slots {
                    assert_eq!(self.master_for_slot(a), new, "slot {a} moved elsewhere");
                }
                return new;
            }
            if Instant::now() > deadline {
                panic!(
                    "no failover of node {old} (replicas {:?}) within {FAILOVER_TIMEOUT:?}: slot \
                     {first_slot} is served by {new:?}; {:?}",
                    killed.replicas,
                    self.settled()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Moves `slot` to master `to` as `redis-cli --cluster reshard` would, live: the
    /// target IMPORTING and the source MIGRATING it, the slot's keys MIGRATEd in batches
    /// of 10 (`GETKEYSINSLOT`), then `SETSLOT … NODE` on the target, the source and every
    /// other master; returns once every node agrees (at most 30 s). Clients see `ASK`
    /// and `TRYAGAIN` meanwhile, then `MOVED`.
    pub fn migrate_slot(&self, slot: u16, to: usize) {
        let from = self.master_for_slot(slot);
        if from == to {
            return;
        }
        assert!(
            self.masters().contains(&to),
            "node {to} is not a master: {:?}",
            self.masters()
        );
        let s = slot.to_string();
        let ok = |i: usize, args: &[&str]| {
            self.cmd(i, args)
                .unwrap_or_else(|e| panic!("node {i}: {args:?}: {e}"));
        };
        ok(
            to,
            &["CLUSTER", "SETSLOT", &s, "IMPORTING", &self.ids[from]],
        );
        ok(
            from,
            &["CLUSTER", "SETSLOT", &s, "MIGRATING", &self.ids[to]],
        );
        let batch = MIGRATE_BATCH.to_string();
        let to_port = self.nodes[to].port.to_string();
        loop {
            let keys = self
                .cmd(from, &["CLUSTER", "GETKEYSINSLOT", &s, &batch])
                .unwrap_or_else(|e| panic!("GETKEYSINSLOT {slot}: {e}"));
            let keys: Vec<Vec<u8>> = redis::from_redis_value(keys).expect("a list of keys");
            if keys.is_empty() {
                break;
            }
            let mut args: Vec<Vec<u8>> = ["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000"]
                .iter()
                .map(|a| a.as_bytes().to_vec())
                .collect();
            if let Some(pw) = &self.password {
                args.extend([b"AUTH".to_vec(), pw.as_bytes().to_vec()]);
            }
            args.push(b"KEYS".to_vec());
            args.extend(keys);
            self.cmd(from, &args)
                .unwrap_or_else(|e| panic!("MIGRATE of slot {slot} to node {to}: {e}"));
        }
        let node = |i: usize| ok(i, &["CLUSTER", "SETSLOT", &s, "NODE", &self.ids[to]]);
        node(to);
        node(from);
        for m in self.masters() {
            if m != to && m != from {
                node(m);
            }
        }
        self.wait_settled(&format!("slot {slot} moved to node {to}"), SETTLE_TIMEOUT);
        for i in self.alive() {
            let view = self.view(i).unwrap_or_else(|e| panic!("node {i}: {e}"));
            let owner = RedisClusterProcs::owner(&view, slot);
            assert_eq!(
                owner,
                Some(self.node_id(to)),
                "node {i}'s owner of slot {slot}"
            );
        }
    }
}
