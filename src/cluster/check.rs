//! `corelay check` for Redis: PING, then a pub/sub round trip, each with a verdict a
//! person can act on.

use std::fmt;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushKind, Value};

use super::redis::{build_client, classify};
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
    pub pubsub: CheckStep,
}

impl CheckReport {
    /// Both steps passed.
    pub fn ok(&self) -> bool {
        self.ping.ok && self.pubsub.ok
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
        )
    }
}

/// Checks that Redis is reachable as `options` say (URL, TLS files, timeouts, sharded or
/// not) with a PING and a pub/sub round trip, on `bridge`. Never fails: every problem is a
/// failed step with its verdict. Each step is bounded by `connect_timeout +
/// command_timeout`.
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
            }
        }
    };
    let steps = Steps {
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
            }
        }
    };
    let pubsub = steps.pubsub(&sub_client, &mut cmd_conn).await;
    CheckReport {
        target: steps.target,
        ping,
        pubsub,
    }
}

/// What the steps share: the options, the URL checked (without its password), each
/// step's time limit (`connect_timeout + command_timeout`), the connections' timeouts.
struct Steps {
    opts: RedisOptions,
    target: String,
    limit: Duration,
    config: AsyncConnectionConfig,
}

impl Steps {
    /// A failed call's verdict; a timeout says what to look at.
    fn err_text(&self, e: &redis::RedisError, what: &str) -> String {
        match classify(e, &self.target, what, self.opts.command_timeout) {
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
        let (publish, kind) = if self.opts.sharded {
            ("SPUBLISH", "sharded pub/sub")
        } else {
            ("PUBLISH", "pub/sub")
        };
        let nonce = random_hex(8);
        let round_trip = self.round_trip(client, cmd_conn, &channel, publish, &nonce);
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
        if self.opts.sharded {
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
}
