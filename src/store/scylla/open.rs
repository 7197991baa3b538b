//! Opening the store: the configuration checked before anything is sent, the session (with
//! the configured consistency, timeout and retry policy), the statements prepared, and the
//! keyspace's bucket size checked (or recorded on first use).

use std::sync::Arc;
use std::time::Duration;

use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{DbError, ExecutionError, NewSessionError, PrepareError, RequestAttemptError};
use scylla::policies::timestamp_generator::MonotonicTimestampGenerator;
use scylla::statement::Consistency;

use super::errors::{schema_hint, BoundedRetry};
use super::schema::{cql, Statements};
use super::Conn;
use crate::config::{ScyllaConfig, ScyllaConsistency};
use crate::history::StoreError;

/// Checks what the configuration must satisfy before anything is sent.
pub(super) fn check_config(cfg: &ScyllaConfig) -> Result<(), StoreError> {
    let bad = |m: String| {
        Err(StoreError::Open(format!(
            "invalid [scylla] configuration: {m}"
        )))
    };
    if cfg.nodes.is_empty() {
        return bad("scylla.nodes is empty: list at least one host:port".into());
    }
    check_keyspace(&cfg.keyspace)?;
    if cfg.bucket_size == 0 || i64::try_from(cfg.bucket_size).is_err() {
        return bad(format!(
            "scylla.bucket_size must be between 1 and {}, got {}",
            i64::MAX,
            cfg.bucket_size
        ));
    }
    if cfg.request_timeout.0.is_zero() {
        return bad("scylla.request_timeout must be positive".into());
    }
    Ok(())
}

/// A keyspace name is spliced into CQL, so it must be a plain identifier.
pub(super) fn check_keyspace(ks: &str) -> Result<(), StoreError> {
    let mut chars = ks.chars();
    let ok = ks.len() <= 48
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Open(format!(
            "invalid [scylla] configuration: scylla.keyspace {ks:?} must be a letter followed by \
             at most 47 letters, digits or underscores"
        )))
    }
}

/// The driver's consistency for the configured one.
fn consistency(c: ScyllaConsistency) -> Consistency {
    match c {
        ScyllaConsistency::Any => Consistency::Any,
        ScyllaConsistency::One => Consistency::One,
        ScyllaConsistency::Two => Consistency::Two,
        ScyllaConsistency::Three => Consistency::Three,
        ScyllaConsistency::Quorum => Consistency::Quorum,
        ScyllaConsistency::All => Consistency::All,
        ScyllaConsistency::LocalQuorum => Consistency::LocalQuorum,
        ScyllaConsistency::EachQuorum => Consistency::EachQuorum,
        ScyllaConsistency::LocalOne => Consistency::LocalOne,
    }
}

/// How long opening may take in all: connecting, preparing, checking `meta`.
fn open_deadline(cfg: &ScyllaConfig) -> Duration {
    (cfg.request_timeout.0 * 5).max(Duration::from_secs(10))
}

/// Opens a session to the configured nodes (on the bridge).
pub(super) async fn session(cfg: &ScyllaConfig, nodes: &str) -> Result<Session, StoreError> {
    let profile = ExecutionProfile::builder()
        .consistency(consistency(cfg.consistency))
        .request_timeout(Some(cfg.request_timeout.0))
        .retry_policy(Arc::new(BoundedRetry { max: cfg.retries }))
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&cfg.nodes)
        .default_execution_profile_handle(profile.into_handle())
        .connection_timeout(cfg.request_timeout.0.max(Duration::from_secs(2)))
        .timestamp_generator(Arc::new(MonotonicTimestampGenerator::new()))
        .keyspaces_to_fetch([cfg.keyspace.clone()]);
    if let Some(user) = &cfg.username {
        builder = builder.user(user, cfg.password.as_deref().unwrap_or(""));
    }
    let unreachable =
        |why: String| StoreError::Open(format!("cannot reach ScyllaDB at {nodes}: {why}"));
    match tokio::time::timeout(open_deadline(cfg), builder.build()).await {
        Err(_) => Err(unreachable(format!(
            "no answer within {} ms",
            open_deadline(cfg).as_millis()
        ))),
        Ok(Err(e)) => Err(unreachable(session_error(&e))),
        Ok(Ok(s)) => Ok(s),
    }
}

/// The text of a session error, with a hint for the common causes.
fn session_error(e: &NewSessionError) -> String {
    let text = e.to_string();
    if text.contains("uthenticat") {
        format!("{text} (check scylla.username and scylla.password)")
    } else {
        text
    }
}

/// Connects, prepares every statement and checks (or records) the bucket size.
pub(super) async fn open_conn(cfg: ScyllaConfig, nodes: String) -> Result<Conn, StoreError> {
    let session = session(&cfg, &nodes).await?;
    let deadline = open_deadline(&cfg);
    let texts = cql(&cfg.keyspace);
    let mut prepared = Vec::with_capacity(texts.len());
    for (name, text) in texts {
        let result = tokio::time::timeout(deadline, session.prepare(text.as_str())).await;
        let mut p = match result {
            Err(_) => {
                return Err(StoreError::Open(format!(
                    "cannot reach ScyllaDB at {nodes}: preparing {name} got no answer within {} ms",
                    deadline.as_millis()
                )))
            }
            Ok(Err(e)) => return Err(prepare_error(&cfg.keyspace, &nodes, name, &e)),
            Ok(Ok(p)) => p,
        };
        p.set_is_idempotent(true);
        prepared.push(p);
    }
    let mut it = prepared.into_iter();
    let mut next = || {
        it.next()
            .ok_or_else(|| StoreError::Open("internal: statement count".into()))
    };
    let st = Statements {
        insert_message: next()?,
        insert_cid: next()?,
        set_latest: next()?,
        get_latest: next()?,
        read_desc: next()?,
        read_asc: next()?,
        get_message: next()?,
        get_cid: next()?,
        get_meta: next()?,
        put_meta: next()?,
    };
    let conn = Conn { session, st };
    check_bucket_size(&conn, &cfg, &nodes).await?;
    Ok(conn)
}

/// Maps a failed PREPARE: a missing keyspace or table says what to run.
fn prepare_error(ks: &str, nodes: &str, name: &str, e: &PrepareError) -> StoreError {
    let db = match e {
        PrepareError::AllAttemptsFailed {
            first_attempt: RequestAttemptError::DbError(db, msg),
        } => Some((db, msg)),
        _ => None,
    };
    match db {
        Some((DbError::Invalid | DbError::ConfigError, msg)) => StoreError::Open(format!(
            "keyspace {ks} or its tables are missing on ScyllaDB at {nodes} ({msg}): \
             run `corelay schema apply`"
        )),
        Some((DbError::Unauthorized, msg)) => StoreError::Open(format!(
            "ScyllaDB at {nodes} refuses access to keyspace {ks} ({msg}): grant scylla.username \
             SELECT and MODIFY on it"
        )),
        _ => StoreError::Open(format!(
            "cannot prepare statement {name} on ScyllaDB at {nodes}: {e}"
        )),
    }
}

/// Refuses to run with another bucket size than the keyspace was written with (every
/// partition key depends on it), and records it on first use.
async fn check_bucket_size(conn: &Conn, cfg: &ScyllaConfig, nodes: &str) -> Result<(), StoreError> {
    let open_err = |what: &str, e: ExecutionError| {
        StoreError::Open(format!(
            "cannot {what} on ScyllaDB at {nodes}: {e}{}",
            schema_hint(&e)
        ))
    };
    let result = conn
        .session
        .execute_unpaged(&conn.st.get_meta, ("bucket_size",))
        .await
        .map_err(|e| open_err("read the bucket size", e))?;
    let stored: Option<(Option<String>,)> = result
        .into_rows_result()
        .map_err(|e| StoreError::Corrupt(format!("meta: {e}")))?
        .maybe_first_row()
        .map_err(|e| StoreError::Corrupt(format!("meta: {e}")))?;
    match stored.and_then(|(v,)| v) {
        None => {
            conn.session
                .execute_unpaged(
                    &conn.st.put_meta,
                    ("bucket_size", cfg.bucket_size.to_string()),
                )
                .await
                .map_err(|e| open_err("record the bucket size", e))?;
            Ok(())
        }
        Some(v) if v.trim().parse::<u64>() == Ok(cfg.bucket_size) => Ok(()),
        Some(v) => Err(StoreError::Open(format!(
            "keyspace {} was written with bucket_size {v}, but scylla.bucket_size is {}: the \
             bucket size is part of the data layout; set scylla.bucket_size = {v}",
            cfg.keyspace, cfg.bucket_size
        ))),
    }
}
