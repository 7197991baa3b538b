//! `history`: while a fan-out runs, reader connections alternate, at a steady total rate,
//! between `history {room, limit}` on the room they are in and `join {room, since}` on the
//! next room (then `leave` of the previous one), and check what comes back against the
//! offsets the senders have seen acked:
//!
//! - `history`: offsets contiguous and ascending, at most `limit`, and reaching at least
//!   the highest offset acked before the read;
//! - `join {since}`: the ack's `offset` at least that high, and `missed` exactly the
//!   offsets `since+1 ..= offset` (or, when `truncated`, a contiguous run ending there).

use super::member::RunCtx;
use super::pacer::Schedule;
use super::{join, offsets_of, open_many, Env, Opened, Parked};
use crate::client::{ack_error, Conn, Incoming};
use crate::stats::{Percentiles, SharedHist};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Parameters of the reads.
#[derive(Debug, Clone)]
pub struct HistoryOpts {
    /// Reader connections.
    pub readers: usize,
    /// Reads per second, all readers together.
    pub rate: f64,
    /// `limit` of `history` reads.
    pub limit: u64,
    /// `join {since}` asks for this many messages back from the latest acked offset.
    pub since_back: u64,
}

/// The largest `limit` the protocol serves.
const MAX_LIMIT: u64 = 100;

#[derive(Default)]
struct HistoryStats {
    history: SharedHist,
    join: SharedHist,
    returned: AtomicU64,
    violations: AtomicU64,
    failures: AtomicU64,
    overflow: AtomicU64,
}

/// Opens the reader connections (users `lg-h<i>`), reader `i` joined to room `i mod R`.
pub async fn open_readers(
    env: &Arc<Env>,
    opts: &HistoryOpts,
    rooms: &Arc<Vec<Arc<str>>>,
    first_index: usize,
) -> Vec<Opened> {
    if rooms.is_empty() {
        return Vec::new();
    }
    let (readers, err) = open_many(env, opts.readers, first_index, "lg-h", |i| {
        Some(rooms[i % rooms.len()].to_string())
    })
    .await;
    if let Some(e) = err {
        eprintln!("warning: a reader connection failed: {e}");
    }
    readers
}

/// Checks the offsets of a `history` answer (`limit` as asked; `acked` the highest offset
/// acked before the request, 0 if none).
pub fn check_history(offsets: &[u64], limit: u64, acked: u64) -> Result<(), &'static str> {
    if offsets.len() as u64 > limit.min(MAX_LIMIT) {
        return Err("history_over_limit");
    }
    if offsets.windows(2).any(|w| w[1] != w[0] + 1) {
        return Err("history_not_contiguous");
    }
    let last = offsets.last().copied().unwrap_or(0);
    if last < acked {
        return Err("history_missing_acked");
    }
    if last >= limit.min(MAX_LIMIT) && (offsets.len() as u64) < limit.min(MAX_LIMIT) {
        return Err("history_short");
    }
    Ok(())
}

/// Checks a `join {since}` answer (`acked` as for [`check_history`]).
pub fn check_join_since(
    since: u64,
    offset: u64,
    missed: &[u64],
    truncated: bool,
    acked: u64,
) -> Result<(), &'static str> {
    if offset < acked {
        return Err("join_offset_behind_acked");
    }
    if missed.windows(2).any(|w| w[1] != w[0] + 1) {
        return Err("join_missed_not_contiguous");
    }
    if offset <= since {
        return if missed.is_empty() {
            Ok(())
        } else {
            Err("join_missed_unexpected")
        };
    }
    if missed.last() != Some(&offset) {
        return Err("join_missed_incomplete");
    }
    let first = missed.first().copied().unwrap_or(0);
    if truncated {
        if first <= since + 1 {
            return Err("join_truncated_but_complete");
        }
    } else if first != since + 1 {
        return Err("join_missed_incomplete");
    }
    Ok(())
}

/// Starts the reads from `start` until `end` over `readers`; the task's result is the
/// figures to add to the summary.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    env: Arc<Env>,
    ctx: Arc<RunCtx>,
    opts: HistoryOpts,
    readers: Vec<Opened>,
    rooms: Arc<Vec<Arc<str>>>,
    start: Instant,
    end: Instant,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<BTreeMap<String, Value>> {
    tokio::spawn(async move {
        let stats = Arc::new(HistoryStats::default());
        let n_readers = readers.len();
        let mut txs = Vec::new();
        let mut tasks = Vec::new();
        for o in readers {
            let (tx, rx) = mpsc::channel(64);
            txs.push(tx);
            let room_idx = o.idx % rooms.len().max(1);
            tasks.push(tokio::spawn(reader(
                env.clone(),
                ctx.clone(),
                stats.clone(),
                opts.clone(),
                o.conn,
                rooms.clone(),
                room_idx,
                rx,
                stop.clone(),
            )));
        }
        if !txs.is_empty() && opts.rate > 0.0 {
            let schedule = Schedule::between(start, end, opts.rate);
            for k in 0..schedule.total {
                tokio::time::sleep_until(schedule.due(k).into()).await;
                if *stop.borrow() {
                    break;
                }
                if txs[k as usize % txs.len()].try_send(()).is_err() {
                    stats.overflow.fetch_add(1, Relaxed);
                    env.errors.add("read_overflow");
                }
            }
        }
        drop(txs);
        for t in tasks {
            let _ = t.await;
        }
        let h = Percentiles::of(&stats.history.snapshot());
        let j = Percentiles::of(&stats.join.snapshot());
        let mut out = BTreeMap::new();
        out.insert("readers".into(), n_readers.into());
        out.insert("read_rate".into(), opts.rate.into());
        out.insert("history_reads".into(), h.count.into());
        out.insert("history_p50_ms".into(), h.p50.into());
        out.insert("history_p99_ms".into(), h.p99.into());
        out.insert("history_max_ms".into(), h.max.into());
        out.insert("join_since_reads".into(), j.count.into());
        out.insert("join_since_p50_ms".into(), j.p50.into());
        out.insert("join_since_p99_ms".into(), j.p99.into());
        out.insert("join_since_max_ms".into(), j.max.into());
        out.insert("read_messages".into(), stats.returned.load(Relaxed).into());
        out.insert(
            "read_violations".into(),
            stats.violations.load(Relaxed).into(),
        );
        out.insert("read_failures".into(), stats.failures.load(Relaxed).into());
        out
    })
}

#[allow(clippy::too_many_arguments)]
async fn reader(
    env: Arc<Env>,
    ctx: Arc<RunCtx>,
    stats: Arc<HistoryStats>,
    opts: HistoryOpts,
    parked: Parked,
    rooms: Arc<Vec<Arc<str>>>,
    mut room_idx: usize,
    mut rx: mpsc::Receiver<()>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conn = match parked.take().await {
        Ok(c) => c,
        Err(kind) => {
            env.errors.add(kind);
            return;
        }
    };
    let mut n = 0u64;
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            _ = super::stopped(&mut stop) => break,
            cmd = rx.recv(), if open => match cmd {
                Some(()) => {
                    n += 1;
                    let r = if n % 2 == 1 {
                        read_history(&env, &ctx, &stats, &opts, &mut conn, &rooms, room_idx).await
                    } else {
                        let next = (room_idx + 1) % rooms.len();
                        let r = join_since(&env, &ctx, &stats, &opts, &mut conn, &rooms, room_idx, next).await;
                        room_idx = next;
                        r
                    };
                    if let Err(e) = r {
                        stats.failures.fetch_add(1, Relaxed);
                        env.errors.add(e);
                        if e == "read_connection_lost" {
                            return;
                        }
                    }
                }
                None => open = false,
            },
            frame = conn.recv() => match frame {
                Ok(Some(Incoming::Ping(p))) => {
                    if conn.pong(&p).await.is_err() {
                        env.errors.add("read_connection_lost");
                        return;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    env.errors.add("read_connection_lost");
                    return;
                }
            },
        }
    }
    conn.close(Duration::from_millis(500)).await;
}

async fn read_history(
    env: &Env,
    ctx: &RunCtx,
    stats: &HistoryStats,
    opts: &HistoryOpts,
    conn: &mut Conn,
    rooms: &[Arc<str>],
    room_idx: usize,
) -> Result<(), &'static str> {
    let acked = ctx.room_latest[room_idx].load(Relaxed);
    let t = Instant::now();
    let payload = json!({ "room": &*rooms[room_idx], "limit": opts.limit });
    let ack = conn
        .request("history", &payload, env.connect_timeout)
        .await
        .map_err(|_| "read_connection_lost")?;
    stats.history.record(t.elapsed().as_micros() as u64);
    if ack_error(&ack).is_some() {
        return Err("history_refused");
    }
    let offsets = offsets_of(ack.get("messages"));
    stats.returned.fetch_add(offsets.len() as u64, Relaxed);
    if let Err(kind) = check_history(&offsets, opts.limit, acked) {
        stats.violations.fetch_add(1, Relaxed);
        env.errors.add(kind);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn join_since(
    env: &Env,
    ctx: &RunCtx,
    stats: &HistoryStats,
    opts: &HistoryOpts,
    conn: &mut Conn,
    rooms: &[Arc<str>],
    from: usize,
    to: usize,
) -> Result<(), &'static str> {
    let acked = ctx.room_latest[to].load(Relaxed);
    let since = acked.saturating_sub(opts.since_back);
    let t = Instant::now();
    let ack = join(conn, &rooms[to], Some(since), env.connect_timeout)
        .await
        .map_err(|e| {
            if e.contains("refused") {
                "join_since_refused"
            } else {
                "read_connection_lost"
            }
        })?;
    stats.join.record(t.elapsed().as_micros() as u64);
    stats.returned.fetch_add(ack.missed.len() as u64, Relaxed);
    if let Err(kind) = check_join_since(since, ack.offset, &ack.missed, ack.truncated, acked) {
        stats.violations.fetch_add(1, Relaxed);
        env.errors.add(kind);
    }
    if from != to {
        let leave = conn
            .request(
                "leave",
                &json!({ "room": &*rooms[from] }),
                env.connect_timeout,
            )
            .await
            .map_err(|_| "read_connection_lost")?;
        if ack_error(&leave).is_some() {
            return Err("leave_refused");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_checks() {
        assert_eq!(check_history(&[], 50, 0), Ok(()));
        assert_eq!(check_history(&[8, 9, 10], 50, 10), Ok(()));
        assert_eq!(
            check_history(&[8, 10], 50, 10),
            Err("history_not_contiguous")
        );
        assert_eq!(check_history(&[8, 9], 50, 10), Err("history_missing_acked"));
        assert_eq!(check_history(&[60, 61], 2, 0), Ok(()));
        assert_eq!(check_history(&[61], 2, 0), Err("history_short"));
        assert_eq!(check_history(&[1, 2, 3], 2, 0), Err("history_over_limit"));
        let full: Vec<u64> = (101..=200).collect();
        assert_eq!(
            check_history(&full, 500, 200),
            Ok(()),
            "limit capped at 100"
        );
    }

    #[test]
    fn join_since_checks() {
        assert_eq!(check_join_since(5, 8, &[6, 7, 8], false, 8), Ok(()));
        assert_eq!(
            check_join_since(5, 9, &[6, 7, 8], false, 8),
            Err("join_missed_incomplete")
        );
        assert_eq!(
            check_join_since(5, 8, &[7, 8], false, 8),
            Err("join_missed_incomplete")
        );
        assert_eq!(check_join_since(5, 8, &[7, 8], true, 8), Ok(()));
        assert_eq!(
            check_join_since(5, 8, &[6, 8], false, 8),
            Err("join_missed_not_contiguous")
        );
        assert_eq!(
            check_join_since(5, 7, &[6, 7], false, 8),
            Err("join_offset_behind_acked")
        );
        assert_eq!(check_join_since(0, 0, &[], false, 0), Ok(()));
        assert_eq!(
            check_join_since(3, 3, &[3], false, 0),
            Err("join_missed_unexpected")
        );
        assert_eq!(
            check_join_since(5, 8, &[6, 7, 8], true, 8),
            Err("join_truncated_but_complete")
        );
    }
}
