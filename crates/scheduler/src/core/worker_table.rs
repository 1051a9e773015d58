//! Workers by id: a vector indexed by `WorkerId` (ids are dense and never reused), with the
//! part of `BTreeMap`'s interface the core uses, iterating in id order as a `BTreeMap` would. A
//! `BTreeMap` lookup at 10,000 workers walked four nodes, several lookups per task: the
//! scheduler's cost per task was twice what it is at 10 workers.
use std::ops::Index;

use super::{Worker, WorkerId};

#[derive(Default)]
pub(super) struct WorkerTable {
    slots: Vec<Option<(WorkerId, Worker)>>,
    len: usize,
    /// No live worker below this index (workers that left long ago are skipped cheaply).
    first: usize,
}

impl WorkerTable {
    pub(super) fn get(&self, id: &WorkerId) -> Option<&Worker> {
        self.slots.get(id.0 as usize)?.as_ref().map(|(_, w)| w)
    }

    pub(super) fn get_mut(&mut self, id: &WorkerId) -> Option<&mut Worker> {
        self.slots.get_mut(id.0 as usize)?.as_mut().map(|(_, w)| w)
    }

    pub(super) fn contains_key(&self, id: &WorkerId) -> bool {
        self.get(id).is_some()
    }

    pub(super) fn insert(&mut self, id: WorkerId, worker: Worker) {
        let i = id.0 as usize;
        if i >= self.slots.len() {
            self.slots.resize_with(i + 1, || None);
        }
        if self.slots[i].replace((id, worker)).is_none() {
            self.len += 1;
        }
        if self.len == 1 || i < self.first {
            self.first = i;
        }
    }

    pub(super) fn remove(&mut self, id: &WorkerId) -> Option<Worker> {
        let (_, w) = self.slots.get_mut(id.0 as usize)?.take()?;
        self.len -= 1;
        while self.first < self.slots.len() && self.slots[self.first].is_none() {
            self.first += 1;
        }
        Some(w)
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&WorkerId, &Worker)> {
        self.slots[self.first.min(self.slots.len())..].iter().flatten().map(|(id, w)| (id, w))
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (&WorkerId, &mut Worker)> {
        let first = self.first.min(self.slots.len());
        self.slots[first..].iter_mut().flatten().map(|(id, w)| (&*id, w))
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &WorkerId> {
        self.iter().map(|(id, _)| id)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Worker> {
        self.iter().map(|(_, w)| w)
    }

    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut Worker> {
        self.iter_mut().map(|(_, w)| w)
    }
}

impl Index<&WorkerId> for WorkerTable {
    type Output = Worker;

    fn index(&self, id: &WorkerId) -> &Worker {
        self.get(id).unwrap_or_else(|| panic!("no {id} in the worker table"))
    }
}
