//! corelay-loadgen: a load generator for Socket.IO v5 chat servers that speak corelay's
//! `PROTOCOL.md` events (corelay itself, or the Node socket.io peer in `loadgen/peer/`).
//!
//! The binary (`src/main.rs`) parses the command line and runs one scenario; the modules
//! here hold everything it needs so that tests can reach the pieces:
//!
//! - [`codec`]: Engine.IO v4 / Socket.IO v5 text packets.
//! - [`client`]: one WebSocket connection, from TCP connect to the Socket.IO CONNECT ack.
//! - [`auth`]: the CONNECT auth payload (HS256 JWT or dev-mode identity).
//! - [`target`]: target parsing, the loopback rule and source-address spreading.
//! - [`stats`]: latency histograms, the per-room order tracker, loss accounting.
//! - [`proc`]: server CPU time and RSS from `/proc`, the file-descriptor limit.
//! - [`scenarios`]: `fanout`, `connect`, `churn`, `history`.
//! - [`report`]: progress line, human summary, the final JSON line.
//! - [`plot`]: HDR histogram files and the SVG percentile plot.

// Network input and other runtime data must never reach `unwrap()`: return an error,
// or use `expect` naming the invariant that makes it impossible. (Tests may unwrap:
// clippy.toml.)
#![warn(clippy::unwrap_used)]
#![warn(missing_docs)]

pub mod auth;
pub mod backlog;
pub mod client;
pub mod clock;
pub mod codec;
pub mod plot;
pub mod proc;
pub mod report;
pub mod scenarios;
pub mod stats;
pub mod target;
