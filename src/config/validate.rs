//! The checks of a configuration that serde cannot make alone (ranges, relations between
//! fields).

use std::time::Duration;

use super::{Config, ConfigError, MAX_CONNECT_BURST, MAX_CONNECT_RATE};

impl Config {
    /// Checks values serde cannot check alone.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.server.shards == Some(0) {
            return bad("server.shards must be at least 1".into());
        }
        if !self.server.path.starts_with('/') {
            return bad(format!(
                "server.path must start with '/', got {:?}",
                self.server.path
            ));
        }
        if self.engineio.ping_interval == 0 || self.engineio.ping_timeout == 0 {
            return bad("engineio.ping_interval and ping_timeout must be positive".into());
        }
        if self.engineio.max_payload < 1024 {
            return bad("engineio.max_payload must be at least 1024 bytes".into());
        }
        let l = &self.limits;
        if l.max_text_bytes == 0 || l.max_rooms_per_conn == 0 {
            return bad("limits.max_text_bytes and max_rooms_per_conn must be positive".into());
        }
        if !(l.send_rate > 0.0 && l.send_burst >= 1.0) {
            return bad("limits.send_rate must be > 0 and limits.send_burst >= 1".into());
        }
        if l.mesh_outbox == 0 {
            return bad("limits.mesh_outbox must be at least 1".into());
        }
        if l.socket_send_buffer != 0 && l.socket_send_buffer < 4096 {
            return bad(
                "limits.socket_send_buffer must be 0 (the kernel's) or at least 4096".into(),
            );
        }
        if l.memory_budget != 0 && l.memory_budget < (1 << 20) {
            return bad("limits.memory_budget must be 0 (no bound) or at least 1048576".into());
        }
        if l.outbound_queue < 8 || l.outbound_queue_bytes < 64 * 1024 {
            return bad(
                "limits.outbound_queue must be >= 8 and outbound_queue_bytes >= 65536".into(),
            );
        }
        if !(l.connect_rate_per_ip >= 0.0 && l.connect_rate_per_ip <= MAX_CONNECT_RATE) {
            return bad(format!(
                "limits.connect_rate_per_ip must be between 0 (off) and {MAX_CONNECT_RATE}"
            ));
        }
        let burst = l.connect_burst_per_ip;
        if !(burst == 0.0 || (1.0..=MAX_CONNECT_BURST).contains(&burst)) {
            return bad(format!(
                "limits.connect_burst_per_ip must be 0 (off) or between 1 and {MAX_CONNECT_BURST}"
            ));
        }
        if self.history.max_replay == 0 {
            return bad("history.max_replay must be positive".into());
        }
        if self.redis.command_timeout.0.is_zero()
            || self.redis.connect_timeout.0.is_zero()
            || self.redis.ping_interval.0.is_zero()
        {
            return bad(
                "redis.connect_timeout, command_timeout and ping_interval must be positive".into(),
            );
        }
        if self.emitter.prefix.is_empty() {
            return bad(
                "emitter.prefix must not be empty (the emitter's default is \"socket.io\")".into(),
            );
        }
        if self.presence.ttl.0 < Duration::from_secs(1) {
            return bad("presence.ttl must be at least 1s".into());
        }
        if let Some(secret) = &self.auth.jwt_secret {
            if secret.len() < 16 {
                return bad("auth.jwt_secret must be at least 16 bytes".into());
            }
        }
        self.hooks.validate().map_err(ConfigError::Invalid)?;
        self.feed.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }
}
