//! `churn`: while a fan-out runs, connections are opened at a steady rate, join one of the
//! fan-out's rooms, stay for a while (reading their deliveries) and go: every other one
//! closes politely (WebSocket close), the rest just drop the TCP connection.
//! They are not measured receivers; their handshake times and failures are reported.

use super::pacer::Schedule;
use super::{open_one, Env};
use crate::client::Incoming;
use crate::stats::{Percentiles, SharedHist};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Parameters of the churn.
#[derive(Debug, Clone)]
pub struct ChurnOpts {
    /// Connections opened per second.
    pub rate: f64,
    /// How long each stays.
    pub hold: Duration,
}

#[derive(Default)]
struct ChurnStats {
    opened: AtomicU64,
    closed: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    deliveries: AtomicU64,
    connect: SharedHist,
}

/// Starts the churn from `start` until `end`; the task's result is the figures to add to
/// the summary. Connection indexes start at `first_index` (for source addresses).
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    env: Arc<Env>,
    opts: ChurnOpts,
    rooms: Arc<Vec<Arc<str>>>,
    first_index: usize,
    start: Instant,
    end: Instant,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<BTreeMap<String, Value>> {
    tokio::spawn(async move {
        let stats = Arc::new(ChurnStats::default());
        let mut tasks = Vec::new();
        if opts.rate > 0.0 && !rooms.is_empty() {
            let schedule = Schedule::between(start, end, opts.rate);
            for k in 0..schedule.total {
                tokio::time::sleep_until(schedule.due(k).into()).await;
                if *stop.borrow() {
                    break;
                }
                let room = rooms[k as usize % rooms.len()].clone();
                tasks.push(tokio::spawn(one(
                    env.clone(),
                    stats.clone(),
                    first_index + k as usize,
                    k,
                    room,
                    opts.hold,
                    stop.clone(),
                )));
            }
        }
        for t in tasks {
            let _ = t.await;
        }
        let p = Percentiles::of(&stats.connect.snapshot());
        let mut out = BTreeMap::new();
        out.insert("churn_rate".into(), opts.rate.into());
        out.insert("churn_hold_s".into(), opts.hold.as_secs_f64().into());
        out.insert("churn_opened".into(), stats.opened.load(Relaxed).into());
        out.insert("churn_closed".into(), stats.closed.load(Relaxed).into());
        out.insert("churn_dropped".into(), stats.dropped.load(Relaxed).into());
        out.insert("churn_failed".into(), stats.failed.load(Relaxed).into());
        out.insert(
            "churn_deliveries".into(),
            stats.deliveries.load(Relaxed).into(),
        );
        out.insert("churn_connect_p50_ms".into(), p.p50.into());
        out.insert("churn_connect_p99_ms".into(), p.p99.into());
        out.insert("churn_connect_max_ms".into(), p.max.into());
        out
    })
}

async fn one(
    env: Arc<Env>,
    stats: Arc<ChurnStats>,
    conn_index: usize,
    k: u64,
    room: Arc<str>,
    hold: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let user = format!("lg-c{k}");
    let mut conn = match open_one(&env, conn_index, &user, Some(&room), Some(&stats.connect)).await
    {
        Ok((conn, _)) => conn,
        Err((kind, _)) => {
            stats.failed.fetch_add(1, Relaxed);
            env.errors.add(&format!("churn_{kind}"));
            return;
        }
    };
    stats.opened.fetch_add(1, Relaxed);
    let until = tokio::time::Instant::now() + hold;
    loop {
        tokio::select! {
            biased;
            _ = super::stopped(&mut stop) => break,
            _ = tokio::time::sleep_until(until) => break,
            frame = conn.recv() => match frame {
                Ok(Some(Incoming::Packet(p))) => {
                    if p.text().starts_with("2[\"message\"") {
                        stats.deliveries.fetch_add(1, Relaxed);
                    }
                }
                Ok(Some(Incoming::Ping(p))) => {
                    if conn.pong(&p).await.is_err() {
                        env.errors.add("churn_disconnected");
                        return;
                    }
                }
                Ok(Some(Incoming::Other)) => {}
                Ok(None) | Err(_) => {
                    env.errors.add("churn_disconnected");
                    return;
                }
            }
        }
    }
    if k.is_multiple_of(2) {
        conn.close(Duration::from_millis(500)).await;
        stats.closed.fetch_add(1, Relaxed);
    } else {
        drop(conn);
        stats.dropped.fetch_add(1, Relaxed);
    }
}
