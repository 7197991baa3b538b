//! The chat layer, above the transport: what connections ask for (`events`, `handler`),
//! a connection's chat state (`member`), a connection following its first room to that
//! room's home shard (`follow`), the per-room state a room's home shard keeps (`home`), the
//! messages shards exchange about rooms (`mesh`), connections per user (`users`), the
//! application's backend asked about them (`hooked`), and emits from existing Node
//! services through `@socket.io/redis-emitter` (`emits`).

pub mod api;
pub mod emits;
pub mod events;
pub mod follow;
pub mod handler;
pub mod home;
pub mod hooked;
pub mod layer;
pub mod member;
pub mod mesh;
#[cfg(test)]
pub(crate) mod testing;
pub mod users;
