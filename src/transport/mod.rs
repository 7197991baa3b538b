//! Transports: the HTTP/1.1 listener, the WebSocket upgrade and framing, and the
//! per-connection tasks that carry Engine.IO over them.

pub mod budget;
pub mod chunked;
pub mod conn;
pub mod connection;
pub mod engine;
pub mod handshake;
pub mod host;
pub mod http;
pub mod polling;
pub mod session;
pub mod websocket;
pub mod ws_task;

#[cfg(test)]
pub(crate) mod testing;
