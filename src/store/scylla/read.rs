//! Reads: a room's commit point, history below it walked bucket by bucket (down for the
//! latest or older messages, up for newer ones), and cid lookups that only find committed
//! messages.

use std::sync::Arc;

use scylla::response::query_result::QueryResult;
use scylla::value::CqlTimestamp;

use super::errors::{corrupt, unavailable};
use super::{Conn, Shared};
use crate::history::{HistoryQuery, StoreError, StoredMessage};

/// A `messages` row as read: offset, id, user, text, ts, cid.
type ReadRow = (i64, String, String, String, CqlTimestamp, Option<String>);

/// The room's commit point: its highest stored offset, 0 when it has none.
pub(super) async fn read_latest(conn: &Conn, room: &str) -> Result<u64, StoreError> {
    let result = conn
        .session
        .execute_unpaged(&conn.st.get_latest, (room,))
        .await
        .map_err(|e| unavailable("read the latest offset", &e))?;
    let row: Option<(Option<i64>,)> = result
        .into_rows_result()
        .map_err(|e| corrupt(room, &e))?
        .maybe_first_row()
        .map_err(|e| corrupt(room, &e))?;
    match row.and_then(|(v,)| v) {
        None => Ok(0),
        Some(v) => u64::try_from(v).map_err(|_| {
            StoreError::Corrupt(format!("room {room:?}: latest offset {v} is negative"))
        }),
    }
}

/// Decodes `messages` rows; anything unexpected is `Corrupt`, never a panic.
fn decode(room: &str, result: QueryResult) -> Result<Vec<StoredMessage>, StoreError> {
    let rows = result.into_rows_result().map_err(|e| corrupt(room, &e))?;
    let mut out = Vec::with_capacity(rows.rows_num());
    for row in rows.rows::<ReadRow>().map_err(|e| corrupt(room, &e))? {
        let (offset, id, user, text, ts, cid) = row.map_err(|e| corrupt(room, &e))?;
        let offset = u64::try_from(offset)
            .map_err(|_| StoreError::Corrupt(format!("room {room:?}: negative offset {offset}")))?;
        let ts = u64::try_from(ts.0).map_err(|_| {
            StoreError::Corrupt(format!("message {room}#{offset}: negative ts {}", ts.0))
        })?;
        out.push(StoredMessage {
            room: room.to_owned(),
            offset,
            id,
            user,
            text,
            ts,
            cid,
        });
    }
    Ok(out)
}

/// `LIMIT` for the next bucket: what is still wanted, at most a bucket, at most `i32::MAX`.
fn page(want: usize, bucket_size: u64) -> i32 {
    let cap = usize::try_from(bucket_size).unwrap_or(usize::MAX);
    i32::try_from(want.min(cap)).unwrap_or(i32::MAX)
}

/// The newest `limit` messages with offset ≤ `hi`, oldest first, walking buckets down.
async fn walk_down(
    shared: &Shared,
    conn: &Conn,
    room: &str,
    hi: u64,
    limit: usize,
) -> Result<Vec<StoredMessage>, StoreError> {
    let mut out = Vec::new();
    if hi == 0 {
        return Ok(out);
    }
    let hi_i = i64::try_from(hi).unwrap_or(i64::MAX);
    let mut bucket = shared.bucket(hi);
    loop {
        let want = page(limit - out.len(), shared.bucket_size);
        let result = conn
            .session
            .execute_unpaged(&conn.st.read_desc, (room, bucket, hi_i, want))
            .await
            .map_err(|e| unavailable("read history", &e))?;
        out.extend(decode(room, result)?);
        if out.len() >= limit || bucket == 0 {
            break;
        }
        bucket -= 1;
    }
    out.truncate(limit);
    out.reverse();
    Ok(out)
}

/// The oldest `limit` messages with `lo` ≤ offset ≤ `hi`, walking buckets up.
async fn walk_up(
    shared: &Shared,
    conn: &Conn,
    room: &str,
    lo: u64,
    hi: u64,
    limit: usize,
) -> Result<Vec<StoredMessage>, StoreError> {
    let mut out = Vec::new();
    let (lo_i, hi_i) = (
        i64::try_from(lo).unwrap_or(i64::MAX),
        i64::try_from(hi).unwrap_or(i64::MAX),
    );
    let last = shared.bucket(hi);
    let mut bucket = shared.bucket(lo);
    while bucket <= last && out.len() < limit {
        let want = page(limit - out.len(), shared.bucket_size);
        let result = conn
            .session
            .execute_unpaged(&conn.st.read_asc, (room, bucket, lo_i, hi_i, want))
            .await
            .map_err(|e| unavailable("read history", &e))?;
        out.extend(decode(room, result)?);
        bucket += 1;
    }
    out.truncate(limit);
    Ok(out)
}

/// A read, on the bridge: the commit point first, then the buckets below it.
pub(super) async fn read(
    shared: Arc<Shared>,
    room: String,
    query: HistoryQuery,
    limit: usize,
) -> Result<Vec<StoredMessage>, StoreError> {
    let conn = shared.conn()?;
    let latest = read_latest(&conn, &room).await?;
    match query {
        HistoryQuery::Latest => walk_down(&shared, &conn, &room, latest, limit).await,
        HistoryQuery::Before(o) => {
            let hi = latest.min(o.saturating_sub(1));
            walk_down(&shared, &conn, &room, hi, limit).await
        }
        HistoryQuery::After(o) if o >= latest => Ok(Vec::new()),
        HistoryQuery::After(o) => walk_up(&shared, &conn, &room, o + 1, latest, limit).await,
    }
}

/// A cid lookup, on the bridge: the cid row, then (at once) the commit point and the
/// message it names, which must be committed and carry the same user and cid.
pub(super) async fn find_cid(
    shared: Arc<Shared>,
    room: String,
    user: String,
    cid: String,
    not_before_ts: u64,
) -> Result<Option<StoredMessage>, StoreError> {
    let conn = shared.conn()?;
    let result = conn
        .session
        .execute_unpaged(&conn.st.get_cid, (&room, &user, &cid))
        .await
        .map_err(|e| unavailable("look up a cid", &e))?;
    let row: Option<(Option<i64>, Option<CqlTimestamp>)> = result
        .into_rows_result()
        .map_err(|e| corrupt(&room, &e))?
        .maybe_first_row()
        .map_err(|e| corrupt(&room, &e))?;
    let Some((Some(offset), Some(ts))) = row else {
        return Ok(None);
    };
    if i64::try_from(not_before_ts).is_ok_and(|nb| ts.0 < nb) {
        return Ok(None);
    }
    let Ok(offset_u) = u64::try_from(offset) else {
        return Err(StoreError::Corrupt(format!(
            "cid {cid:?} of {user:?} in room {room:?} names negative offset {offset}"
        )));
    };
    let message = async {
        conn.session
            .execute_unpaged(
                &conn.st.get_message,
                (&room, shared.bucket(offset_u), offset),
            )
            .await
            .map_err(|e| unavailable("look up a cid", &e))
    };
    let (latest, message) = futures::future::join(read_latest(&conn, &room), message).await;
    if offset_u > latest? {
        return Ok(None); // not committed: its append failed or is still running
    }
    let found = decode(&room, message?)?.into_iter().next().filter(|m| {
        m.user == user && m.cid.as_deref() == Some(cid.as_str()) && m.ts >= not_before_ts
    });
    Ok(found)
}
