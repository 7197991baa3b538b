//! Who a connection is: the [`Identity`] and [`RoomGrant`] read from a verified token's
//! claims, the rules on those claims (`sub`, `name`, `rooms`), and the identity dev mode
//! trusts from the payload as-is.

use serde_json::{Map, Value};

use super::{AuthError, MAX_USER_BYTES};

/// Who a connection is, after CONNECT.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// Stable user id (`sub` claim, or `user` in dev mode); 1–128 bytes.
    pub user: String,
    /// Display name, if the token (or dev payload) gave one.
    pub name: Option<String>,
    /// Rooms this identity may join without a room token.
    pub rooms: RoomGrant,
}

/// Which rooms an identity may join without a room token.
#[derive(Debug, Clone, PartialEq)]
pub enum RoomGrant {
    /// Every room (dev mode, or a `"*"` entry in the `rooms` claim).
    All,
    /// Exact room names, or `"prefix*"` entries matching every room starting with `prefix`.
    Patterns(Vec<String>),
    /// No room without a room token (no `rooms` claim, or an empty one).
    None,
}

impl RoomGrant {
    /// Whether `room` may be joined under this grant, so `join` can skip the room token.
    pub fn allows(&self, room: &str) -> bool {
        match self {
            RoomGrant::All => true,
            RoomGrant::None => false,
            RoomGrant::Patterns(patterns) => patterns.iter().any(|p| pattern_allows(p, room)),
        }
    }

    /// A grant of these room entries (as the `rooms` claim: `"*"`, `"prefix*"`, names),
    /// e.g. the rooms the application's backend answered for a connection.
    pub fn from_list(patterns: Vec<String>) -> RoomGrant {
        if patterns.iter().any(|p| p == "*") {
            RoomGrant::All
        } else if patterns.is_empty() {
            RoomGrant::None
        } else {
            RoomGrant::Patterns(patterns)
        }
    }

    /// Builds a grant from the `rooms` claim (`None` = claim absent).
    pub(super) fn from_claim(claim: Option<&Value>) -> Result<Self, AuthError> {
        let Some(claim) = claim else {
            return Ok(RoomGrant::None);
        };
        let entries = claim.as_array().ok_or(AuthError::InvalidClaim("rooms"))?;
        let mut patterns = Vec::with_capacity(entries.len());
        for entry in entries {
            let entry = entry.as_str().ok_or(AuthError::InvalidClaim("rooms"))?;
            patterns.push(entry.to_owned());
        }
        Ok(RoomGrant::from_list(patterns))
    }
}

/// One `rooms` entry: a trailing `*` makes it a prefix, otherwise it is an exact name.
fn pattern_allows(pattern: &str, room: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => room.starts_with(prefix),
        None => pattern == room,
    }
}

/// The `sub` claim, which must be a 1–128 byte string.
pub(super) fn sub_claim(claims: &Map<String, Value>) -> Result<&str, AuthError> {
    match claims.get("sub") {
        Some(Value::String(sub)) if valid_user_len(sub) => Ok(sub),
        _ => Err(AuthError::InvalidSub),
    }
}

/// An optional string claim: absent is fine, present must be a string.
pub(super) fn optional_string(
    claims: &Map<String, Value>,
    key: &'static str,
) -> Result<Option<String>, AuthError> {
    match claims.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(AuthError::InvalidClaim(key)),
    }
}

/// User ids are 1–128 bytes.
pub(super) fn valid_user_len(user: &str) -> bool {
    (1..=MAX_USER_BYTES).contains(&user.len())
}

/// Dev mode: trust `{"user", "name"?}` and allow every room.
pub(super) fn dev_identity(payload: Option<&Map<String, Value>>) -> Result<Identity, AuthError> {
    let payload = payload.ok_or(AuthError::MissingUser)?;
    let user = match payload.get("user") {
        Some(Value::String(user)) => user,
        _ => return Err(AuthError::MissingUser),
    };
    if !valid_user_len(user) {
        return Err(AuthError::InvalidUser);
    }
    let name = optional_string(payload, "name")?;
    Ok(Identity {
        user: user.clone(),
        name,
        rooms: RoomGrant::All,
    })
}
