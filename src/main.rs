//! The `corelay` command: `serve`, `check`, `token`, `schema`.

// Network input and other runtime data must never reach `unwrap()`: return an error,
// or use `expect` naming the invariant that makes it impossible. (Tests may unwrap:
// clippy.toml.)
#![warn(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};

use corelay::auth::Authenticator;
use corelay::config::{Config, HumanDuration, LogFormat, StoreKind};

#[derive(Parser)]
#[command(
    name = "corelay",
    version,
    about = "A sharded chat server for Socket.IO clients"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Reach Redis (PING, a pub/sub round trip) and open the configured store; exit 0 or
    /// say what is wrong.
    Check(CheckArgs),
    /// Mint a JWT with the configured secret (for tests and operations).
    Token(TokenArgs),
    /// The ScyllaDB schema (deploy/scylla/schema.cql) for `store = "scylla"`.
    Schema {
        #[command(subcommand)]
        action: SchemaAction,
    },
}

// The flags of `serve` (no doc comment here: clap would take it for the command's about).
#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:8080).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Shards to run (default: one per core).
    #[arg(long)]
    shards: Option<usize>,
    /// Let the kernel place the shards instead of pinning shard i to core i (for hosts
    /// where other busy processes share the cores).
    #[arg(long)]
    no_pin: bool,
    /// Directory of the embedded store (default ./data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Redis URL: joins a cluster of corelay hosts.
    #[arg(long)]
    redis: Option<String>,
    /// History store.
    #[arg(long, value_enum)]
    store: Option<StoreKind>,
    /// Test only: behave like the Socket.IO reference test server (ping 300/200 ms,
    /// CORS *, echo events, raw Engine.IO echo at /engine.io/).
    #[arg(long)]
    conformance: bool,
}

// The flags of `check`.
#[derive(Args)]
struct CheckArgs {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Redis URL (overrides redis.url).
    #[arg(long)]
    redis: Option<String>,
    /// History store (overrides store.kind).
    #[arg(long, value_enum)]
    store: Option<StoreKind>,
}

// The flags of `token`.
#[derive(Args)]
struct TokenArgs {
    #[arg(long)]
    config: Option<PathBuf>,
    /// The user id (`sub`).
    #[arg(long)]
    sub: String,
    /// Display name (`name`).
    #[arg(long)]
    name: Option<String>,
    /// Rooms the user may join, comma-separated; `x*` is a prefix, `*` every room.
    #[arg(long)]
    rooms: Option<String>,
    /// Mint a room token for this room instead (`join {token}`).
    #[arg(long)]
    room: Option<String>,
    /// Lifetime, e.g. 30m, 1h, 7d.
    #[arg(long, default_value = "1h")]
    ttl: String,
}

#[derive(Subcommand)]
enum SchemaAction {
    /// Connect to the [scylla] nodes and create the keyspace and tables (if not there yet).
    Apply {
        /// TOML configuration file (its [scylla] section; CORELAY_SCYLLA_* override it).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Replication factor of a new keyspace (default 3, as in schema.cql; 1 for a single node).
        #[arg(long)]
        replication_factor: Option<u32>,
    },
    /// Print the CQL that `apply` runs, for the configured keyspace.
    Print {
        /// TOML configuration file (for [scylla] keyspace).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Replication factor to print instead of 3.
        #[arg(long)]
        replication_factor: Option<u32>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("corelay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => run_serve(args),
        Command::Check(args) => run_check(args),
        Command::Token(args) => run_token(args),
        Command::Schema { action } => run_schema(action),
    }
}

/// `corelay serve`: the configuration with the flags written over it, then the server.
fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let ServeArgs {
        config,
        listen,
        shards,
        no_pin,
        data_dir,
        redis,
        store,
        conformance,
    } = args;
    let mut cfg = Config::load(config.as_deref())?;
    if let Some(v) = listen {
        cfg.server.listen = v;
    }
    if let Some(v) = shards {
        cfg.server.shards = Some(v);
    }
    if no_pin {
        cfg.server.pin_shards = false;
    }
    if let Some(v) = data_dir {
        cfg.server.data_dir = v;
    }
    if let Some(v) = redis {
        cfg.redis.url = Some(v);
    }
    if let Some(v) = store {
        cfg.store.kind = v;
    }
    if conformance {
        cfg.enable_conformance();
    }
    seed_redis_url(&mut cfg)?;
    cfg.validate()?;
    init_logging(cfg.log.format);
    corelay::server::run(cfg, |addr, shards| {
        println!("listening on {addr} shards={shards}");
        // systemd (Type=notify): ready once every shard accepts.
        if let Err(e) = corelay::notify::notify("READY=1") {
            tracing::warn!(error = %e, "sd_notify READY failed");
        }
        tracing::info!(%addr, shards, "listening");
    })?;
    Ok(())
}

/// `corelay check`: the configuration with the flags written over it, then [`check`].
fn run_check(args: CheckArgs) -> anyhow::Result<()> {
    let CheckArgs {
        config,
        redis,
        store,
    } = args;
    let mut cfg = Config::load(config.as_deref())?;
    if let Some(v) = redis {
        cfg.redis.url = Some(v);
    }
    if let Some(v) = store {
        cfg.store.kind = v;
    }
    seed_redis_url(&mut cfg)?;
    cfg.validate()?;
    check(&cfg)
}

/// `corelay token`: a user token (or a room token, with `--room`) on stdout.
fn run_token(args: TokenArgs) -> anyhow::Result<()> {
    let TokenArgs {
        config,
        sub,
        name,
        rooms,
        room,
        ttl,
    } = args;
    let cfg = Config::load(config.as_deref())?;
    let Some(secret) = cfg.auth.jwt_secret.as_deref() else {
        bail!("no secret: set CORELAY_JWT_SECRET or auth.jwt_secret to mint tokens");
    };
    let ttl = HumanDuration::parse(&ttl)
        .map_err(anyhow::Error::msg)?
        .0
        .as_secs();
    let auth = Authenticator::new(Some(secret));
    let token = match room {
        Some(room) => auth.mint_room_token(&sub, &room, ttl),
        None => {
            let rooms: Option<Vec<String>> = rooms.map(|r| {
                r.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            });
            auth.mint(&sub, name.as_deref(), rooms.as_deref(), ttl)
        }
    }
    .context("cannot mint token")?;
    println!("{token}");
    Ok(())
}

/// `corelay schema print` and `corelay schema apply`.
fn run_schema(action: SchemaAction) -> anyhow::Result<()> {
    match action {
        SchemaAction::Print {
            config,
            replication_factor,
        } => {
            let cfg = Config::load(config.as_deref())?;
            let cql =
                corelay::store::scylla::render_schema(&cfg.scylla.keyspace, replication_factor)?;
            print!("{cql}");
            Ok(())
        }
        SchemaAction::Apply {
            config,
            replication_factor,
        } => {
            let cfg = Config::load(config.as_deref())?;
            init_logging(cfg.log.format);
            let bridge = corelay::bridge::Bridge::global()?;
            let applied = futures::executor::block_on(corelay::store::scylla::apply_schema(
                &cfg.scylla,
                replication_factor,
                bridge,
            ))?;
            println!(
                "applied {} statements to keyspace {} at [{}]",
                applied.len(),
                cfg.scylla.keyspace,
                cfg.scylla.nodes.join(", ")
            );
            Ok(())
        }
    }
}

/// The seed's `REDIS_HOST`/`REDIS_PORT`/`REDIS_PASSWORD`/`REDIS_DB`, when `redis.url` is unset.
fn seed_redis_url(cfg: &mut Config) -> anyhow::Result<()> {
    if cfg.redis.url.is_none() {
        cfg.redis.url = corelay::cluster::url_from_env()?;
    }
    Ok(())
}

/// `corelay check`: one verdict per line; an error (exit 1) naming what failed.
fn check(cfg: &Config) -> anyhow::Result<()> {
    let mut failed: Vec<&str> = Vec::new();
    let cluster = corelay::cluster::RedisOptions::from_config(cfg);
    match &cluster {
        None => println!("redis: not configured (single host)"),
        Some(options) => {
            let bridge = corelay::bridge::Bridge::global()?;
            let report = futures::executor::block_on(corelay::cluster::check(options, &bridge));
            println!("{report}");
            if !report.ok() {
                failed.push("redis");
            }
        }
    }
    let store = match (cfg.store.kind, &cluster) {
        (StoreKind::Embedded, Some(_)) => Err(
            "the embedded store is local to one host; use store.kind = \"redis\" or \"scylla\" in cluster mode".to_string(),
        ),
        (StoreKind::Memory, _) => Ok("memory (nothing kept across restarts)".to_string()),
        (StoreKind::Embedded, None) => {
            match corelay::store::Store::open_embedded(&cfg.server.data_dir, cfg.store.durability) {
                Ok(s) => {
                    let _ = futures::executor::block_on(s.close());
                    Ok(format!("embedded at {}", cfg.server.data_dir.display()))
                }
                Err(e) => Err(e.to_string()),
            }
        }
        (StoreKind::Redis, None) => {
            Err("store \"redis\" needs redis.url (--redis, CORELAY_REDIS_URL)".to_string())
        }
        (StoreKind::Redis, Some(_)) if failed.contains(&"redis") => {
            Err("redis store: Redis is not reachable (see above)".to_string())
        }
        (StoreKind::Redis, Some(_)) => Ok("redis (streams in the cluster's Redis)".to_string()),
        (StoreKind::Scylla, _) => match corelay::store::Store::open_scylla(&cfg.scylla) {
            Ok(s) => {
                let _ = futures::executor::block_on(s.close());
                let mode = if cluster.is_some() {
                    " (cluster mode: offsets and the recent window in Redis)"
                } else {
                    ""
                };
                Ok(format!("scylla at [{}]{mode}", cfg.scylla.nodes.join(", ")))
            }
            Err(e) => Err(e.to_string()),
        },
    };
    match store {
        Ok(what) => println!("store: ok: {what}"),
        Err(why) => {
            println!("store: FAILED: {why}");
            failed.push("store");
        }
    }
    if failed.is_empty() {
        println!("all checks passed");
        Ok(())
    } else {
        bail!("check failed: {}", failed.join(", "))
    }
}

/// The log filter when `RUST_LOG` is unset: one line per notable event of corelay's own;
/// the storage engine's internals (fjall, its LSM tree) only when they warn.
const DEFAULT_LOG: &str = "info,fjall=warn,lsm_tree=warn";

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG));
    use std::io::IsTerminal as _;
    // Colours only on a terminal: journald and log shippers get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
