//! Minting tokens: connect tokens for `corelay token` and tests, room tokens for tests and
//! tools (in production the application's backend mints those). Needs a secret.

use serde_json::Map;

use super::identity::valid_user_len;
use super::{AuthError, Authenticator};

impl Authenticator {
    /// Mints an HS256 connect token (for `corelay token` and tests).
    ///
    /// `rooms: None` omits the claim; `exp` = now + `ttl_secs`. Fails in dev mode.
    pub fn mint(
        &self,
        sub: &str,
        name: Option<&str>,
        rooms: Option<&[String]>,
        ttl_secs: u64,
    ) -> Result<String, AuthError> {
        let keys = self.keys.as_ref().ok_or(AuthError::DevMode)?;
        if !valid_user_len(sub) {
            return Err(AuthError::InvalidSub);
        }
        let mut claims = Map::new();
        claims.insert("sub".into(), sub.into());
        if let Some(name) = name {
            claims.insert("name".into(), name.into());
        }
        if let Some(rooms) = rooms {
            claims.insert("rooms".into(), rooms.into());
        }
        keys.sign(claims, ttl_secs)
    }

    /// Mints an HS256 room token admitting `sub` to exactly `room` (for tests and tools;
    /// normally the application's backend mints these). Fails in dev mode.
    pub fn mint_room_token(
        &self,
        sub: &str,
        room: &str,
        ttl_secs: u64,
    ) -> Result<String, AuthError> {
        let keys = self.keys.as_ref().ok_or(AuthError::DevMode)?;
        if !valid_user_len(sub) {
            return Err(AuthError::InvalidSub);
        }
        if room.is_empty() {
            return Err(AuthError::InvalidClaim("room"));
        }
        let mut claims = Map::new();
        claims.insert("sub".into(), sub.into());
        claims.insert("room".into(), room.into());
        keys.sign(claims, ttl_secs)
    }
}
