//! Tests of [`Authenticator`](super::Authenticator): the helpers that forge tokens by hand,
//! and connecting with a token or in dev mode; the other files test the token checks
//! (`jwt`), the claims (`claims`), room tokens and minting (`room_tokens`).

mod claims;
mod jwt;
mod room_tokens;

use super::jwt::now_secs;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;

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
