//! Connection identity (PROTOCOL.md, "Identity").
//!
//! A Socket.IO CONNECT carries an auth payload. With a configured secret that payload is
//! `{"token": "<JWT>"}`, an HS256 token whose claims say who the user is (`sub`), what to
//! call them (`name`) and which rooms they may join (`rooms`). Without a secret the server
//! runs in dev mode and trusts `{"user": "..."}` as-is.
//!
//! A room outside the `rooms` claim can still be joined with a *room token*: a JWT with
//! `sub` = the user and `room` = the room, minted by the application's backend.
//!
//! Hardening beyond the protocol text:
//! - only HS256 is accepted (`alg` is checked before anything else is trusted);
//! - tokens longer than [`MAX_TOKEN_BYTES`] are refused before any parsing;
//! - `exp` and `nbf` are optional but, when present, must be numbers and are enforced
//!   with [`LEEWAY_SECS`] of leeway;
//! - tokens carrying an `aud` claim or a `crit` header are refused (corelay has no
//!   configured audience and understands no critical header extensions);
//! - errors never contain the token, its claims or the secret.

//!
//! # Files
//!
//! - this one: [`Authenticator`] (checking CONNECT payloads and room tokens), [`Secret`],
//!   [`AuthError`] and the limits;
//! - `identity`: [`Identity`] and [`RoomGrant`], read from verified claims or, in dev mode,
//!   from the payload itself;
//! - `jwt`: the HS256 keys, and verifying and signing tokens (the hardening above);
//! - `mint`: minting connect and room tokens (`corelay token`, tests and tools).

use std::fmt;
use std::sync::Arc;

use serde_json::Value;

mod identity;
mod jwt;
mod mint;
#[cfg(test)]
mod tests;

use identity::{dev_identity, optional_string, sub_claim};
pub use identity::{Identity, RoomGrant};
use jwt::Keys;

/// Longest token accepted, in bytes; longer ones are refused before parsing so that a
/// huge token costs nothing to reject.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Longest user id (`sub` claim, or dev-mode `user`), in bytes, per the protocol.
pub const MAX_USER_BYTES: usize = 128;

/// Clock-skew allowance, in seconds, when checking `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;

/// A credential from a client (a room token): usable as a `&str`, never shown by
/// `Debug`, so it cannot reach a log line through a `?value`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
}

impl std::ops::Deref for Secret {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.0.len())
    }
}

/// Why a CONNECT payload or room token was refused (or a token could not be minted).
///
/// Messages are for logs; clients only ever see `unauthorized` / `forbidden`. No variant
/// carries the token, its claims or the secret.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No auth payload, or no `token` in it (secret configured).
    #[error("missing auth token")]
    MissingToken,
    /// Dev mode: the payload has no `user` string.
    #[error("dev mode: missing `user` in auth payload")]
    MissingUser,
    /// Dev mode: `user` is empty or longer than 128 bytes.
    #[error("dev mode: `user` must be 1-128 bytes")]
    InvalidUser,
    /// The token is longer than [`MAX_TOKEN_BYTES`]; it was not parsed.
    #[error("token too large (limit {MAX_TOKEN_BYTES} bytes)")]
    TokenTooLarge,
    /// Not a well-formed JWT (segments, base64url, JSON, unsupported header).
    #[error("malformed token")]
    Malformed,
    /// The header's `alg` is not HS256 (`none`, HS384/HS512, RS256, missing, ...).
    #[error("token algorithm is not HS256")]
    WrongAlgorithm,
    /// The HMAC does not match: tampered token or a different secret.
    #[error("bad token signature")]
    BadSignature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `sub` missing, not a string, empty or longer than 128 bytes.
    #[error("missing or invalid `sub` claim (must be a 1-128 byte string)")]
    InvalidSub,
    /// Another claim has the wrong type or a refused value; names the claim.
    #[error("invalid `{0}` claim")]
    InvalidClaim(&'static str),
    /// Room token whose `room` is not the room being joined.
    #[error("room token is for a different room")]
    RoomMismatch,
    /// Room token whose `sub` is not the connection's user.
    #[error("room token is for a different user")]
    UserMismatch,
    /// Minting needs a secret; the server is in dev mode.
    #[error("no secret configured (dev mode): cannot mint tokens")]
    DevMode,
    /// The token could not be signed.
    #[error("failed to sign token")]
    Signing,
}

/// Verifies CONNECT payloads and room tokens, and mints tokens; built once at start and
/// shared (cloning is an `Arc` bump).
#[derive(Clone)]
pub struct Authenticator {
    /// `None` = dev mode.
    keys: Option<Arc<Keys>>,
}

impl fmt::Debug for Authenticator {
    /// Redacted: never prints key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("dev_mode", &self.is_dev_mode())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Builds the verifier from the configured secret. `secret: None` = dev mode.
    ///
    /// An empty secret also means dev mode: HMAC with an empty key would let anyone forge
    /// tokens, whereas dev mode is loud (warning at start, loopback only).
    pub fn new(secret: Option<&str>) -> Self {
        let keys = secret
            .filter(|s| !s.is_empty())
            .map(|secret| Arc::new(Keys::new(secret)));
        Authenticator { keys }
    }

    /// Whether no secret is configured, so the server can warn and refuse public binds.
    pub fn is_dev_mode(&self) -> bool {
        self.keys.is_none()
    }

    /// Turns the CONNECT auth payload (`None` when the client sent none) into an identity.
    ///
    /// With a secret: expects `{"token": "<JWT>"}`; other fields are ignored.
    /// Dev mode: expects `{"user": "alice", "name"?: "..."}` and grants every room.
    pub fn authenticate(&self, auth: Option<&Value>) -> Result<Identity, AuthError> {
        let payload = auth.and_then(Value::as_object);
        let Some(keys) = &self.keys else {
            return dev_identity(payload);
        };
        let token = match payload.and_then(|p| p.get("token")) {
            None | Some(Value::Null) => return Err(AuthError::MissingToken),
            Some(Value::String(t)) if t.is_empty() => return Err(AuthError::MissingToken),
            Some(Value::String(t)) => t,
            Some(_) => return Err(AuthError::Malformed),
        };
        let claims = keys.verify(token)?;
        let user = sub_claim(&claims)?.to_owned();
        let name = optional_string(&claims, "name")?;
        let rooms = RoomGrant::from_claim(claims.get("rooms"))?;
        Ok(Identity { user, name, rooms })
    }

    /// Checks a room token carried by `join`: valid only for exactly `user` and `room`.
    ///
    /// In dev mode every room is allowed anyway, so any token is accepted.
    pub fn check_room_token(&self, token: &str, user: &str, room: &str) -> Result<(), AuthError> {
        let Some(keys) = &self.keys else {
            return Ok(());
        };
        let claims = keys.verify(token)?;
        let sub = sub_claim(&claims)?;
        let token_room = match claims.get("room") {
            Some(Value::String(r)) => r,
            _ => return Err(AuthError::InvalidClaim("room")),
        };
        if sub != user {
            return Err(AuthError::UserMismatch);
        }
        if token_room != room {
            return Err(AuthError::RoomMismatch);
        }
        Ok(())
    }
}
