//! What a failed Redis call means: [`classify`] turns a client error into a
//! [`ClusterError`] that says what to do about it, and [`backoff`] spaces the reconnect
//! attempts. Shared by the process's link, the shards' links and `corelay check`.

use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};

use crate::cluster::{ClusterError, RedisOptions};

/// A [`ClusterError`] for `e`, a failure of `what` on the Redis at `target`, that says what
/// went wrong and, where it can, what to do.
pub(crate) fn classify(
    e: &RedisError,
    target: &str,
    what: &str,
    timeout: Duration,
) -> ClusterError {
    let code = e.code().unwrap_or("");
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    if e.kind() == ErrorKind::AuthenticationFailed
        || matches!(code, "WRONGPASS" | "NOAUTH")
        || lower.contains("wrongpass")
        || lower.contains("noauth")
    {
        return ClusterError::Auth(format!(
            "redis at {target} refused the credentials ({text}); check the user and password in \
             redis.url (or REDIS_PASSWORD)"
        ));
    }
    if e.kind() == ErrorKind::Server(ServerErrorKind::NoPerm) || code == "NOPERM" {
        return ClusterError::Auth(format!(
            "the redis user lacks a permission for {what} ({text}); it needs keys and channels \
             `corelay:*` and the read, write, pubsub and scripting commands (on a Redis \
             Cluster also CLUSTER SLOTS and CLUSTER NODES)"
        ));
    }
    if lower.contains("certificate")
        || lower.contains("tls")
        || lower.contains("handshake")
        || lower.contains("peer sent no certificates")
    {
        return ClusterError::Tls(format!("TLS with redis at {target} failed: {text}"));
    }
    if matches!(
        code,
        "CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN" | "MOVED" | "ASK" | "LOADING" | "READONLY"
    ) {
        // A Redis Cluster in the middle of a failover or a slot migration (or a node still
        // loading its data): the same call succeeds once it is over.
        return ClusterError::Unavailable(format!(
            "redis at {target} cannot serve {what} now ({text}): a failover or slot \
             migration in progress, or a slot with no master"
        ));
    }
    if e.is_timeout() {
        return ClusterError::Timeout(format!(
            "redis at {target} did not answer {what} within {timeout:?}"
        ));
    }
    if e.is_connection_refusal() {
        return ClusterError::Unavailable(format!(
            "cannot reach redis at {target}: connection refused (is redis-server running there?)"
        ));
    }
    match e.kind() {
        ErrorKind::Io => ClusterError::Unavailable(format!("redis at {target}, {what}: {text}")),
        ErrorKind::InvalidClientConfig => {
            ClusterError::Config(format!("redis.url {target}: {text}"))
        }
        ErrorKind::RESP3NotSupported => ClusterError::Config(format!(
            "redis at {target} does not speak RESP3 (Redis 6 or newer is needed): {text}"
        )),
        ErrorKind::Server(_) | ErrorKind::Extension => {
            ClusterError::Server(format!("redis at {target} refused {what}: {text}"))
        }
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => {
            ClusterError::Protocol(format!("redis at {target}, {what}: {text}"))
        }
        _ => ClusterError::Unavailable(format!("redis at {target}, {what}: {text}")),
    }
}

/// The delay before reconnect attempt `failures` (≥ 1): `reconnect_min · 2^(failures-1)`,
/// capped at `reconnect_max`, then a random part of it (between half and all) as jitter.
pub(crate) fn backoff(opts: &RedisOptions, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let base = opts
        .reconnect_min
        .saturating_mul(1u32 << exp)
        .min(opts.reconnect_max);
    let mut r = [0u8; 4];
    crate::ids::random_bytes(&mut r);
    let fraction = 0.5 + 0.5 * (u32::from_le_bytes(r) as f64 / u32::MAX as f64);
    base.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_between_two_states_is_unavailable() {
        use ServerErrorKind::*;
        for kind in [
            ClusterDown,
            TryAgain,
            Moved,
            Ask,
            MasterDown,
            ReadOnly,
            BusyLoading,
        ] {
            let e = RedisError::from((ErrorKind::Server(kind), "refused", "3999 h:1".to_owned()));
            let err = classify(&e, "redis://h", "a read", Duration::from_secs(1));
            assert!(
                matches!(err, ClusterError::Unavailable(_)),
                "{kind:?}: {err:?}"
            );
            assert!(err.is_transient());
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let opts = RedisOptions::new("redis://h");
        for failures in 1..40 {
            let d = backoff(&opts, failures);
            let base = opts
                .reconnect_min
                .saturating_mul(1 << (failures - 1).min(20))
                .min(opts.reconnect_max);
            assert!(d >= base / 2 && d <= base, "{failures}: {d:?} vs {base:?}");
        }
    }
}
