//! Appends: the rows of an append grouped by partition into small UNLOGGED batches, run a
//! few at a time, then the commit point raised (see *Writing* in the module docs). The
//! single-writer append checks offsets under each room's lock; the cluster append does not.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures::stream::{self, StreamExt as _, TryStreamExt as _};
use scylla::statement::batch::{Batch, BatchStatement, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimestamp;

use super::errors::unavailable;
use super::read::read_latest;
use super::{Conn, Shared};
use crate::history::{StoreError, StoredMessage};
use crate::store::check_batch;

/// Most rows in one UNLOGGED (single-partition) batch.
const MAX_BATCH_ROWS: usize = 100;
/// Rough byte budget of one UNLOGGED batch (well under ScyllaDB's batch size warning).
const MAX_BATCH_BYTES: usize = 64 * 1024;
/// Most rooms committed in one LOGGED batch.
const MAX_COMMIT_ROOMS: usize = 1000;
/// Row batches of one append in flight at once.
const WRITE_CONCURRENCY: usize = 16;

/// A `messages` row: room, bucket, offset, id, user, text, ts, cid.
type MessageRow<'a> = (
    &'a str,
    i64,
    i64,
    &'a str,
    &'a str,
    &'a str,
    CqlTimestamp,
    Option<&'a str>,
);
/// A `cids` row: room, user, cid, offset, ts, then the write timestamp (= offset).
type CidRow<'a> = (&'a str, &'a str, &'a str, i64, CqlTimestamp, i64);

/// A running write request.
type WriteFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send + 'a>>;

/// One write request of an append: rows of one partition, at most one batch's worth.
enum Job<'a> {
    Messages(Vec<MessageRow<'a>>),
    Cids(Vec<CidRow<'a>>),
}

/// An offset or ts as the bigint CQL stores; larger values cannot be stored.
fn to_i64(m: &StoredMessage, what: &str, v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| {
        StoreError::Invalid(format!(
            "{what} {v} of message {}#{} is above {}",
            m.room,
            m.offset,
            i64::MAX
        ))
    })
}

/// Roughly how many bytes a message's rows take in a batch.
fn row_bytes(m: &StoredMessage) -> usize {
    64 + m.room.len()
        + m.id.len()
        + m.user.len()
        + m.text.len()
        + m.cid.as_ref().map_or(0, String::len)
}

/// Splits one partition's rows into batches of at most [`MAX_BATCH_ROWS`] rows and about
/// [`MAX_BATCH_BYTES`] bytes (a larger row goes alone).
fn chunks<T>(rows: Vec<(T, usize)>, into: &mut Vec<Vec<T>>) {
    let mut current = Vec::new();
    let mut bytes = 0;
    for (row, size) in rows {
        if !current.is_empty()
            && (current.len() >= MAX_BATCH_ROWS || bytes + size > MAX_BATCH_BYTES)
        {
            into.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(row);
    }
    if !current.is_empty() {
        into.push(current);
    }
}

/// The write requests of an append, grouped by partition. Fails (before any I/O) on a
/// message the schema cannot hold.
fn jobs<'a>(
    shared: &Shared,
    batch: &'a [StoredMessage],
    with_cids: bool,
) -> Result<Vec<Job<'a>>, StoreError> {
    let mut messages: BTreeMap<(&str, i64), Vec<(MessageRow<'a>, usize)>> = BTreeMap::new();
    let mut cids: BTreeMap<(&str, &str), Vec<(CidRow<'a>, usize)>> = BTreeMap::new();
    for m in batch {
        let offset = to_i64(m, "offset", m.offset)?;
        let ts = CqlTimestamp(to_i64(m, "ts", m.ts)?);
        let bucket = shared.bucket(m.offset);
        let size = row_bytes(m);
        messages.entry((&m.room, bucket)).or_default().push((
            (
                &m.room,
                bucket,
                offset,
                &m.id,
                &m.user,
                &m.text,
                ts,
                m.cid.as_deref(),
            ),
            size,
        ));
        if let Some(cid) = m.cid.as_ref().filter(|_| with_cids) {
            cids.entry((&m.room, &m.user))
                .or_default()
                .push(((&m.room, &m.user, cid, offset, ts, offset), size));
        }
    }
    let mut out = Vec::new();
    let mut rows = Vec::new();
    for (_, part) in messages {
        chunks(part, &mut rows);
    }
    out.extend(rows.drain(..).map(Job::Messages));
    let mut rows = Vec::new();
    for (_, part) in cids {
        chunks(part, &mut rows);
    }
    out.extend(rows.into_iter().map(Job::Cids));
    Ok(out)
}

/// The same prepared statement `n` times, as an idempotent batch of the given type.
fn batch_of(p: &PreparedStatement, n: usize, kind: BatchType) -> Batch {
    let mut batch =
        Batch::new_with_statements(kind, vec![BatchStatement::PreparedStatement(p.clone()); n]);
    batch.set_is_idempotent(true);
    batch
}

/// Runs one write request.
async fn run_job(conn: &Conn, job: Job<'_>) -> Result<(), StoreError> {
    let session = &conn.session;
    let (result, what) = match job {
        Job::Messages(rows) => (
            match rows.as_slice() {
                [one] => session.execute_unpaged(&conn.st.insert_message, one).await,
                _ => {
                    let batch = batch_of(&conn.st.insert_message, rows.len(), BatchType::Unlogged);
                    session.batch(&batch, &rows).await
                }
            },
            "store messages",
        ),
        Job::Cids(rows) => (
            match rows.as_slice() {
                [one] => session.execute_unpaged(&conn.st.insert_cid, one).await,
                _ => {
                    let batch = batch_of(&conn.st.insert_cid, rows.len(), BatchType::Unlogged);
                    session.batch(&batch, &rows).await
                }
            },
            "store cids",
        ),
    };
    result.map(drop).map_err(|e| unavailable(what, &e))
}

/// Raises the commit point of every room of an append (see the module docs).
async fn commit(conn: &Conn, latest: &HashMap<&str, u64>) -> Result<(), StoreError> {
    let mut rows: Vec<(i64, i64, &str)> = Vec::with_capacity(latest.len());
    for (room, offset) in latest {
        // Checked to fit when the rows were built.
        let o =
            i64::try_from(*offset).map_err(|_| StoreError::Invalid("offset too large".into()))?;
        rows.push((o, o, room));
    }
    rows.sort_unstable_by_key(|r| r.2);
    for part in rows.chunks(MAX_COMMIT_ROOMS) {
        let result = match part {
            [one] => {
                conn.session
                    .execute_unpaged(&conn.st.set_latest, *one)
                    .await
            }
            _ => {
                let batch = batch_of(&conn.st.set_latest, part.len(), BatchType::Logged);
                conn.session.batch(&batch, part).await
            }
        };
        result.map_err(|e| unavailable("commit the append", &e))?;
    }
    Ok(())
}

/// Runs an append's write requests, [`WRITE_CONCURRENCY`] at a time; the first failure
/// ends it.
async fn run_jobs(conn: &Conn, jobs: Vec<Job<'_>>) -> Result<(), StoreError> {
    // Boxed: a stream over borrowing futures otherwise trips the compiler's `Send` check
    // (higher-ranked lifetimes in the closure).
    let writes: Vec<WriteFuture<'_>> = jobs
        .into_iter()
        .map(|job| -> WriteFuture<'_> { Box::pin(run_job(conn, job)) })
        .collect();
    stream::iter(writes)
        .buffer_unordered(WRITE_CONCURRENCY)
        .try_for_each(|()| async { Ok(()) })
        .await
}

/// A cluster append, on the bridge (see
/// [`ScyllaStore::append_cluster`](super::ScyllaStore::append_cluster)): the message rows,
/// then each room's commit point raised to the batch's highest offset of that room.
/// No lock, no read, no order check: every host may write any offset, in any order.
pub(super) async fn append_cluster(
    shared: Arc<Shared>,
    batch: Vec<StoredMessage>,
) -> Result<(), StoreError> {
    let conn = shared.conn()?;
    let mut highest: HashMap<&str, u64> = HashMap::new();
    for m in &batch {
        if m.offset == 0 {
            return Err(StoreError::Invalid(format!(
                "message {} of room {:?} has offset 0; offsets start at 1",
                m.id, m.room
            )));
        }
        let h = highest.entry(m.room.as_str()).or_insert(0);
        *h = (*h).max(m.offset);
    }
    let jobs = jobs(&shared, &batch, false)?;
    run_jobs(&conn, jobs).await?;
    commit(&conn, &highest).await
}

/// An append, on the bridge: check, write the rows, commit (see the module docs).
pub(super) async fn append(
    shared: Arc<Shared>,
    batch: Vec<StoredMessage>,
) -> Result<(), StoreError> {
    let conn = shared.conn()?;
    let mut rooms: Vec<&str> = batch.iter().map(|m| m.room.as_str()).collect();
    rooms.sort_unstable();
    rooms.dedup();
    // Queue on every room's lock in one poll, so appends keep their order on each room.
    let slots = shared.slots(&rooms);
    let mut guards = futures::future::join_all(slots.into_iter().map(|s| s.lock_owned())).await;

    let unknown: Vec<usize> = (0..rooms.len()).filter(|i| guards[*i].is_none()).collect();
    let read =
        futures::future::join_all(unknown.iter().map(|i| read_latest(&conn, rooms[*i]))).await;
    for (i, latest) in unknown.into_iter().zip(read) {
        *guards[i] = Some(latest?);
    }
    let known: HashMap<&str, u64> = rooms
        .iter()
        .zip(&guards)
        .map(|(room, g)| (*room, g.unwrap_or(0)))
        .collect();
    let new_latest = check_batch(&batch, |room| {
        known
            .get(room)
            .copied()
            .ok_or_else(|| StoreError::Unavailable(format!("internal: room {room:?} not locked")))
    })?;
    let jobs = jobs(&shared, &batch, true)?;

    let written: Result<(), StoreError> = async {
        run_jobs(&conn, jobs).await?;
        commit(&conn, &new_latest).await
    }
    .await;
    match written {
        Ok(()) => {
            for (room, guard) in rooms.iter().zip(guards.iter_mut()) {
                if let Some(latest) = new_latest.get(room) {
                    **guard = Some(*latest);
                }
            }
            Ok(())
        }
        Err(e) => {
            // The commit may or may not have landed: read the truth next time.
            for guard in &mut guards {
                **guard = None;
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_split_by_rows_and_bytes() {
        let mut out: Vec<Vec<u32>> = Vec::new();
        chunks((0..250).map(|i| (i, 10)).collect(), &mut out);
        assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), [100, 100, 50]);
        let mut out: Vec<Vec<u32>> = Vec::new();
        chunks(
            vec![(1, 40_000), (2, 40_000), (3, 100_000), (4, 10)],
            &mut out,
        );
        assert_eq!(out, [vec![1], vec![2], vec![3], vec![4]]);
    }
}
