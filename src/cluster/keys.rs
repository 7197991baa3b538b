//! Key and channel names. All of one room's share the `{room}` hash tag.

/// The room's offset counter.
pub fn offset(room: &str) -> String {
    format!("corelay:{{{room}}}:offset")
}

/// The room's message stream.
pub fn stream(room: &str) -> String {
    format!("corelay:{{{room}}}:stream")
}

/// The dedupe key of `(user, cid)` in the room (the user is length-prefixed).
pub fn cid(room: &str, user: &str, cid: &str) -> String {
    format!("corelay:{{{room}}}:cid:{}:{user}:{cid}", user.len())
}

/// One host's presence hash in the room.
pub fn presence(room: &str, host: &str) -> String {
    format!("corelay:{{{room}}}:presence:{host}")
}

/// The prefix of the room's presence hashes (the script appends the host id).
pub fn presence_prefix(room: &str) -> String {
    format!("corelay:{{{room}}}:presence:")
}

/// The room's zset of hosts with presence, scored by expiry.
pub fn presence_hosts(room: &str) -> String {
    format!("corelay:{{{room}}}:presence:hosts")
}

/// The users a reap of `host` announced offline in the room (see the presence scripts).
pub fn reaped(room: &str, host: &str) -> String {
    format!("corelay:{{{room}}}:reaped:{host}")
}

/// The prefix of the room's reaped sets (the script appends the host id).
pub fn reaped_prefix(room: &str) -> String {
    format!("corelay:{{{room}}}:reaped:")
}

/// The room's pub/sub channel.
pub fn channel(room: &str) -> String {
    format!("corelay:{{{room}}}")
}

/// The room a channel name belongs to, if it is a room channel.
pub fn room_of_channel(channel: &[u8]) -> Option<&str> {
    let inner = channel.strip_prefix(b"corelay:{")?.strip_suffix(b"}")?;
    std::str::from_utf8(inner).ok()
}

/// A host's private round-trip probe channel.
pub fn ping(host: &str) -> String {
    format!("corelay:ping:{host}")
}

#[cfg(test)]
mod tests {
    use crate::cluster::keys;

    #[test]
    fn keys_share_the_room_hash_tag() {
        assert_eq!(keys::offset("r1"), "corelay:{r1}:offset");
        assert_eq!(keys::stream("r1"), "corelay:{r1}:stream");
        assert_eq!(keys::channel("r1"), "corelay:{r1}");
        assert_eq!(keys::cid("r1", "a:b", "c"), "corelay:{r1}:cid:3:a:b:c");
        assert_ne!(keys::cid("r1", "a:b", "c"), keys::cid("r1", "a", "b:c"));
        assert_eq!(keys::room_of_channel(b"corelay:{r1}"), Some("r1"));
        assert_eq!(keys::room_of_channel(b"corelay:ping:x"), None);
    }
}
