//! The ScyllaDB store without a ScyllaDB node: the `scylla-proxy` crate in dry mode plays
//! the node. Its request rules answer the driver's handshake (OPTIONS → SUPPORTED,
//! STARTUP/REGISTER → READY), refuse the driver's system-table queries (the driver then
//! runs on the contact points alone, as it does when its first metadata read fails), and
//! hand PREPARE / EXECUTE / BATCH frames to a small in-memory fake of corelay's four tables
//! written here, which decodes the bound values and answers with hand-encoded CQL v4 RESULT
//! frames. Extra rules put in front of it drop or fail chosen statements.
//!
//! What this covers: the wire-level wiring (which statements are prepared, their bind and
//! column types as the driver checks them, consistency, batch kinds, the store's write
//! protocol and bucket walks, as *this fake* understands CQL), unreachable nodes, a missing
//! schema, timeouts, server errors and bounded retries. What it cannot cover: ScyllaDB's own
//! semantics (ORDER BY/LIMIT on real partitions, USING TIMESTAMP conflict resolution,
//! logged batch atomicity, consistency levels on real replicas): the generic suite in
//! `tests/store_suite.rs` runs against a real node when `CORELAY_TEST_SCYLLA` is set.
//!
//! Cluster mode (`store = "scylla"` with Redis): the cluster append path on the wire, the
//! composed store (a real `redis-server` for the recent window, this fake for ScyllaDB),
//! and two real `corelay serve` hosts sharing one Redis and the fake node, with a ScyllaDB
//! failure in the middle. None of this is a real ScyllaDB round trip.

mod common;
mod common_redis;
use common_redis::{on_shard_blocking as on_shard, publish_one};

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use corelay::bridge::Bridge;
use corelay::cluster::shard_link::ShardLink;
use corelay::config::{HumanDuration, ScyllaConfig, ScyllaConsistency};
use corelay::store::scylla::{statement_texts, ScyllaStore};
use corelay::store::{HistoryQuery, HistoryStore, StoreError, StoredMessage};
use scylla::errors::DbError;
use scylla_proxy::{
    Condition, Node, Proxy, Reaction, RequestFrame, RequestOpcode, RequestReaction, RequestRule,
    ResponseFrame, ResponseOpcode, RunningProxy,
};

// ---------------------------------------------------------------------------------------
// CQL v4 encoding and decoding, just what the fake needs
// ---------------------------------------------------------------------------------------

const BIGINT: u16 = 0x0002;
const INT: u16 = 0x0009;
const TIMESTAMP: u16 = 0x000B;
const VARCHAR: u16 = 0x000D;

/// Consistency codes on the wire.
const QUORUM: u16 = 0x0004;

/// A bound or returned value: `None` is CQL null.
type Value = Option<Vec<u8>>;

fn put_string(b: &mut BytesMut, s: &str) {
    b.put_u16(u16::try_from(s.len()).expect("short string"));
    b.put_slice(s.as_bytes());
}

fn big(v: i64) -> Value {
    Some(v.to_be_bytes().to_vec())
}

fn text(s: &str) -> Value {
    Some(s.as_bytes().to_vec())
}

/// Reads a request body; every read is checked (a malformed frame is a test failure).
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        assert!(self.0.len() >= n, "truncated frame");
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }
    fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take(2).try_into().expect("2 bytes"))
    }
    fn i32(&mut self) -> i32 {
        i32::from_be_bytes(self.take(4).try_into().expect("4 bytes"))
    }
    fn short_bytes(&mut self) -> Vec<u8> {
        let n = usize::from(self.u16());
        self.take(n).to_vec()
    }
    fn long_string(&mut self) -> String {
        let n = usize::try_from(self.i32()).expect("length");
        String::from_utf8(self.take(n).to_vec()).expect("utf-8")
    }
    fn value(&mut self) -> Value {
        let n = self.i32();
        if n < 0 {
            None
        } else {
            Some(self.take(usize::try_from(n).expect("length")).to_vec())
        }
    }
    fn values(&mut self) -> Vec<Value> {
        let n = self.u16();
        (0..n).map(|_| self.value()).collect()
    }
}

fn as_i64(v: &Value) -> i64 {
    i64::from_be_bytes(
        v.as_deref()
            .expect("non-null bigint")
            .try_into()
            .expect("8 bytes"),
    )
}

fn as_i32(v: &Value) -> i32 {
    i32::from_be_bytes(
        v.as_deref()
            .expect("non-null int")
            .try_into()
            .expect("4 bytes"),
    )
}

fn as_text(v: &Value) -> String {
    String::from_utf8(v.clone().expect("non-null text")).expect("utf-8")
}

/// What a statement binds and returns, as the fake's "schema" says.
struct Sig {
    name: &'static str,
    table: &'static str,
    binds: &'static [(&'static str, u16)],
    columns: &'static [(&'static str, u16)],
}

const MSG_COLUMNS: &[(&str, u16)] = &[
    ("offset", BIGINT),
    ("id", VARCHAR),
    ("user", VARCHAR),
    ("text", VARCHAR),
    ("ts", TIMESTAMP),
    ("cid", VARCHAR),
];

/// In the order of `statement_texts` (the store's own list of the CQL it prepares).
const SIGS: &[Sig] = &[
    Sig {
        name: "insert_message",
        table: "messages",
        binds: &[
            ("room", VARCHAR),
            ("bucket", BIGINT),
            ("offset", BIGINT),
            ("id", VARCHAR),
            ("user", VARCHAR),
            ("text", VARCHAR),
            ("ts", TIMESTAMP),
            ("cid", VARCHAR),
        ],
        columns: &[],
    },
    Sig {
        name: "insert_cid",
        table: "cids",
        binds: &[
            ("room", VARCHAR),
            ("user", VARCHAR),
            ("cid", VARCHAR),
            ("offset", BIGINT),
            ("ts", TIMESTAMP),
            ("[timestamp]", BIGINT),
        ],
        columns: &[],
    },
    Sig {
        name: "set_latest",
        table: "room_latest",
        binds: &[
            ("[timestamp]", BIGINT),
            ("latest", BIGINT),
            ("room", VARCHAR),
        ],
        columns: &[],
    },
    Sig {
        name: "get_latest",
        table: "room_latest",
        binds: &[("room", VARCHAR)],
        columns: &[("latest", BIGINT)],
    },
    Sig {
        name: "read_desc",
        table: "messages",
        binds: &[
            ("room", VARCHAR),
            ("bucket", BIGINT),
            ("offset", BIGINT),
            ("[limit]", INT),
        ],
        columns: MSG_COLUMNS,
    },
    Sig {
        name: "read_asc",
        table: "messages",
        binds: &[
            ("room", VARCHAR),
            ("bucket", BIGINT),
            ("offset", BIGINT),
            ("offset", BIGINT),
            ("[limit]", INT),
        ],
        columns: MSG_COLUMNS,
    },
    Sig {
        name: "get_message",
        table: "messages",
        binds: &[("room", VARCHAR), ("bucket", BIGINT), ("offset", BIGINT)],
        columns: MSG_COLUMNS,
    },
    Sig {
        name: "get_cid",
        table: "cids",
        binds: &[("room", VARCHAR), ("user", VARCHAR), ("cid", VARCHAR)],
        columns: &[("offset", BIGINT), ("ts", TIMESTAMP)],
    },
    Sig {
        name: "get_meta",
        table: "meta",
        binds: &[("key", VARCHAR)],
        columns: &[("value", VARCHAR)],
    },
    Sig {
        name: "put_meta",
        table: "meta",
        binds: &[("key", VARCHAR), ("value", VARCHAR)],
        columns: &[],
    },
];

/// The prepared-statement id the fake hands out: the name, marked so a rule can find it
/// in EXECUTE and BATCH bodies.
fn id_of(name: &str) -> Vec<u8> {
    format!("#ID:{name}#").into_bytes()
}

fn name_of(id: &[u8]) -> Option<&'static str> {
    SIGS.iter().map(|s| s.name).find(|name| id_of(name) == id)
}

/// A condition true for frames that carry this statement's id (EXECUTE or BATCH).
fn carries(name: &str) -> Condition {
    Condition::BodyContainsCaseSensitive(id_of(name).into_boxed_slice())
}

fn put_specs(b: &mut BytesMut, ks: &str, table: &str, specs: &[(&str, u16)]) {
    put_string(b, ks);
    put_string(b, table);
    for (name, typ) in specs {
        put_string(b, name);
        b.put_u16(*typ);
    }
}

fn prepared(ks: &str, sig: &Sig) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_i32(4); // Prepared
    b.put_u16(u16::try_from(id_of(sig.name).len()).expect("id"));
    b.put_slice(&id_of(sig.name));
    // Prepared metadata: global table spec, no partition key indexes (no token routing).
    b.put_i32(0x0001);
    b.put_i32(i32::try_from(sig.binds.len()).expect("binds"));
    b.put_i32(0);
    put_specs(&mut b, ks, sig.table, sig.binds);
    // Result metadata.
    if sig.columns.is_empty() {
        b.put_i32(0x0004); // no metadata
        b.put_i32(0);
    } else {
        b.put_i32(0x0001);
        b.put_i32(i32::try_from(sig.columns.len()).expect("columns"));
        put_specs(&mut b, ks, sig.table, sig.columns);
    }
    b
}

fn rows(ks: &str, sig: &Sig, rows: &[Vec<Value>]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_i32(2); // Rows
    b.put_i32(0x0001);
    b.put_i32(i32::try_from(sig.columns.len()).expect("columns"));
    put_specs(&mut b, ks, sig.table, sig.columns);
    b.put_i32(i32::try_from(rows.len()).expect("rows"));
    for row in rows {
        for v in row {
            match v {
                None => b.put_i32(-1),
                Some(bytes) => {
                    b.put_i32(i32::try_from(bytes.len()).expect("cell"));
                    b.put_slice(bytes);
                }
            }
        }
    }
    b
}

fn void() -> BytesMut {
    let mut b = BytesMut::new();
    b.put_i32(1);
    b
}

// ---------------------------------------------------------------------------------------
// The fake node
// ---------------------------------------------------------------------------------------

/// One frame the fake answered, for the tests' assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Prepare(String),
    Execute {
        name: String,
        consistency: u16,
    },
    Batch {
        kind: u8,
        names: Vec<String>,
        consistency: u16,
    },
}

/// A stored `messages` row: id, user, text, ts, cid.
type Row = (String, String, String, i64, Option<String>);

/// corelay's four tables in memory, with last-write-wins by the bound USING TIMESTAMP
/// where the store gives one.
#[derive(Default)]
struct Fake {
    keyspace: String,
    messages: BTreeMap<(String, i64, i64), Row>,
    cids: HashMap<(String, String, String), (i64, i64, i64)>,
    latest: HashMap<String, (i64, i64)>,
    meta: HashMap<String, String>,
    seen: Vec<Seen>,
}

impl Fake {
    fn sig(name: &str) -> &'static Sig {
        SIGS.iter()
            .find(|s| s.name == name)
            .expect("known statement")
    }

    fn msg_row(offset: i64, r: &Row) -> Vec<Value> {
        vec![
            big(offset),
            text(&r.0),
            text(&r.1),
            text(&r.2),
            big(r.3),
            r.4.as_deref().and_then(text),
        ]
    }

    /// Runs one statement; `Some(rows)` for a SELECT.
    fn run(&mut self, name: &str, v: &[Value]) -> Option<Vec<Vec<Value>>> {
        assert_eq!(v.len(), Fake::sig(name).binds.len(), "{name}: bound values");
        match name {
            "insert_message" => {
                let key = (as_text(&v[0]), as_i64(&v[1]), as_i64(&v[2]));
                let cid = v[7].as_ref().map(|_| as_text(&v[7]));
                self.messages.insert(
                    key,
                    (
                        as_text(&v[3]),
                        as_text(&v[4]),
                        as_text(&v[5]),
                        as_i64(&v[6]),
                        cid,
                    ),
                );
                None
            }
            "insert_cid" => {
                let key = (as_text(&v[0]), as_text(&v[1]), as_text(&v[2]));
                let new = (as_i64(&v[3]), as_i64(&v[4]), as_i64(&v[5]));
                let cell = self.cids.entry(key).or_insert(new);
                if new.2 >= cell.2 {
                    *cell = new;
                }
                None
            }
            "set_latest" => {
                let (wts, latest, room) = (as_i64(&v[0]), as_i64(&v[1]), as_text(&v[2]));
                let cell = self.latest.entry(room).or_insert((latest, wts));
                if wts >= cell.1 {
                    *cell = (latest, wts);
                }
                None
            }
            "get_latest" => Some(
                self.latest
                    .get(&as_text(&v[0]))
                    .map(|(l, _)| vec![big(*l)])
                    .into_iter()
                    .collect(),
            ),
            "read_desc" | "read_asc" | "get_message" => {
                let (room, bucket) = (as_text(&v[0]), as_i64(&v[1]));
                let (lo, hi, limit) = match name {
                    "read_desc" => (i64::MIN, as_i64(&v[2]), as_i32(&v[3])),
                    "read_asc" => (as_i64(&v[2]), as_i64(&v[3]), as_i32(&v[4])),
                    _ => (as_i64(&v[2]), as_i64(&v[2]), i32::MAX),
                };
                let range = self
                    .messages
                    .range((room.clone(), bucket, lo)..=(room, bucket, hi))
                    .map(|((_, _, o), r)| Fake::msg_row(*o, r));
                let limit = usize::try_from(limit).expect("positive limit");
                Some(if name == "read_desc" {
                    range.rev().take(limit).collect()
                } else {
                    range.take(limit).collect()
                })
            }
            "get_cid" => {
                let key = (as_text(&v[0]), as_text(&v[1]), as_text(&v[2]));
                Some(
                    self.cids
                        .get(&key)
                        .map(|(o, ts, _)| vec![big(*o), big(*ts)])
                        .into_iter()
                        .collect(),
                )
            }
            "get_meta" => Some(
                self.meta
                    .get(&as_text(&v[0]))
                    .map(|val| vec![text(val)])
                    .into_iter()
                    .collect(),
            ),
            "put_meta" => {
                self.meta.insert(as_text(&v[0]), as_text(&v[1]));
                None
            }
            other => panic!("unknown statement {other}"),
        }
    }

    /// Answers one request frame the earlier rules let through.
    fn answer(&mut self, frame: RequestFrame) -> ResponseFrame {
        let mut r = Reader(&frame.body);
        let body = match frame.opcode {
            RequestOpcode::Options => {
                return ResponseFrame::forged_supported(frame.params, &HashMap::new())
                    .expect("supported")
            }
            RequestOpcode::Startup | RequestOpcode::Register => {
                return ResponseFrame::forged_ready(frame.params)
            }
            RequestOpcode::Prepare => {
                let cql = r.long_string();
                self.seen.push(Seen::Prepare(cql.clone()));
                let texts = statement_texts(&self.keyspace);
                let Some(i) = texts.iter().position(|t| *t == cql) else {
                    return error(
                        &frame,
                        DbError::Invalid,
                        &format!("unknown statement {cql}"),
                    );
                };
                prepared(&self.keyspace, &SIGS[i])
            }
            RequestOpcode::Execute => {
                let id = r.short_bytes();
                let consistency = r.u16();
                let flags = r.u8();
                let values = if flags & 0x01 != 0 {
                    r.values()
                } else {
                    Vec::new()
                };
                let Some(name) = name_of(&id) else {
                    return error(
                        &frame,
                        DbError::Unprepared {
                            statement_id: id.into(),
                        },
                        "?",
                    );
                };
                self.seen.push(Seen::Execute {
                    name: name.to_owned(),
                    consistency,
                });
                match self.run(name, &values) {
                    Some(found) => rows(&self.keyspace, Fake::sig(name), &found),
                    None => void(),
                }
            }
            RequestOpcode::Batch => {
                let kind = r.u8();
                let n = r.u16();
                let mut statements = Vec::new();
                for _ in 0..n {
                    assert_eq!(r.u8(), 1, "batch of prepared statements");
                    let id = r.short_bytes();
                    let name = name_of(&id).expect("known id");
                    statements.push((name, r.values()));
                }
                let consistency = r.u16();
                self.seen.push(Seen::Batch {
                    kind,
                    names: statements.iter().map(|(n, _)| (*n).to_owned()).collect(),
                    consistency,
                });
                for (name, values) in statements {
                    assert!(self.run(name, &values).is_none(), "writes only in batches");
                }
                void()
            }
            // System tables (topology, schema): refused, so the driver runs on the contact
            // points alone.
            _ => return error(&frame, DbError::ServerError, "dry-mode proxy"),
        };
        ResponseFrame::new(
            frame.params.for_response(),
            ResponseOpcode::Result,
            body.freeze(),
        )
    }
}

/// An ERROR frame answering `frame`.
fn error(frame: &RequestFrame, e: DbError, msg: &str) -> ResponseFrame {
    ResponseFrame::forged_error(frame.params, e, Some(msg)).expect("error frame")
}

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// The catch-all rule: the fake answers every frame no earlier rule took.
fn answer_rule(fake: Arc<Mutex<Fake>>) -> RequestRule {
    RequestRule(
        Condition::True,
        RequestReaction::forge_response(Arc::new(move |frame| {
            fake.lock().unwrap_or_else(|p| p.into_inner()).answer(frame)
        })),
    )
}

/// A dry-mode proxy node backed by the fake, on its own tokio runtime (a second bridge).
struct FakeNode {
    addr: SocketAddr,
    fake: Arc<Mutex<Fake>>,
    proxy: Option<RunningProxy>,
    runtime: Bridge,
}

impl FakeNode {
    fn start(keyspace: &str) -> FakeNode {
        let addr = SocketAddr::new(scylla_proxy::get_exclusive_local_address(), 9042);
        let fake = Arc::new(Mutex::new(Fake {
            keyspace: keyspace.to_owned(),
            ..Fake::default()
        }));
        let answer = answer_rule(fake.clone());
        let runtime = Bridge::start().expect("proxy runtime");
        let proxy = runtime
            .block_on(async move {
                Proxy::builder()
                    .with_node(
                        Node::builder()
                            .proxy_address(addr)
                            .request_rules(vec![answer])
                            .build_dry_mode(),
                    )
                    .build()
                    .run()
                    .await
            })
            .expect("runtime")
            .expect("proxy");
        FakeNode {
            addr,
            fake,
            proxy: Some(proxy),
            runtime,
        }
    }

    /// Puts rules in front of the fake (highest priority first).
    fn prepend(&mut self, rules: Vec<RequestRule>) {
        if let Some(p) = self.proxy.as_mut() {
            p.running_nodes[0].prepend_request_rules(rules);
        }
    }

    /// Removes the rules put in front: only the fake's catch-all is left.
    fn clear_prepended(&mut self) {
        let answer = answer_rule(self.fake.clone());
        if let Some(p) = self.proxy.as_mut() {
            p.running_nodes[0].change_request_rules(Some(vec![answer]));
        }
    }

    fn config(&self, keyspace: &str) -> ScyllaConfig {
        ScyllaConfig {
            nodes: vec![self.addr.to_string()],
            keyspace: keyspace.to_owned(),
            consistency: ScyllaConsistency::Quorum,
            request_timeout: HumanDuration(Duration::from_secs(2)),
            retries: 2,
            bucket_size: 4,
            ..ScyllaConfig::default()
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.fake.lock().expect("fake").seen.clone()
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        if let Some(proxy) = self.proxy.take() {
            let _ = self.runtime.block_on(async move { proxy.finish().await });
        }
        self.runtime.shutdown();
    }
}

/// Opens a store on its own bridge (blocking, as the main thread does).
fn open(cfg: &ScyllaConfig) -> Result<ScyllaStore, StoreError> {
    let bridge = Bridge::start().expect("bridge");
    futures::executor::block_on(ScyllaStore::connect(cfg, bridge))
}

fn msg(room: &str, offset: u64, user: &str, cid: Option<&str>) -> StoredMessage {
    StoredMessage {
        room: room.to_owned(),
        offset,
        id: format!("id-{room}-{offset}"),
        user: user.to_owned(),
        text: format!("message {offset} in {room} ✓"),
        ts: 1_000 + offset,
        cid: cid.map(str::to_owned),
    }
}

fn offsets(msgs: &[StoredMessage]) -> Vec<u64> {
    msgs.iter().map(|m| m.offset).collect()
}

/// After a write that kept failing: it was tried once plus `retries` times (one message per
/// attempt on `attempts`) and the commit point was never written.
fn assert_retried_never_committed(
    attempts: &mut tokio::sync::mpsc::UnboundedReceiver<(RequestFrame, Option<u16>)>,
    node: &FakeNode,
    cfg: &ScyllaConfig,
) {
    let mut n = 0;
    while attempts.try_recv().is_ok() {
        n += 1;
    }
    assert_eq!(
        n,
        1 + cfg.retries as usize,
        "one attempt and `retries` retries"
    );
    assert_eq!(
        prepared_count(&node.seen(), "set_latest"),
        0,
        "never committed"
    );
}

fn prepared_count(seen: &[Seen], name: &str) -> usize {
    seen.iter()
        .map(|s| match s {
            Seen::Execute { name: n, .. } if n == name => 1,
            Seen::Batch { names, .. } => names.iter().filter(|n| *n == name).count(),
            _ => 0,
        })
        .sum()
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// No node listening: a clear `Open` error naming the nodes, quickly. A keyspace name that
/// is not a plain identifier is refused before anything is sent (it is spliced into CQL).
#[test]
fn unreachable_nodes_and_bad_settings_are_clear_open_errors() {
    let cfg = ScyllaConfig {
        nodes: vec!["127.0.0.1:1".into()],
        request_timeout: HumanDuration(Duration::from_millis(500)),
        ..ScyllaConfig::default()
    };
    let start = Instant::now();
    let err = open(&cfg).expect_err("nothing listens on port 1");
    let text = err.to_string();
    println!("{text} (after {:?})", start.elapsed());
    assert!(matches!(err, StoreError::Open(_)), "{err:?}");
    assert!(
        text.starts_with("cannot open store: cannot reach ScyllaDB at [127.0.0.1:1]: "),
        "{text}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );

    for (cfg, expect) in [
        (
            ScyllaConfig {
                keyspace: "x; DROP KEYSPACE y".into(),
                ..cfg.clone()
            },
            "scylla.keyspace",
        ),
        (
            ScyllaConfig {
                nodes: Vec::new(),
                ..cfg.clone()
            },
            "scylla.nodes is empty",
        ),
        (
            ScyllaConfig {
                bucket_size: 0,
                ..cfg.clone()
            },
            "scylla.bucket_size",
        ),
    ] {
        let err = open(&cfg).expect_err("invalid");
        println!("{err}");
        assert!(
            err.to_string()
                .starts_with("cannot open store: invalid [scylla] configuration: "),
            "{err}"
        );
        assert!(err.to_string().contains(expect), "{err}");
    }
}

/// The node answers, but the keyspace is not there: the error says to run
/// `corelay schema apply`.
#[test]
fn missing_schema_says_run_schema_apply() {
    let mut node = FakeNode::start("corelay");
    node.prepend(vec![RequestRule(
        Condition::RequestOpcode(RequestOpcode::Prepare),
        RequestReaction::forge_with_error_and_message(
            DbError::Invalid,
            Some("Keyspace corelay does not exist".into()),
        ),
    )]);
    let err = open(&node.config("corelay")).expect_err("no schema");
    let text = err.to_string();
    println!("{text}");
    assert!(matches!(err, StoreError::Open(_)), "{err:?}");
    assert!(text.contains("Keyspace corelay does not exist"), "{text}");
    assert!(text.contains(&node.addr.to_string()), "{text}");
    assert!(text.ends_with("run `corelay schema apply`"), "{text}");
}

/// A keyspace written with another bucket size is refused (it would hide all history).
#[test]
fn another_bucket_size_is_refused() {
    let node = FakeNode::start("corelay");
    node.fake
        .lock()
        .expect("fake")
        .meta
        .insert("bucket_size".into(), "1000".into());
    let err = open(&node.config("corelay")).expect_err("bucket size mismatch");
    let text = err.to_string();
    println!("{text}");
    assert!(text.contains("bucket_size 1000"), "{text}");
    assert!(text.contains("scylla.bucket_size is 4"), "{text}");
}

/// The store connects through the proxy, prepares exactly its statements (the driver
/// checks every bound value and every column against the types the fake declares), and a
/// round trip works: appends across bucket boundaries and rooms, reads of every kind that
/// walk buckets, find_cid, conflicts, close. On the wire: the configured consistency on
/// every request, messages in UNLOGGED single-partition batches, then the commit of both
/// rooms in one LOGGED batch after every row is written.
#[test]
fn wiring_prepares_every_statement_and_round_trips() {
    let ks = "corelay_wiring";
    let node = FakeNode::start(ks);
    let store = open(&node.config(ks)).expect("open through the proxy");

    let seen = node.seen();
    // The driver prepares its own system-table queries too (refused here); ours are the
    // ones naming the keyspace.
    let prepared: Vec<&String> = seen
        .iter()
        .filter_map(|s| match s {
            Seen::Prepare(cql) if cql.contains(&format!("{ks}.")) => Some(cql),
            _ => None,
        })
        .collect();
    let texts = statement_texts(ks);
    for t in &texts {
        assert!(prepared.contains(&t), "not prepared: {t}");
    }
    assert!(prepared.iter().all(|p| texts.contains(p)), "{prepared:#?}");
    assert_eq!(
        node.fake.lock().expect("fake").meta.get("bucket_size"),
        Some(&"4".to_owned()),
        "bucket size recorded at first open"
    );

    let mut batch = Vec::new();
    for o in 1..=10 {
        let cid = format!("c{o}");
        batch.push(msg("a", o, "alice", (o % 3 == 0).then_some(cid.as_str())));
    }
    batch.push(msg("b", 1, "bob", Some("only")));
    let first = batch.clone();
    let s = store.clone();
    on_shard(move || async move {
        use HistoryQuery::{After, Before, Latest};
        s.append(batch).await.expect("append");
        assert_eq!(s.latest_offset("a").await.expect("latest"), 10);
        assert_eq!(s.latest_offset("b").await.expect("latest"), 1);
        assert_eq!(s.latest_offset("none").await.expect("latest"), 0);
        let all = s.read("a", After(0), 100).await.expect("read");
        assert_eq!(all, first[..10], "exact round trip");
        let read = |q, n| {
            let s = s.clone();
            async move { offsets(&s.read("a", q, n).await.expect("read")) }
        };
        assert_eq!(read(Latest, 3).await, [8, 9, 10]);
        assert_eq!(read(Latest, 6).await, [5, 6, 7, 8, 9, 10]);
        assert_eq!(read(Latest, 100).await, (1..=10).collect::<Vec<_>>());
        assert_eq!(read(Before(9), 5).await, [4, 5, 6, 7, 8]);
        assert_eq!(read(Before(2), 5).await, [1]);
        assert!(read(Before(1), 5).await.is_empty());
        assert_eq!(read(Before(u64::MAX), 2).await, [9, 10]);
        assert_eq!(read(After(3), 4).await, [4, 5, 6, 7]);
        assert_eq!(read(After(8), 10).await, [9, 10]);
        assert!(read(After(10), 5).await.is_empty());
        assert!(read(Latest, 0).await.is_empty());
        assert_eq!(
            s.read("b", Latest, 5).await.expect("read"),
            first[10..],
            "room b holds only its own"
        );

        let find = |room: &'static str, user: &'static str, cid: &'static str, nb| {
            let s = s.clone();
            async move {
                s.find_cid(room, user, cid, nb)
                    .await
                    .expect("find_cid")
                    .map(|m| m.offset)
            }
        };
        assert_eq!(find("a", "alice", "c6", 0).await, Some(6));
        assert_eq!(
            find("a", "alice", "c6", 1_006).await,
            Some(6),
            "ts == window edge"
        );
        assert_eq!(
            find("a", "alice", "c6", 1_007).await,
            None,
            "outside the window"
        );
        assert_eq!(find("a", "bob", "c6", 0).await, None);
        assert_eq!(find("a", "alice", "c5", 0).await, None);
        assert_eq!(find("b", "bob", "only", 0).await, Some(1));

        match s.append(vec![msg("a", 10, "alice", None)]).await {
            Err(StoreError::OffsetConflict {
                offset: 10,
                latest: 10,
                ..
            }) => {}
            other => panic!("expected OffsetConflict, got {other:?}"),
        }
        s.append(vec![msg("a", 11, "alice", None)])
            .await
            .expect("append more");
        assert_eq!(read(Latest, 2).await, [10, 11]);
        s.health().expect("healthy");
        s.close().await.expect("close");
        assert!(matches!(
            s.latest_offset("a").await,
            Err(StoreError::Closed)
        ));
        assert!(matches!(s.health(), Err(StoreError::Closed)));
    });

    let seen = node.seen();
    for s in &seen {
        if let Seen::Execute { consistency, .. } | Seen::Batch { consistency, .. } = s {
            assert_eq!(*consistency, QUORUM, "configured consistency: {s:?}");
        }
    }
    // Room a's offsets 1..10 in buckets of 4: partitions {1,2,3}, {4..7}, {8,9,10}, each one
    // UNLOGGED batch; room b's single message goes alone.
    let mut message_batches: Vec<(u8, usize)> = seen
        .iter()
        .filter_map(|s| match s {
            Seen::Batch { kind, names, .. } if names[0] == "insert_message" => {
                Some((*kind, names.len()))
            }
            _ => None,
        })
        .collect();
    message_batches.sort_unstable();
    assert_eq!(message_batches, [(1, 3), (1, 3), (1, 4)]);
    let commit = Seen::Batch {
        kind: 0,
        names: vec!["set_latest".into(); 2],
        consistency: QUORUM,
    };
    let commit_at = seen
        .iter()
        .position(|s| *s == commit)
        .expect("both rooms committed in one LOGGED batch");
    let before = &seen[..commit_at];
    assert_eq!(prepared_count(before, "insert_message"), 11);
    assert_eq!(prepared_count(before, "insert_cid"), 4);
    assert_eq!(prepared_count(before, "set_latest"), 0);
}

/// A node that takes a write and never answers: the append fails with `Unavailable` once
/// the configured timeout has passed (it bounds the request, retries included), health says so, and
/// nothing of the message is visible afterwards. Reads time out the same way.
#[test]
fn a_node_that_does_not_answer_is_unavailable_within_the_timeout() {
    let mut node = FakeNode::start("corelay");
    let cfg = ScyllaConfig {
        request_timeout: HumanDuration(Duration::from_secs(1)),
        ..node.config("corelay")
    };
    let store = open(&cfg).expect("open");
    node.prepend(vec![RequestRule(
        carries("insert_message"),
        RequestReaction::drop_frame(),
    )]);
    let s = store.clone();
    let (result, elapsed) = on_shard(move || async move {
        let start = Instant::now();
        let result = s.append(vec![msg("t", 1, "alice", Some("k1"))]).await;
        (result, start.elapsed())
    });
    let err = result.expect_err("no answer");
    println!("{err} (after {elapsed:?})");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(
        err.to_string().contains("did not answer within 1000 ms"),
        "{err}"
    );
    assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
    // `request_timeout` bounds the whole call (retries included), plus a little slack.
    assert!(elapsed < Duration::from_millis(2_500), "{elapsed:?}");
    assert!(matches!(store.health(), Err(StoreError::Unavailable(_))));

    node.clear_prepended();
    let s = store.clone();
    on_shard(move || async move {
        assert_eq!(s.latest_offset("t").await.expect("latest"), 0);
        assert!(s
            .read("t", HistoryQuery::After(0), 10)
            .await
            .expect("read")
            .is_empty());
        // Its cid row was written, but it names an uncommitted offset.
        assert_eq!(s.find_cid("t", "alice", "k1", 0).await.expect("cid"), None);
        s.health().expect("healthy again after a success");
    });
    assert!(
        node.fake.lock().expect("fake").cids.contains_key(&(
            "t".into(),
            "alice".into(),
            "k1".into()
        )),
        "the cid row did reach the node"
    );

    node.prepend(vec![RequestRule(
        carries("get_latest"),
        RequestReaction::drop_frame(),
    )]);
    let s = store.clone();
    let (result, elapsed) = on_shard(move || async move {
        let start = Instant::now();
        let result = s.read("t", HistoryQuery::Latest, 10).await;
        (result, start.elapsed())
    });
    let err = result.expect_err("no answer");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(2_500), "{elapsed:?}");
}

/// The node answers a write with an error: `Unavailable` after exactly `retries` retries,
/// the commit is never sent, nothing is visible. A failed commit leaves the written rows
/// invisible; the next append at the same offsets overwrites them, and the failed
/// message's cid no longer finds anything.
#[test]
fn a_server_error_is_unavailable_after_bounded_retries_and_nothing_is_visible() {
    let mut node = FakeNode::start("corelay");
    let cfg = node.config("corelay"); // retries = 2
    let store = open(&cfg).expect("open");
    let (tx, mut attempts) = tokio::sync::mpsc::unbounded_channel();
    node.prepend(vec![RequestRule(
        carries("insert_message"),
        RequestReaction::forge()
            .server_error()
            .with_feedback_when_performed(tx),
    )]);
    let batch = vec![
        msg("e", 1, "alice", Some("x")),
        msg("e", 2, "alice", None),
        msg("e", 3, "bob", None),
    ];
    let s = store.clone();
    let err = on_shard(move || async move { s.append(batch).await.expect_err("server error") });
    println!("{err}");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("Proxy-triggered error"), "{err}");
    assert_retried_never_committed(&mut attempts, &node, &cfg);

    node.clear_prepended();
    let s = store.clone();
    on_shard(move || async move {
        assert_eq!(s.latest_offset("e").await.expect("latest"), 0);
        assert!(s
            .read("e", HistoryQuery::Latest, 10)
            .await
            .expect("read")
            .is_empty());
        assert_eq!(s.find_cid("e", "alice", "x", 0).await.expect("cid"), None);
    });

    // Rows written, commit refused (a coordinator-side write timeout, retried twice).
    node.prepend(vec![RequestRule(
        carries("set_latest"),
        RequestReaction::forge().write_timeout(),
    )]);
    let s = store.clone();
    let err = on_shard(move || async move {
        s.append(vec![msg("e", 1, "alice", Some("x"))])
            .await
            .expect_err("commit fails")
    });
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(node
        .fake
        .lock()
        .expect("fake")
        .messages
        .contains_key(&("e".into(), 0, 1)));
    node.clear_prepended();
    let s = store.clone();
    on_shard(move || async move {
        assert!(s
            .read("e", HistoryQuery::Latest, 10)
            .await
            .expect("read")
            .is_empty());
        assert_eq!(s.find_cid("e", "alice", "x", 0).await.expect("cid"), None);
        // The offset is reused for another message: stored and visible, the stray cid is not.
        let mut other = msg("e", 1, "bob", None);
        other.text = "second try".into();
        s.append(vec![other.clone()]).await.expect("append");
        assert_eq!(
            s.read("e", HistoryQuery::Latest, 10).await.expect("read"),
            [other]
        );
        assert_eq!(s.find_cid("e", "alice", "x", 0).await.expect("cid"), None);
        s.close().await.expect("close");
    });
}

/// `corelay schema print` prints the shipped schema (for the configured keyspace), and
/// `corelay schema apply` with no node listening fails with a clear message.
#[test]
fn schema_command() {
    let bin = env!("CARGO_BIN_EXE_corelay");
    let out = std::process::Command::new(bin)
        .args(["schema", "print"])
        .env_remove("CORELAY_SCYLLA_KEYSPACE")
        .output()
        .expect("run corelay");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        corelay::store::scylla::SCHEMA_CQL
    );

    let out = std::process::Command::new(bin)
        .args(["schema", "print", "--replication-factor", "1"])
        .env("CORELAY_SCYLLA_KEYSPACE", "chat_eu")
        .output()
        .expect("run corelay");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("CREATE KEYSPACE IF NOT EXISTS chat_eu"),
        "{text}"
    );
    assert!(
        text.contains("CREATE TABLE IF NOT EXISTS chat_eu.messages"),
        "{text}"
    );
    assert!(text.contains("'replication_factor': 1"), "{text}");

    let out = std::process::Command::new(bin)
        .args(["schema", "apply"])
        .env("CORELAY_SCYLLA_NODES", "127.0.0.1:1")
        .env("CORELAY_SCYLLA_REQUEST_TIMEOUT", "500ms")
        .output()
        .expect("run corelay");
    let err = String::from_utf8_lossy(&out.stderr);
    println!("{err}");
    assert!(!out.status.success());
    assert!(
        err.contains("cannot reach ScyllaDB at [127.0.0.1:1]"),
        "{err}"
    );
}

/// The `[scylla]` section: defaults, a list or a comma-separated string of nodes,
/// consistency names, environment overrides, and the password kept out of `Debug`.
#[test]
fn scylla_config_section() {
    use corelay::config::Config;
    let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let c = Config::from_toml_and_env("", env(&[])).expect("defaults");
    assert_eq!(c.scylla.nodes, ["127.0.0.1:9042"]);
    assert_eq!(c.scylla.keyspace, "corelay");
    assert_eq!(c.scylla.consistency, ScyllaConsistency::LocalQuorum);
    assert_eq!(c.scylla.request_timeout.0, Duration::from_secs(2));
    assert_eq!(c.scylla.retries, 2);
    assert_eq!(c.scylla.bucket_size, 1000);
    assert!(c.scylla.username.is_none() && c.scylla.password.is_none());

    let c = Config::from_toml_and_env(
        "[store]\nkind = \"scylla\"\n[scylla]\nnodes = [\"a:9042\", \"b:9042\"]\nconsistency = \"quorum\"\nrequest_timeout = \"750ms\"\nusername = \"corelay\"\npassword = \"s3cret\"",
        env(&[
            ("CORELAY_SCYLLA_KEYSPACE", "chat"),
            ("CORELAY_SCYLLA_BUCKET_SIZE", "500"),
        ]),
    )
    .expect("scylla section");
    assert_eq!(c.scylla.nodes, ["a:9042", "b:9042"]);
    assert_eq!(c.scylla.consistency, ScyllaConsistency::Quorum);
    assert_eq!(c.scylla.request_timeout.0, Duration::from_millis(750));
    assert_eq!(c.scylla.keyspace, "chat");
    assert_eq!(c.scylla.bucket_size, 500);
    let debug = format!("{:?}", c.scylla);
    assert!(!debug.contains("s3cret"), "{debug}");

    let c = Config::from_toml_and_env(
        "",
        env(&[
            ("CORELAY_SCYLLA_NODES", "x:1, y:2"),
            ("CORELAY_SCYLLA_CONSISTENCY", "local_one"),
        ]),
    )
    .expect("env");
    assert_eq!(c.scylla.nodes, ["x:1", "y:2"]);
    assert_eq!(c.scylla.consistency, ScyllaConsistency::LocalOne);

    let err = Config::from_toml_and_env("[scylla]\nconsistency = \"most\"", env(&[]))
        .expect_err("unknown consistency");
    assert!(err.to_string().contains("most"), "{err}");
    let err =
        Config::from_toml_and_env("[scylla]\nnode = \"a:1\"", env(&[])).expect_err("unknown key");
    assert!(err.to_string().contains("node"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Cluster mode
// ---------------------------------------------------------------------------------------

/// How many reads of `messages` / `room_latest` the fake answered.
fn scylla_reads(seen: &[Seen]) -> usize {
    ["read_desc", "read_asc", "get_message", "get_latest"]
        .iter()
        .map(|n| prepared_count(seen, n))
        .sum()
}

/// The cluster append path: hosts write a room's offsets out of order; each append writes
/// the message rows (one UNLOGGED batch per partition) and then raises `room_latest` with
/// `USING TIMESTAMP = offset`, without reading anything first and without cid rows (Redis
/// dedupes in cluster mode). A lower commit arriving later does not lower `room_latest`;
/// writing a message again rewrites the same row; offset 0 is refused before any I/O.
#[test]
fn cluster_appends_arrive_out_of_order_and_room_latest_only_rises() {
    let ks = "corelay_cluster";
    let node = FakeNode::start(ks);
    let store = open(&node.config(ks)).expect("open");
    let before = node.seen().len();
    let s = store.clone();
    on_shard(move || async move {
        // Host B's 7 lands before host A's 5 and 6.
        s.append_cluster(vec![msg("r", 7, "bob", Some("b7"))])
            .await
            .expect("append 7");
        s.append_cluster(vec![msg("r", 5, "alice", None), msg("r", 6, "alice", None)])
            .await
            .expect("append 5, 6");
        assert_eq!(s.latest_offset("r").await.expect("latest"), 7);
        // A retry writes 6 again: same row, nothing else changes.
        s.append_cluster(vec![msg("r", 6, "alice", None)])
            .await
            .expect("rewrite 6");
        let got = s.read("r", HistoryQuery::After(4), 10).await.expect("read");
        assert_eq!(offsets(&got), [5, 6, 7]);
        assert_eq!(got[1], msg("r", 6, "alice", None));
        match s.append_cluster(vec![msg("r", 0, "alice", None)]).await {
            Err(StoreError::Invalid(why)) => assert!(why.contains("offset 0"), "{why}"),
            other => panic!("expected Invalid, got {other:?}"),
        }
        // Two rooms in one append: each room's commit point is its own highest offset.
        s.append_cluster(vec![
            msg("r", 9, "alice", None),
            msg("q", 2, "bob", None),
            msg("r", 8, "alice", None),
        ])
        .await
        .expect("two rooms");
        assert_eq!(s.latest_offset("r").await.expect("latest"), 9);
        assert_eq!(s.latest_offset("q").await.expect("latest"), 2);
        s.close().await.expect("close");
    });

    let fake = node.fake.lock().expect("fake");
    assert_eq!(
        fake.latest.get("r"),
        Some(&(9, 9)),
        "value and write timestamp"
    );
    assert!(fake.cids.is_empty(), "no cid rows in cluster mode");
    let seen = &fake.seen[before..];
    // Every write: rows, then the commit; no read of `room_latest` in between.
    let writes: Vec<&Seen> = seen
        .iter()
        .filter(|s| match s {
            // Reads of the test's own checks; the driver's own metadata statements.
            Seen::Execute { name, .. } => name != "get_latest" && !name.starts_with("read"),
            Seen::Batch { .. } => true,
            Seen::Prepare(_) => false,
        })
        .collect();
    let names: Vec<String> = writes
        .iter()
        .map(|s| match s {
            Seen::Execute { name, .. } => name.clone(),
            Seen::Batch { kind, names, .. } => format!("batch{kind}:{}x{}", names[0], names.len()),
            Seen::Prepare(_) => "prepare".into(),
        })
        .collect();
    // One segment per append, each ending with its commit. Within an append the row
    // writes run concurrently, so their order is not fixed.
    let mut segments: Vec<Vec<&str>> = Vec::new();
    let mut current = Vec::new();
    for n in &names {
        current.push(n.as_str());
        if n.contains("set_latest") {
            current.sort_unstable();
            segments.push(std::mem::take(&mut current));
        }
    }
    assert!(
        current.is_empty(),
        "a write after the last commit: {current:?}"
    );
    let expected: Vec<Vec<&str>> = vec![
        vec!["insert_message", "set_latest"],
        // 5 and 6 share bucket 1: one partition, one UNLOGGED batch.
        vec!["batch1:insert_messagex2", "set_latest"],
        vec!["insert_message", "set_latest"],
        // r's 8 and 9 (bucket 2) and q's 2 (bucket 0): two partitions; both rooms
        // committed in one LOGGED batch.
        vec![
            "batch0:set_latestx2",
            "batch1:insert_messagex2",
            "insert_message",
        ],
    ];
    assert_eq!(segments, expected);
}

/// A cluster append that ScyllaDB does not take: `Unavailable` (within the timeout when
/// the node stays silent; after the bounded retries on a server error), the commit point
/// never sent. Written again once the node is back, the message is there.
#[test]
fn a_failing_cluster_append_is_unavailable_and_never_committed() {
    let mut node = FakeNode::start("corelay");
    let cfg = ScyllaConfig {
        request_timeout: HumanDuration(Duration::from_secs(1)),
        ..node.config("corelay")
    };
    let store = open(&cfg).expect("open");

    node.prepend(vec![RequestRule(
        carries("insert_message"),
        RequestReaction::drop_frame(),
    )]);
    let s = store.clone();
    let (result, elapsed) = on_shard(move || async move {
        let start = Instant::now();
        let r = s
            .append_cluster(vec![msg("f", 3, "alice", Some("k"))])
            .await;
        (r, start.elapsed())
    });
    let err = result.expect_err("no answer");
    println!("{err} (after {elapsed:?})");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(
        err.to_string().contains("did not answer within 1000 ms"),
        "{err}"
    );
    assert!(elapsed < Duration::from_millis(2_500), "{elapsed:?}");
    assert!(matches!(store.health(), Err(StoreError::Unavailable(_))));

    node.clear_prepended();
    let (tx, mut attempts) = tokio::sync::mpsc::unbounded_channel();
    node.prepend(vec![RequestRule(
        carries("insert_message"),
        RequestReaction::forge()
            .server_error()
            .with_feedback_when_performed(tx),
    )]);
    let s = store.clone();
    let err = on_shard(move || async move {
        s.append_cluster(vec![
            msg("f", 1, "alice", Some("k")),
            msg("f", 2, "bob", None),
        ])
        .await
        .expect_err("server error")
    });
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert_retried_never_committed(&mut attempts, &node, &cfg);

    // The commit itself fails: rows there, room_latest not raised; a rewrite completes it.
    node.clear_prepended();
    node.prepend(vec![RequestRule(
        carries("set_latest"),
        RequestReaction::forge().write_timeout(),
    )]);
    let s = store.clone();
    let err = on_shard(move || async move {
        s.append_cluster(vec![msg("f", 3, "alice", Some("k"))])
            .await
            .expect_err("commit fails")
    });
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(!node.fake.lock().expect("fake").latest.contains_key("f"));
    node.clear_prepended();
    let s = store.clone();
    on_shard(move || async move {
        s.append_cluster(vec![msg("f", 3, "alice", Some("k"))])
            .await
            .expect("written again");
        assert_eq!(s.latest_offset("f").await.expect("latest"), 3);
        assert_eq!(
            s.read("f", HistoryQuery::Latest, 5).await.expect("read"),
            [msg("f", 3, "alice", Some("k"))]
        );
        s.health().expect("healthy again");
        s.close().await.expect("close");
    });
}

/// Publishes `n` messages to `room` through a shard link of the cluster (its script) and
/// persists them as the home shard does; returns them.
async fn publish_n(
    cluster: &corelay::cluster::redis::RedisCluster,
    store: &corelay::store::Store,
    room: &str,
    n: u64,
) -> Vec<StoredMessage> {
    use corelay::cluster::{NewMessage, Published};
    let (link, _events) = ShardLink::start(cluster.clone(), 0).await;
    let mut out = Vec::new();
    for i in 0..n {
        let m = NewMessage {
            room: room.to_owned(),
            user: "alice".into(),
            text: format!("hello {i}"),
            cid: None,
            ts: 5_000 + i,
            id: format!("id-{room}-{i}"),
        };
        match publish_one(&link, m).await.expect("publish") {
            Published::Stored(m) => out.push(m),
            other => panic!("expected Stored, got {other:?}"),
        }
    }
    store.persist_published(out.clone()).await.expect("persist");
    out
}

/// The composed store of a cluster with ScyllaDB, with a real `redis-server` and the fake
/// node: reads that the stream can answer never touch ScyllaDB; those reaching below the
/// stream's window (trimmed here to its last 5 entries) are completed from ScyllaDB, seamlessly.
/// A Redis counter behind ScyllaDB (a keyspace written by one host before) is raised at
/// the room's first `latest_offset`, so the next publish continues the durable stream.
/// A retried send whose first ScyllaDB write failed is written again from the stream.
#[test]
fn composed_store_reads_recent_from_the_stream_and_older_from_scylla() {
    use corelay::cluster::{NewMessage, Published};
    let redis = common_redis::RedisServer::start();
    let url = redis.url();
    let mut node = FakeNode::start("corelay");
    let cfg = node.config("corelay");
    let bridge = Bridge::start().expect("bridge");
    let mut opts = corelay::cluster::RedisOptions::new(url.clone());
    opts.history_max_len = 0;
    let cluster = futures::executor::block_on(corelay::cluster::redis::RedisCluster::connect(
        opts,
        bridge.clone(),
    ))
    .expect("connect to redis");
    let durable = open(&cfg).expect("open the fake node");
    let store = corelay::store::Store::cluster(&cluster, durable);

    let (c, s) = (cluster.clone(), store.clone());
    let all = on_shard(move || async move { publish_n(&c, &s, "r", 20).await });
    assert_eq!(offsets(&all), (1..=20).collect::<Vec<_>>());
    assert_eq!(
        node.fake.lock().expect("fake").messages.len(),
        20,
        "every published message in ScyllaDB"
    );
    redis
        .cmd(&url, &["XTRIM", "corelay:{r}:stream", "MAXLEN", "5"])
        .expect("trim");

    let reads_so_far = || scylla_reads(&node.seen());
    let check = |q: HistoryQuery, limit: usize, expect: std::ops::RangeInclusive<u64>| {
        let s = store.clone();
        let got = on_shard(move || async move { s.read("r", q, limit).await.expect("read") });
        let want: Vec<StoredMessage> = all
            .iter()
            .filter(|m| expect.contains(&m.offset))
            .cloned()
            .collect();
        assert_eq!(got, want, "{q:?} limit {limit}");
    };
    use HistoryQuery::{After, Before, Latest};
    // Within the stream (16..=20): Redis only.
    let n = reads_so_far();
    check(Latest, 3, 18..=20);
    check(Latest, 5, 16..=20);
    check(After(15), 3, 16..=18);
    check(After(17), 50, 18..=20);
    check(Before(20), 2, 18..=19);
    check(After(20), 10, 0..=0); // offset 0 never exists: nothing
    check(After(99), 10, 0..=0);
    assert_eq!(
        reads_so_far(),
        n,
        "no ScyllaDB read for the stream's window"
    );
    // Reaching below it: completed from ScyllaDB.
    check(Latest, 8, 13..=20);
    check(Latest, 100, 1..=20);
    check(Before(18), 6, 12..=17);
    check(Before(10), 4, 6..=9);
    check(After(10), 8, 11..=18);
    check(After(0), 3, 1..=3);
    check(After(12), 100, 13..=20);
    assert!(reads_so_far() > n, "older history came from ScyllaDB");

    let s = store.clone();
    on_shard(move || async move {
        assert_eq!(s.latest_offset("r").await.expect("latest"), 20);
        assert!(s.read("none", Latest, 5).await.expect("read").is_empty());
        assert!(s.read("r", Before(1), 5).await.expect("read").is_empty());
        s.health().expect("healthy");
    });

    // A room ScyllaDB has up to 42 and Redis knows nothing of.
    node.fake
        .lock()
        .expect("fake")
        .latest
        .insert("old".into(), (42, 42));
    let (c, s) = (cluster.clone(), store.clone());
    let next = on_shard(move || async move {
        assert_eq!(s.latest_offset("old").await.expect("latest"), 42);
        publish_n(&c, &s, "old", 1).await
    });
    assert_eq!(
        offsets(&next),
        [43],
        "the counter continues ScyllaDB's stream"
    );

    // The first send's ScyllaDB write fails; the retry (same cid) writes it again.
    node.prepend(vec![RequestRule(
        carries("insert_message"),
        RequestReaction::forge().server_error(),
    )]);
    let send = |text: &'static str| {
        let (c, s) = (cluster.clone(), store.clone());
        on_shard(move || async move {
            let (link, _events) = ShardLink::start(c, 0).await;
            let m = NewMessage {
                room: "r".into(),
                user: "bob".into(),
                text: text.into(),
                cid: Some("k1".into()),
                ts: 9_000,
                id: format!("id-{text}"),
            };
            let published = publish_one(&link, m).await.expect("publish");
            let durable = match &published {
                Published::Stored(m) => s.persist_published(vec![m.clone()]).await,
                Published::Duplicate(ack) => {
                    s.persist_duplicate("r", "bob", "k1", ack.offset).await
                }
            };
            (published, durable)
        })
    };
    let (first, durable) = send("first");
    assert!(
        matches!(first, Published::Stored(ref m) if m.offset == 21),
        "{first:?}"
    );
    assert!(
        matches!(durable, Err(StoreError::Unavailable(_))),
        "{durable:?}"
    );
    assert!(!node
        .fake
        .lock()
        .expect("fake")
        .messages
        .contains_key(&("r".into(), 21 / 4, 21)));
    node.clear_prepended();
    let (retry, durable) = send("retry with other text");
    assert!(
        matches!(retry, Published::Duplicate(ref a) if a.offset == 21),
        "{retry:?}"
    );
    durable.expect("written again");
    let row = node
        .fake
        .lock()
        .expect("fake")
        .messages
        .get(&("r".into(), 21 / 4, 21))
        .cloned()
        .expect("row 21 in ScyllaDB");
    assert_eq!(
        row.2, "first",
        "the first send's message, read back from the stream"
    );

    futures::executor::block_on(store.close()).expect("close");
    cluster.close();
    bridge.shutdown();
}

/// Two real `corelay serve --store scylla` hosts sharing a real `redis-server` and the fake
/// node (no real ScyllaDB): a send is acked once the fake holds its row, and delivered to
/// the other host. While the node refuses writes, a send gets `unavailable` and its row is
/// not there (nothing acked); it was published, though (the other host's member sees it
/// live, as with any cluster publish). Once the node is back, the host's background rewrite
/// puts the row in without any retry, and the sender's retry with the same `cid` gets the
/// first offset back. With the stream trimmed to its newest entry, `join {since: 0}` gets
/// the older messages from the node; history reads come back whole from either host; after
/// Redis lost all its data the next offset still continues the room (no row overwritten);
/// and `corelay check` says the store runs in cluster mode.
#[test]
fn two_hosts_ack_only_what_scylla_holds() {
    use common::{token, WsClient};
    use serde_json::json;
    common_redis::within(Duration::from_secs(120), || {
        let redis = common_redis::RedisServer::start();
        let url = redis.url();
        let mut node = FakeNode::start("corelay");
        let nodes = node.addr.to_string();
        let env = [
            ("CORELAY_SCYLLA_NODES", nodes.as_str()),
            ("CORELAY_SCYLLA_BUCKET_SIZE", "4"),
            ("CORELAY_SCYLLA_REQUEST_TIMEOUT", "1s"),
            ("CORELAY_SCYLLA_CONSISTENCY", "quorum"),
            ("CORELAY_REDIS_COMMAND_TIMEOUT", "1s"),
        ];
        let host =
            || common::Server::start_with(&env, &["--redis", &url, "--store", "scylla"], true);
        let (a, b) = (host(), host());
        let mut alice = WsClient::connect(a.port, &token("alice", Some(&["*"])));
        let mut bob = WsClient::connect(b.port, &token("bob", Some(&["*"])));
        for c in [&mut alice, &mut bob] {
            let ack = c.emit_ack("join", json!({ "room": "lobby" }));
            assert_eq!(ack["ok"], true, "{ack}");
        }
        let fake = node.fake.clone();
        let row = |offset: i64| {
            fake.lock()
                .expect("fake")
                .messages
                .get(&("lobby".to_owned(), offset / 4, offset))
                .map(|r| r.2.clone())
        };
        let next_message = |c: &mut WsClient| loop {
            let ev = c.next_event(Duration::from_secs(5)).expect("an event");
            if ev[0] == "message" {
                return ev[1].clone();
            }
        };

        let ack = alice.emit_ack(
            "message",
            json!({"room": "lobby", "text": "one", "cid": "c1"}),
        );
        assert_eq!(ack["ok"], true, "{ack}");
        assert_eq!(ack["offset"], 1, "{ack}");
        assert_eq!(row(1).as_deref(), Some("one"), "acked: in ScyllaDB");
        let m = next_message(&mut bob);
        assert_eq!(
            (m["offset"].as_u64(), m["text"].as_str()),
            (Some(1), Some("one"))
        );

        node.prepend(vec![RequestRule(
            carries("insert_message"),
            RequestReaction::forge().server_error(),
        )]);
        let ack = alice.emit_ack(
            "message",
            json!({"room": "lobby", "text": "two", "cid": "c2"}),
        );
        println!("{ack}");
        assert_eq!(ack["ok"], false, "{ack}");
        assert_eq!(ack["error"]["code"], "unavailable", "{ack}");
        assert_eq!(row(2), None, "not acked: not in ScyllaDB");
        let m = next_message(&mut bob);
        assert_eq!(
            (m["offset"].as_u64(), m["text"].as_str()),
            (Some(2), Some("two"))
        );

        node.clear_prepended();
        let deadline = Instant::now() + Duration::from_secs(10);
        while row(2).is_none() {
            assert!(
                Instant::now() < deadline,
                "the background rewrite never landed"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(row(2).as_deref(), Some("two"));
        let ack = alice.emit_ack(
            "message",
            json!({"room": "lobby", "text": "two", "cid": "c2"}),
        );
        assert_eq!(ack["ok"], true, "{ack}");
        assert_eq!(ack["offset"], 2, "the retry gets the first offset: {ack}");

        let ack = bob.emit_ack("message", json!({"room": "lobby", "text": "three"}));
        assert_eq!(ack["offset"], 3, "{ack}");
        assert_eq!(row(3).as_deref(), Some("three"));
        assert_eq!(
            node.fake
                .lock()
                .expect("fake")
                .latest
                .get("lobby")
                .map(|l| l.0),
            Some(3)
        );
        // Only the newest message left in the stream: older history comes from the node.
        redis
            .cmd(&url, &["XTRIM", "corelay:{lobby}:stream", "MAXLEN", "1"])
            .expect("trim");
        let row_reads = || {
            let seen = node.seen();
            prepared_count(&seen, "read_desc") + prepared_count(&seen, "read_asc")
        };
        let reads = row_reads();
        let mut carol = WsClient::connect(b.port, &token("carol", Some(&["*"])));
        let ack = carol.emit_ack("join", json!({ "room": "lobby", "since": 0 }));
        let missed: Vec<u64> = ack["missed"]
            .as_array()
            .expect("missed")
            .iter()
            .filter_map(|m| m["offset"].as_u64())
            .collect();
        assert_eq!(missed, [1, 2, 3], "{ack}");
        assert!(
            scylla_reads(&node.seen()) > reads,
            "read below the stream's window"
        );
        for c in [&mut alice, &mut bob] {
            let ack = c.emit_ack("history", json!({"room": "lobby"}));
            let texts: Vec<&str> = ack["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .filter_map(|m| m["text"].as_str())
                .collect();
            assert_eq!(texts, ["one", "two", "three"], "{ack}");
        }
        assert_eq!(a.health()["store"]["ok"], true, "{}", a.health());

        // Redis loses everything (a restart without persistence): the next offset still
        // continues the room's stream instead of overwriting message 1 in ScyllaDB.
        redis.cmd(&url, &["FLUSHALL"]).expect("flushall");
        let ack = alice.emit_ack("message", json!({"room": "lobby", "text": "four"}));
        assert_eq!(ack["ok"], true, "{ack}");
        assert_eq!(ack["offset"], 4, "{ack}");
        assert_eq!(row(1).as_deref(), Some("one"), "message 1 kept");
        assert_eq!(row(4).as_deref(), Some("four"));

        let out = std::process::Command::new(env!("CARGO_BIN_EXE_corelay"))
            .args(["check", "--redis", &url, "--store", "scylla"])
            .envs(env)
            .output()
            .expect("run corelay check");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains(&format!("store: ok: scylla at [{nodes}] (cluster mode")),
            "{text}"
        );
    });
}
