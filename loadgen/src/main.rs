//! `corelay-loadgen`: load scenarios against Socket.IO chat servers, and the latency plot.
//!
//! ```text
//! corelay-loadgen fanout  [common] -c 1000 -m 10 --rate 2000 --duration 10s
//! corelay-loadgen connect [common] -c 10000 --hold 30s
//! corelay-loadgen churn   [common] -c 1000 --rate 1000 --churn-rate 50
//! corelay-loadgen history [common] -c 1000 --rate 1000 --read-rate 200
//! corelay-loadgen plot a.hdr b.hdr --out latency.svg
//! ```
//!
//! Load runs against corelay should raise its per-connection send limit (default 20 msg/s,
//! burst 40), e.g. `CORELAY_LIMITS_SEND_RATE=100000 CORELAY_LIMITS_SEND_BURST=100000`;
//! `rate_limited` acks are reported as errors (`ack_rate_limited`).

// Network input and other runtime data must never reach `unwrap()`: return an error,
// or use `expect` naming the invariant that makes it impossible. (Tests may unwrap:
// clippy.toml.)
#![warn(clippy::unwrap_used)]

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use corelay_loadgen::auth::Auth;
use corelay_loadgen::clock::{parse_duration, Clock};
use corelay_loadgen::plot::{self, Series, YScale};
use corelay_loadgen::proc;
use corelay_loadgen::report::Summary;
use corelay_loadgen::scenarios::churn::ChurnOpts;
use corelay_loadgen::scenarios::connect::{self, ConnectOpts};
use corelay_loadgen::scenarios::fanout::{self, Extra, FanoutOpts};
use corelay_loadgen::scenarios::floor;
use corelay_loadgen::scenarios::history::HistoryOpts;
use corelay_loadgen::scenarios::{Env, RunOutput};
use corelay_loadgen::stats::{Errors, SharedHist};
use corelay_loadgen::target::{parse_targets, Sources};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "corelay-loadgen",
    version,
    about = "Load generator for Socket.IO v5 chat servers (corelay, Node socket.io)",
    after_help = "Against corelay, raise the send rate limit for load runs: \
                  CORELAY_LIMITS_SEND_RATE=100000 CORELAY_LIMITS_SEND_BURST=100000.\n\
                  The last line of stdout is one JSON object with every figure."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Rooms of M members, S senders at a total paced rate: ack and delivery latency, loss, order.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        fanout: FanoutArgs,
    },
    /// C idle connections held for T: connect-time percentiles, server memory per connection.
    Connect {
        #[command(flatten)]
        common: Common,
        /// How long to hold the connections once all are open.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        hold: Duration,
        /// Join rooms of this many members (0: join no room).
        #[arg(short = 'm', long, default_value_t = 0)]
        room_size: usize,
    },
    /// `fanout` plus connections opened and closed at a steady rate.
    Churn {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        fanout: FanoutArgs,
        /// Connections opened per second (each joins a fan-out room).
        #[arg(long, default_value_t = 50.0)]
        churn_rate: f64,
        /// How long each churning connection stays.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        churn_hold: Duration,
    },
    /// `fanout` plus `join {since}` and `history` reads at a steady rate.
    History {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        fanout: FanoutArgs,
        /// Reader connections.
        #[arg(long, default_value_t = 10)]
        readers: usize,
        /// Reads per second (history and join-since alternate).
        #[arg(long, default_value_t = 100.0)]
        read_rate: f64,
        /// `limit` of history reads.
        #[arg(long, default_value_t = 50)]
        read_limit: u64,
        /// `join {since}` asks for this many messages back.
        #[arg(long, default_value_t = 50)]
        since_back: u64,
    },
    /// No server: the kernel's CPU cost of one small loopback write, the floor under any
    /// server's CPU per delivery measured on this host.
    Floor {
        /// Connected socket pairs the writes go round-robin over.
        #[arg(long, default_value_t = 1000)]
        sockets: usize,
        /// Messages per second, paced evenly.
        #[arg(short = 'r', long, default_value_t = 45_000.0)]
        rate: f64,
        /// Bytes per message.
        #[arg(long, default_value_t = 150)]
        frame_bytes: usize,
        /// Messages per write (more than 1: frames that queued up between two writes).
        #[arg(long, default_value_t = 1)]
        per_write: usize,
        /// How long to write (at most 10 minutes).
        #[arg(short = 'd', long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        /// `epoll`: the reader sleeps in epoll_wait like a real client (each write may pay
        /// for a wake-up); `spin`: it never sleeps (the bare TCP cost).
        #[arg(long, default_value = "epoll", value_parser = ["epoll", "spin"])]
        reader: String,
    },
    /// Plot HDR histogram files (from --hdr-out) on one percentile chart.
    Plot {
        /// Histogram files; each becomes a line labelled with its file name.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The SVG to write.
        #[arg(long, short)]
        out: PathBuf,
        /// Chart title.
        #[arg(long, default_value = "latency by percentile")]
        title: String,
        /// Linear y axis (default: log).
        #[arg(long)]
        linear: bool,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// Server(s), host:port; repeat or comma-separate. Connection i goes to target i mod N.
    #[arg(short, long = "target", default_value = "127.0.0.1:8080")]
    targets: Vec<String>,
    /// Socket.IO path.
    #[arg(long, default_value = "/socket.io/")]
    path: String,
    /// Allow targets outside the loopback range.
    #[arg(long)]
    allow_remote: bool,
    /// HS256 secret to mint tokens ({sub, rooms:["*"], exp}); without it, dev mode {"user"}.
    #[arg(long, env = "CORELAY_JWT_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Lifetime of minted tokens.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    token_ttl: Duration,
    /// Connections (measured members).
    #[arg(short = 'c', long, default_value_t = 100)]
    connections: usize,
    /// Source addresses 127.0.0.2.. to spread connections over (0: don't bind; default:
    /// one per 20000 connections, none below that).
    #[arg(long)]
    source_addrs: Option<u32>,
    /// Handshakes in flight at once while opening connections.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Time allowed for one handshake, and for one ack during setup.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Time allowed for opening all connections.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    setup_timeout: Duration,
    /// Tokio worker threads (the server likely shares the machine). `fanout` adds one
    /// thread for the pacer and the senders, so that a due send never waits behind readers.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Server process(es) to sample from /proc (CPU time, RSS); repeat to sum several.
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,
    /// Write the main latency histogram (delivery; connect for `connect`) to this file.
    #[arg(long)]
    hdr_out: Option<PathBuf>,
    /// Write a latency percentile plot of this run to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// A label for the summary, JSON and plot.
    #[arg(long)]
    label: Option<String>,
    /// No progress line even on a terminal.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args, Clone)]
struct FanoutArgs {
    /// Members per room.
    #[arg(short = 'm', long, default_value_t = 10)]
    room_size: usize,
    /// Senders (0: one per room).
    #[arg(short = 's', long, default_value_t = 0)]
    senders: usize,
    /// Total messages per second, paced evenly over the senders.
    #[arg(short = 'r', long, default_value_t = 100.0)]
    rate: f64,
    /// Warm-up before the measured window.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Measured window.
    #[arg(short = 'd', long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Time after the window to wait for late deliveries.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    grace: Duration,
    /// Pad message texts to this many bytes.
    #[arg(long, default_value_t = 0)]
    text_bytes: usize,
}

impl FanoutArgs {
    fn opts(&self, connections: usize) -> FanoutOpts {
        FanoutOpts {
            connections,
            room_size: self.room_size,
            senders: self.senders,
            rate: self.rate,
            warmup: self.warmup,
            duration: self.duration,
            grace: self.grace,
            text_bytes: self.text_bytes,
        }
    }

    fn run_time(&self) -> Duration {
        self.warmup + self.duration + self.grace
    }
}

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("corelay-loadgen: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let (common, scenario, extra_fds, run_time) = match &cli.cmd {
        Command::Plot {
            files,
            out,
            title,
            linear,
        } => {
            let mut series = Vec::new();
            for f in files {
                let label = f
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| f.display().to_string());
                series.push(Series {
                    label,
                    hist: plot::read_hdr(f)?,
                });
            }
            let scale = if *linear { YScale::Linear } else { YScale::Log };
            plot::write_svg(out, title, &series, scale)?;
            println!("wrote {}", out.display());
            return Ok(0);
        }
        Command::Floor {
            sockets,
            rate,
            frame_bytes,
            per_write,
            duration,
            reader,
        } => {
            if *duration > Duration::from_secs(600) {
                anyhow::bail!("--duration is at most 10 minutes");
            }
            let report = floor::run(&floor::FloorOpts {
                reader: if reader == "spin" {
                    floor::Reader::Spin
                } else {
                    floor::Reader::Epoll
                },
                sockets: *sockets,
                rate: *rate,
                frame_bytes: *frame_bytes,
                per_write: *per_write,
                duration: *duration,
            })?;
            print!("{}", report.human());
            println!("{}", serde_json::to_string(&report)?);
            return Ok(0);
        }
        Command::Fanout { common, fanout } => (common, "fanout", 0, fanout.run_time()),
        Command::Connect { common, hold, .. } => (common, "connect", 0, *hold),
        Command::Churn {
            common,
            fanout,
            churn_rate,
            churn_hold,
        } => {
            let in_flight =
                churn_rate * (churn_hold.as_secs_f64() + common.connect_timeout.as_secs_f64());
            (common, "churn", in_flight.ceil() as u64, fanout.run_time())
        }
        Command::History {
            common,
            fanout,
            readers,
            ..
        } => (common, "history", *readers as u64, fanout.run_time()),
    };
    let common = common.clone();

    let endpoints = parse_targets(&common.targets, &common.path, common.allow_remote)?;
    let need_fds = common.connections as u64 + extra_fds + 64;
    proc::ensure_fd_limit(need_fds)?;
    for &pid in &common.server_pids {
        proc::cpu_time(pid)?;
    }
    if let Command::Fanout { fanout, .. }
    | Command::Churn { fanout, .. }
    | Command::History { fanout, .. } = &cli.cmd
    {
        let rooms = common.connections.div_ceil(fanout.room_size.max(1)).max(1);
        let senders = if fanout.senders == 0 {
            rooms
        } else {
            fanout.senders
        };
        let per_sender = fanout.rate / senders.max(1) as f64;
        if per_sender > 20.0 {
            eprintln!(
                "note: {per_sender:.1} msg/s per sender; corelay's default limit is 20/s (burst 40): \
                 start it with CORELAY_LIMITS_SEND_RATE / CORELAY_LIMITS_SEND_BURST raised, or \
                 expect ack_rate_limited errors"
            );
        }
    }

    let sources = Sources::new(
        common.source_addrs,
        common.connections + extra_fds as usize,
        &endpoints,
    );
    let clock = Clock::new();
    let env = Arc::new(Env {
        endpoints,
        sources,
        auth: Auth::new(common.secret.as_deref(), common.token_ttl),
        connect_timeout: common.connect_timeout,
        connect_concurrency: common.connect_concurrency,
        setup_timeout: common.setup_timeout,
        server_pids: common.server_pids.clone(),
        progress: !common.no_progress,
        clock,
        errors: Arc::new(Errors::default()),
        room_prefix: format!("lg{}", clock.now_ns() / 1_000_000 % 100_000_000),
        opened: AtomicU64::new(0),
        connect_hist: SharedHist::default(),
    });
    let base = Summary {
        scenario: scenario.to_string(),
        label: common.label.clone(),
        targets: common
            .targets
            .iter()
            .flat_map(|t| t.split(','))
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect(),
        ..Summary::default()
    };

    // Every run is bounded: setup + run + closing, then a watchdog ends the process.
    let deadline = common.setup_timeout + run_time + Duration::from_secs(20);
    let watchdog = deadline + Duration::from_secs(10);
    std::thread::spawn(move || {
        std::thread::sleep(watchdog);
        eprintln!("corelay-loadgen: hard deadline of {watchdog:?} passed, exiting");
        std::process::exit(3);
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(common.threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let cmd = cli.cmd;
    let env2 = env.clone();
    let base2 = base.clone();
    let result = rt.block_on(async move {
        let fut = async move {
            match cmd {
                Command::Fanout { common, fanout } => {
                    fanout::run(env2, fanout.opts(common.connections), Extra::None, base2).await
                }
                Command::Connect {
                    common,
                    hold,
                    room_size,
                } => {
                    let opts = ConnectOpts {
                        connections: common.connections,
                        hold,
                        room_size,
                    };
                    connect::run(env2, opts, base2).await
                }
                Command::Churn {
                    common,
                    fanout,
                    churn_rate,
                    churn_hold,
                } => {
                    let extra = Extra::Churn(ChurnOpts {
                        rate: churn_rate,
                        hold: churn_hold,
                    });
                    fanout::run(env2, fanout.opts(common.connections), extra, base2).await
                }
                Command::History {
                    common,
                    fanout,
                    readers,
                    read_rate,
                    read_limit,
                    since_back,
                } => {
                    let extra = Extra::History(HistoryOpts {
                        readers,
                        rate: read_rate,
                        limit: read_limit,
                        since_back,
                    });
                    fanout::run(env2, fanout.opts(common.connections), extra, base2).await
                }
                Command::Plot { .. } | Command::Floor { .. } => unreachable!("handled above"),
            }
        };
        tokio::time::timeout(deadline, fut).await
    });
    // Do not wait for lingering connection tasks.
    rt.shutdown_background();

    let out: RunOutput = match result {
        Ok(r) => r?,
        Err(_) => {
            let mut s = base;
            s.deadline_hit = true;
            s.error_kinds = env.errors.snapshot();
            s.errors = s.error_kinds.values().sum::<u64>() + 1;
            s.print();
            return Ok(2);
        }
    };
    if let Some(path) = &common.hdr_out {
        if let Some((_, h)) = out.series.first() {
            plot::write_hdr(path, h)?;
        }
    }
    if let Some(path) = &common.plot {
        let prefix = common.label.clone().unwrap_or_else(|| scenario.to_string());
        let series: Vec<Series> = out
            .series
            .iter()
            .map(|(name, h)| Series {
                label: format!("{prefix} {name}"),
                hist: h.clone(),
            })
            .collect();
        plot::write_svg(
            path,
            &format!("corelay-loadgen {scenario}"),
            &series,
            YScale::Log,
        )?;
    }
    out.summary.print();
    Ok(0)
}
