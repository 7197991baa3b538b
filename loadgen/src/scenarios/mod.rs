//! The load scenarios and what they share: the run environment and the opening of many
//! connections at a bounded concurrency.
//!
//! - [`fanout`]: rooms of M members, S senders at a total paced rate; latency, loss, order.
//! - [`connect`]: C idle connections held for T seconds; connect times, memory per connection.
//! - [`churn`]: `fanout` plus connections opened and closed at a steady rate.
//! - [`history`]: `fanout` plus `join {since}` and `history` reads at a steady rate.
//! - [`floor`]: no server; the kernel's cost of one small loopback write.

pub mod churn;
pub mod connect;
pub mod fanout;
pub mod floor;
pub mod history;
pub mod member;
pub mod pacer;
pub mod send_runtime;

use crate::auth::Auth;
use crate::client::Conn;
use crate::clock::Clock;
use crate::proc;
use crate::stats::{Errors, SharedHist};
use crate::target::{Endpoint, Sources};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Everything a scenario needs that does not depend on the scenario.
pub struct Env {
    /// Servers to connect to; connection `i` goes to `endpoints[i % len]`.
    pub endpoints: Vec<Endpoint>,
    /// Source addresses.
    pub sources: Sources,
    /// CONNECT auth.
    pub auth: Auth,
    /// Time allowed for one connection's handshake (and for one ack).
    pub connect_timeout: Duration,
    /// Handshakes in flight at once while opening connections.
    pub connect_concurrency: usize,
    /// Time allowed for opening all connections.
    pub setup_timeout: Duration,
    /// Server processes to sample (CPU, RSS); may be empty.
    pub server_pids: Vec<u32>,
    /// Draw a progress line on stderr.
    pub progress: bool,
    /// The clock message timestamps are read from.
    pub clock: Clock,
    /// Errors by kind, for the whole run.
    pub errors: Arc<Errors>,
    /// Prefix of room names (unique per run).
    pub room_prefix: String,
    /// Connections opened so far (for the progress line).
    pub opened: AtomicU64,
    /// Connection handshake times.
    pub connect_hist: SharedHist,
}

impl Env {
    /// The endpoint for connection `i`.
    pub fn endpoint(&self, i: usize) -> &Endpoint {
        &self.endpoints[i % self.endpoints.len()]
    }

    /// Samples the server processes, counting a failure as an error (`None` then).
    pub fn sample_server(&self) -> Option<proc::Sample> {
        match proc::sample(&self.server_pids) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("warning: {e:#}");
                self.errors.add("server_sample");
                None
            }
        }
    }

    /// The name of room `r`.
    pub fn room_name(&self, r: usize) -> String {
        format!("{}-{r}", self.room_prefix)
    }
}

/// What a scenario run produces: the summary and its latency histograms (µs), the first
/// being the one `--hdr-out` writes.
pub struct RunOutput {
    /// All figures.
    pub summary: crate::report::Summary,
    /// Named latency histograms.
    pub series: Vec<(String, hdrhistogram::Histogram<u64>)>,
}

/// CPU time of this process (zero when `/proc` cannot be read).
pub fn self_cpu() -> Duration {
    proc::cpu_time(proc::self_pid()).unwrap_or_default()
}

/// A connection opened (and possibly joined to a room) during setup.
pub struct Opened {
    /// Its index among the connections asked for.
    pub idx: usize,
    /// The connection, kept alive (pings answered) until the scenario takes it.
    pub conn: Parked,
    /// The room's latest offset from the join ack (0 when not joined).
    pub join_offset: u64,
}

/// Opens `count` connections with user ids `<user_prefix><i>`, `connect_concurrency` at a
/// time, each joining `room_of(i)` when that is `Some`. Failures are counted in
/// `env.errors` and left out; the first failure's text is returned beside the successes.
/// Stops at `env.setup_timeout`.
pub async fn open_many(
    env: &Arc<Env>,
    count: usize,
    first_conn_index: usize,
    user_prefix: &str,
    room_of: impl Fn(usize) -> Option<String>,
) -> (Vec<Opened>, Option<String>) {
    let sem = Arc::new(Semaphore::new(env.connect_concurrency.max(1)));
    let mut handles = Vec::with_capacity(count);
    for i in 0..count {
        let env = env.clone();
        let sem = sem.clone();
        let user = format!("{user_prefix}{i}");
        let room = room_of(i);
        handles.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.ok()?;
            let hist = Some(&env.connect_hist);
            match open_one(&env, first_conn_index + i, &user, room.as_deref(), hist).await {
                Ok((conn, join_offset)) => {
                    env.opened.fetch_add(1, Relaxed);
                    Some(Ok(Opened {
                        idx: i,
                        conn: Parked::park(conn),
                        join_offset,
                    }))
                }
                Err((kind, msg)) => {
                    env.errors.add(kind);
                    Some(Err(msg))
                }
            }
        }));
    }
    let deadline = tokio::time::Instant::now() + env.setup_timeout;
    let mut opened = Vec::with_capacity(count);
    let mut first_err = None;
    for h in handles {
        match tokio::time::timeout_at(deadline, h).await {
            Ok(Ok(Some(Ok(o)))) => opened.push(o),
            Ok(Ok(Some(Err(msg)))) => {
                first_err.get_or_insert(msg);
            }
            Ok(_) => {
                env.errors.add("setup_task");
            }
            Err(_) => {
                env.errors.add("setup_timeout");
                first_err.get_or_insert_with(|| {
                    format!(
                        "opening connections took longer than {:?}",
                        env.setup_timeout
                    )
                });
            }
        }
    }
    (opened, first_err)
}

/// A connection waiting for its scenario: a task answers the server's pings (and drops
/// anything else) so that a long setup does not let early connections time out.
pub struct Parked {
    release: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<Conn, &'static str>>,
}

impl Parked {
    /// Parks `conn`.
    pub fn park(mut conn: Conn) -> Parked {
        let (release, mut rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    _ = &mut rx => return Ok(conn),
                    frame = conn.recv() => match frame {
                        Ok(Some(crate::client::Incoming::Ping(p))) => {
                            conn.pong(&p).await.map_err(|_| "disconnected")?;
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => return Err("disconnected"),
                    },
                }
            }
        });
        Parked { release, task }
    }

    /// Takes the connection back (an error kind if it was lost meanwhile).
    pub async fn take(self) -> Result<Conn, &'static str> {
        let _ = self.release.send(());
        self.task.await.unwrap_or(Err("park_task"))
    }
}

/// Opens connection number `conn_index` as `user` and joins `room`, recording the
/// handshake time in `hist`; on failure an error kind and a message.
pub async fn open_one(
    env: &Env,
    conn_index: usize,
    user: &str,
    room: Option<&str>,
    hist: Option<&SharedHist>,
) -> Result<(Conn, u64), (&'static str, String)> {
    let auth = env
        .auth
        .connect_payload(user)
        .map_err(|e| ("auth", e.to_string()))?;
    let (mut conn, took) = Conn::open(
        env.endpoint(conn_index),
        env.sources.for_conn(conn_index),
        &auth,
        env.connect_timeout,
    )
    .await
    .map_err(|e| (e.kind(), e.to_string()))?;
    if let Some(h) = hist {
        h.record(took.as_micros() as u64);
    }
    let mut offset = 0;
    if let Some(room) = room {
        offset = join(&mut conn, room, None, env.connect_timeout)
            .await
            .map_err(|e| ("join", e))?
            .offset;
    }
    Ok((conn, offset))
}

/// The parts of a join ack the scenarios use.
#[derive(Debug, Clone, Default)]
pub struct JoinAck {
    /// The room's latest offset.
    pub offset: u64,
    /// Offsets of the `missed` messages (with `since`).
    pub missed: Vec<u64>,
    /// Whether older messages were left out.
    pub truncated: bool,
}

/// Joins `room` (with `since` when given) and reads the ack.
pub async fn join(
    conn: &mut Conn,
    room: &str,
    since: Option<u64>,
    timeout: Duration,
) -> Result<JoinAck, String> {
    let payload = match since {
        Some(s) => json!({ "room": room, "since": s }),
        None => json!({ "room": room }),
    };
    let ack = conn.request("join", &payload, timeout).await?;
    if let Some(code) = crate::client::ack_error(&ack) {
        return Err(format!("join {room} refused: {code}"));
    }
    Ok(JoinAck {
        offset: ack.get("offset").and_then(Value::as_u64).unwrap_or(0),
        missed: offsets_of(ack.get("missed")),
        truncated: ack
            .get("truncated")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

/// The `offset` of each message in a JSON array of messages.
pub fn offsets_of(messages: Option<&Value>) -> Vec<u64> {
    messages
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|m| m.get("offset").and_then(Value::as_u64).unwrap_or(0))
                .collect()
        })
        .unwrap_or_default()
}

/// Resolves once `stop` turns true (or its sender is gone). Unlike `wait_for`, its output
/// holds no lock guard, so it can sit in a `select!` beside branches that await.
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
