//! A caller's (un)subscribe: the command sent on the subscriber connection, and the wait
//! for Redis to confirm it.

use futures::channel::oneshot;

use super::node::{NodeLink, Waiter};
use super::within;
use crate::cluster::{keys, ClusterError};

impl NodeLink {
    pub(super) async fn subscribe(&self, room: &str) -> Result<(), ClusterError> {
        if !self.sub.borrow_mut().rooms.insert(room.to_owned()) {
            // Wanted already: subscribed, or pending until the link is back.
            return match self.sub.borrow().writer {
                Some(_) => Ok(()),
                None => {
                    self.owed_reconnect.set(true);
                    Err(self.link_down(room))
                }
            };
        }
        let result = self.sub_commands(true, vec![keys::channel(room)]).await;
        match result {
            Err(ClusterError::Unavailable(_)) => {
                self.owed_reconnect.set(true);
                Err(self.link_down(room))
            }
            Err(e) if !e.is_transient() => {
                self.sub.borrow_mut().rooms.remove(room);
                Err(e)
            }
            other => other,
        }
    }

    pub(super) async fn unsubscribe(&self, room: &str) -> Result<(), ClusterError> {
        if !self.sub.borrow_mut().rooms.remove(room) {
            return Ok(());
        }
        if self.sub.borrow().writer.is_none() {
            return Ok(()); // Down: the next connect will not subscribe it.
        }
        self.sub_commands(false, vec![keys::channel(room)]).await
    }

    /// Sends one (un)subscribe command per channel (pipelined) and waits for every
    /// confirmation, within `command_timeout`.
    pub(super) async fn sub_commands(
        &self,
        subscribe: bool,
        channels: Vec<String>,
    ) -> Result<(), ClusterError> {
        let what = if subscribe {
            "subscribe"
        } else {
            "unsubscribe"
        };
        if channels.is_empty() {
            return Ok(());
        }
        let writer = self.sub.borrow().writer.clone();
        let Some(writer) = writer else {
            return Err(ClusterError::Unavailable(format!(
                "the pub/sub link to {} is down",
                self.name
            )));
        };
        let name = self.subscribe_command(subscribe);
        let limit = self.opts().command_timeout;
        let mut packed = Vec::new();
        let mut confirmations = Vec::with_capacity(channels.len());
        let mut w = writer.lock().await;
        {
            // Queued under the writer's lock: the waiters are in the order Redis answers.
            let mut sub = self.sub.borrow_mut();
            for channel in channels {
                redis::cmd(name)
                    .arg(&channel)
                    .write_packed_command(&mut packed);
                let (done, confirmed) = oneshot::channel();
                sub.waiting.push_back(Waiter {
                    subscribe,
                    channel,
                    done,
                });
                confirmations.push(confirmed);
            }
        }
        let sent = within(limit, w.send(&packed)).await;
        if sent.is_none() {
            // Part of a command may have gone out: nothing more can follow it. Closing our
            // side ends the link (or the probe does, when the server stalls), and it is set
            // up again. The close is bounded too: with TLS it writes a close_notify that a
            // stalled server may never make room for.
            let _ = within(limit, w.close()).await;
        }
        drop(w);
        match sent {
            None => return Err(self.timed_out(what)),
            Some(Err(e)) => {
                return Err(ClusterError::Unavailable(format!(
                    "redis at {}, {what}: {e}",
                    self.name
                )))
            }
            Some(Ok(())) => {}
        }
        let Some(answers) = within(limit, futures::future::join_all(confirmations)).await else {
            return Err(self.timed_out(what));
        };
        for answer in answers {
            match answer {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(oneshot::Canceled) => {
                    return Err(ClusterError::Unavailable(format!(
                        "lost the pub/sub connection to {} before it confirmed {what}",
                        self.name
                    )))
                }
            }
        }
        Ok(())
    }
}
