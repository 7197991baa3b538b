//! The CQL side of the store: the shipped schema ([`SCHEMA_CQL`]), rendered for another
//! keyspace or replication factor and applied by `corelay schema apply`, and the statements
//! the store prepares at open ([`statement_texts`]).

use std::time::Duration;

use scylla::statement::prepared::PreparedStatement;
use scylla::statement::unprepared::Statement;

use super::errors::bridge_error;
use super::open::{check_config, check_keyspace, session};
use crate::bridge::Bridge;
use crate::config::ScyllaConfig;
use crate::history::StoreError;

/// `deploy/scylla/schema.cql`, as shipped (keyspace `corelay`, replication factor 3).
pub const SCHEMA_CQL: &str = include_str!("../../../deploy/scylla/schema.cql");

/// The keyspace name written in [`SCHEMA_CQL`], replaced by the configured one.
const SCHEMA_KEYSPACE: &str = "corelay";
/// The replication factor written in [`SCHEMA_CQL`], replaced on request.
const SCHEMA_RF: &str = "'replication_factor': 3";

/// DDL (`schema apply`) gets at least this long: schema changes wait for agreement.
const DDL_TIMEOUT: Duration = Duration::from_secs(60);

/// One prepared statement per query the store makes.
pub(super) struct Statements {
    pub(super) insert_message: PreparedStatement,
    pub(super) insert_cid: PreparedStatement,
    pub(super) set_latest: PreparedStatement,
    pub(super) get_latest: PreparedStatement,
    pub(super) read_desc: PreparedStatement,
    pub(super) read_asc: PreparedStatement,
    pub(super) get_message: PreparedStatement,
    pub(super) get_cid: PreparedStatement,
    pub(super) get_meta: PreparedStatement,
    pub(super) put_meta: PreparedStatement,
}

/// The CQL of every statement the store prepares, for keyspace `ks` (already checked to be
/// a plain identifier). Public so tests and operators can see what runs.
pub fn statement_texts(ks: &str) -> Vec<String> {
    cql(ks).into_iter().map(|(_, text)| text).collect()
}

/// `(name, text)` of every statement, in [`Statements`] order.
pub(super) fn cql(ks: &str) -> [(&'static str, String); 10] {
    const COLUMNS: &str = r#""offset", id, "user", "text", ts, cid"#;
    [
        (
            "insert_message",
            format!(
                r#"INSERT INTO {ks}.messages (room, bucket, "offset", id, "user", "text", ts, cid) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"#
            ),
        ),
        (
            "insert_cid",
            format!(
                r#"INSERT INTO {ks}.cids (room, "user", cid, "offset", ts) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"#
            ),
        ),
        (
            "set_latest",
            format!("UPDATE {ks}.room_latest USING TIMESTAMP ? SET latest = ? WHERE room = ?"),
        ),
        (
            "get_latest",
            format!("SELECT latest FROM {ks}.room_latest WHERE room = ?"),
        ),
        (
            "read_desc",
            format!(
                r#"SELECT {COLUMNS} FROM {ks}.messages WHERE room = ? AND bucket = ? AND "offset" <= ? ORDER BY "offset" DESC LIMIT ?"#
            ),
        ),
        (
            "read_asc",
            format!(
                r#"SELECT {COLUMNS} FROM {ks}.messages WHERE room = ? AND bucket = ? AND "offset" >= ? AND "offset" <= ? ORDER BY "offset" ASC LIMIT ?"#
            ),
        ),
        (
            "get_message",
            format!(
                r#"SELECT {COLUMNS} FROM {ks}.messages WHERE room = ? AND bucket = ? AND "offset" = ?"#
            ),
        ),
        (
            "get_cid",
            format!(
                r#"SELECT "offset", ts FROM {ks}.cids WHERE room = ? AND "user" = ? AND cid = ?"#
            ),
        ),
        (
            "get_meta",
            format!("SELECT value FROM {ks}.meta WHERE key = ?"),
        ),
        (
            "put_meta",
            format!("INSERT INTO {ks}.meta (key, value) VALUES (?, ?)"),
        ),
    ]
}

/// [`SCHEMA_CQL`] for keyspace `keyspace` (a plain identifier), with the replication
/// factor replaced when one is given. Comment lines are kept as they are.
pub fn render_schema(
    keyspace: &str,
    replication_factor: Option<u32>,
) -> Result<String, StoreError> {
    check_keyspace(keyspace)?;
    if replication_factor == Some(0) {
        return Err(StoreError::Open(
            "the replication factor must be at least 1".into(),
        ));
    }
    let mut out = String::with_capacity(SCHEMA_CQL.len() + 64);
    for line in SCHEMA_CQL.lines() {
        if line.trim_start().starts_with("--") {
            out.push_str(line);
        } else {
            let mut l = line
                .replace(
                    &format!("KEYSPACE IF NOT EXISTS {SCHEMA_KEYSPACE}"),
                    &format!("KEYSPACE IF NOT EXISTS {keyspace}"),
                )
                .replace(&format!("{SCHEMA_KEYSPACE}."), &format!("{keyspace}."));
            if let Some(rf) = replication_factor {
                l = l.replace(SCHEMA_RF, &format!("'replication_factor': {rf}"));
            }
            out.push_str(&l);
        }
        out.push('\n');
    }
    Ok(out)
}

/// The statements of a schema text: `--` comment lines dropped, split on `;`, trimmed.
pub fn schema_statements(cql: &str) -> Vec<String> {
    let code: Vec<&str> = cql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect();
    code.join("\n")
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Connects with the `[scylla]` settings and runs the schema's statements in order (each is
/// `IF NOT EXISTS`; the driver waits for schema agreement after each). Returns the
/// statements it ran. Runs on `bridge`; any executor may await it.
pub async fn apply_schema(
    cfg: &ScyllaConfig,
    replication_factor: Option<u32>,
    bridge: Bridge,
) -> Result<Vec<String>, StoreError> {
    check_config(cfg)?;
    let statements = schema_statements(&render_schema(&cfg.keyspace, replication_factor)?);
    let cfg = cfg.clone();
    bridge
        .spawn(async move {
            let nodes = format!("[{}]", cfg.nodes.join(", "));
            let session = session(&cfg, &nodes).await?;
            for text in &statements {
                let mut st = Statement::new(text.as_str());
                st.set_request_timeout(Some(cfg.request_timeout.0.max(DDL_TIMEOUT)));
                st.set_is_idempotent(true);
                session.query_unpaged(st, ()).await.map_err(|e| {
                    StoreError::Unavailable(format!(
                        "ScyllaDB at {nodes} refused `{}`: {e}",
                        text.lines().next().unwrap_or_default()
                    ))
                })?;
            }
            Ok(statements)
        })
        .await
        .map_err(bridge_error)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_renders_for_another_keyspace() {
        let text = render_schema("chat_test_1", Some(1)).expect("render");
        let statements = schema_statements(&text);
        assert_eq!(statements.len(), 5, "{statements:#?}");
        for s in &statements {
            assert!(!s.contains("corelay"), "keyspace left in: {s}");
            assert!(s.contains("chat_test_1"), "{s}");
        }
        assert!(statements[0].starts_with("CREATE KEYSPACE IF NOT EXISTS chat_test_1"));
        assert!(statements[0].contains("'replication_factor': 1"));
        assert!(statements[0].contains("NetworkTopologyStrategy"));
        // The shipped file, for the default keyspace, is what `schema print` prints.
        assert_eq!(render_schema("corelay", None).expect("render"), SCHEMA_CQL);
        for s in statement_texts("chat_test_1") {
            assert!(s.contains("chat_test_1.") && !s.contains("corelay"), "{s}");
        }
    }

    #[test]
    fn keyspace_names_are_checked() {
        for bad in ["", "1abc", "a-b", "a;DROP", "a b", &"x".repeat(49)] {
            assert!(render_schema(bad, None).is_err(), "{bad:?}");
        }
        assert!(render_schema("corelay", Some(0)).is_err());
        assert!(render_schema("Abc_9", Some(3)).is_ok());
    }
}
