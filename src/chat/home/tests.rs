//! A home on its own: the memory store, and a mesh that records what the home sends.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::*;
use crate::chat::member::User;
use crate::chat::testing::Recorder;
use crate::store::{HistoryStore, Store};
use crate::transport::testing::on_glommio;

/// A running local home on shard 0 of `count`, with the store it writes to.
fn start(count: usize) -> (Rc<Home>, Rc<Recorder>, Store) {
    start_replaying(count, 100)
}

/// [`start`], replaying at most `max_replay` missed messages on a join.
fn start_replaying(count: usize, max_replay: usize) -> (Rc<Home>, Rc<Recorder>, Store) {
    let store = Store::memory();
    let home = Home::new(HomeParts {
        shard: 0,
        count,
        store: store.clone(),
        metrics: Arc::new(Metrics::new(count)),
        ids: MessageIds::new(7, 0),
        limits: HomeLimits {
            max_replay,
            dedupe_window: Duration::from_secs(600),
            max_pending: 4096,
        },
        sequencer: Sequencer::Local,
        feed: None,
        budget: std::rc::Rc::new(crate::transport::budget::ShardBudget::new(0)),
    });
    let mesh = Rc::new(Recorder::default());
    glommio::spawn_local(home.clone().run(mesh.clone())).detach();
    (home, mesh, store)
}

/// Waits (up to 5 s) until the recorder holds `n` messages.
async fn sent(mesh: &Recorder, n: usize) -> Vec<(usize, ShardMsg)> {
    for _ in 0..5000 {
        if mesh.len() >= n {
            return mesh.take();
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    panic!("the home sent {} messages, not {n}", mesh.len());
}

/// Lets the home handle whatever it can (to show it sent nothing more).
async fn settle() {
    glommio::timer::sleep(Duration::from_millis(20)).await;
}

fn conn(shard: usize, id: u64) -> ConnRef {
    ConnRef { shard, id }
}

fn user(id: &str, name: Option<&str>) -> User {
    User {
        id: Arc::from(id),
        name: name.map(Arc::from),
    }
}

fn join(home: &Home, room: &str, c: ConnRef, u: User, since: Option<u64>) {
    home.enqueue(HomeCmd::Join {
        room: Arc::from(room),
        conn: c,
        user: u,
        since,
        ack_id: Some(1),
    });
}

fn publish(home: &Home, room: &str, from: ConnRef, ack_id: u64, text: &str, cid: Option<&str>) {
    home.enqueue(HomeCmd::Publish {
        room: Arc::from(room),
        user: Arc::from(format!("user-{}", from.id)),
        text: text.to_string(),
        cid: cid.map(str::to_string),
        reply: ReplyTo::Conn {
            conn: from,
            ack_id: Some(ack_id),
        },
    });
}

/// The text a server-to-client WebSocket text frame carries.
fn payload(frame: &[u8]) -> &str {
    assert_eq!(frame[0], 0x81, "a final text frame");
    let start = match frame[1] {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    std::str::from_utf8(&frame[start..]).expect("utf-8")
}

/// The JSON array of a Socket.IO packet (`43<id>[…]`, `42[…]`).
fn packet_args(frame: &[u8]) -> Value {
    let text = payload(frame);
    let at = text.find('[').expect("an argument array");
    serde_json::from_str(&text[at..]).expect("json")
}

/// The ack body of a `Reply`, `(shard, conn, body)`.
fn reply(msg: &(usize, ShardMsg)) -> (usize, u64, Value) {
    match msg {
        (to, ShardMsg::Member(MemberMsg::Reply { conn, frame })) => {
            (*to, *conn, packet_args(frame)[0].clone())
        }
        other => panic!("not a reply: {other:?}"),
    }
}

/// A `Deliver`: `(shard, event name, body, except)`.
fn delivery(msg: &(usize, ShardMsg)) -> (usize, String, Value, Option<ConnRef>) {
    match msg {
        (to, ShardMsg::Member(MemberMsg::Deliver { frame, except, .. })) => {
            let args = packet_args(frame);
            let name = args[0].as_str().expect("event name").to_string();
            (*to, name, args[1].clone(), *except)
        }
        other => panic!("not a delivery: {other:?}"),
    }
}

/// A `Joined`: `(shard, conn, admitted, ack body)`.
fn joined(msg: &(usize, ShardMsg)) -> (usize, u64, bool, Value) {
    match msg {
        (
            to,
            ShardMsg::Member(MemberMsg::Joined {
                conn,
                frame,
                admitted,
                ..
            }),
        ) => (*to, *conn, *admitted, packet_args(frame)[0].clone()),
        other => panic!("not a join answer: {other:?}"),
    }
}

#[test]
fn join_is_answered_with_the_rooms_offset_and_what_was_missed() {
    on_glommio(|| async {
        let (home, mesh, _store) = start(2);
        join(&home, "r", conn(1, 5), user("u5", None), None);
        let out = sent(&mesh, 2).await; // presence online (to no one but shard 1), the answer
        let (to, c, admitted, ack) = joined(&out[1]);
        assert_eq!((to, c, admitted), (1, 5, true));
        assert_eq!(ack["ok"], true);
        assert_eq!(ack["offset"], 0);
        assert!(ack.get("missed").is_none());

        publish(&home, "r", conn(1, 5), 2, "hello", None);
        sent(&mesh, 2).await; // the ack, and the delivery to shard 1

        // A rejoin from offset 0 gets the one message it missed.
        join(&home, "r", conn(0, 6), user("u6", None), Some(0));
        let out = sent(&mesh, 3).await; // presence online to shards 0 and 1, the answer
        let (to, c, admitted, ack) = joined(out.last().expect("an answer"));
        assert_eq!((to, c, admitted), (0, 6, true));
        assert_eq!(ack["offset"], 1);
        assert_eq!(ack["missed"][0]["text"], "hello");
        assert_eq!(ack["truncated"], false);
        assert_eq!(home.room_count(), 1);
    });
}

#[test]
fn a_join_replays_at_most_max_replay_of_the_newest_missed_messages() {
    on_glommio(|| async {
        let (home, mesh, _store) = start_replaying(1, 2);
        join(&home, "r", conn(0, 1), user("a", None), None);
        sent(&mesh, 2).await;
        for i in 1..=4 {
            publish(&home, "r", conn(0, 1), 10 + i, &format!("m{i}"), None);
        }
        sent(&mesh, 8).await;
        join(&home, "r", conn(0, 2), user("b", None), Some(1));
        let out = sent(&mesh, 2).await;
        let (_, c, admitted, ack) = joined(&out[1]);
        assert_eq!((c, admitted), (2, true));
        assert_eq!(ack["offset"], 4);
        let texts: Vec<&str> = ack["missed"]
            .as_array()
            .expect("missed")
            .iter()
            .filter_map(|m| m["text"].as_str())
            .collect();
        assert_eq!(texts, vec!["m3", "m4"]);
        assert_eq!(ack["truncated"], true);
    });
}

#[test]
fn publishes_are_acked_in_order_and_delivered_once_per_shard_with_members() {
    on_glommio(|| async {
        let (home, mesh, store) = start(3);
        let sender = conn(0, 1);
        join(&home, "r", sender, user("a", None), None);
        join(&home, "r", conn(2, 2), user("b", None), None);
        sent(&mesh, 5).await; // two answers, three presence events
        for i in 0..3 {
            publish(&home, "r", sender, 10 + i, &format!("m{i}"), None);
        }
        let out = sent(&mesh, 9).await;
        settle().await;
        assert_eq!(mesh.len(), 0, "nothing more: {:?}", mesh.take());

        let acks: Vec<(usize, u64, Value)> = out
            .iter()
            .filter(|m| matches!(m.1, ShardMsg::Member(MemberMsg::Reply { .. })))
            .map(reply)
            .collect();
        let offsets: Vec<(usize, u64, u64)> = acks
            .iter()
            .map(|(to, c, a)| (*to, *c, a["offset"].as_u64().expect("offset")))
            .collect();
        assert_eq!(offsets, vec![(0, 1, 1), (0, 1, 2), (0, 1, 3)]);

        let deliveries: Vec<_> = out
            .iter()
            .filter(|m| matches!(m.1, ShardMsg::Member(MemberMsg::Deliver { .. })))
            .map(delivery)
            .collect();
        for shard in [0, 2] {
            let got: Vec<(u64, &str)> = deliveries
                .iter()
                .filter(|d| d.0 == shard)
                .map(|(_, name, body, except)| {
                    assert_eq!(name, "message");
                    assert_eq!(*except, Some(sender), "never back to the sender");
                    (body["offset"].as_u64().expect("offset"), "")
                })
                .collect();
            assert_eq!(got, vec![(1, ""), (2, ""), (3, "")], "shard {shard}");
        }
        assert!(
            deliveries.iter().all(|d| d.0 != 1),
            "shard 1 has no members"
        );
        assert_eq!(store.latest_offset("r").await.expect("latest"), 3);
        assert!(home.is_idle());
    });
}

#[test]
fn a_retried_cid_gets_the_first_ack_unchanged() {
    on_glommio(|| async {
        let (home, mesh, store) = start(1);
        let sender = conn(0, 1);
        join(&home, "r", sender, user("a", None), None);
        sent(&mesh, 2).await;
        // The retry arrives while the first send is being written, and once more after.
        publish(&home, "r", sender, 20, "once", Some("c1"));
        publish(&home, "r", sender, 21, "once", Some("c1"));
        let out = sent(&mesh, 3).await; // a delivery (to no one but the sender's shard), two acks
        publish(&home, "r", sender, 22, "once", Some("c1"));
        let late = sent(&mesh, 1).await;
        settle().await;
        assert_eq!(mesh.len(), 0);

        let acks: Vec<(usize, u64, Value)> = out
            .iter()
            .chain(late.iter())
            .filter(|m| matches!(m.1, ShardMsg::Member(MemberMsg::Reply { .. })))
            .map(reply)
            .collect();
        assert_eq!(acks.len(), 3);
        assert_eq!(acks[0].2["offset"], 1);
        assert_eq!(acks[1].2, acks[0].2);
        assert_eq!(acks[2].2, acks[0].2);
        let deliveries = out
            .iter()
            .filter(|m| matches!(m.1, ShardMsg::Member(MemberMsg::Deliver { .. })))
            .count();
        assert_eq!(deliveries, 1, "stored and delivered once");
        assert_eq!(store.latest_offset("r").await.expect("latest"), 1);

        publish(&home, "r", sender, 23, "another", Some("c2"));
        let out = sent(&mesh, 2).await;
        let (_, _, ack) = reply(out.last().expect("an ack"));
        assert_eq!(ack["offset"], 2);
    });
}

#[test]
fn leave_is_acked_announced_and_unloads_an_empty_room() {
    on_glommio(|| async {
        let (home, mesh, _store) = start(2);
        join(&home, "r", conn(0, 1), user("a", None), None);
        join(&home, "r", conn(1, 2), user("b", None), None);
        sent(&mesh, 5).await;
        home.enqueue(HomeCmd::Leave {
            room: Arc::from("r"),
            conn: conn(1, 2),
            ack_id: Some(9),
        });
        let out = sent(&mesh, 2).await;
        let (to, name, body, except) = delivery(&out[0]);
        assert_eq!((to, name.as_str(), except), (0, "presence", None));
        assert_eq!(body["user"], "b");
        assert_eq!(body["online"], false);
        let (to, c, ack) = reply(&out[1]);
        assert_eq!((to, c), (1, 2));
        assert_eq!(ack, serde_json::json!({"ok": true}));

        // Shard 1 has no member left: a message goes to shard 0 only.
        publish(&home, "r", conn(0, 1), 3, "after", None);
        let out = sent(&mesh, 2).await;
        settle().await;
        assert_eq!(mesh.len(), 0);
        assert!(out.iter().all(|(to, _)| *to == 0), "{out:?}");

        home.enqueue(HomeCmd::Leave {
            room: Arc::from("r"),
            conn: conn(0, 1),
            ack_id: None,
        });
        settle().await;
        assert_eq!(home.room_count(), 0);
    });
}

#[test]
fn presence_lists_each_user_once_while_any_connection_is_in() {
    on_glommio(|| async {
        let (home, mesh, _store) = start(2);
        join(&home, "r", conn(0, 1), user("zed", Some("Zed")), None);
        join(&home, "r", conn(1, 2), user("ann", Some("Ann")), None);
        join(&home, "r", conn(1, 3), user("zed", Some("Zed")), None);
        sent(&mesh, 6).await; // three answers, three presence events
        let list = |home: Rc<Home>| async move {
            let (tx, rx) = futures::channel::oneshot::channel();
            home.enqueue(HomeCmd::Presence {
                room: Arc::from("r"),
                reply: ReplyTo::Api(tx),
            });
            let body = rx.await.expect("an answer");
            serde_json::from_slice::<Value>(&body).expect("json")
        };
        assert_eq!(
            list(home.clone()).await,
            serde_json::json!({"ok": true, "users": [
                {"user": "ann", "name": "Ann"}, {"user": "zed", "name": "Zed"}]})
        );
        home.enqueue(HomeCmd::Leave {
            room: Arc::from("r"),
            conn: conn(0, 1),
            ack_id: None,
        });
        let users = list(home.clone()).await;
        assert_eq!(users["users"].as_array().map(Vec::len), Some(2), "{users}");
        home.enqueue(HomeCmd::Leave {
            room: Arc::from("r"),
            conn: conn(1, 3),
            ack_id: None,
        });
        assert_eq!(
            list(home.clone()).await,
            serde_json::json!({"ok": true, "users": [{"user": "ann", "name": "Ann"}]})
        );
    });
}

#[test]
fn a_publish_is_refused_while_a_queue_to_another_shard_is_full() {
    on_glommio(|| async {
        let (home, mesh, store) = start(2);
        join(&home, "r", conn(0, 1), user("a", None), None);
        sent(&mesh, 2).await;
        // The home's own queue does not count here: only queues toward other shards.
        mesh.congested.borrow_mut().push(0);
        publish(&home, "r", conn(0, 1), 4, "fine", None);
        let out = sent(&mesh, 2).await;
        assert_eq!(reply(&out[1]).2["offset"], 1);

        mesh.congested.borrow_mut().push(1);
        publish(&home, "r", conn(0, 1), 5, "refused", None);
        let out = sent(&mesh, 1).await;
        let (to, c, ack) = reply(&out[0]);
        assert_eq!((to, c), (0, 1));
        assert_eq!(ack["ok"], false);
        assert_eq!(ack["error"]["code"], "unavailable");
        settle().await;
        assert_eq!(mesh.len(), 0);
        assert_eq!(store.latest_offset("r").await.expect("latest"), 1);
        assert!(home.is_idle());
    });
}

#[test]
fn a_failed_write_is_refused_with_unavailable() {
    on_glommio(|| async {
        let (home, mesh, store) = start(1);
        join(&home, "r", conn(0, 1), user("a", None), None);
        sent(&mesh, 2).await;
        store.close().await.expect("close");
        publish(&home, "r", conn(0, 1), 4, "lost", None);
        let out = sent(&mesh, 1).await;
        let (_, _, ack) = reply(&out[0]);
        assert_eq!(ack["error"]["code"], "unavailable");
        assert!(home.is_idle());
        settle().await;
        assert_eq!(mesh.len(), 0, "nothing delivered");
    });
}
