//! `corelay check` for Redis: PING, then a pub/sub round trip, each with a verdict a
//! person can act on.
//!
//! On a Redis Cluster (the URL's node says so in `HELLO`), also: every one of the 16,384
//! slots has a master (`CLUSTER SLOTS`; a hole names its slot ranges), and each master is
//! reachable as `redis.url` says (TLS, AUTH), runs scripts (SCRIPT LOAD of the publish
//! script) and carries sharded pub/sub (a round trip on a fresh channel of its own slots).

use std::fmt;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushKind, Value};

use super::redis::{build_client, build_client_at, classify, is_cluster_node};
use super::scripts::Scripts;
use super::topology::{slot_of, NodeAddr, SlotMap, SLOTS};
use super::wire::bytes;
use super::{random_hex, ClusterError, RedisOptions};
use crate::bridge::Bridge;

/// One step of a [`CheckReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckStep {
    /// Whether the step passed.
    pub ok: bool,
    /// How long the step's round trip took, when it got that far.
    pub elapsed: Option<Duration>,
    /// What happened, and on failure what to look at.
    pub verdict: String,
}

impl CheckStep {
    fn pass(elapsed: Duration, verdict: String) -> CheckStep {
        CheckStep {
            ok: true,
            elapsed: Some(elapsed),
            verdict,
        }
    }

    fn fail(verdict: String) -> CheckStep {
        CheckStep {
            ok: false,
            elapsed: None,
            verdict,
        }
    }
}

/// What [`check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// The Redis URL checked, without its password.
    pub target: String,
    /// PING on a command connection (connecting, TLS and AUTH included).
    pub ping: CheckStep,
    /// Subscribe to a random channel, publish to it from the command connection, receive.
    /// On a Redis Cluster: passed when the round trip passed on every master (see
    /// [`ClusterCheck::masters`]).
    pub pubsub: CheckStep,
    /// On a Redis Cluster: slot coverage and each master. `None` on a standalone Redis, or
    /// when PING failed.
    pub cluster: Option<ClusterCheck>,
}

/// The Redis Cluster part of a [`CheckReport`]: what a cluster needs beyond what one node
/// answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterCheck {
    /// Every slot has a master (`CLUSTER SLOTS` from the URL's node).
    pub slots: CheckStep,
    /// Each master of the slot map, sorted by address.
    pub masters: Vec<MasterCheck>,
}

/// One master of a Redis Cluster, checked on connections of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterCheck {
    /// Its address, as the cluster announces it.
    pub node: NodeAddr,
    /// How many slots it serves.
    pub slots: u32,
    /// Connect (TLS, AUTH), PING, and SCRIPT LOAD of the publish script.
    pub ping: CheckStep,
    /// SSUBSCRIBE a fresh channel of its slots, SPUBLISH to it, receive.
    pub pubsub: CheckStep,
}

impl ClusterCheck {
    /// Every slot is served and every master passed.
    pub fn ok(&self) -> bool {
        self.slots.ok && !self.masters.is_empty() && self.masters.iter().all(|m| m.ok())
    }
}

impl MasterCheck {
    /// Both steps passed.
    pub fn ok(&self) -> bool {
        self.ping.ok && self.pubsub.ok
    }
}

impl CheckReport {
    /// Every step passed (on a cluster, the cluster's too).
    pub fn ok(&self) -> bool {
        self.ping.ok && self.pubsub.ok && self.cluster.as_ref().is_none_or(ClusterCheck::ok)
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = |ok: bool| if ok { "ok" } else { "FAILED" };
        writeln!(f, "redis {}", self.target)?;
        writeln!(f, "  PING: {}: {}", mark(self.ping.ok), self.ping.verdict)?;
        write!(
            f,
            "  pub/sub: {}: {}",
            mark(self.pubsub.ok),
            self.pubsub.verdict
        )?;
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        write!(
            f,
            "\n  cluster slots: {}: {}",
            mark(cluster.slots.ok),
            cluster.slots.verdict
        )?;
        for m in &cluster.masters {
            write!(
                f,
                "\n  master {} ({} slots): {}: {}",
                m.node,
                m.slots,
                mark(m.ping.ok),
                m.ping.verdict
            )?;
            write!(
                f,
                "\n  master {} sharded pub/sub: {}: {}",
                m.node,
                mark(m.pubsub.ok),
                m.pubsub.verdict
            )?;
        }
        Ok(())
    }
}

/// Checks that Redis is reachable as `options` say (URL, TLS files, timeouts, sharded or
/// not) with a PING and a pub/sub round trip, on `bridge`; on a Redis Cluster also the slot
/// coverage and each master (see [`ClusterCheck`]), with sharded pub/sub whatever
/// `options.sharded` says. Never fails: every problem is a failed step with its verdict.
/// Each step is bounded by `connect_timeout + command_timeout` (the masters are checked
/// side by side).
pub async fn check(options: &RedisOptions, bridge: &Bridge) -> CheckReport {
    let opts = options.clone();
    let target = options.redacted_url();
    let t = target.clone();
    match bridge.spawn(async move { run(opts, t).await }).await {
        Ok(report) => report,
        Err(e) => CheckReport {
            target,
            ping: CheckStep::fail(format!("cannot run the check: {e}")),
            pubsub: CheckStep::fail("skipped".into()),
            cluster: None,
        },
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// The steps, on the bridge.
async fn run(opts: RedisOptions, target: String) -> CheckReport {
    let skipped = || CheckStep::fail("skipped: PING failed".into());
    let (cmd_client, sub_client) = match (build_client(&opts, false), build_client(&opts, true)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            return CheckReport {
                target,
                ping: CheckStep::fail(e.to_string()),
                pubsub: skipped(),
                cluster: None,
            }
        }
    };
    let seed_host = match cmd_client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, _) | redis::ConnectionAddr::TcpTls { host, .. } => {
            host.clone()
        }
        _ => String::new(),
    };
    let steps = Steps {
        seed_host,
        limit: opts.connect_timeout + opts.command_timeout,
        config: AsyncConnectionConfig::new()
            .set_connection_timeout(Some(opts.connect_timeout))
            .set_response_timeout(Some(opts.command_timeout)),
        opts,
        target,
    };
    let (mut cmd_conn, ping) = match steps.ping(&cmd_client).await {
        Ok(passed) => passed,
        Err(failed) => {
            return CheckReport {
                target: steps.target,
                ping: failed,
                pubsub: skipped(),
                cluster: None,
            }
        }
    };
    let cluster = tokio::time::timeout(steps.limit, is_cluster_node(&mut cmd_conn)).await;
    if matches!(cluster, Ok(Ok(true))) {
        let (ping, pubsub, cluster) = steps.cluster(ping, &mut cmd_conn).await;
        return CheckReport {
            target: steps.target,
            ping,
            pubsub,
            cluster: Some(cluster),
        };
    }
    let pubsub = steps.pubsub(&sub_client, &mut cmd_conn).await;
    CheckReport {
        target: steps.target,
        ping,
        pubsub,
        cluster: None,
    }
}

/// What the steps share: the options, the URL checked (without its password), each
/// step's time limit (`connect_timeout + command_timeout`), the connections' timeouts.
struct Steps {
    opts: RedisOptions,
    target: String,
    /// The URL's host, for the nodes a cluster announces without one.
    seed_host: String,
    limit: Duration,
    config: AsyncConnectionConfig,
}

impl Steps {
    /// A failed call's verdict; a timeout says what to look at.
    fn err_text(&self, e: &redis::RedisError, what: &str) -> String {
        self.err_text_at(e, what, &self.target)
    }

    /// [`Steps::err_text`] for a call to the server at `at`.
    fn err_text_at(&self, e: &redis::RedisError, what: &str, at: &str) -> String {
        match classify(e, at, what, self.opts.command_timeout) {
            ClusterError::Timeout(text) => {
                format!("redis timeout: {text} (is the host or port right? is the server stalled?)")
            }
            other => other.to_string(),
        }
    }

    /// The verdict when `what` took longer than the step's limit.
    fn timed_out(&self, what: &str) -> String {
        let (target, limit) = (&self.target, self.limit);
        ClusterError::Timeout(format!(
            "redis at {target} did not answer {what} within {limit:?} (is the host or port \
             right? is the server stalled?)"
        ))
        .to_string()
    }

    /// PING on a new command connection (the server's version with it, when INFO is
    /// allowed): the connection, for the pub/sub step to publish on, and the passed step;
    /// or the failed one.
    async fn ping(
        &self,
        client: &redis::Client,
    ) -> Result<(MultiplexedConnection, CheckStep), CheckStep> {
        let started = Instant::now();
        let ping = tokio::time::timeout(self.limit, async {
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await
                .map_err(|e| self.err_text(&e, "connect"))?;
            let pong: String = redis::cmd("PING")
                .query_async(&mut conn)
                .await
                .map_err(|e| self.err_text(&e, "PING"))?;
            let elapsed = started.elapsed();
            // The version is a courtesy: an ACL user may not be allowed INFO.
            let version = redis::cmd("INFO")
                .arg("server")
                .query_async::<String>(&mut conn)
                .await
                .ok()
                .and_then(|info| {
                    info.lines()
                        .find_map(|l| l.strip_prefix("redis_version:"))
                        .map(|v| v.trim().to_owned())
                });
            Ok::<_, String>((conn, pong, elapsed, version))
        })
        .await;
        match ping {
            Err(_) => Err(CheckStep::fail(self.timed_out("PING"))),
            Ok(Err(text)) => Err(CheckStep::fail(text)),
            Ok(Ok((conn, pong, elapsed, version))) => {
                let server = version.map_or_else(|| "Redis".to_owned(), |v| format!("Redis {v}"));
                Ok((
                    conn,
                    CheckStep::pass(
                        elapsed,
                        format!("{server} answered {pong} in {}", ms(elapsed)),
                    ),
                ))
            }
        }
    }

    /// Pub/sub round trip: subscribe to a fresh channel on a RESP3 connection of `client`,
    /// publish to it on `cmd_conn`, and wait for the message to come back.
    async fn pubsub(
        &self,
        client: &redis::Client,
        cmd_conn: &mut MultiplexedConnection,
    ) -> CheckStep {
        let channel = format!("corelay:check:{}", random_hex(8));
        self.pubsub_on(client, cmd_conn, &channel, self.opts.sharded)
            .await
    }

    /// [`Steps::pubsub`] on `channel`, sharded or not.
    async fn pubsub_on(
        &self,
        client: &redis::Client,
        cmd_conn: &mut MultiplexedConnection,
        channel: &str,
        sharded: bool,
    ) -> CheckStep {
        let (publish, kind) = if sharded {
            ("SPUBLISH", "sharded pub/sub")
        } else {
            ("PUBLISH", "pub/sub")
        };
        let nonce = random_hex(8);
        let round_trip = self.round_trip(client, cmd_conn, channel, publish, &nonce);
        let limit = self.limit;
        match tokio::time::timeout(limit, round_trip).await {
            Ok(Ok((elapsed, _))) => CheckStep::pass(
                elapsed,
                format!(
                    "a message {publish}ed on a fresh channel came back in {} ({kind})",
                    ms(elapsed)
                ),
            ),
            Ok(Err(text)) => CheckStep::fail(text),
            Err(_) => CheckStep::fail(format!(
                "subscribed, but a message {publish}ed to the channel did not come back within \
                 {limit:?} ({kind}; is a proxy in between that drops pub/sub?)"
            )),
        }
    }

    /// Subscribes to `channel`, publishes `nonce` to it with `publish` on `cmd_conn`, and
    /// reads until it comes back: how long that took and how many receivers Redis counted,
    /// or what went wrong.
    async fn round_trip(
        &self,
        client: &redis::Client,
        cmd_conn: &mut MultiplexedConnection,
        channel: &str,
        publish: &str,
        nonce: &str,
    ) -> Result<(Duration, i64), String> {
        let target = &self.target;
        let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
        let mut sub = client
            .get_multiplexed_async_connection_with_config(&self.config.clone().set_push_sender(tx))
            .await
            .map_err(|e| self.err_text(&e, "connect (pub/sub)"))?;
        if publish == "SPUBLISH" {
            redis::cmd("SSUBSCRIBE")
                .arg(channel)
                .query_async::<Value>(&mut sub)
                .await
                .map_err(|e| self.err_text(&e, "SSUBSCRIBE"))?;
        } else {
            sub.subscribe(channel)
                .await
                .map_err(|e| self.err_text(&e, "SUBSCRIBE"))?;
        }
        let started = Instant::now();
        let receivers: i64 = redis::cmd(publish)
            .arg(channel)
            .arg(nonce)
            .query_async(cmd_conn)
            .await
            .map_err(|e| self.err_text(&e, publish))?;
        loop {
            let Some(push) = pushes.recv().await else {
                return Err(format!("the pub/sub connection to {target} closed"));
            };
            match push.kind {
                PushKind::Disconnection => {
                    return Err(format!("the pub/sub connection to {target} was lost"))
                }
                PushKind::Message | PushKind::SMessage => {
                    let mut data = push.data.into_iter();
                    let (Some(ch), Some(payload)) = (data.next(), data.next()) else {
                        continue;
                    };
                    if bytes(ch).as_deref() == Some(channel.as_bytes())
                        && bytes(payload).as_deref() == Some(nonce.as_bytes())
                    {
                        return Ok((started.elapsed(), receivers));
                    }
                }
                _ => {}
            }
        }
    }

    /// The cluster steps, after PING passed on `cmd_conn` (the URL's node): the slot map and
    /// its coverage, then each master side by side. Gives the report's PING (marked as a
    /// cluster node), its pub/sub step (every master's round trip) and the cluster part.
    async fn cluster(
        &self,
        ping: CheckStep,
        cmd_conn: &mut MultiplexedConnection,
    ) -> (CheckStep, CheckStep, ClusterCheck) {
        let ping = CheckStep {
            verdict: format!("{} (a Redis Cluster node)", ping.verdict),
            ..ping
        };
        let map = match self.slot_map(cmd_conn).await {
            Ok(map) => map,
            Err(text) => {
                let cluster = ClusterCheck {
                    slots: CheckStep::fail(text),
                    masters: Vec::new(),
                };
                let pubsub = CheckStep::fail("skipped: no slot map".into());
                return (ping, pubsub, cluster);
            }
        };
        let slots = self.coverage(&map, cmd_conn).await;
        let masters =
            futures::future::join_all(map.masters().into_iter().map(|m| self.master(&map, m)))
                .await;
        let failed: Vec<String> = masters
            .iter()
            .filter(|m| !m.pubsub.ok)
            .map(|m| m.node.to_string())
            .collect();
        let pubsub = if masters.is_empty() {
            CheckStep::fail("no master to check".into())
        } else if failed.is_empty() {
            let slowest = masters.iter().filter_map(|m| m.pubsub.elapsed).max();
            CheckStep {
                ok: true,
                elapsed: slowest,
                verdict: format!(
                    "sharded pub/sub works on all {} masters (the slowest round trip took {})",
                    masters.len(),
                    slowest.map_or_else(|| "?".into(), ms)
                ),
            }
        } else {
            CheckStep::fail(format!(
                "sharded pub/sub failed on {} of {} masters: {} (see below)",
                failed.len(),
                masters.len(),
                failed.join(", ")
            ))
        };
        (ping, pubsub, ClusterCheck { slots, masters })
    }

    /// `CLUSTER SLOTS` on the URL's node, parsed; else the failed step's verdict.
    async fn slot_map(&self, cmd_conn: &mut MultiplexedConnection) -> Result<SlotMap, String> {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SLOTS");
        let reply = match tokio::time::timeout(self.limit, cmd.query_async::<Value>(cmd_conn)).await
        {
            Err(_) => return Err(self.timed_out("CLUSTER SLOTS")),
            Ok(Err(e)) => return Err(self.err_text(&e, "CLUSTER SLOTS")),
            Ok(Ok(reply)) => reply,
        };
        SlotMap::parse(reply, &self.seed_host).map_err(|e| e.to_string())
    }

    /// Whether every slot has a master (with `cluster_state` from `CLUSTER INFO`, when the
    /// node answers it).
    async fn coverage(&self, map: &SlotMap, cmd_conn: &mut MultiplexedConnection) -> CheckStep {
        let started = Instant::now();
        let info = tokio::time::timeout(
            self.limit,
            redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async::<String>(cmd_conn),
        )
        .await;
        let state = match info {
            Ok(Ok(text)) => text
                .lines()
                .find_map(|l| l.strip_prefix("cluster_state:"))
                .map(|s| s.trim().to_owned()),
            _ => None,
        };
        let state_text = state
            .as_deref()
            .map_or_else(String::new, |s| format!(", cluster_state:{s}"));
        let masters = map.masters().len();
        let replicas: usize = map
            .masters()
            .into_iter()
            .map(|m| map.replicas_of(m).len())
            .sum();
        let uncovered = map.uncovered();
        if uncovered == 0 {
            return CheckStep::pass(
                started.elapsed(),
                format!(
                    "all {SLOTS} slots are served, by {masters} masters with {replicas} \
                     replicas{state_text}"
                ),
            );
        }
        let holes: Vec<String> = map
            .holes()
            .into_iter()
            .take(8)
            .map(|(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect();
        CheckStep::fail(format!(
            "{uncovered} of {SLOTS} slots have no master (slots {}{}{state_text}): the rooms \
             that hash there cannot be served; assign them (redis-cli --cluster fix) or wait \
             for a replica to take over",
            holes.join(", "),
            if map.holes().len() > holes.len() {
                ", …"
            } else {
                ""
            }
        ))
    }

    /// One master: connect, PING and SCRIPT LOAD, then a sharded pub/sub round trip on a
    /// fresh channel of its own slots.
    async fn master(&self, map: &SlotMap, node: &NodeAddr) -> MasterCheck {
        let at = node.to_string();
        let mut check = MasterCheck {
            node: node.clone(),
            slots: map.slots_of(node),
            ping: CheckStep::fail("not run".into()),
            pubsub: CheckStep::fail("skipped: the master cannot be reached".into()),
        };
        let (cmd_client, sub_client) = match (
            build_client_at(&self.opts, false, Some(node)),
            build_client_at(&self.opts, true, Some(node)),
        ) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                check.ping = CheckStep::fail(e.to_string());
                return check;
            }
        };
        let started = Instant::now();
        let scripts = Scripts::new();
        let reached = tokio::time::timeout(self.limit, async {
            let mut conn = cmd_client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await
                .map_err(|e| self.err_text_at(&e, "connect", &at))?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map_err(|e| self.err_text_at(&e, "PING", &at))?;
            let elapsed = started.elapsed();
            let sha: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(&scripts.publish_cross_slot.source)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.err_text_at(&e, "SCRIPT LOAD", &at))?;
            if sha != scripts.publish_cross_slot.sha {
                return Err(format!(
                    "redis at {at} loaded the publish script as {sha}, not {}",
                    scripts.publish_cross_slot.sha
                ));
            }
            Ok::<_, String>((conn, elapsed))
        })
        .await;
        let mut conn = match reached {
            Err(_) => {
                check.ping = CheckStep::fail(format!(
                    "redis at {at} did not answer within {:?} (is it down, or stalled?)",
                    self.limit
                ));
                return check;
            }
            Ok(Err(text)) => {
                check.ping = CheckStep::fail(text);
                return check;
            }
            Ok(Ok((conn, elapsed))) => {
                check.ping = CheckStep::pass(
                    elapsed,
                    format!("answered PONG in {} and loaded the scripts", ms(elapsed)),
                );
                conn
            }
        };
        check.pubsub = match channel_of(map, node) {
            Some(channel) => self.pubsub_on(&sub_client, &mut conn, &channel, true).await,
            None => CheckStep::fail(format!("no channel name hashes to a slot of {at}")),
        };
        check
    }
}

/// A fresh channel name whose slot `master` serves (random names until one does).
fn channel_of(map: &SlotMap, master: &NodeAddr) -> Option<String> {
    let base = random_hex(8);
    (0..1u32 << 20)
        .map(|i| format!("corelay:check:{{{base}{i}}}"))
        .find(|c| map.master_of(slot_of(c.as_bytes())) == Some(master))
}
