//! Test helpers for the chat layer: a mesh that records what it is asked to send.

use std::cell::RefCell;

use super::home::Mesh;
use super::mesh::ShardMsg;

/// A mesh that keeps what it is asked to send; shards in `congested` refuse new work.
#[derive(Default)]
pub struct Recorder {
    pub sent: RefCell<Vec<(usize, ShardMsg)>>,
    pub congested: RefCell<Vec<usize>>,
}

impl Mesh for Recorder {
    fn send(&self, to: usize, msg: ShardMsg) {
        self.sent.borrow_mut().push((to, msg));
    }

    fn congested(&self, to: usize) -> bool {
        self.congested.borrow().contains(&to)
    }
}

impl Recorder {
    /// Everything sent so far, oldest first; the record starts again empty.
    pub fn take(&self) -> Vec<(usize, ShardMsg)> {
        std::mem::take(&mut *self.sent.borrow_mut())
    }

    /// How many messages were sent and not taken yet.
    pub fn len(&self) -> usize {
        self.sent.borrow().len()
    }
}
