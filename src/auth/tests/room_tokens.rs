//! Room tokens, and minting connect and room tokens.

use super::*;

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
