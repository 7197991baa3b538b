//! Fuzzes connection identity (`corelay::auth::Authenticator`): CONNECT auth payloads
//! and room tokens, with a configured secret and in dev mode.
//!
//! Byte 0 picks the mode; the rest is the input:
//! - 0: the rest is a token string: `authenticate({"token": …})` and
//!   `check_room_token(…)` with the secret (shape, header, base64, signature checks);
//! - 1: the rest is `header JSON` `\n` `claims JSON`, signed with the server's secret so
//!   the fuzzer gets past the signature into header and claim handling (alg, crit,
//!   exp/nbf types, sub, name, rooms, room, aud);
//! - 2: the rest is a whole CONNECT auth payload (JSON) for a server with a secret;
//! - other: the same payload for a dev-mode server (`{"user", "name"?}`).
//!
//! Checks: no panic; an accepted identity has a 1–128 byte user; an accepted room token
//! names exactly the user and room asked for; a token the server signed with a header
//! other than `alg: HS256` is never accepted.

#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use corelay::auth::{Authenticator, Identity, MAX_USER_BYTES};
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

const SECRET: &str = "fuzzing-secret-0123456789abcdef";

fn check_identity(id: &Identity) {
    assert!((1..=MAX_USER_BYTES).contains(&id.user.len()));
}

/// Tries `token` as a connect token and as a room token for alice in lobby.
fn try_token(auth: &Authenticator, token: &str) -> bool {
    let connect = auth.authenticate(Some(&json!({ "token": token })));
    if let Ok(id) = &connect {
        check_identity(id);
    }
    let room = auth.check_room_token(token, "alice", "lobby").is_ok();
    connect.is_ok() || room
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let with_secret = Authenticator::new(Some(SECRET));
    match mode {
        0 => {
            if let Ok(token) = std::str::from_utf8(rest) {
                try_token(&with_secret, token);
            }
        }
        1 => {
            let (header, claims) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (&b"{\"alg\":\"HS256\",\"typ\":\"JWT\"}"[..], rest),
            };
            let message = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header),
                URL_SAFE_NO_PAD.encode(claims)
            );
            let key = EncodingKey::from_secret(SECRET.as_bytes());
            let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256)
                .expect("HMAC signing does not fail");
            let token = format!("{message}.{signature}");
            let accepted = try_token(&with_secret, &token);
            if accepted {
                let h: Value = serde_json::from_slice(header).expect("accepted header is JSON");
                assert_eq!(h.get("alg").and_then(Value::as_str), Some("HS256"));
                assert!(h.get("crit").is_none(), "token with a crit header accepted");
                let c: Value = serde_json::from_slice(claims).expect("accepted claims are JSON");
                assert!(c.get("aud").is_none(), "token with an aud claim accepted");
            }
        }
        2 => {
            if let Ok(payload) = serde_json::from_slice::<Value>(rest) {
                if let Ok(id) = with_secret.authenticate(Some(&payload)) {
                    check_identity(&id);
                }
            }
        }
        _ => {
            let dev = Authenticator::new(None);
            let payload = serde_json::from_slice::<Value>(rest).ok();
            if let Ok(id) = dev.authenticate(payload.as_ref()) {
                check_identity(&id);
            }
        }
    }
});
