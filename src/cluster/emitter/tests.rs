//! The emitter's wire format: real payloads written by `notepack.io` 3.0 (as
//! `@socket.io/redis-emitter` 5.1.0 encodes them), and malformed ones.

use super::*;

/// `hex` as bytes.
fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// `v` as MessagePack.
fn pack(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).unwrap();
    out
}

/// `[uid, packet, opts]` with the given packet and opts.
fn message(packet: Value, opts: Value) -> Vec<u8> {
    pack(&Value::Array(vec!["emitter".into(), packet, opts]))
}

/// A map from string keys.
fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

/// An EVENT packet of namespace `/` with `data`.
fn event(data: Vec<Value>) -> Value {
    map(vec![
        ("type", 2.into()),
        ("data", Value::Array(data)),
        ("nsp", "/".into()),
    ])
}

/// `emitter.to("r1").except("r2").emit("notice", {text: "hi", n: 1.5, big: 2 ** 40,
/// neg: -7, ok: true, none: null, d: new Date(Date.UTC(2024, 0, 2, 3, 4, 5, 678))})`.
const TO_ROOM: &str = "93a7656d697474657283a47479706502a46461746192a66e6f7469636587a474657874a26869a16ecb3ff8000000000000a3626967cf0000010000000000a36e6567f9a26f6bc3a46e6f6e65c0a164d7ffa1a5d60065937d25a36e7370a12f83a5726f6f6d7391a27231a5666c61677380a665786365707491a27232";

/// `emitter.volatile.emit("all")`.
const TO_ALL: &str = "93a7656d697474657283a47479706502a46461746191a3616c6ca36e7370a12f83a5726f6f6d7390a5666c61677381a8766f6c6174696c65c3a665786365707490";

#[test]
fn a_room_emit_from_the_real_emitter() {
    let emit = decode(&unhex(TO_ROOM)).unwrap();
    assert_eq!(
        String::from_utf8(emit.data).unwrap(),
        r#"["notice",{"text":"hi","n":1.5,"big":1099511627776,"neg":-7,"ok":true,"none":null,"d":"2024-01-02T03:04:05.678Z"}]"#
    );
    assert_eq!(emit.rooms, ["r1"]);
    assert_eq!(emit.except, ["r2"]);
    assert!(!emit.volatile);
}

#[test]
fn an_emit_to_all_from_the_real_emitter() {
    let emit = decode(&unhex(TO_ALL)).unwrap();
    assert_eq!(emit.data, br#"["all"]"#);
    assert!(emit.rooms.is_empty() && emit.except.is_empty());
    assert!(emit.volatile);
}

#[test]
fn dates_as_json_stringify_writes_them() {
    // notepack's encodings of new Date(0), new Date(-1) and Date.UTC(2200, 0, 1).
    for (hex, iso) in [
        ("d6ff00000000", "1970-01-01T00:00:00.000Z"),
        ("c70cff3b8b87c0ffffffffffffffff", "1969-12-31T23:59:59.999Z"),
        ("d7ff00000001b09e1900", "2200-01-01T00:00:00.000Z"),
    ] {
        let date = rmpv::decode::read_value(&mut &unhex(hex)[..]).unwrap();
        let emit = decode(&message(event(vec!["e".into(), date]), map(vec![]))).unwrap();
        assert_eq!(emit.data, format!(r#"["e","{iso}"]"#).into_bytes(), "{hex}");
    }
}

#[test]
fn numeric_rooms_and_missing_opts_fields() {
    let opts = map(vec![("rooms", Value::Array(vec![42.into(), "x".into()]))]);
    let emit = decode(&message(event(vec!["e".into()]), opts)).unwrap();
    assert_eq!(emit.rooms, ["42", "x"]);
    assert!(emit.except.is_empty());
    // A packet without nsp is namespace "/", as the adapter reads it.
    let packet = map(vec![
        ("type", 2.into()),
        ("data", Value::Array(vec!["e".into()])),
    ]);
    assert!(decode(&message(packet, map(vec![]))).is_ok());
}

#[test]
fn malformed_input_is_an_error_not_a_panic() {
    let ok = unhex(TO_ROOM);
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("truncated", ok[..ok.len() / 2].to_vec()),
        ("trailing bytes", [ok.as_slice(), &[0xc0]].concat()),
        (
            "a lying array length",
            vec![0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0],
        ),
        (
            "a lying string length",
            vec![0xdb, 0xff, 0xff, 0xff, 0xff, b'a'],
        ),
        ("reserved marker", vec![0xc1]),
        ("too deep", [vec![0x91; 100_000], vec![0xc0]].concat()),
        ("not an array", pack(&"hello".into())),
        (
            "two parts",
            pack(&Value::Array(vec!["a".into(), "b".into()])),
        ),
        ("packet not a map", message("p".into(), map(vec![]))),
        ("opts not a map", message(event(vec!["e".into()]), 7.into())),
        (
            "no data",
            message(map(vec![("type", 2.into())]), map(vec![])),
        ),
        (
            "data not led by a name",
            message(event(vec![1.into()]), map(vec![])),
        ),
        ("empty data", message(event(vec![]), map(vec![]))),
        (
            "rooms not a list",
            message(event(vec!["e".into()]), map(vec![("rooms", "r".into())])),
        ),
        (
            "a room of bool",
            message(
                event(vec!["e".into()]),
                map(vec![("except", Value::Array(vec![true.into()]))]),
            ),
        ),
        (
            "map key not a string",
            message(
                event(vec!["e".into(), Value::Map(vec![(1.into(), 2.into())])]),
                map(vec![]),
            ),
        ),
        (
            "an unknown extension",
            message(event(vec!["e".into(), Value::Ext(5, vec![1])]), map(vec![])),
        ),
        (
            "a bad timestamp",
            message(
                event(vec!["e".into(), Value::Ext(-1, vec![1, 2, 3])]),
                map(vec![]),
            ),
        ),
        (
            "a date past 9999",
            message(
                event(vec![
                    "e".into(),
                    Value::Ext(
                        -1,
                        [&[0u8; 4][..], &400_000_000_000i64.to_be_bytes()].concat(),
                    ),
                ]),
                map(vec![]),
            ),
        ),
    ];
    for (what, bytes) in bad {
        let result = std::panic::catch_unwind(|| decode(&bytes));
        assert!(matches!(result, Ok(Err(_))), "{what}: {result:?}");
    }
    // A string of invalid UTF-8, written by hand: fixstr of 2 bytes 0xff 0xfe.
    let mut raw = message(event(vec!["e".into(), "XY".into()]), map(vec![]));
    let at = raw.windows(2).position(|w| w == b"XY").unwrap();
    raw[at] = 0xff;
    raw[at + 1] = 0xfe;
    assert_eq!(decode(&raw), Err(EmitError::Shape("a string is not UTF-8")));
}

#[test]
fn other_namespaces_types_and_binary_are_refused() {
    let packet = map(vec![
        ("type", 2.into()),
        ("data", Value::Array(vec!["e".into()])),
        ("nsp", "/admin".into()),
    ]);
    assert!(matches!(
        decode(&message(packet, map(vec![]))),
        Err(EmitError::Namespace(_))
    ));
    let ack = map(vec![
        ("type", 3.into()),
        ("data", Value::Array(vec!["e".into()])),
    ]);
    assert!(matches!(
        decode(&message(ack, map(vec![]))),
        Err(EmitError::PacketType(_))
    ));
    let binary = event(vec!["e".into(), Value::Binary(vec![1, 2, 3])]);
    assert_eq!(
        decode(&message(binary, map(vec![]))),
        Err(EmitError::Binary)
    );
}

#[test]
fn the_pattern_escapes_glob_characters() {
    assert_eq!(pattern(DEFAULT_PREFIX), "socket.io#/#*");
    assert_eq!(pattern("a*b[1]"), r"a\*b\[1\]#/#*");
}
