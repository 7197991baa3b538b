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

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

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

    /// Builds a grant from the `rooms` claim (`None` = claim absent).
    fn from_claim(claim: Option<&Value>) -> Result<Self, AuthError> {
        let Some(claim) = claim else {
            return Ok(RoomGrant::None);
        };
        let entries = claim.as_array().ok_or(AuthError::InvalidClaim("rooms"))?;
        let mut patterns = Vec::with_capacity(entries.len());
        for entry in entries {
            let entry = entry.as_str().ok_or(AuthError::InvalidClaim("rooms"))?;
            patterns.push(entry.to_owned());
        }
        if patterns.iter().any(|p| p == "*") {
            Ok(RoomGrant::All)
        } else if patterns.is_empty() {
            Ok(RoomGrant::None)
        } else {
            Ok(RoomGrant::Patterns(patterns))
        }
    }
}

/// One `rooms` entry: a trailing `*` makes it a prefix, otherwise it is an exact name.
fn pattern_allows(pattern: &str, room: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => room.starts_with(prefix),
        None => pattern == room,
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

/// Key material and validation rules derived from the secret.
struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
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
        let keys = secret.filter(|s| !s.is_empty()).map(|secret| {
            let mut validation = Validation::new(Algorithm::HS256);
            // `exp` is optional (but enforced when present); `sub` is always required.
            validation.set_required_spec_claims(&["sub"]);
            validation.validate_exp = true;
            validation.validate_nbf = true;
            validation.leeway = LEEWAY_SECS;
            // `validate_aud` stays on with no expected audience: tokens with `aud` are refused.
            validation.validate_aud = true;
            validation.aud = None;
            Arc::new(Keys {
                encoding: EncodingKey::from_secret(secret.as_bytes()),
                decoding: DecodingKey::from_secret(secret.as_bytes()),
                validation,
            })
        });
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

impl Keys {
    /// Verifies size, header, signature and time claims; returns the claims object.
    fn verify(&self, token: &str) -> Result<Map<String, Value>, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TokenTooLarge);
        }
        check_header(token)?;
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &self.decoding, &self.validation)
                .map_err(|e| map_jwt_error(e.kind()))?;
        let claims = data.claims;
        // jsonwebtoken silently skips `exp`/`nbf` it cannot read as a u64 (a string, a
        // negative number, null): such a token must not pass as "never expires".
        for claim in ["exp", "nbf"] {
            if let Some(v) = claims.get(claim) {
                if !is_numeric_date(v) {
                    return Err(AuthError::InvalidClaim(claim));
                }
            }
        }
        // Likewise the library only refuses an `aud` it can read (a string or an array of
        // strings): an `aud` of any other type must be refused too (found by fuzzing).
        if claims.contains_key("aud") {
            return Err(AuthError::InvalidClaim("aud"));
        }
        Ok(claims)
    }

    /// Adds `iat`/`exp` and signs with HS256.
    fn sign(&self, mut claims: Map<String, Value>, ttl_secs: u64) -> Result<String, AuthError> {
        let now = now_secs();
        claims.insert("iat".into(), now.into());
        claims.insert("exp".into(), now.saturating_add(ttl_secs).into());
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|_| AuthError::Signing)
    }
}

/// Checks the JWT shape and that the header says HS256 before the library sees it, so
/// `alg: none` and friends get a clear error and nothing else in the header is trusted.
fn check_header(token: &str) -> Result<(), AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthError::Malformed)?;
    let header: Map<String, Value> =
        serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)?;
    match header.get("alg") {
        Some(Value::String(alg)) if alg == "HS256" => {}
        _ => return Err(AuthError::WrongAlgorithm),
    }
    if header.contains_key("crit") {
        return Err(AuthError::Malformed);
    }
    Ok(())
}

/// Translates a jsonwebtoken failure into our (token-free) error.
fn map_jwt_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm => AuthError::WrongAlgorithm,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidSubject => AuthError::InvalidSub,
        ErrorKind::InvalidAudience => AuthError::InvalidClaim("aud"),
        ErrorKind::InvalidIssuer => AuthError::InvalidClaim("iss"),
        _ => AuthError::Malformed,
    }
}

/// Same acceptance rule as jsonwebtoken's NumericDate parsing (non-negative, fits in u64).
fn is_numeric_date(v: &Value) -> bool {
    v.as_u64().is_some()
        || v.as_f64()
            .is_some_and(|f| f.is_finite() && f >= 0.0 && f < u64::MAX as f64)
}

/// The `sub` claim, which must be a 1–128 byte string.
fn sub_claim(claims: &Map<String, Value>) -> Result<&str, AuthError> {
    match claims.get("sub") {
        Some(Value::String(sub)) if valid_user_len(sub) => Ok(sub),
        _ => Err(AuthError::InvalidSub),
    }
}

/// An optional string claim: absent is fine, present must be a string.
fn optional_string(
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
fn valid_user_len(user: &str) -> bool {
    (1..=MAX_USER_BYTES).contains(&user.len())
}

/// Dev mode: trust `{"user", "name"?}` and allow every room.
fn dev_identity(payload: Option<&Map<String, Value>>) -> Result<Identity, AuthError> {
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

/// Seconds since the Unix epoch (0 if the clock is before it).
fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "test-secret-0123456789abcdef0123456789";

    fn auth() -> Authenticator {
        Authenticator::new(Some(SECRET))
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Builds `header.payload.signature` by hand, HMAC-signing with `alg` (any HMAC alg),
    /// regardless of what the header claims.
    fn forge(header: &Value, claims: &Value, secret: &str, alg: Algorithm) -> String {
        let message = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let key = EncodingKey::from_secret(secret.as_bytes());
        let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, alg).expect("sign");
        format!("{message}.{sig}")
    }

    /// A properly signed HS256 token with arbitrary claims.
    fn hs256(claims: &Value) -> String {
        forge(
            &json!({"alg": "HS256", "typ": "JWT"}),
            claims,
            SECRET,
            Algorithm::HS256,
        )
    }

    fn connect(a: &Authenticator, token: &str) -> Result<Identity, AuthError> {
        a.authenticate(Some(&json!({ "token": token })))
    }

    fn now() -> u64 {
        now_secs()
    }

    #[test]
    fn valid_token() {
        let token = hs256(&json!({
            "sub": "alice", "name": "Alice", "rooms": ["general", "team-*"], "exp": now() + 600
        }));
        let id = connect(&auth(), &token).expect("valid");
        assert_eq!(
            id,
            Identity {
                user: "alice".into(),
                name: Some("Alice".into()),
                rooms: RoomGrant::Patterns(vec!["general".into(), "team-*".into()]),
            }
        );
    }

    #[test]
    fn token_without_exp_is_accepted() {
        let id = connect(&auth(), &hs256(&json!({"sub": "bob"}))).expect("valid");
        assert_eq!(id.user, "bob");
        assert_eq!(id.name, None);
        assert_eq!(id.rooms, RoomGrant::None);
    }

    #[test]
    fn extra_payload_fields_are_ignored_with_secret() {
        let token = hs256(&json!({"sub": "alice"}));
        let id = auth()
            .authenticate(Some(&json!({"token": token, "user": "mallory"})))
            .expect("valid");
        assert_eq!(id.user, "alice");
    }

    #[test]
    fn dev_mode_with_user() {
        let a = Authenticator::new(None);
        assert!(a.is_dev_mode());
        let id = a
            .authenticate(Some(&json!({"user": "alice"})))
            .expect("dev");
        assert_eq!(
            id,
            Identity {
                user: "alice".into(),
                name: None,
                rooms: RoomGrant::All
            }
        );
        let id = a
            .authenticate(Some(&json!({"user": "bob", "name": "Bob"})))
            .expect("dev");
        assert_eq!(id.name.as_deref(), Some("Bob"));
        assert!(id.rooms.allows("anything"));
        // A token is not needed, and not checked, in dev mode.
        let id = a
            .authenticate(Some(&json!({"user": "carol", "token": "garbage"})))
            .expect("dev");
        assert_eq!(id.user, "carol");
    }

    #[test]
    fn dev_mode_without_user() {
        let a = Authenticator::new(None);
        assert_eq!(a.authenticate(None), Err(AuthError::MissingUser));
        assert_eq!(
            a.authenticate(Some(&json!({}))),
            Err(AuthError::MissingUser)
        );
        assert_eq!(
            a.authenticate(Some(&json!({"token": "x"}))),
            Err(AuthError::MissingUser)
        );
        assert_eq!(
            a.authenticate(Some(&json!({"user": 5}))),
            Err(AuthError::MissingUser)
        );
        assert_eq!(
            a.authenticate(Some(&json!("alice"))),
            Err(AuthError::MissingUser)
        );
        assert_eq!(
            a.authenticate(Some(&json!({"user": ""}))),
            Err(AuthError::InvalidUser)
        );
        let long = "u".repeat(129);
        assert_eq!(
            a.authenticate(Some(&json!({"user": long}))),
            Err(AuthError::InvalidUser)
        );
        let max = "u".repeat(128);
        assert!(a.authenticate(Some(&json!({"user": max}))).is_ok());
        assert_eq!(
            a.authenticate(Some(&json!({"user": "alice", "name": 3}))),
            Err(AuthError::InvalidClaim("name"))
        );
    }

    #[test]
    fn empty_secret_is_dev_mode() {
        assert!(Authenticator::new(Some("")).is_dev_mode());
        assert!(!auth().is_dev_mode());
    }

    #[test]
    fn missing_token() {
        let a = auth();
        assert_eq!(a.authenticate(None), Err(AuthError::MissingToken));
        assert_eq!(
            a.authenticate(Some(&json!({}))),
            Err(AuthError::MissingToken)
        );
        assert_eq!(
            a.authenticate(Some(&json!({"token": null}))),
            Err(AuthError::MissingToken)
        );
        assert_eq!(
            a.authenticate(Some(&json!({"token": ""}))),
            Err(AuthError::MissingToken)
        );
        assert_eq!(
            a.authenticate(Some(&json!({"user": "alice"}))),
            Err(AuthError::MissingToken)
        );
        assert_eq!(
            a.authenticate(Some(&json!("tok"))),
            Err(AuthError::MissingToken)
        );
        assert_eq!(
            a.authenticate(Some(&json!({"token": 42}))),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn malformed_tokens() {
        let a = auth();
        let good = hs256(&json!({"sub": "alice"}));
        let parts: Vec<&str> = good.split('.').collect();
        let not_json = format!("{}.{}.{}", b64(b"not json"), parts[1], parts[2]);
        let bad_b64 = format!("!!!.{}.{}", parts[1], parts[2]);
        let bad_payload = format!("{}.{}.{}", parts[0], b64(b"[1,2]"), parts[2]);
        for token in [
            "abc",
            "a.b",
            "a.b.c.d",
            &format!("{good}.extra"),
            &not_json,
            &bad_b64,
        ] {
            assert_eq!(connect(&a, token), Err(AuthError::Malformed), "{token}");
        }
        // A payload that was never signed fails the signature first.
        assert_eq!(connect(&a, &bad_payload), Err(AuthError::BadSignature));
        let crit = forge(
            &json!({"alg": "HS256", "crit": ["b64"], "b64": false}),
            &json!({"sub": "alice"}),
            SECRET,
            Algorithm::HS256,
        );
        assert_eq!(connect(&a, &crit), Err(AuthError::Malformed));
    }

    #[test]
    fn alg_none_is_rejected() {
        let claims = json!({"sub": "alice", "rooms": ["*"]});
        for alg in ["none", "None", "NONE", "nOnE"] {
            let header = b64(json!({"alg": alg, "typ": "JWT"}).to_string().as_bytes());
            let payload = b64(claims.to_string().as_bytes());
            let unsigned = format!("{header}.{payload}.");
            assert_eq!(connect(&auth(), &unsigned), Err(AuthError::WrongAlgorithm));
            // Even with a valid HS256 signature attached, the header decides.
            let signed = forge(&json!({"alg": alg}), &claims, SECRET, Algorithm::HS256);
            assert_eq!(connect(&auth(), &signed), Err(AuthError::WrongAlgorithm));
        }
        let no_alg = forge(&json!({"typ": "JWT"}), &claims, SECRET, Algorithm::HS256);
        assert_eq!(connect(&auth(), &no_alg), Err(AuthError::WrongAlgorithm));
        let num_alg = forge(&json!({"alg": 256}), &claims, SECRET, Algorithm::HS256);
        assert_eq!(connect(&auth(), &num_alg), Err(AuthError::WrongAlgorithm));
    }

    #[test]
    fn other_hmac_algorithms_are_rejected() {
        let claims = json!({"sub": "alice", "exp": now() + 600});
        for alg in [Algorithm::HS384, Algorithm::HS512] {
            let token = jsonwebtoken::encode(
                &Header::new(alg),
                &claims,
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .expect("encode");
            assert_eq!(connect(&auth(), &token), Err(AuthError::WrongAlgorithm));
        }
        let lowercase = forge(&json!({"alg": "hs256"}), &claims, SECRET, Algorithm::HS256);
        assert_eq!(connect(&auth(), &lowercase), Err(AuthError::WrongAlgorithm));
    }

    #[test]
    fn rs256_header_with_hmac_signature_is_rejected() {
        // Key confusion: claim RS256 but sign with HMAC using the (public) secret.
        let claims = json!({"sub": "alice", "rooms": ["*"]});
        for alg in ["RS256", "ES256", "PS256", "EdDSA"] {
            let token = forge(
                &json!({"alg": alg, "typ": "JWT"}),
                &claims,
                SECRET,
                Algorithm::HS256,
            );
            assert_eq!(
                connect(&auth(), &token),
                Err(AuthError::WrongAlgorithm),
                "{alg}"
            );
            assert_eq!(
                auth().check_room_token(&token, "alice", "general"),
                Err(AuthError::WrongAlgorithm)
            );
        }
    }

    #[test]
    fn tampered_payload_is_bad_signature() {
        let token = hs256(&json!({"sub": "alice", "rooms": ["general"]}));
        let parts: Vec<&str> = token.split('.').collect();
        let evil = b64(json!({"sub": "admin", "rooms": ["*"]})
            .to_string()
            .as_bytes());
        let tampered = format!("{}.{}.{}", parts[0], evil, parts[2]);
        assert_eq!(connect(&auth(), &tampered), Err(AuthError::BadSignature));
        // Flip the first character (the last one also carries padding bits).
        let mut sig = parts[2].to_owned();
        let first = if sig.starts_with('A') { "B" } else { "A" };
        sig.replace_range(..1, first);
        let bad_sig = format!("{}.{}.{}", parts[0], parts[1], sig);
        assert_eq!(connect(&auth(), &bad_sig), Err(AuthError::BadSignature));
        let unsigned = format!("{}.{}.", parts[0], parts[1]);
        assert_eq!(connect(&auth(), &unsigned), Err(AuthError::BadSignature));
    }

    #[test]
    fn other_secret_is_bad_signature() {
        let other = Authenticator::new(Some("some-other-secret"));
        let token = other.mint("alice", None, None, 600).expect("mint");
        assert_eq!(connect(&auth(), &token), Err(AuthError::BadSignature));
    }

    #[test]
    fn expired() {
        let token = hs256(&json!({"sub": "alice", "exp": now() - 120}));
        assert_eq!(connect(&auth(), &token), Err(AuthError::Expired));
        let token = hs256(&json!({"sub": "alice", "exp": 1}));
        assert_eq!(connect(&auth(), &token), Err(AuthError::Expired));
    }

    #[test]
    fn exp_within_leeway_is_accepted() {
        let token = hs256(&json!({"sub": "alice", "exp": now() - 10}));
        assert!(connect(&auth(), &token).is_ok());
        let float = hs256(&json!({"sub": "alice", "exp": (now() + 600) as f64 + 0.5}));
        assert!(connect(&auth(), &float).is_ok());
    }

    #[test]
    fn non_numeric_exp_or_nbf_is_invalid() {
        for bad in [
            json!("99999999999"),
            json!(-5),
            json!(null),
            json!(1e300),
            json!(true),
        ] {
            let token = hs256(&json!({"sub": "alice", "exp": bad}));
            assert_eq!(
                connect(&auth(), &token),
                Err(AuthError::InvalidClaim("exp")),
                "{bad}"
            );
            let token = hs256(&json!({"sub": "alice", "nbf": bad}));
            assert_eq!(
                connect(&auth(), &token),
                Err(AuthError::InvalidClaim("nbf")),
                "{bad}"
            );
        }
        // Containers trip up jsonwebtoken's own claim parser first; still refused.
        for bad in [json!([1]), json!({"t": 1})] {
            for claim in ["exp", "nbf"] {
                let token = hs256(&json!({"sub": "alice", claim: bad}));
                assert_eq!(connect(&auth(), &token), Err(AuthError::Malformed), "{bad}");
            }
        }
    }

    #[test]
    fn nbf() {
        let future = hs256(&json!({"sub": "alice", "nbf": now() + 300, "exp": now() + 600}));
        assert_eq!(connect(&auth(), &future), Err(AuthError::NotYetValid));
        let within_leeway = hs256(&json!({"sub": "alice", "nbf": now() + 10}));
        assert!(connect(&auth(), &within_leeway).is_ok());
        let past = hs256(&json!({"sub": "alice", "nbf": now() - 10}));
        assert!(connect(&auth(), &past).is_ok());
    }

    #[test]
    fn huge_token_is_rejected_before_parsing() {
        let a = auth();
        let huge = "a".repeat(1024 * 1024);
        let start = std::time::Instant::now();
        assert_eq!(connect(&a, &huge), Err(AuthError::TokenTooLarge));
        assert_eq!(
            a.check_room_token(&huge, "alice", "general"),
            Err(AuthError::TokenTooLarge)
        );
        assert!(start.elapsed() < std::time::Duration::from_millis(100));
        // A validly signed token that is just too long is still refused.
        let padded = hs256(&json!({"sub": "alice", "pad": "x".repeat(MAX_TOKEN_BYTES)}));
        assert_eq!(connect(&a, &padded), Err(AuthError::TokenTooLarge));
        // The limit itself is inclusive.
        assert_eq!(
            connect(&a, &"a".repeat(MAX_TOKEN_BYTES)),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            connect(&a, &"a".repeat(MAX_TOKEN_BYTES + 1)),
            Err(AuthError::TokenTooLarge)
        );
    }

    #[test]
    fn sub_rules() {
        let a = auth();
        for claims in [
            json!({"sub": ""}),
            json!({"sub": "s".repeat(129)}),
            json!({"sub": 42}),
            json!({"sub": null}),
            json!({"name": "no sub"}),
        ] {
            assert_eq!(
                connect(&a, &hs256(&claims)),
                Err(AuthError::InvalidSub),
                "{claims}"
            );
        }
        let max = "s".repeat(128);
        assert_eq!(
            connect(&a, &hs256(&json!({"sub": max}))).map(|i| i.user),
            Ok(max)
        );
        // 128 bytes, not 128 chars.
        let multibyte = "é".repeat(65); // 130 bytes
        assert_eq!(
            connect(&a, &hs256(&json!({"sub": multibyte}))),
            Err(AuthError::InvalidSub)
        );
    }

    #[test]
    fn room_patterns() {
        let grant = RoomGrant::Patterns(vec!["general".into(), "team-*".into()]);
        assert!(grant.allows("general"));
        assert!(!grant.allows("general2"));
        assert!(!grant.allows("genera"));
        assert!(grant.allows("team-a"));
        assert!(grant.allows("team-"));
        assert!(!grant.allows("team"));
        assert!(!grant.allows("other"));
        assert!(RoomGrant::All.allows("anything"));
        assert!(!RoomGrant::None.allows("general"));
        assert!(!RoomGrant::Patterns(vec![]).allows("general"));
        // Only a trailing `*` is special.
        let mid = RoomGrant::Patterns(vec!["a*b".into()]);
        assert!(mid.allows("a*b"));
        assert!(!mid.allows("axb"));

        let grant_of =
            |rooms: Value| connect(&auth(), &hs256(&json!({"sub": "u", "rooms": rooms})));
        assert_eq!(grant_of(json!(["*"])).map(|i| i.rooms), Ok(RoomGrant::All));
        assert_eq!(
            grant_of(json!(["a", "*"])).map(|i| i.rooms),
            Ok(RoomGrant::All)
        );
        assert_eq!(grant_of(json!([])).map(|i| i.rooms), Ok(RoomGrant::None));
        assert_eq!(
            grant_of(json!(["lobby"])).map(|i| i.rooms),
            Ok(RoomGrant::Patterns(vec!["lobby".into()]))
        );
        let id = grant_of(json!(["lobby", "dm:alice:*"])).expect("valid");
        assert!(id.rooms.allows("lobby"));
        assert!(id.rooms.allows("dm:alice:bob"));
        assert!(!id.rooms.allows("dm:bob:alice"));
        let none = connect(&auth(), &hs256(&json!({"sub": "u"}))).expect("valid");
        assert_eq!(none.rooms, RoomGrant::None);
    }

    #[test]
    fn bad_rooms_claim() {
        for rooms in [
            json!("general"),
            json!("*"),
            json!([1]),
            json!(["a", null]),
            json!(["*", 5]),
            json!({"general": true}),
            json!(null),
            json!(true),
        ] {
            let token = hs256(&json!({"sub": "u", "rooms": rooms}));
            assert_eq!(
                connect(&auth(), &token),
                Err(AuthError::InvalidClaim("rooms")),
                "{rooms}"
            );
        }
    }

    #[test]
    fn bad_name_claim() {
        for name in [json!(1), json!(null), json!(["Alice"])] {
            let token = hs256(&json!({"sub": "u", "name": name}));
            assert_eq!(
                connect(&auth(), &token),
                Err(AuthError::InvalidClaim("name"))
            );
        }
    }

    #[test]
    fn aud_claim_of_any_type_is_refused() {
        for aud in [
            json!(41020.5),
            json!(7),
            json!(null),
            json!({"a": 1}),
            json!([1, 2]),
        ] {
            let token = hs256(&json!({"sub": "u", "aud": aud}));
            assert_eq!(
                connect(&auth(), &token),
                Err(AuthError::InvalidClaim("aud")),
                "aud = {aud}"
            );
        }
    }

    #[test]
    fn aud_claim_is_refused() {
        let token = hs256(&json!({"sub": "u", "aud": "some-other-service"}));
        assert_eq!(
            connect(&auth(), &token),
            Err(AuthError::InvalidClaim("aud"))
        );
    }

    #[test]
    fn room_token() {
        let a = auth();
        let token = a
            .mint_room_token("alice", "secret-room", 600)
            .expect("mint");
        assert_eq!(a.check_room_token(&token, "alice", "secret-room"), Ok(()));
        assert_eq!(
            a.check_room_token(&token, "alice", "other-room"),
            Err(AuthError::RoomMismatch)
        );
        assert_eq!(
            a.check_room_token(&token, "bob", "secret-room"),
            Err(AuthError::UserMismatch)
        );
        // `room` is exact: no patterns in room tokens.
        let star = hs256(&json!({"sub": "alice", "room": "team-*"}));
        assert_eq!(
            a.check_room_token(&star, "alice", "team-a"),
            Err(AuthError::RoomMismatch)
        );
        let any = hs256(&json!({"sub": "alice", "room": "*"}));
        assert_eq!(
            a.check_room_token(&any, "alice", "lobby"),
            Err(AuthError::RoomMismatch)
        );
    }

    #[test]
    fn room_token_claim_rules() {
        let a = auth();
        let connect_token = a
            .mint("alice", None, Some(&["*".into()]), 600)
            .expect("mint");
        assert_eq!(
            a.check_room_token(&connect_token, "alice", "general"),
            Err(AuthError::InvalidClaim("room"))
        );
        let numeric_room = hs256(&json!({"sub": "alice", "room": 7}));
        assert_eq!(
            a.check_room_token(&numeric_room, "alice", "7"),
            Err(AuthError::InvalidClaim("room"))
        );
        let no_sub = hs256(&json!({"room": "general"}));
        assert_eq!(
            a.check_room_token(&no_sub, "alice", "general"),
            Err(AuthError::InvalidSub)
        );
        let expired = hs256(&json!({"sub": "alice", "room": "general", "exp": now() - 120}));
        assert_eq!(
            a.check_room_token(&expired, "alice", "general"),
            Err(AuthError::Expired)
        );
        let early = hs256(&json!({"sub": "alice", "room": "general", "nbf": now() + 300}));
        assert_eq!(
            a.check_room_token(&early, "alice", "general"),
            Err(AuthError::NotYetValid)
        );
        let header = b64(br#"{"alg":"none"}"#);
        let payload = b64(json!({"sub": "alice", "room": "general"})
            .to_string()
            .as_bytes());
        let none = format!("{header}.{payload}.");
        assert_eq!(
            a.check_room_token(&none, "alice", "general"),
            Err(AuthError::WrongAlgorithm)
        );
        let foreign = Authenticator::new(Some("other"))
            .mint_room_token("alice", "general", 600)
            .expect("mint");
        assert_eq!(
            a.check_room_token(&foreign, "alice", "general"),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            a.check_room_token("", "alice", "general"),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn room_token_in_dev_mode_is_accepted() {
        let a = Authenticator::new(None);
        assert_eq!(
            a.check_room_token("anything at all", "alice", "general"),
            Ok(())
        );
    }

    #[test]
    fn mint_round_trip() {
        let a = auth();
        let rooms = vec!["general".to_owned(), "team-*".to_owned()];
        let token = a
            .mint("alice", Some("Alice A."), Some(&rooms), 3600)
            .expect("mint");
        let id = connect(&a, &token).expect("valid");
        assert_eq!(
            id,
            Identity {
                user: "alice".into(),
                name: Some("Alice A.".into()),
                rooms: RoomGrant::Patterns(rooms)
            }
        );
        let bare = a.mint("bob", None, None, 60).expect("mint");
        let id = connect(&a, &bare).expect("valid");
        assert_eq!((id.name, id.rooms), (None, RoomGrant::None));
        // The header is plain HS256/JWT and exp = iat + ttl.
        let header = jsonwebtoken::decode_header(&bare).expect("header");
        assert_eq!(header.alg, Algorithm::HS256);
        let payload = bare.split('.').nth(1).expect("payload");
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("b64")).expect("json");
        assert_eq!(
            claims["exp"].as_u64(),
            claims["iat"].as_u64().map(|t| t + 60)
        );
        // A zero TTL still works within the leeway.
        assert!(connect(&a, &a.mint("carol", None, None, 0).expect("mint")).is_ok());
        // A huge TTL saturates instead of overflowing.
        assert!(connect(&a, &a.mint("dave", None, None, u64::MAX).expect("mint")).is_ok());
    }

    #[test]
    fn mint_errors() {
        let dev = Authenticator::new(None);
        assert_eq!(dev.mint("alice", None, None, 60), Err(AuthError::DevMode));
        assert_eq!(
            dev.mint_room_token("alice", "general", 60),
            Err(AuthError::DevMode)
        );
        let a = auth();
        assert_eq!(a.mint("", None, None, 60), Err(AuthError::InvalidSub));
        assert_eq!(
            a.mint(&"s".repeat(129), None, None, 60),
            Err(AuthError::InvalidSub)
        );
        assert_eq!(
            a.mint_room_token("", "general", 60),
            Err(AuthError::InvalidSub)
        );
        assert_eq!(
            a.mint_room_token("alice", "", 60),
            Err(AuthError::InvalidClaim("room"))
        );
    }

    #[test]
    fn errors_and_debug_leak_nothing() {
        let a = auth();
        assert!(!format!("{a:?}").contains(SECRET));
        let token = hs256(&json!({"sub": "leaky-user-id", "exp": now() - 120}));
        let err = connect(&a, &token).expect_err("expired");
        let msg = err.to_string();
        assert!(!msg.contains(SECRET) && !msg.contains(&token) && !msg.contains("leaky"));
        let errors = [
            AuthError::MissingToken,
            AuthError::MissingUser,
            AuthError::InvalidUser,
            AuthError::TokenTooLarge,
            AuthError::Malformed,
            AuthError::WrongAlgorithm,
            AuthError::BadSignature,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::InvalidSub,
            AuthError::InvalidClaim("rooms"),
            AuthError::RoomMismatch,
            AuthError::UserMismatch,
            AuthError::DevMode,
            AuthError::Signing,
        ];
        for e in errors {
            let msg = e.to_string();
            assert!(!msg.is_empty() && !msg.contains(SECRET));
        }
        assert_eq!(
            AuthError::TokenTooLarge.to_string(),
            "token too large (limit 8192 bytes)"
        );
        assert_eq!(
            AuthError::InvalidClaim("rooms").to_string(),
            "invalid `rooms` claim"
        );
    }

    #[test]
    fn authenticator_is_shareable() {
        fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}
        assert_send_sync_clone::<Authenticator>();
        assert_send_sync_clone::<Identity>();
        let a = auth();
        let b = a.clone();
        let token = a.mint("alice", None, None, 60).expect("mint");
        assert!(connect(&b, &token).is_ok());
        let handle = std::thread::spawn(move || connect(&b, &token).map(|i| i.user));
        assert_eq!(handle.join().expect("thread"), Ok("alice".to_owned()));
    }
}
