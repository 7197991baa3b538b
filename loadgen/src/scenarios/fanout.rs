//! `fanout`: C connections in rooms of M members, S senders sending at a total rate paced
//! evenly; a warm-up, a measured window, then a grace period for stragglers.
//!
//! Timeline (all sends stop at the end of the window):
//!
//! ```text
//! setup (connect + join) | warm-up | measured window | grace | stop
//! ```
//!
//! Only messages whose scheduled send time falls in the window are measured. Each is
//! expected at every other measured member of its room; the `churn` and `history`
//! scenarios add connections of their own, which are not measured receivers.

use super::member::{self, Cmd, Member, RunCtx};
use super::pacer;
use super::send_runtime::SendRuntime;
use super::{churn, history, open_many, self_cpu, Env, RunOutput};
use crate::backlog::{self, Watched};
use crate::report::{Progress, Summary};
use crate::stats::{Counters, OrderReport, Percentiles, SharedHist};
use anyhow::{bail, Context};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Parameters of a fan-out run.
#[derive(Debug, Clone)]
pub struct FanoutOpts {
    /// Measured connections.
    pub connections: usize,
    /// Members per room.
    pub room_size: usize,
    /// Senders (0: one per room).
    pub senders: usize,
    /// Total messages per second.
    pub rate: f64,
    /// Warm-up before the window.
    pub warmup: Duration,
    /// Measured window.
    pub duration: Duration,
    /// Time after the window to wait for stragglers.
    pub grace: Duration,
    /// Message text padded to at least this many bytes.
    pub text_bytes: usize,
}

/// What runs beside the fan-out.
#[derive(Debug, Clone)]
pub enum Extra {
    /// Nothing: plain `fanout`.
    None,
    /// Connections opened and closed at a steady rate.
    Churn(churn::ChurnOpts),
    /// `join {since}` and `history` reads at a steady rate.
    History(history::HistoryOpts),
}

/// Queue of paced sends per sender; a full queue means the sender cannot keep up.
const SENDER_QUEUE: usize = 4096;

/// Runs a fan-out (with `extra` beside it) and fills `summary`.
pub async fn run(
    env: Arc<Env>,
    opts: FanoutOpts,
    extra: Extra,
    mut summary: Summary,
) -> anyhow::Result<RunOutput> {
    if opts.connections < 2 || opts.room_size < 2 {
        bail!("fan-out needs at least 2 connections and rooms of at least 2 members");
    }
    if !(opts.rate > 0.0 && opts.rate.is_finite()) {
        bail!("--rate must be positive");
    }
    let rooms_n = opts.connections.div_ceil(opts.room_size);
    let room_names: Arc<Vec<Arc<str>>> =
        Arc::new((0..rooms_n).map(|r| Arc::from(env.room_name(r))).collect());
    let baseline = env.sample_server();
    // The pacer's timer and the senders' runtime are made before the connections, so that
    // a run at the descriptor limit fails on a connection, with its clear message.
    let timer = pacer::Timer::new().context("cannot make the pacer's timer")?;
    let send_rt = SendRuntime::start()?;

    // Setup: open and join every measured member, then the readers of `history`.
    let setup_progress = {
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
    let m = opts.room_size;
    let (opened, first_err) = open_many(&env, opts.connections, 0, "lg-", |i| {
        Some(env.room_name(i / m))
    })
    .await;
    let readers = match &extra {
        Extra::History(h) => history::open_readers(&env, h, &room_names, opts.connections).await,
        _ => Vec::new(),
    };
    setup_progress.finish().await;
    if opened.len() < 2 {
        bail!(
            "only {} of {} connections opened: {}",
            opened.len(),
            opts.connections,
            first_err.unwrap_or_default()
        );
    }
    if let Some(e) = &first_err {
        eprintln!(
            "warning: {} of {} connections failed; first error: {e}",
            opts.connections - opened.len(),
            opts.connections
        );
    }
    let after_connect = env.sample_server();

    // Who is in which room, and who sends.
    let mut by_room: Vec<Vec<usize>> = vec![Vec::new(); rooms_n];
    for (pos, o) in opened.iter().enumerate() {
        by_room[o.idx / m].push(pos);
    }
    let senders_wanted = if opts.senders == 0 {
        rooms_n
    } else {
        opts.senders.min(opened.len())
    };
    let sender_pos = pick_senders(&by_room, senders_wanted);
    if sender_pos.is_empty() {
        bail!("no room has two open members: nothing to measure");
    }

    // Timeline.
    let t0 = Instant::now() + Duration::from_millis(200);
    let window_start = t0 + opts.warmup;
    let window_end = window_start + opts.duration;
    let grace_end = window_end + opts.grace;
    let ctx = Arc::new(RunCtx {
        clock: env.clock,
        window_start_ns: env.clock.ns_at(window_start),
        window_end_ns: env.clock.ns_at(window_end),
        counters: Counters::default(),
        ack_hist: SharedHist::default(),
        delivery_hist: SharedHist::default(),
        send_lag_hist: SharedHist::default(),
        errors: env.errors.clone(),
        room_latest: (0..rooms_n).map(|_| AtomicU64::new(0)).collect(),
        text_bytes: opts.text_bytes,
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    // Members.
    let connected = opened.len();
    let mut is_sender = vec![false; connected];
    for &p in &sender_pos {
        is_sender[p] = true;
    }
    let mut sender_txs = vec![None; connected];
    let mut handles = Vec::with_capacity(connected);
    let watched = Watched::default();
    for (pos, o) in opened.into_iter().enumerate() {
        let room_idx = o.idx / m;
        ctx.room_latest[room_idx].fetch_max(o.join_offset, Relaxed);
        let member = Member {
            idx: o.idx,
            room_idx,
            room: room_names[room_idx].clone(),
            members: by_room[room_idx].len() as u64,
            join_offset: o.join_offset,
        };
        let rx = if is_sender[pos] {
            let (tx, rx) = mpsc::channel(SENDER_QUEUE);
            sender_txs[pos] = Some(tx);
            Some(rx)
        } else {
            None
        };
        let (ctx2, stop2, watched2) = (ctx.clone(), stop_rx.clone(), watched.clone());
        let task = async move {
            match o.conn.take().await {
                Ok(conn) => {
                    watched2.add(conn.raw_fd());
                    member::run(conn, member, ctx2, rx, stop2).await
                }
                Err(kind) => {
                    ctx2.errors.add(kind);
                    member::Outcome {
                        disconnected: true,
                        ..member::Outcome::default()
                    }
                }
            }
        };
        handles.push(if is_sender[pos] {
            send_rt.spawn(task)
        } else {
            tokio::spawn(task)
        });
    }
    let txs: Vec<mpsc::Sender<Cmd>> = sender_pos
        .iter()
        .filter_map(|&p| sender_txs[p].take())
        .collect();
    let senders_n = txs.len();
    let schedule = pacer::Schedule::between(t0, window_end, opts.rate);
    let pacer = send_rt.spawn(pacer::pace(ctx.clone(), timer, txs, schedule));

    // Beside the fan-out.
    let churn_task = match &extra {
        Extra::Churn(c) => Some(churn::spawn(
            env.clone(),
            c.clone(),
            room_names.clone(),
            opts.connections,
            t0,
            window_end,
            stop_rx.clone(),
        )),
        _ => None,
    };
    let history_task = match &extra {
        Extra::History(h) => Some(history::spawn(
            env.clone(),
            ctx.clone(),
            h.clone(),
            readers,
            room_names.clone(),
            t0,
            window_end,
            stop_rx.clone(),
        )),
        _ => None,
    };

    let progress = {
        let ctx = ctx.clone();
        Progress::start(env.progress, move |_| {
            let now = Instant::now();
            let phase = if now < window_start {
                "warm-up"
            } else if now < window_end {
                "measure"
            } else {
                "grace"
            };
            let c = &ctx.counters;
            format!(
                "{phase} conns={connected} sent={} acked={} recv={} expected={} errors={}",
                c.sent.load(Relaxed),
                c.acked.load(Relaxed),
                c.received.load(Relaxed),
                c.expected.load(Relaxed),
                ctx.errors.total()
            )
        })
    };

    // Measure.
    let unread = tokio::spawn(backlog::sample(watched, window_start, window_end));
    tokio::time::sleep_until(window_start.into()).await;
    let s1 = env.sample_server();
    let me1 = self_cpu();
    let bytes1 = ctx.counters.bytes_in.load(Relaxed);
    tokio::time::sleep_until(window_end.into()).await;
    let s2 = env.sample_server();
    let me2 = self_cpu();
    let bytes2 = ctx.counters.bytes_in.load(Relaxed);
    let unread = unread.await.unwrap_or_default();
    tokio::time::sleep_until(grace_end.into()).await;
    let _ = stop_tx.send(true);
    let _ = pacer.await;

    let mut order = OrderReport::default();
    let mut disconnects = 0;
    let join_deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    for h in handles {
        match tokio::time::timeout_at(join_deadline, h).await {
            Ok(Ok(out)) => {
                order.add(out.order);
                disconnects += out.disconnected as u64;
            }
            _ => env.errors.add("member_stuck"),
        }
    }
    drop(send_rt);
    if let Some(h) = churn_task {
        let extra_figs = h.await.unwrap_or_default();
        summary.extra.extend(extra_figs);
    }
    if let Some(h) = history_task {
        let extra_figs = h.await.unwrap_or_default();
        summary.extra.extend(extra_figs);
    }
    progress.finish().await;

    // Figures.
    let secs = opts.duration.as_secs_f64();
    let c = &ctx.counters;
    let loss = c.loss();
    let ack = ctx.ack_hist.snapshot();
    let delivery = ctx.delivery_hist.snapshot();
    summary.connections = opts.connections as u64;
    summary.connected = connected as u64;
    summary.source_addrs = env.sources.count();
    summary.rooms = Some(rooms_n as u64);
    summary.room_size = Some(m as u64);
    summary.senders = Some(senders_n as u64);
    summary.rate = Some(opts.rate);
    summary.text_bytes = Some(opts.text_bytes as u64);
    summary.warmup_s = Some(opts.warmup.as_secs_f64());
    summary.duration_s = secs;
    summary.grace_s = Some(opts.grace.as_secs_f64());
    summary.sent = Some(c.sent_window.load(Relaxed));
    summary.acked = Some(c.acked_window.load(Relaxed));
    summary.ack_errors = Some(c.ack_errors_window.load(Relaxed));
    summary.expected = Some(loss.expected);
    summary.received = Some(loss.received);
    summary.loss = Some(loss.lost);
    summary.loss_pct = Some(loss.pct());
    summary.excess = Some(loss.excess);
    summary.order_violations = Some(order.total());
    summary.order_gaps = Some(order.gaps);
    summary.order_reorders = Some(order.reorders);
    summary.order_duplicates = Some(order.duplicates);
    summary.set_ack(Percentiles::of(&ack));
    summary.set_delivery(Percentiles::of(&delivery));
    let send_lag = Percentiles::of(&ctx.send_lag_hist.snapshot());
    (summary.send_lag_p50_ms, summary.send_lag_p99_ms) = (send_lag.p50, send_lag.p99);
    summary.set_connect(Percentiles::of(&env.connect_hist.snapshot()));
    summary.deliveries_per_sec = Some(loss.received as f64 / secs.max(1e-9));
    if let (Some(a), Some(b)) = (s1, s2) {
        let cpu_us = b.cpu.saturating_sub(a.cpu).as_micros() as f64;
        summary.server_cpu_pct = Some(100.0 * cpu_us / 1e6 / secs.max(1e-9));
        if loss.received > 0 {
            summary.server_cpu_us_per_delivery = Some(cpu_us / loss.received as f64);
            let user_us = b.user.saturating_sub(a.user).as_micros() as f64;
            summary.server_user_us_per_delivery = Some(user_us / loss.received as f64);
        }
        summary.server_rss_kib = Some(b.rss_kib);
    }
    if let (Some(a), Some(b)) = (baseline, after_connect) {
        summary.kib_per_connection =
            Some((b.rss_kib as f64 - a.rss_kib as f64) / connected.max(1) as f64);
    }
    summary.loadgen_cpu_pct = Some(100.0 * me2.saturating_sub(me1).as_secs_f64() / secs.max(1e-9));
    if unread.samples > 0 {
        summary.loadgen_unread_kib_avg = Some(unread.avg_bytes / 1024.0);
        summary.loadgen_unread_kib_max = Some(unread.max_bytes as f64 / 1024.0);
        summary.loadgen_lag_ms =
            unread.lag_ms(bytes2.saturating_sub(bytes1) as f64 / secs.max(1e-9));
    }
    let overflow = c.pacer_overflow.load(Relaxed);
    if overflow > 0 {
        summary
            .extra
            .insert("pacer_overflow".into(), overflow.into());
    }
    summary.disconnects = disconnects;
    summary.error_kinds = env.errors.snapshot();
    summary.errors = summary.error_kinds.values().sum();
    Ok(RunOutput {
        summary,
        series: vec![("delivery".into(), delivery), ("ack".into(), ack)],
    })
}

/// Picks `wanted` senders: round robin over the rooms, the k-th sender of room r being
/// its member (k + r) mod len. The offset spreads the senders over the targets: connection
/// i goes to target i mod N, so always taking a room's first member would put every sender
/// on the same target whenever N divides the room size. Rooms with fewer than two open
/// members are skipped (nobody would receive).
fn pick_senders(by_room: &[Vec<usize>], wanted: usize) -> Vec<usize> {
    let rooms_n = by_room.len();
    let mut out = Vec::with_capacity(wanted);
    if rooms_n == 0 {
        return out;
    }
    for j in 0..wanted {
        let r = j % rooms_n;
        let k = j / rooms_n;
        let room = &by_room[r];
        if room.len() >= 2 && k < room.len() {
            out.push(room[(k + r) % room.len()]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::pick_senders;

    /// 100 rooms of 10 over connections 0..1000, as `fanout -c 1000 -m 10` opens them.
    fn rooms() -> Vec<Vec<usize>> {
        (0..100).map(|r| (r * 10..r * 10 + 10).collect()).collect()
    }

    #[test]
    fn one_sender_per_room_spreads_over_two_targets() {
        let senders = pick_senders(&rooms(), 100);
        assert_eq!(senders.len(), 100);
        // Target = connection index mod 2.
        let on_first = senders.iter().filter(|&&p| p % 2 == 0).count();
        assert_eq!(on_first, 50, "{senders:?}");
        for (r, &p) in senders.iter().enumerate() {
            assert_eq!(p / 10, r, "room {r}'s sender is its own member");
        }
    }

    #[test]
    fn every_member_sends_once_when_all_send() {
        let mut senders = pick_senders(&rooms(), 1000);
        senders.sort_unstable();
        assert_eq!(senders, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn short_rooms_give_no_duplicates_and_lone_members_do_not_send() {
        let by_room = vec![vec![0, 1, 2], vec![10], vec![20, 21]];
        let mut senders = pick_senders(&by_room, 30);
        senders.sort_unstable();
        assert_eq!(senders, vec![0, 1, 2, 20, 21]);
        assert!(pick_senders(&[], 5).is_empty());
    }
}
