//! `corelay check` for Redis: PING, then a pub/sub round trip, each with a verdict a
//! person can act on.

use std::fmt;
use std::time::{Duration, Instant};

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
    let limit = opts.connect_timeout + opts.command_timeout;
    let err_text = |e: &redis::RedisError, what: &str| match classify(
        e,
        &target,
        what,
        opts.command_timeout,
    ) {
        ClusterError::Timeout(text) => {
            format!("redis timeout: {text} (is the host or port right? is the server stalled?)")
        }
        other => other.to_string(),
    };
    let timed_out = |what: &str| {
        ClusterError::Timeout(format!(
            "redis at {target} did not answer {what} within {limit:?} (is the host or port \
             right? is the server stalled?)"
        ))
        .to_string()
    };
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(opts.connect_timeout))
        .set_response_timeout(Some(opts.command_timeout));

    // PING.
    let started = Instant::now();
    let ping = tokio::time::timeout(limit, async {
        let mut conn = cmd_client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| err_text(&e, "connect"))?;
        let pong: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| err_text(&e, "PING"))?;
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
    let (mut cmd_conn, ping) = match ping {
        Err(_) => {
            return CheckReport {
                target: target.clone(),
                ping: CheckStep::fail(timed_out("PING")),
                pubsub: skipped(),
            }
        }
        Ok(Err(text)) => {
            return CheckReport {
                target: target.clone(),
                ping: CheckStep::fail(text),
                pubsub: skipped(),
            }
        }
        Ok(Ok((conn, pong, elapsed, version))) => {
            let server = version.map_or_else(|| "Redis".to_owned(), |v| format!("Redis {v}"));
            (
                conn,
                CheckStep::pass(
                    elapsed,
                    format!("{server} answered {pong} in {}", ms(elapsed)),
                ),
            )
        }
    };

    // Pub/sub round trip: subscribe on a RESP3 connection, publish on the command one.
    let channel = format!("corelay:check:{}", random_hex(8));
    let (publish, kind) = if opts.sharded {
        ("SPUBLISH", "sharded pub/sub")
    } else {
        ("PUBLISH", "pub/sub")
    };
    let nonce = random_hex(8);
    let round_trip = tokio::time::timeout(limit, async {
        let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
        let mut sub = sub_client
            .get_multiplexed_async_connection_with_config(&config.clone().set_push_sender(tx))
            .await
            .map_err(|e| err_text(&e, "connect (pub/sub)"))?;
        if opts.sharded {
            redis::cmd("SSUBSCRIBE")
                .arg(&channel)
                .query_async::<Value>(&mut sub)
                .await
                .map_err(|e| err_text(&e, "SSUBSCRIBE"))?;
        } else {
            sub.subscribe(&channel)
                .await
                .map_err(|e| err_text(&e, "SUBSCRIBE"))?;
        }
        let started = Instant::now();
        let receivers: i64 = redis::cmd(publish)
            .arg(&channel)
            .arg(&nonce)
            .query_async(&mut cmd_conn)
            .await
            .map_err(|e| err_text(&e, publish))?;
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
    })
    .await;
    let pubsub = match round_trip {
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
    };
    CheckReport {
        target,
        ping,
        pubsub,
    }
}
