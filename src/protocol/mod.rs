//! Wire formats: Engine.IO v4 packets and Socket.IO v5 packets.
//!
//! These modules are pure: bytes in, typed values out (and back). They know nothing
//! of sockets or shards, so they can be unit-tested, fuzzed and benchmarked alone.

pub mod engineio;
pub mod socketio;
