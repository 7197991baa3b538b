//! Claim rules: `sub`, `rooms` patterns, `name`.

use super::*;

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

    let grant_of = |rooms: Value| connect(&auth(), &hs256(&json!({"sub": "u", "rooms": rooms})));
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
