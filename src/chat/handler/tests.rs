//! The chat handler on its own: a `Chat` on shard 0 of 2 with the memory store, a home
//! that is not running, and a mesh that records what chat sends. Members sit on plain
//! transport sessions; the tests read what they queue for their clients.

use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::chat::home::{Home, HomeLimits, HomeParts, Mesh, Sequencer};
use crate::chat::mesh::{MemberMsg, ShardMsg};
use crate::chat::testing::Recorder;
use crate::config::Config;
use crate::ids::MessageIds;
use crate::store::Store;
use crate::transport::conn::{Timers, Transport};
use crate::transport::testing::{self, on_glommio, SHARDS};

/// What a test runs against: shard 0's chat state and the mesh it sends through.
struct Fixture {
    chat: Rc<Chat>,
    mesh: Rc<Recorder>,
    next_id: std::cell::Cell<u64>,
}

/// A chat on shard 0 of [`SHARDS`], dev-mode authentication, `config` adjusted by `tune`.
fn fixture(tune: impl FnOnce(&mut Config)) -> Fixture {
    let mut config = Config::default();
    tune(&mut config);
    let ctx = Arc::new(testing::context(config));
    let metrics = ctx.metrics.clone();
    let store = Store::memory();
    let home = Home::new(HomeParts {
        shard: 0,
        count: SHARDS,
        store: store.clone(),
        metrics,
        ids: MessageIds::new(7, 0),
        limits: HomeLimits::from_config(&ctx.config),
        sequencer: Sequencer::Local,
        feed: None,
        budget: std::rc::Rc::new(crate::transport::budget::ShardBudget::new(0)),
    });
    let mesh = Rc::new(Recorder::default());
    let weak: std::rc::Weak<dyn Mesh> = Rc::downgrade(&(mesh.clone() as Rc<dyn Mesh>));
    let chat = Chat::new((0, SHARDS), ctx, store, home, weak, None);
    Fixture {
        chat,
        mesh,
        next_id: std::cell::Cell::new(1),
    }
}

impl Fixture {
    /// A member on a new polling session, known to chat, not connected yet.
    fn member(&self) -> Rc<Member> {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let now = Instant::now();
        let limits = &self.chat.ctx.config.limits;
        let timers = Timers {
            next_ping: now + Duration::from_secs(25),
            pong_deadline: None,
            connect_deadline: Some(now + Duration::from_secs(45)),
            close_deadline: None,
        };
        let session = Rc::new(Session::new(
            id,
            crate::ids::new_sid(0),
            Transport::Polling,
            (limits, self.chat.budget.clone()),
            timers,
            tracing::Span::none(),
        ));
        let member = Rc::new(Member::new(session, limits, now));
        self.chat.add_member(member.clone());
        member
    }

    /// Feeds one Engine.IO message (`4…`) from `member`: its body, the Socket.IO packet,
    /// is what the handler gets.
    fn packet(&self, member: &Rc<Member>, message: &str) -> Flow {
        let body = message.strip_prefix('4').expect("an Engine.IO message");
        self.socketio(member, body.as_bytes())
    }

    /// Feeds one Socket.IO packet from `member`.
    fn socketio(&self, member: &Rc<Member>, packet: &[u8]) -> Flow {
        let mut parser = member.parser();
        on_socketio(&self.chat, member, &mut parser, packet.to_vec())
    }

    /// Feeds one binary attachment from `member`.
    fn attachment(&self, member: &Rc<Member>) -> Flow {
        let mut parser = member.parser();
        on_binary(&self.chat, member, &mut parser, vec![1, 2, 3])
    }

    /// A connected member (`max_connections_per_user` is 0 in these fixtures, or the
    /// admission is played through here), its CONNECT answer taken.
    fn connected(&self, user: &str) -> Rc<Member> {
        let member = self.member();
        let flow = self.packet(&member, &format!("40{{\"user\":\"{user}\"}}"));
        assert_eq!(flow, Flow::Continue);
        self.admit_all();
        assert!(member.is_connected(), "{user} is connected");
        let out = frames(&member);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out[0].starts_with("40{\"sid\":"), "{out:?}");
        member
    }

    /// Plays the user owners' part for every `UserCmd` recorded: the chat counts the
    /// connection as the owner would and its answer is handed back to this shard.
    fn admit_all(&self) {
        let mut rest = Vec::new();
        for (to, msg) in self.mesh.take() {
            match msg {
                ShardMsg::Users(cmd) => self.chat.handle_users(cmd),
                other => rest.push((to, other)),
            }
        }
        for (to, msg) in self.mesh.take() {
            match msg {
                ShardMsg::Member(m) if to == 0 => self.chat.handle_member(m),
                other => rest.push((to, other)),
            }
        }
        self.mesh.sent.borrow_mut().extend(rest);
    }

    /// `member` joins `room` and its home admits it (the member is then in the room).
    fn joined(&self, member: &Rc<Member>, room: &str) {
        self.packet(member, &format!("42[\"join\",{{\"room\":\"{room}\"}}]"));
        let sent = self.mesh.take();
        assert!(
            matches!(&sent[..], [(_, ShardMsg::Home(HomeCmd::Join { .. }))]),
            "{sent:?}"
        );
        self.chat.handle_member(MemberMsg::Joined {
            room: Arc::from(room),
            conn: member.session().id,
            frame: bytes::Bytes::new(),
            admitted: true,
        });
        assert!(member.is_in(room));
    }
}

/// The text of every frame queued for `member`'s client, oldest first (taken).
fn frames(member: &Member) -> Vec<String> {
    let mut out = Vec::new();
    let mut queue = member.session().queue();
    while let Some(frame) = queue.pop() {
        assert_eq!(frame[0], 0x81, "a final text frame");
        let start = match frame[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        out.push(String::from_utf8(frame[start..].to_vec()).expect("utf-8"));
    }
    out
}

/// The error code of an ack frame `43<id>[{"ok":false,"error":{"code":…}}]` for `ack_id`.
fn error_code(frame: &str, ack_id: u64) -> String {
    let prefix = format!("43{ack_id}");
    let json = frame
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("an ack for {ack_id}: {frame}"));
    let v: serde_json::Value = serde_json::from_str(json).expect("json");
    assert_eq!(v[0]["ok"], false, "{frame}");
    v[0]["error"]["code"].as_str().expect("a code").to_string()
}

/// A room whose home is `shard` (of [`SHARDS`]).
fn room_on(shard: usize) -> String {
    (0..)
        .map(|i| format!("room-{i}"))
        .find(|r| home_of(r, SHARDS) == shard)
        .expect("a room")
}

/// No user limit: a CONNECT is admitted on the spot.
fn unlimited(c: &mut Config) {
    c.limits.max_connections_per_user = 0;
}

const PROTOCOL: Flow = Flow::Close(CloseReason::Protocol(close_code::PROTOCOL));

#[test]
fn dev_mode_connect_answers_with_a_socketio_sid() {
    on_glommio(|| async {
        let f = fixture(unlimited);
        let member = f.member();
        assert!(member.session().timers().connect_deadline.is_some());
        assert_eq!(f.packet(&member, r#"40{"user":"alice"}"#), Flow::Continue);
        let out = frames(&member);
        assert_eq!(out.len(), 1, "{out:?}");
        let v: serde_json::Value =
            serde_json::from_str(out[0].strip_prefix("40").expect("a CONNECT answer")).unwrap();
        let sid = v["sid"].as_str().expect("a sid");
        assert_eq!(sid.len(), 20);
        assert_ne!(
            sid,
            member.session().sid,
            "the Socket.IO sid is not the Engine.IO one"
        );
        assert_eq!(member.user().expect("connected").id.as_ref(), "alice");
        assert!(member.session().timers().connect_deadline.is_none());
        assert!(f.mesh.take().is_empty(), "no user count without a limit");
    });
}

#[test]
fn a_counted_connect_waits_for_the_user_owner() {
    on_glommio(|| async {
        let f = fixture(|_| {});
        let member = f.member();
        assert_eq!(f.packet(&member, r#"40{"user":"bob"}"#), Flow::Continue);
        // Nothing yet: the count goes to the user's owner shard first.
        assert!(frames(&member).is_empty());
        assert!(member.is_pending() && !member.is_connected());
        let sent = f.mesh.take();
        match &sent[..] {
            [(to, ShardMsg::Users(UserCmd::Acquire { user, conn }))] => {
                assert_eq!(*to, home_of("bob", SHARDS));
                assert_eq!(user.as_ref(), "bob");
                assert_eq!(conn.id, member.session().id);
            }
            other => panic!("{other:?}"),
        }
        // An event right behind it is held, not lost.
        let room = room_on(1);
        f.packet(&member, &format!("421[\"leave\",{{\"room\":\"{room}\"}}]"));
        assert!(frames(&member).is_empty());
        f.mesh.sent.borrow_mut().extend(sent);
        f.admit_all();
        let out = frames(&member);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out[0].starts_with("40{\"sid\":"), "{out:?}");
        assert_eq!(out[1], "431[{\"ok\":true}]");
        assert!(member.is_connected());
    });
}

#[test]
fn a_connect_to_another_namespace_is_refused() {
    on_glommio(|| async {
        let f = fixture(unlimited);
        let member = f.member();
        assert_eq!(f.packet(&member, "40/admin,"), Flow::Continue);
        let out = frames(&member);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out[0].starts_with("44/admin,"), "{out:?}");
        assert!(!member.is_connected());
    });
}

#[test]
fn an_event_before_connect_is_ignored() {
    on_glommio(|| async {
        let f = fixture(unlimited);
        let member = f.member();
        let room = room_on(0);
        for event in ["message", "join", "presence", "typing", "leave"] {
            let packet = format!("421[\"{event}\",{{\"room\":\"{room}\",\"text\":\"hi\"}}]");
            assert_eq!(f.packet(&member, &packet), Flow::Continue, "{event}");
        }
        assert!(frames(&member).is_empty());
        assert!(f.mesh.take().is_empty());
        assert!(!member.is_joining(&room));
    });
}

#[test]
fn a_message_to_a_room_not_joined_is_refused() {
    on_glommio(|| async {
        let f = fixture(unlimited);
        let member = f.connected("alice");
        let room = room_on(1);
        f.packet(
            &member,
            &format!("427[\"message\",{{\"room\":\"{room}\",\"text\":\"hi\"}}]"),
        );
        f.packet(&member, &format!("428[\"typing\",{{\"room\":\"{room}\"}}]"));
        f.packet(
            &member,
            &format!("429[\"presence\",{{\"room\":\"{room}\"}}]"),
        );
        f.packet(
            &member,
            &format!("4210[\"history\",{{\"room\":\"{room}\"}}]"),
        );
        let out = frames(&member);
        assert_eq!(out.len(), 4, "{out:?}");
        for (frame, id) in out.iter().zip(7..) {
            assert_eq!(error_code(frame, id), "not_joined");
        }
        assert!(f.mesh.take().is_empty());
    });
}

#[test]
fn join_goes_to_the_home_shard_and_marks_the_member_joining() {
    on_glommio(|| async {
        let f = fixture(unlimited);
        let member = f.connected("alice");
        for shard in 0..SHARDS {
            let room = room_on(shard);
            f.packet(
                &member,
                &format!("425[\"join\",{{\"room\":\"{room}\",\"since\":3}}]"),
            );
            let sent = f.mesh.take();
            match &sent[..] {
                [(
                    to,
                    ShardMsg::Home(HomeCmd::Join {
                        room: r,
                        conn,
                        user,
                        since,
                        ack_id,
                    }),
                )] => {
                    assert_eq!(*to, shard);
                    assert_eq!(r.as_ref(), room);
                    assert_eq!(*conn, member.conn_ref(0));
                    assert_eq!(user.id.as_ref(), "alice");
                    assert_eq!(*since, Some(3));
                    assert_eq!(*ack_id, Some(5));
                }
                other => panic!("{other:?}"),
            }
            assert!(member.is_joining(&room) && !member.is_in(&room));
        }
        assert!(frames(&member).is_empty(), "the home acks the join");
        // The home's answer makes it a member, and its ack frame is queued.
        let room: Arc<str> = Arc::from(room_on(1));
        f.chat.handle_member(MemberMsg::Joined {
            room: room.clone(),
            conn: member.session().id,
            frame: text_frame(b"435[{\"ok\":true}]"),
            admitted: true,
        });
        assert!(member.is_in(&room) && !member.is_joining(&room));
        assert_eq!(frames(&member), ["435[{\"ok\":true}]"]);
    });
}

#[test]
fn a_joined_member_sends_typing_and_presence_to_the_home() {
    on_glommio(|| async {
        let f = fixture(unlimited);
        let member = f.connected("alice");
        let room = room_on(1);
        f.joined(&member, &room);
        f.packet(
            &member,
            &format!("421[\"message\",{{\"room\":\"{room}\",\"text\":\"hi\",\"cid\":\"c1\"}}]"),
        );
        f.packet(&member, &format!("422[\"typing\",{{\"room\":\"{room}\"}}]"));
        f.packet(
            &member,
            &format!("423[\"presence\",{{\"room\":\"{room}\"}}]"),
        );
        let sent = f.mesh.take();
        assert_eq!(sent.len(), 3, "{sent:?}");
        assert!(sent.iter().all(|(to, _)| *to == 1));
        match &sent[0].1 {
            ShardMsg::Home(HomeCmd::Publish {
                text, cid, reply, ..
            }) => {
                assert_eq!(text, "hi");
                assert_eq!(cid.as_deref(), Some("c1"));
                assert!(
                    matches!(reply, ReplyTo::Conn { conn, ack_id: Some(1) } if *conn == member.conn_ref(0))
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&sent[1].1, ShardMsg::Home(HomeCmd::Typing { .. })));
        assert!(matches!(
            &sent[2].1,
            ShardMsg::Home(HomeCmd::Presence {
                reply: ReplyTo::Conn {
                    ack_id: Some(3),
                    ..
                },
                ..
            })
        ));
        // Only typing is acked here; the home acks the message and the presence.
        assert_eq!(frames(&member), ["432[{\"ok\":true}]"]);
    });
}

#[test]
fn sends_past_the_rate_limit_are_refused() {
    on_glommio(|| async {
        let f = fixture(|c| {
            unlimited(c);
            c.limits.send_burst = 2.0;
            c.limits.send_rate = 0.001;
        });
        let member = f.connected("alice");
        let room = room_on(0);
        f.joined(&member, &room);
        for id in 1..=3 {
            f.packet(
                &member,
                &format!("42{id}[\"message\",{{\"room\":\"{room}\",\"text\":\"m{id}\"}}]"),
            );
        }
        f.packet(&member, &format!("424[\"typing\",{{\"room\":\"{room}\"}}]"));
        let sent = f.mesh.take();
        assert_eq!(sent.len(), 2, "two sends fit the burst: {sent:?}");
        assert!(sent
            .iter()
            .all(|(to, m)| *to == 0 && matches!(m, ShardMsg::Home(HomeCmd::Publish { .. }))));
        let out = frames(&member);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(error_code(&out[0], 3), "rate_limited");
        assert_eq!(error_code(&out[1], 4), "rate_limited");
    });
}

#[test]
fn a_congested_mesh_refuses_new_work_and_drops_typing() {
    on_glommio(|| async {
        let f = fixture(unlimited);
        let member = f.connected("alice");
        let room = room_on(1);
        f.joined(&member, &room);
        let other = (0..)
            .map(|i| format!("other-{i}"))
            .find(|r| home_of(r, SHARDS) == 1)
            .expect("a room");
        f.mesh.congested.borrow_mut().push(1);
        let before = f.chat.stats().mesh_refusals.load(Relaxed);
        f.packet(
            &member,
            &format!("421[\"message\",{{\"room\":\"{room}\",\"text\":\"hi\"}}]"),
        );
        f.packet(&member, &format!("422[\"join\",{{\"room\":\"{other}\"}}]"));
        f.packet(
            &member,
            &format!("423[\"presence\",{{\"room\":\"{room}\"}}]"),
        );
        f.packet(&member, &format!("424[\"typing\",{{\"room\":\"{room}\"}}]"));
        assert!(f.mesh.take().is_empty(), "nothing crosses a congested mesh");
        let out = frames(&member);
        assert_eq!(out.len(), 4, "{out:?}");
        assert_eq!(error_code(&out[0], 1), "unavailable");
        assert_eq!(error_code(&out[1], 2), "unavailable");
        assert_eq!(error_code(&out[2], 3), "unavailable");
        assert_eq!(
            out[3], "434[{\"ok\":true}]",
            "typing is dropped, acked as taken"
        );
        assert!(!member.is_joining(&other), "a refused join leaves no trace");
        assert_eq!(f.chat.stats().mesh_refusals.load(Relaxed) - before, 4);
        // Uncongested, the same requests go through.
        f.mesh.congested.borrow_mut().clear();
        f.packet(&member, &format!("425[\"join\",{{\"room\":\"{other}\"}}]"));
        assert_eq!(f.mesh.take().len(), 1);
        assert!(member.is_joining(&other));
    });
}

#[test]
fn the_home_queue_of_this_shard_counts_as_congestion() {
    on_glommio(|| async {
        let f = fixture(|c| {
            unlimited(c);
            c.limits.mesh_outbox = 2;
        });
        let member = f.connected("alice");
        let room = room_on(0);
        f.joined(&member, &room);
        // The home is not running: what is queued for it stays queued.
        for _ in 0..2 {
            f.chat.home.enqueue(HomeCmd::Presence {
                room: Arc::from(room.as_str()),
                reply: ReplyTo::Conn {
                    conn: member.conn_ref(0),
                    ack_id: None,
                },
            });
        }
        assert!(f.chat.mesh_congested(0));
        assert!(
            !f.chat.mesh_congested(1),
            "the recorder says shard 1 is free"
        );
        f.packet(
            &member,
            &format!("421[\"message\",{{\"room\":\"{room}\",\"text\":\"hi\"}}]"),
        );
        assert_eq!(error_code(&frames(&member)[0], 1), "unavailable");
        assert!(f.mesh.take().is_empty());
    });
}

#[test]
fn binary_events_are_refused() {
    on_glommio(|| async {
        let f = fixture(unlimited);
        let member = f.connected("alice");
        let room = room_on(0);
        // No attachment announced: refused at once.
        assert_eq!(
            f.packet(
                &member,
                &format!("450-1[\"message\",{{\"room\":\"{room}\"}}]")
            ),
            Flow::Continue
        );
        // Two attachments: refused once both arrived.
        assert_eq!(
            f.packet(
                &member,
                &format!("452-2[\"message\",{{\"room\":\"{room}\"}},{{\"_placeholder\":true,\"num\":0}}]")
            ),
            Flow::Continue
        );
        let first = frames(&member);
        assert_eq!(first.len(), 1, "{first:?}");
        assert_eq!(error_code(&first[0], 1), "bad_request");
        assert_eq!(f.attachment(&member), Flow::Continue);
        assert!(frames(&member).is_empty(), "one attachment of two");
        assert_eq!(f.attachment(&member), Flow::Continue);
        let out = frames(&member);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(error_code(&out[0], 2), "bad_request");
        assert!(f.mesh.take().is_empty());
    });
}

#[test]
fn malformed_packets_close_the_connection() {
    on_glommio(|| async {
        let f = fixture(unlimited);
        let member = f.connected("alice");
        for bad in [
            "",
            "x",
            "9",
            "2not json",
            "2{\"not\":\"an array\"}",
            "2[1,2]",
            "0[\"user\"]",
        ] {
            assert_eq!(f.socketio(&member, bad.as_bytes()), PROTOCOL, "{bad:?}");
        }
        // A binary frame with no binary packet, and text while attachments are due.
        assert_eq!(f.attachment(&member), PROTOCOL);
        assert_eq!(f.packet(&member, "451-1[\"message\",{}]"), Flow::Continue);
        assert_eq!(f.packet(&member, "42[\"typing\",{}]"), PROTOCOL);
        assert!(frames(&member).is_empty());
        assert!(f.mesh.take().is_empty());
    });
}

#[test]
fn an_unknown_event_gets_an_error_ack_and_the_connection_goes_on() {
    on_glommio(|| async {
        let f = fixture(unlimited);
        let member = f.connected("alice");
        assert_eq!(f.packet(&member, "423[\"dance\",{}]"), Flow::Continue);
        assert_eq!(error_code(&frames(&member)[0], 3), "bad_request");
    });
}

#[test]
fn leaving_a_room_not_joined_is_acked_without_the_home() {
    on_glommio(|| async {
        let f = fixture(unlimited);
        let member = f.connected("alice");
        let room = room_on(1);
        f.packet(&member, &format!("426[\"leave\",{{\"room\":\"{room}\"}}]"));
        assert_eq!(frames(&member), ["436[{\"ok\":true}]"]);
        assert!(f.mesh.take().is_empty());
        // A room joined is left through its home, which acks.
        f.joined(&member, &room);
        f.packet(&member, &format!("427[\"leave\",{{\"room\":\"{room}\"}}]"));
        assert!(frames(&member).is_empty());
        let sent = f.mesh.take();
        assert!(
            matches!(
                &sent[..],
                [(
                    1,
                    ShardMsg::Home(HomeCmd::Leave {
                        ack_id: Some(7),
                        ..
                    })
                )]
            ),
            "{sent:?}"
        );
        assert!(!member.is_in(&room));
    });
}

#[test]
fn deliveries_reach_the_room_members_but_the_sender() {
    on_glommio(|| async {
        let f = fixture(unlimited);
        let alice = f.connected("alice");
        let bob = f.connected("bob");
        let carol = f.connected("carol");
        let room = room_on(1);
        f.joined(&alice, &room);
        f.joined(&bob, &room);
        f.chat.handle_member(MemberMsg::Deliver {
            room: Arc::from(room.as_str()),
            frame: text_frame(b"42[\"message\",{}]"),
            except: Some(alice.conn_ref(0)),
            volatile: false,
            sent_at: Instant::now(),
        });
        assert!(frames(&alice).is_empty(), "not to the sender");
        assert_eq!(frames(&bob), ["42[\"message\",{}]"]);
        assert!(frames(&carol).is_empty(), "not to a member of no room");
        // Disconnecting leaves the room through its home.
        assert_eq!(f.packet(&bob, "41"), Flow::Continue);
        assert!(!bob.is_connected());
        let sent = f.mesh.take();
        assert!(
            matches!(
                &sent[..],
                [(1, ShardMsg::Home(HomeCmd::Leave { ack_id: None, .. }))]
            ),
            "{sent:?}"
        );
        f.chat.handle_member(MemberMsg::Deliver {
            room: Arc::from(room.as_str()),
            frame: text_frame(b"42[\"message\",{}]"),
            except: None,
            volatile: false,
            sent_at: Instant::now(),
        });
        assert!(frames(&bob).is_empty());
        assert_eq!(frames(&alice).len(), 1);
    });
}

#[test]
fn an_emit_reaches_its_rooms_members_once_but_the_excepted_and_everyone_without_rooms() {
    use crate::chat::emits::EmitFrame;
    use crate::cluster::emitter::Emit;
    on_glommio(|| async {
        let f = fixture(unlimited);
        let (a, b, c) = (f.connected("a"), f.connected("b"), f.connected("c"));
        let unconnected = f.member();
        f.joined(&a, "news");
        f.joined(&b, "news");
        f.joined(&b, "vip");
        f.joined(&c, "ops");
        let emit = |rooms: &[&str], except: &[&str]| {
            EmitFrame::new(Emit {
                data: br#"["notice",1]"#.to_vec(),
                rooms: rooms.iter().map(|r| r.to_string()).collect(),
                except: except.iter().map(|r| r.to_string()).collect(),
                volatile: false,
            })
        };
        let notice = vec![r#"42["notice",1]"#.to_string()];
        f.chat.deliver_emit(&emit(&["news", "vip"], &[]));
        assert_eq!((frames(&a), frames(&b)), (notice.clone(), notice.clone()));
        assert!(frames(&c).is_empty());
        f.chat.deliver_emit(&emit(&["news", "ops"], &["vip"]));
        assert_eq!((frames(&a), frames(&c)), (notice.clone(), notice.clone()));
        assert!(frames(&b).is_empty());
        f.chat.deliver_emit(&emit(&[], &["ops"]));
        assert_eq!((frames(&a), frames(&b)), (notice.clone(), notice));
        assert!(frames(&c).is_empty() && frames(&unconnected).is_empty());
        assert_eq!(f.chat.stats().emitter_frames.load(Relaxed), 6);
    });
}
