//! A shard on its own (shard 0 of 2, no peer running): its sweeper, the congestion of its
//! mesh outboxes, and what its budget counts of what it sends.

use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use glommio::channels::local_channel::{self, LocalReceiver};

use super::*;
use crate::chat::handler::ChatHandler;
use crate::chat::home::{HomeLimits, HomeParts, Sequencer};
use crate::chat::mesh::{HomeCmd, ReplyTo, UserCmd};
use crate::config::Config;
use crate::ids::MessageIds;
use crate::transport::budget::{Queue, ShardBudget};
use crate::transport::engine;
use crate::transport::testing::{self, on_glommio};

/// Shard 0 of 2 with `config` adjusted by `tune`, and the receiving end of its outbox
/// toward shard 1 (nothing drains it). Its home does not run.
fn shard(tune: impl FnOnce(&mut Config)) -> (Rc<Shard>, LocalReceiver<ShardMsg>) {
    let mut config = Config::default();
    tune(&mut config);
    let ctx = Arc::new(testing::context(config));
    let metrics = ctx.metrics.clone();
    let store = Store::memory();
    let home = Home::new(HomeParts {
        shard: 0,
        count: 2,
        store: store.clone(),
        metrics,
        ids: MessageIds::new(7, 0),
        limits: HomeLimits::from_config(&ctx.config),
        sequencer: Sequencer::Local,
        feed: None,
        budget: Rc::new(ShardBudget::for_shard(0, &ctx.metrics, 0)),
    });
    let (tx, rx) = local_channel::new_unbounded::<ShardMsg>();
    let parts = ShardParts {
        id: 0,
        count: 2,
        ctx,
        store,
        home,
        handler: Rc::new(ChatHandler),
        outboxes: vec![None, Some(tx)],
        hooks: None,
    };
    (Rc::new_cyclic(|me| Shard::new(parts, me.clone())), rx)
}

/// The payloads of the text frames queued for a session (taken); a close frame as
/// `close <code>`.
fn queued(session: &Session) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(frame) = session.queue().pop() {
        out.push(match frame[0] {
            0x81 => String::from_utf8(frame[2..].to_vec()).expect("utf-8"),
            0x88 => format!("close {}", u16::from_be_bytes([frame[2], frame[3]])),
            other => panic!("an unexpected frame {other:#x}"),
        });
    }
    out
}

#[test]
fn the_sweeper_pings_and_ends_a_session_whose_pong_is_overdue() {
    on_glommio(|| async {
        let (shard, _rx) = shard(|c| {
            c.engineio.ping_interval = 40;
            c.engineio.ping_timeout = 40;
        });
        let silent = shard.open_session(Transport::Polling);
        let answering = shard.open_session(Transport::Polling);
        silent.connected();
        answering.connected();
        glommio::spawn_local(shard.clone().run_sweeper()).detach();
        // One client answers every ping it gets; the other never does.
        let host = shard.clone();
        let replier = answering.clone();
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(Duration::from_millis(5)).await;
                if queued(&replier).iter().any(|p| p == "2") {
                    engine::on_text(&*host, &replier, b"3".to_vec());
                }
            }
        })
        .detach();
        for _ in 0..200 {
            if shard.session_by_sid(&silent.sid).is_none() {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            shard.session_by_sid(&silent.sid).is_none(),
            "the silent session is gone"
        );
        assert_eq!(silent.closing(), Some(CloseReason::Timeout));
        assert_eq!(
            queued(&silent),
            ["2", "close 1000"],
            "a ping, then the close"
        );
        // The answering one lived through the same rounds.
        glommio::timer::sleep(Duration::from_millis(100)).await;
        assert!(shard.session_by_sid(&answering.sid).is_some());
        assert!(!answering.is_closing());
        assert_eq!(shard.session_count(), 1);
    });
}

#[test]
fn a_session_is_overdue_past_its_connect_or_pong_deadline_only() {
    on_glommio(|| async {
        let (shard, _rx) = shard(|_| {});
        let now = Instant::now();
        let session = shard.open_session(Transport::Polling);
        // Not connected yet, deadline ahead.
        assert!(!shard.end_if_overdue(&session, now));
        let deadline = session
            .timers()
            .connect_deadline
            .expect("a connect deadline");
        assert!(shard.end_if_overdue(&session, deadline));
        assert_eq!(session.closing(), Some(CloseReason::Timeout));
        assert!(shard.session_by_sid(&session.sid).is_none());

        let session = shard.open_session(Transport::WebSocket);
        session.connected();
        let mut t = session.timers();
        t.pong_deadline = Some(now + Duration::from_secs(1));
        session.set_timers(t);
        assert!(!shard.end_if_overdue(&session, now));
        assert!(shard.end_if_overdue(&session, now + Duration::from_secs(1)));
        // A WebSocket is forgotten by its own reader, once its socket task ends.
        assert!(shard.session_by_sid(&session.sid).is_some());
        assert!(session.is_closing());
        // A session already closing is not ended twice.
        assert!(!shard.end_if_overdue(&session, now + Duration::from_secs(2)));
    });
}

#[test]
fn an_outbox_past_mesh_outbox_is_congested() {
    on_glommio(|| async {
        let (shard, rx) = shard(|c| c.limits.mesh_outbox = 2);
        let release = || {
            ShardMsg::Users(UserCmd::Release {
                user: Arc::from("u"),
            })
        };
        assert!(!Mesh::congested(&*shard, 1));
        shard.send(1, release());
        assert!(!Mesh::congested(&*shard, 1));
        assert!(!shard.chat.mesh_congested(1));
        shard.send(1, release());
        assert!(Mesh::congested(&*shard, 1), "two queued, the limit is 2");
        let refusals = || shard.stats().mesh_refusals.load(Relaxed);
        assert_eq!(refusals(), 0);
        assert!(shard.chat.mesh_congested(1));
        assert_eq!(refusals(), 1, "a refusal is counted");
        // The queue still takes what follows from accepted work.
        shard.send(1, release());
        assert!(Mesh::congested(&*shard, 1));
        // Shard 0 is this one: no outbox; its home's own queue counts instead.
        assert!(!Mesh::congested(&*shard, 0));
        assert!(!shard.chat.mesh_congested(0));
        for _ in 0..2 {
            shard.send(
                0,
                ShardMsg::Home(HomeCmd::Presence {
                    room: Arc::from("r"),
                    reply: ReplyTo::Conn {
                        conn: crate::chat::member::ConnRef { shard: 0, id: 1 },
                        ack_id: None,
                    },
                }),
            );
        }
        assert_eq!(
            shard.chat.home.queued(),
            2,
            "handled in place: queued at home"
        );
        assert!(shard.chat.mesh_congested(0));
        // Drained, the outbox takes new work again.
        for _ in 0..3 {
            assert!(matches!(rx.recv().await, Some(ShardMsg::Users(_))));
        }
        assert!(!Mesh::congested(&*shard, 1));
    });
}

#[test]
fn what_a_shard_sends_counts_in_its_budget_until_taken() {
    on_glommio(|| async {
        let (shard, rx) = shard(|_| {});
        let budget = shard.chat.budget.clone();
        let frame = Bytes::from(vec![b'x'; 10_000]);
        let deliver = ShardMsg::Member(MemberMsg::Deliver {
            room: Arc::from("r"),
            frame,
            except: None,
            volatile: false,
            sent_at: Instant::now(),
        });
        let weight = deliver.weight();
        assert!(weight > 10_000);
        shard.send(1, deliver);
        assert_eq!(budget.queued(Queue::Mesh), weight);
        assert_eq!(budget.used(), weight);
        // Shard 1 takes it (its receiving task uncounts what the message weighs).
        let msg = rx.recv().await.expect("queued toward shard 1");
        shard.ctx.metrics.mesh_bytes[0].taken(msg.weight());
        assert_eq!(budget.used(), 0);

        // A command to this shard's own home counts in the home's queue while it waits
        // (the home does not run here).
        shard.send(
            0,
            ShardMsg::Home(HomeCmd::Publish {
                room: Arc::from("r"),
                user: Arc::from("u"),
                text: "y".repeat(5_000),
                cid: None,
                reply: ReplyTo::Conn {
                    conn: crate::chat::member::ConnRef { shard: 0, id: 1 },
                    ack_id: None,
                },
            }),
        );
        assert!(budget.queued(Queue::Home) > 5_000);
        assert_eq!(budget.queued(Queue::Mesh), 0);
    });
}
