//! The core's invariants, checked after every event in tests.

use std::collections::BTreeSet;

use super::{INDEX_OVER, SchedulerCore, TaskId, TaskState, WorkerId, occupancy};

impl SchedulerCore {
    /// Checks every invariant; panics with a description of the first one broken.
    pub fn validate(&self) {
        let mut n = 0;
        let mut by_prefix = vec![[0u64; super::TASK_STATES.len()]; self.prefixes.len()];
        for (i, slot) in self.tasks.iter().enumerate() {
            let Some(task) = slot else { continue };
            n += 1;
            by_prefix[task.prefix as usize][task.state.index()] += 1;
            let t = TaskId(i as u32);
            let key = &task.key;
            assert_eq!(self.keys.get(key), Some(&t), "{key}: key index");
            // Counters.
            let active = task.dependents.iter().filter(|d| self.task(**d).state.is_active()).count() as u32;
            assert_eq!(task.active_dependents, active, "{key}: active_dependents");
            for d in task.dependencies.iter() {
                assert!(self.task(*d).dependents.contains(&t), "{key}: dependency link");
            }
            for d in &task.dependents {
                assert!(self.task(*d).dependencies.contains(&t), "{key}: dependent link");
            }
            match self.positions.get(&t) {
                Some(index) => {
                    assert!(task.dependents.len() > INDEX_OVER / 2, "{key}: an index for a short list");
                    assert_eq!(index.len(), task.dependents.len(), "{key}: index size");
                    for (d, p) in index {
                        assert_eq!(task.dependents.get(*p as usize), Some(d), "{key}: index position");
                    }
                }
                None => assert!(task.dependents.len() <= INDEX_OVER, "{key}: a long list without an index"),
            }
            for c in &task.who_wants {
                assert!(self.clients.get(c).is_some_and(|cl| cl.wants.contains(&t)), "{key}: who_wants vs client");
            }
            let wanted = !task.who_wants.is_empty();
            assert!(
                wanted || !task.dependents.is_empty(),
                "{key}: unwanted, no dependents, still here ({})",
                task.state.name()
            );
            let deps_in_memory =
                task.dependencies.iter().filter(|d| matches!(self.task(**d).state, TaskState::Memory { .. })).count()
                    as u32;
            if task.state.is_active() {
                assert!(wanted || task.active_dependents > 0, "{key}: {} but nobody needs it", task.state.name());
                for d in task.dependencies.iter() {
                    let s = &self.task(*d).state;
                    assert!(
                        matches!(s, TaskState::Memory { .. }) || s.is_active(),
                        "{key}: active with dependency in {}",
                        s.name()
                    );
                }
            }
            match &task.state {
                TaskState::Released => {
                    assert!(!wanted, "{key}: wanted but released");
                }
                TaskState::Waiting { remaining } => {
                    assert!(*remaining > 0, "{key}: waiting on nothing");
                    assert_eq!(*remaining, task.dependencies.len() as u32 - deps_in_memory, "{key}: remaining");
                }
                TaskState::Queued => {
                    let r = task.restrictions.as_ref();
                    assert!(
                        r.is_none_or(|r| !r.hard() && r.resources.is_empty()),
                        "{key}: queued (any worker takes it) but restricted to some"
                    );
                    assert_eq!(deps_in_memory as usize, task.dependencies.len(), "{key}: queued with deps missing");
                    assert!(self.queue.contains(self.queue_key(t)), "{key}: queued but not in queue");
                }
                TaskState::NoWorker => {
                    assert_eq!(deps_in_memory as usize, task.dependencies.len(), "{key}: no-worker with deps missing");
                    assert!(self.no_worker.contains(&t), "{key}: no-worker set");
                }
                TaskState::Processing { worker } => {
                    assert_eq!(deps_in_memory as usize, task.dependencies.len(), "{key}: processing with deps missing");
                    let w = self.workers.get(worker).unwrap_or_else(|| panic!("{key}: processing on unknown {worker}"));
                    assert!(w.processing.contains(&t), "{key}: not in worker's processing");
                }
                TaskState::Memory { who_has, .. } => {
                    assert!(!who_has.is_empty(), "{key}: memory without replicas");
                    assert!(wanted || task.active_dependents > 0, "{key}: memory but not needed");
                    for w in who_has {
                        let worker = self.workers.get(w).unwrap_or_else(|| panic!("{key}: held by unknown {w}"));
                        assert!(worker.has_what.contains(&t), "{key}: has_what");
                    }
                }
                TaskState::Erred { .. } => {}
            }
            if !matches!(task.state, TaskState::Queued) {
                assert!(!self.queue.contains(self.queue_key(t)), "{key}: in queue while {}", task.state.name());
            }
        }
        assert_eq!(n, self.keys.len(), "key index size");
        for (p, counted) in self.prefixes.iter().zip(&by_prefix) {
            assert_eq!(&p.now, counted, "a task prefix's counts by state");
        }
        assert_eq!(
            self.queue.len(),
            self.tasks.iter().flatten().filter(|t| matches!(t.state, TaskState::Queued)).count(),
            "queue size"
        );
        let expected: BTreeSet<(u64, WorkerId)> =
            self.workers.iter().filter(|(_, w)| w.open()).map(|(id, w)| (occupancy(w), *id)).collect();
        assert_eq!(self.by_occupancy, expected, "workers by occupancy");
        assert_eq!(self.by_address.len(), self.workers.len(), "address index");
        assert_eq!(self.by_name.len(), self.workers.len(), "name index");
        for (n, set) in &self.by_resource {
            assert!(!set.is_empty(), "an empty resource index for {n}");
            for id in set {
                assert!(self.workers.get(id).is_some_and(|w| w.resource(n).0 > 0.0), "{id} indexed for {n}");
            }
        }
        for (id, w) in self.workers.iter() {
            for (n, amount) in &w.spec.resources {
                assert_eq!(*amount > 0.0, self.by_resource.get(n).is_some_and(|s| s.contains(id)), "{id}: {n} index");
            }
        }
        for (id, w) in self.workers.iter() {
            assert_eq!(self.by_address.get(&w.spec.address), Some(id), "{id}: address index");
            assert_eq!(self.by_name.get(&w.spec.name), Some(id), "{id}: name index");
            for t in &w.processing {
                assert_eq!(self.task(*t).state, TaskState::Processing { worker: *id }, "{id}: processing set");
            }
            for t in &w.long_running {
                assert!(w.processing.contains(t), "{id}: a seceded task that is not processing there");
            }
            let mut bytes = 0;
            for t in &w.has_what {
                match &self.task(*t).state {
                    TaskState::Memory { who_has, nbytes } => {
                        assert!(who_has.contains(id), "{id}: has_what");
                        bytes += nbytes;
                    }
                    s => panic!("{id}: has_what lists a task in {}", s.name()),
                }
            }
            assert_eq!(bytes, w.nbytes, "{id}: nbytes");
        }
        for (c, client) in &self.clients {
            for t in &client.wants {
                assert!(self.task(*t).who_wants.contains(c), "{c}: wants");
            }
        }
        for t in &self.no_worker {
            assert_eq!(self.task(*t).state, TaskState::NoWorker);
            assert_eq!(self.res_waiting.contains(&self.queue_key(*t)), self.needs_resources(*t), "res_waiting");
        }
        assert!(self.res_waiting.len() <= self.no_worker.len(), "res_waiting size");
        // Resources: what each worker's tasks hold is what they need, never more than it has.
        for (id, w) in self.workers.iter() {
            let mut held = vec![0.0f64; w.spec.resources.len()];
            for t in &w.processing {
                if let Some(r) = &self.task(*t).restrictions {
                    for (n, amount) in r.resources.iter() {
                        let i = w.spec.resources.iter().position(|(x, _)| x == n);
                        let i =
                            i.unwrap_or_else(|| panic!("{id} runs {} needing {n}, which it lacks", self.task(*t).key));
                        held[i] += amount;
                    }
                }
            }
            for (i, (n, total)) in w.spec.resources.iter().enumerate() {
                assert!(
                    (held[i] - w.used[i]).abs() < 1e-6,
                    "{id}: {n} used {} but its tasks hold {}",
                    w.used[i],
                    held[i]
                );
                assert!(held[i] <= total + 1e-6, "{id}: {n} oversubscribed: {} of {total}", held[i]);
            }
        }
        self.validate_retirement();
        self.validate_steals();
        self.validate_copies();
    }
}
