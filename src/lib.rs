//! corelay: a chat server for Socket.IO clients on a thread-per-core runtime.
//!
//! Layers, from the wire up: `protocol` (Engine.IO / Socket.IO packets), `transport`
//! (HTTP, WebSocket, per-connection tasks), `chat` (events, sessions, rooms' home
//! shards), `shard` (executors and the mesh between them), `store` (message history) and
//! `cluster` (the Redis layer between hosts), which share `history`'s data model.
//! `server::run` ties them together.

// Network input and other runtime data must never reach `unwrap()`: return an error,
// or use `expect` naming the invariant that makes it impossible. (Tests may unwrap:
// clippy.toml.)
#![warn(clippy::unwrap_used)]

pub mod auth;
pub mod bridge;
pub mod chat;
pub mod cluster;
pub mod config;
pub mod conformance;
pub mod connect_limit;
pub mod context;
pub mod feed;
pub mod history;
pub mod hooks;
pub mod ids;
pub mod metrics;
pub mod notify;
pub mod pem;
pub mod protocol;
pub mod server;
pub mod shard;
pub mod store;
pub mod stream;
pub mod transport;
