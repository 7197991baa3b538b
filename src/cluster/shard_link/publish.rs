//! A batch over the nodes: its rooms grouped by the node serving them, one script call
//! per node, all nodes at once; then, on a Redis Cluster, the rooms a node sent elsewhere
//! go again: `MOVED` (the map is read again, and the room follows the redirect meanwhile),
//! `ASK` (that room alone, after `ASKING`, to the node importing its slot), `TRYAGAIN`
//! (each room of the call alone, after a short pause, until the migration is done).

use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::commands::ScriptReply;
use super::node::NodeLink;
use super::router::{NodeKey, Router};
use crate::cluster::keys;
use crate::cluster::publish::{group_by_room, scatter, PublishCall, RoomMessages, RoomOutcome};
use crate::cluster::topology::{slot_of, NodeAddr, Redirect};
use crate::cluster::{ClusterError, NewMessage, Published};

/// Most rounds of redirects one batch follows (within half the command timeout, the
/// script's deadline, whichever comes first).
const MAX_ROUNDS: usize = 64;

/// Pause before sending again the rooms of a slot being migrated (`TRYAGAIN`).
const TRY_AGAIN_PAUSE: Duration = Duration::from_millis(25);

/// Where a batch's room goes next when the map is not enough.
#[derive(Clone)]
enum Detour {
    /// To this node (it said `MOVED` there), until the map says so too.
    Moved(NodeAddr),
    /// Alone, after `ASKING`, to this node.
    Ask(NodeAddr),
    /// Alone, to the node the map says.
    Alone,
}

/// The calls of one round: a node, whether `ASKING` goes first, and the groups it carries.
struct Planned {
    node: Rc<NodeLink>,
    asking: bool,
    groups: Vec<usize>,
}

impl Router {
    pub(super) async fn publish_batch(
        &self,
        msgs: Vec<(NewMessage, u64)>,
    ) -> Vec<Result<Published, ClusterError>> {
        let groups = group_by_room(&msgs);
        let mut outcomes: Vec<Option<RoomOutcome>> = (0..groups.len()).map(|_| None).collect();
        let cross_slot = self.is_cluster();
        let script = self.cluster.publish_script(cross_slot);
        let deadline = self.cluster.publish_deadline();
        let limit = self.cluster.options().command_timeout;
        let started = Instant::now();
        let mut detours: HashMap<usize, Detour> = HashMap::new();
        let rooms: Vec<&str> = groups
            .iter()
            .map(|(idx, _)| msgs[idx[0]].0.room.as_str())
            .collect();
        for _ in 0..MAX_ROUNDS {
            let pending: Vec<usize> = (0..groups.len())
                .filter(|&g| outcomes[g].is_none())
                .collect();
            if pending.is_empty() || started.elapsed() >= limit / 2 {
                break;
            }
            let plan = self.plan(&pending, &rooms, &detours, &mut outcomes);
            let calls = plan.into_iter().map(|p| {
                let call = PublishCall::new(
                    self.cluster.options(),
                    &script.sha,
                    p.node.publish_command(),
                    deadline,
                    !cross_slot || p.groups.len() == 1,
                    p.groups
                        .iter()
                        .map(|&g| RoomMessages {
                            group: g,
                            msgs: groups[g].0.iter().map(|&i| &msgs[i].0).collect(),
                            floor: groups[g].1,
                        })
                        .collect(),
                );
                async move {
                    let reply = if call.is_empty() {
                        ScriptReply::Reply(redis::Value::Nil)
                    } else {
                        Box::pin(p.node.run_script(&call.cmd, &script.source, p.asking)).await
                    };
                    (p, call, reply)
                }
            });
            let replies = futures::future::join_all(calls).await;
            let mut refresh = false;
            let mut pause = false;
            for (p, call, reply) in replies {
                match reply {
                    ScriptReply::Reply(value) => {
                        let target = p.node.name.clone();
                        for (g, outcome) in call.settle(value, &target, limit) {
                            outcomes[g] = Some(outcome);
                            detours.remove(&g);
                        }
                    }
                    ScriptReply::Failed(e) => {
                        for (g, outcome) in call.fail(&e) {
                            outcomes[g] = Some(outcome);
                        }
                    }
                    ScriptReply::Redirect(redirect) => {
                        let rooms = &rooms;
                        let of_slot = |slot: u16| {
                            p.groups.iter().copied().filter(move |&g| {
                                slot_of(keys::channel(rooms[g]).as_bytes()) == slot
                            })
                        };
                        match redirect {
                            Redirect::Moved(slot, to) => {
                                refresh = true;
                                for g in of_slot(slot) {
                                    detours.insert(g, Detour::Moved(to.clone()));
                                }
                            }
                            Redirect::Ask(slot, to) => {
                                for g in of_slot(slot) {
                                    detours.insert(g, Detour::Ask(to.clone()));
                                }
                            }
                            Redirect::NotLocal => {
                                refresh = true;
                                for &g in &p.groups {
                                    detours.entry(g).or_insert(Detour::Alone);
                                }
                            }
                            Redirect::TryAgain => {
                                pause = true;
                                for &g in &p.groups {
                                    detours.entry(g).or_insert(Detour::Alone);
                                }
                            }
                            Redirect::Down => {
                                let e = ClusterError::Unavailable(format!(
                                    "the redis cluster cannot serve these rooms now (CLUSTERDOWN at {}): a failover is under way",
                                    p.node.name
                                ));
                                for (g, outcome) in call.fail(&e) {
                                    outcomes[g] = Some(outcome);
                                }
                            }
                        }
                    }
                }
            }
            if refresh {
                if let Err(e) = Box::pin(self.refresh()).await {
                    tracing::debug!(error = %e, "reading the slot map after MOVED failed");
                }
            }
            if pause {
                glommio::timer::sleep(TRY_AGAIN_PAUSE).await;
            }
        }
        let outcomes = outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(ClusterError::Unavailable(format!(
                        "redis at {} kept redirecting the publish (a slot is moving); nothing was stored",
                        self.cluster.target()
                    )))
                })
            })
            .collect();
        scatter(msgs.len(), &groups, outcomes)
    }

    /// The calls for the `pending` groups: one per node for the rooms the map places, one
    /// per room for those with a detour. A room with no node now fails `unavailable`.
    fn plan(
        &self,
        pending: &[usize],
        rooms: &[&str],
        detours: &HashMap<usize, Detour>,
        outcomes: &mut [Option<RoomOutcome>],
    ) -> Vec<Planned> {
        let mut by_node: Vec<(NodeKey, Planned)> = Vec::new();
        let mut alone = Vec::new();
        for &g in pending {
            let detour = detours.get(&g);
            let placed = match detour {
                Some(Detour::Moved(to)) | Some(Detour::Ask(to)) => self
                    .cluster_node(to, false)
                    .map(|n| (NodeKey::Node(to.clone()), n)),
                Some(Detour::Alone) | None => self.node_for(rooms[g]),
            };
            let Some((key, node)) = placed else {
                outcomes[g] = Some(Err(ClusterError::Unavailable(format!(
                    "no redis node serves room {:?} now (redis at {} not reached yet, or a slot without a master)",
                    rooms[g],
                    self.cluster.target()
                ))));
                continue;
            };
            match detour {
                Some(Detour::Ask(_)) | Some(Detour::Alone) => alone.push(Planned {
                    node,
                    asking: matches!(detour, Some(Detour::Ask(_))),
                    groups: vec![g],
                }),
                _ => match by_node.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, p)) => p.groups.push(g),
                    None => by_node.push((
                        key,
                        Planned {
                            node,
                            asking: false,
                            groups: vec![g],
                        },
                    )),
                },
            }
        }
        by_node.into_iter().map(|(_, p)| p).chain(alone).collect()
    }
}
