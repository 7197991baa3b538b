//! `connect`: C connections opened (optionally joined to rooms of M), held idle for T
//! seconds answering pings, then closed. Reports handshake-time percentiles and, with
//! `--server-pid`, the server's memory per connection.

use super::{open_many, self_cpu, Env, RunOutput};
use crate::client::Incoming;
use crate::report::{Progress, Summary};
use crate::stats::Percentiles;
use anyhow::bail;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Parameters of a connect run.
#[derive(Debug, Clone)]
pub struct ConnectOpts {
    /// Connections.
    pub connections: usize,
    /// How long to hold them once all are open.
    pub hold: Duration,
    /// Join rooms of this many members (0: join nothing).
    pub room_size: usize,
}

/// Runs the connect scenario and fills `summary`.
pub async fn run(
    env: Arc<Env>,
    opts: ConnectOpts,
    mut summary: Summary,
) -> anyhow::Result<RunOutput> {
    if opts.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let baseline = env.sample_server();
    let progress = {
        let env2 = env.clone();
        let total = opts.connections;
        Progress::start(env.progress, move |t| {
            format!(
                "connecting {}/{total} ({:.0}s) errors={}",
                env2.opened.load(Relaxed),
                t.as_secs_f64(),
                env2.errors.total()
            )
        })
    };
    let setup_start = Instant::now();
    let room_size = opts.room_size;
    let (opened, first_err) = open_many(&env, opts.connections, 0, "lg-", |i| {
        (room_size > 0).then(|| env.room_name(i / room_size))
    })
    .await;
    let setup_secs = setup_start.elapsed().as_secs_f64();
    progress.finish().await;
    if let Some(e) = &first_err {
        eprintln!(
            "warning: {} of {} connections failed; first error: {e}",
            opts.connections - opened.len(),
            opts.connections
        );
    }
    if opened.is_empty() {
        bail!("no connection opened: {}", first_err.unwrap_or_default());
    }
    let connected = opened.len();

    // Hold.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut handles = Vec::with_capacity(connected);
    for o in opened {
        handles.push(tokio::spawn(hold(o.conn, env.clone(), stop_rx.clone())));
    }
    let progress = Progress::start(env.progress, move |t| {
        format!("holding {connected} connections ({:.0}s)", t.as_secs_f64())
    });
    let s1 = env.sample_server();
    let me1 = self_cpu();
    tokio::time::sleep(opts.hold).await;
    let s2 = env.sample_server();
    let me2 = self_cpu();
    let _ = stop_tx.send(true);
    let mut disconnects = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    for h in handles {
        match tokio::time::timeout_at(deadline, h).await {
            Ok(Ok(lost)) => disconnects += lost as u64,
            _ => env.errors.add("holder_stuck"),
        }
    }
    progress.finish().await;

    let hold_secs = opts.hold.as_secs_f64();
    let connect = env.connect_hist.snapshot();
    summary.connections = opts.connections as u64;
    summary.connected = connected as u64;
    summary.source_addrs = env.sources.count();
    summary.room_size = (room_size > 0).then_some(room_size as u64);
    summary.rooms = (room_size > 0).then(|| opts.connections.div_ceil(room_size) as u64);
    summary.duration_s = hold_secs;
    summary.set_connect(Percentiles::of(&connect));
    if let (Some(a), Some(b)) = (s1, s2) {
        summary.server_cpu_pct =
            Some(100.0 * b.cpu.saturating_sub(a.cpu).as_secs_f64() / hold_secs.max(1e-9));
        summary.server_rss_kib = Some(b.rss_kib);
    }
    if let (Some(a), Some(b)) = (baseline, s2) {
        summary.kib_per_connection = Some((b.rss_kib as f64 - a.rss_kib as f64) / connected as f64);
    }
    summary.loadgen_cpu_pct =
        Some(100.0 * me2.saturating_sub(me1).as_secs_f64() / hold_secs.max(1e-9));
    summary.extra.insert(
        "connects_per_sec".into(),
        (connected as f64 / setup_secs.max(1e-9)).into(),
    );
    summary.disconnects = disconnects;
    summary.error_kinds = env.errors.snapshot();
    summary.errors = summary.error_kinds.values().sum();
    Ok(RunOutput {
        summary,
        series: vec![("connect".into(), connect)],
    })
}

/// Holds a connection idle until `stop`, answering pings. Returns whether it was lost.
async fn hold(parked: super::Parked, env: Arc<Env>, mut stop: watch::Receiver<bool>) -> bool {
    let mut conn = match parked.take().await {
        Ok(c) => c,
        Err(kind) => {
            env.errors.add(kind);
            return true;
        }
    };
    loop {
        tokio::select! {
            biased;
            _ = super::stopped(&mut stop) => break,
            frame = conn.recv() => match frame {
                Ok(Some(Incoming::Ping(p))) => {
                    if conn.pong(&p).await.is_err() {
                        env.errors.add("disconnected");
                        return true;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    env.errors.add("disconnected");
                    return true;
                }
            },
        }
    }
    conn.close(Duration::from_millis(500)).await;
    false
}
