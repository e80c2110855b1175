//! Logical stream ids that must not be bound again.
//!
//! A data stream for an id that was bound, or whose open was abandoned, can only be a
//! duplicate or a latecomer; remembering the id lets the machine refuse it at once instead
//! of holding it for the bind timeout. Memory stays bounded by forgetting the oldest ids.

use std::collections::{HashSet, VecDeque};

/// How many recently bound or abandoned logical stream ids are remembered.
pub(super) const RETIRED_IDS_REMEMBERED: usize = 4096;

/// Ids that must not be bound again, forgetting the oldest past a bound.
#[derive(Debug, Default)]
pub(super) struct RetiredIds {
    order: VecDeque<u64>,
    members: HashSet<u64>,
}

impl RetiredIds {
    pub(super) fn insert(&mut self, id: u64) {
        if self.members.insert(id) {
            self.order.push_back(id);
            if self.order.len() > RETIRED_IDS_REMEMBERED {
                if let Some(oldest) = self.order.pop_front() {
                    self.members.remove(&oldest);
                }
            }
        }
    }

    pub(super) fn contains(&self, id: u64) -> bool {
        self.members.contains(&id)
    }
}
