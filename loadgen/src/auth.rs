//! The Socket.IO CONNECT auth payload: an HS256 JWT minted with the server's secret, or the
//! dev-mode identity `{"user": ...}` when the server runs without a secret.

use jsonwebtoken::{encode, EncodingKey, Header};
use serde::Serialize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How connections identify themselves.
#[derive(Clone)]
pub enum Auth {
    /// Mint `{sub, rooms:["*"], exp}` tokens signed HS256 with this secret.
    Jwt {
        /// The shared secret (`CORELAY_JWT_SECRET` on the server).
        key: EncodingKey,
        /// Token lifetime.
        ttl: Duration,
    },
    /// Dev mode: `{"user": ...}`.
    Dev,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    rooms: [&'a str; 1],
    exp: u64,
}

impl Auth {
    /// JWT auth with `secret`, or dev mode when `secret` is `None`.
    pub fn new(secret: Option<&str>, ttl: Duration) -> Auth {
        match secret {
            Some(s) => Auth::Jwt {
                key: EncodingKey::from_secret(s.as_bytes()),
                ttl,
            },
            None => Auth::Dev,
        }
    }

    /// The JSON text of the CONNECT auth payload for `user`.
    pub fn connect_payload(&self, user: &str) -> anyhow::Result<String> {
        match self {
            Auth::Jwt { key, ttl } => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
                let claims = Claims {
                    sub: user,
                    rooms: ["*"],
                    exp: now + ttl.as_secs().max(60),
                };
                let token = encode(&Header::default(), &claims, key)?;
                Ok(serde_json::to_string(
                    &serde_json::json!({ "token": token }),
                )?)
            }
            Auth::Dev => Ok(serde_json::to_string(&serde_json::json!({ "user": user }))?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{decode, DecodingKey, Validation};

    #[test]
    fn minted_token_verifies() {
        let auth = Auth::new(Some("0123456789abcdef0123"), Duration::from_secs(3600));
        let payload = auth.connect_payload("lg-7").unwrap();
        let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
        let token = v["token"].as_str().unwrap();
        let data = decode::<serde_json::Value>(
            token,
            &DecodingKey::from_secret(b"0123456789abcdef0123"),
            &Validation::new(jsonwebtoken::Algorithm::HS256),
        )
        .unwrap();
        assert_eq!(data.claims["sub"], "lg-7");
        assert_eq!(data.claims["rooms"][0], "*");
    }

    #[test]
    fn dev_mode() {
        let auth = Auth::new(None, Duration::from_secs(1));
        assert_eq!(auth.connect_payload("lg-1").unwrap(), "{\"user\":\"lg-1\"}");
    }
}
