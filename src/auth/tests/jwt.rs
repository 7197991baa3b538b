//! Token checks: shape, algorithm, signature, time claims, size, `aud`.

use super::*;

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
