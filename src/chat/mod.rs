//! The chat layer: what connections ask for (`events`), the per-connection state a
//! shard keeps (`session`), the per-room state a room's home shard keeps (`home`), and
//! the messages shards exchange about rooms (`mesh`), and connections per user (`users`).

pub mod events;
pub mod handler;
pub mod home;
pub mod mesh;
pub mod session;
pub mod users;
