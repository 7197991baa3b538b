//! The queue from one shard to another is bounded for the work clients start
//! (`limits.mesh_outbox`): past it a send is refused with `unavailable` and nothing is
//! stored, while everything acked is delivered and stored once, in offset order.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{token, Server, WsClient};
use corelay::chat::mesh::home_of;
use corelay::transport::websocket::client_frame;
use serde_json::{json, Value};
use tungstenite::protocol::frame::coding::{Data, OpCode};

const BURST: u64 = 300;

/// A room name whose home is `shard` (of two).
fn room_on(shard: usize) -> String {
    (0..)
        .map(|i| format!("outbox-{i}"))
        .find(|r| home_of(r, 2) == shard)
        .expect("some room is homed on each shard")
}

/// A connected client whose connection was accepted by `shard`.
fn connected_on(server: &Server, shard: usize, user: &str) -> WsClient {
    let mut others = Vec::new();
    for _ in 0..64 {
        let before = server.connections_per_shard();
        let mut c = WsClient::connect(server.port, &token(user, Some(&["*"])));
        if server.connections_per_shard()[shard] > before[shard] {
            return c;
        }
        c.send_text("41");
        others.push(c);
    }
    panic!("no connection landed on shard {shard} in 64 tries");
}

#[test]
fn a_full_outbox_refuses_new_sends_and_loses_nothing_acked() {
    let server = Server::start(&[
        ("CORELAY_LIMITS_MESH_OUTBOX", "2"),
        ("CORELAY_SERVER_FOLLOW_ROOMS", "false"),
        ("CORELAY_LIMITS_SEND_RATE", "100000"),
        ("CORELAY_LIMITS_SEND_BURST", "100000"),
    ]);
    let room = room_on(1);
    let mut sender = connected_on(&server, 0, "sender");
    let mut reader = WsClient::connect(server.port, &token("reader", Some(&["*"])));
    for c in [&mut sender, &mut reader] {
        assert_eq!(c.emit_ack("join", json!({"room": room}))["ok"], true);
    }

    // One write: the sender's shard handles the whole burst before its outbox task runs.
    let mut burst = Vec::new();
    for id in 1..=BURST {
        let packet = format!(
            "42{id}{}",
            json!(["message", {"room": room, "text": format!("m{id}"), "cid": format!("c{id}")}])
        );
        burst.extend(client_frame(
            OpCode::Data(Data::Text),
            true,
            packet.as_bytes(),
            [1, 2, 3, 4],
        ));
    }
    sender.send_raw(&burst);
    let mut refused = Vec::new();
    for id in 1..=BURST {
        let ack = sender.wait_ack(id);
        if ack["ok"] != true {
            assert_eq!(ack["error"]["code"], "unavailable", "{ack}");
            refused.push(id);
        }
    }
    assert!(
        !refused.is_empty(),
        "a burst of {BURST} past an outbox of 2 refused nothing"
    );
    assert!(refused.len() < BURST as usize, "every send was refused");
    assert!(server.metric("corelay_mesh_refusals_total") >= refused.len() as f64);

    // The refused sends go through when retried one at a time, with the same cid.
    for id in &refused {
        let ack = sender.emit_ack(
            "message",
            json!({"room": room, "text": format!("m{id}"), "cid": format!("c{id}")}),
        );
        assert_eq!(ack["ok"], true, "retry of {id}: {ack}");
    }

    // The other member got every message once, in offset order, with offsets 1..=BURST.
    let mut got: BTreeMap<u64, String> = BTreeMap::new();
    let mut last = 0;
    while got.len() < BURST as usize {
        let ev: Value = reader
            .next_event(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("after {} messages: {e:?}", got.len()));
        if ev[0] != "message" {
            continue;
        }
        let offset = ev[1]["offset"].as_u64().expect("an offset");
        assert!(offset > last, "offset {offset} after {last}");
        last = offset;
        let text = ev[1]["text"].as_str().expect("a text").to_string();
        assert!(got.insert(offset, text).is_none());
    }
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        (1..=BURST).collect::<Vec<_>>()
    );
    let mut texts: Vec<&String> = got.values().collect();
    texts.sort();
    texts.dedup();
    assert_eq!(texts.len(), BURST as usize, "a text was stored twice");
}
