//! Tasks ready to run that no worker has a free slot for, highest priority first, then in
//! submission order.
use std::cmp::Reverse;
use std::collections::BTreeSet;

use super::TaskId;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct QueueKey(Reverse<i32>, u64, TaskId);

impl QueueKey {
    pub fn new(priority: i32, order: u64, t: TaskId) -> Self {
        QueueKey(Reverse(priority), order, t)
    }

    pub fn task(&self) -> TaskId {
        self.2
    }
}

#[derive(Default)]
pub struct ReadyQueue(BTreeSet<QueueKey>);

impl ReadyQueue {
    pub fn push(&mut self, k: QueueKey) {
        self.0.insert(k);
    }
    pub fn remove(&mut self, k: QueueKey) -> bool {
        self.0.remove(&k)
    }
    pub fn peek(&self) -> Option<TaskId> {
        self.0.first().map(|k| k.2)
    }
    pub fn pop(&mut self) -> Option<TaskId> {
        self.0.pop_first().map(|k| k.2)
    }
    pub fn contains(&self, k: QueueKey) -> bool {
        self.0.contains(&k)
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Tasks in the order they would run.
    pub fn iter(&self) -> impl Iterator<Item = TaskId> + '_ {
        self.0.iter().map(|k| k.2)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
