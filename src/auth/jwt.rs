//! HS256 tokens: the keys and validation rules derived from the secret, verification (the
//! header checked before the library sees it, the claims it would let through refused
//! after) and signing.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use super::{AuthError, LEEWAY_SECS, MAX_TOKEN_BYTES};

/// Key material and validation rules derived from the secret.
pub(super) struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl Keys {
    /// The keys and validation rules for `secret` (not empty: see
    /// [`Authenticator::new`](super::Authenticator::new)).
    pub(super) fn new(secret: &str) -> Keys {
        let mut validation = Validation::new(Algorithm::HS256);
        // `exp` is optional (but enforced when present); `sub` is always required.
        validation.set_required_spec_claims(&["sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        // `validate_aud` stays on with no expected audience: tokens with `aud` are refused.
        validation.validate_aud = true;
        validation.aud = None;
        Keys {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// Verifies size, header, signature and time claims; returns the claims object.
    pub(super) fn verify(&self, token: &str) -> Result<Map<String, Value>, AuthError> {
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
    pub(super) fn sign(
        &self,
        mut claims: Map<String, Value>,
        ttl_secs: u64,
    ) -> Result<String, AuthError> {
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

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
