//! Task state changes, the one place they happen, and the bookkeeping that follows them:
//! counters, indexes, reports to clients, releasing and forgetting what nobody needs.

use bytes::Bytes;

use super::Needs;
use super::{
    Command, Cx, DepLocation, FIRE_AND_FORGET, INDEX_OVER, InvalidTransition, NoticeLevel, Report, SchedulerCore, Task,
    TaskId, TaskState, WorkerId, occupancy, queue, story::log_key,
};

impl SchedulerCore {
    /// The one place task states change. Keeps every counter and index in step, and emits the
    /// commands.
    pub(super) fn transition(&mut self, t: TaskId, new: TaskState, cx: &mut Cx<'_>) {
        let old = std::mem::replace(&mut self.task_mut(t).state, TaskState::Released);
        let (from, to) = (old.name(), new.name());
        if !allowed(&old, &new) {
            // A bug in the core. Keep the old state rather than corrupt the counters.
            self.task_mut(t).state = old;
            let err = InvalidTransition { key: self.task(t).key.to_string(), from, to };
            debug_assert!(false, "{err}");
            tracing::error!("{err}");
            return;
        }
        // Leave the old state.
        match &old {
            TaskState::Queued => {
                self.queue.remove(self.queue_key(t));
            }
            TaskState::NoWorker => {
                self.no_worker.remove(&t);
                if self.needs_resources(t) {
                    self.res_waiting.remove(&self.queue_key(t));
                }
            }
            TaskState::Processing { worker } => {
                self.task_mut(t).started = false;
                self.forget_steal(t, cx);
                let needs = self.resources_of(t);
                if let Some(w) = self.workers.get_mut(worker) {
                    let before = occupancy(w);
                    w.processing.remove(&t);
                    w.long_running.remove(&t);
                    if let Some(needs) = needs {
                        w.hold(&needs, -1.0);
                    }
                    if w.open() {
                        self.by_occupancy.remove(&(before, *worker));
                        self.by_occupancy.insert((occupancy(w), *worker));
                    }
                    cx.freed.push(*worker);
                    if !matches!(new, TaskState::Memory { .. }) {
                        // Cancel the computation on the worker.
                        cx.out.push(Command::Free { worker: *worker, key: self.task(t).key.clone() });
                    }
                }
            }
            TaskState::Memory { who_has, nbytes } => {
                self.copies_lost(Some(t), None, cx);
                self.replicating.remove(&t);
                self.copy_failures.remove(&t);
                for w in who_has {
                    if let Some(worker) = self.workers.get_mut(w) {
                        worker.has_what.remove(&t);
                        worker.nbytes = worker.nbytes.saturating_sub(*nbytes);
                        cx.out.push(Command::Free { worker: *w, key: self.task(t).key.clone() });
                    }
                }
                // Dependents that were counting on this value wait for it again.
                let dependents = self.task(t).dependents.clone();
                for d in dependents {
                    match self.task(d).state {
                        TaskState::Waiting { .. } => {
                            if let TaskState::Waiting { remaining } = &mut self.task_mut(d).state {
                                *remaining += 1;
                            }
                        }
                        TaskState::Queued | TaskState::NoWorker | TaskState::Processing { .. } => {
                            self.set_state(d, TaskState::Waiting { remaining: 1 }, cx);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        let was_active = old.is_active();
        let is_active = new.is_active();
        if was_active != is_active {
            let deps = self.task(t).dependencies.clone();
            for d in deps.iter() {
                let dep = self.task_mut(*d);
                if is_active {
                    dep.active_dependents += 1;
                } else {
                    dep.active_dependents -= 1;
                    if dep.active_dependents == 0 {
                        cx.to_check.push(*d);
                    }
                }
            }
        }
        self.log_transition(t, from, to, cx);
        // Enter the new state.
        match &new {
            TaskState::Queued => self.queue.push(self.queue_key(t)),
            TaskState::NoWorker => {
                self.no_worker.insert(t);
                if self.needs_resources(t) {
                    self.res_waiting.insert(self.queue_key(t));
                    self.say_if_unrunnable(t, cx);
                }
            }
            TaskState::Processing { worker } => {
                let needs = self.resources_of(t);
                let w = self.workers.get_mut(worker).expect("processing on a known worker");
                let before = occupancy(w);
                w.processing.insert(t);
                if let Some(needs) = needs {
                    w.hold(&needs, 1.0);
                }
                let after = occupancy(w);
                if self.by_occupancy.remove(&(before, *worker)) {
                    self.by_occupancy.insert((after, *worker));
                }
                let task = self.task(t);
                let deps = task
                    .dependencies
                    .iter()
                    .map(|d| {
                        let dep = self.task(*d);
                        let TaskState::Memory { nbytes, who_has } = &dep.state else {
                            unreachable!("processing task with a dependency not in memory")
                        };
                        DepLocation {
                            key: dep.key.clone(),
                            workers: who_has.iter().map(|w| self.workers[w].spec.address.clone()).collect(),
                            nbytes: *nbytes,
                        }
                    })
                    .collect();
                cx.out.push(Command::Compute {
                    worker: *worker,
                    key: task.key.clone(),
                    spec: Bytes::copy_from_slice(&task.spec),
                    deps,
                    priority: task.priority,
                    inline: task.who_wants.iter().any(|c| !c.is_holder()),
                    announce: task.orphaned || task.suspicious > 0,
                    resources: task.restrictions.as_ref().map_or_else(Vec::new, |r| r.resources.to_vec()),
                });
            }
            TaskState::Memory { nbytes, who_has } => {
                for w in who_has {
                    let worker = self.workers.get_mut(w).expect("memory on a known worker");
                    worker.has_what.insert(t);
                    worker.nbytes += nbytes;
                }
            }
            _ => {}
        }
        let prefix = self.task(t).prefix as usize;
        let p = &mut self.prefixes[prefix];
        let (from, to) = (old.index(), new.index());
        p.now[from] -= 1;
        p.now[to] += 1;
        // A move between workers (a steal) is no new state, as in dask.
        if from != to {
            p.entered[to] += 1;
        }
        self.task_mut(t).state = new;
    }

    /// Changes a task's state ([`Self::transition`]), then tells the clients that want it and
    /// wakes or fails its dependents.
    pub(super) fn set_state(&mut self, t: TaskId, new: TaskState, cx: &mut Cx<'_>) {
        self.transition(t, new, cx);
        match &self.task(t).state {
            TaskState::Memory { .. } => {
                self.report_to_wanters(t, cx);
                let dependents = self.task(t).dependents.clone();
                for d in dependents {
                    if let TaskState::Waiting { remaining } = &mut self.task_mut(d).state {
                        *remaining -= 1;
                        if *remaining == 0 {
                            self.schedule(d, cx);
                        }
                    }
                }
                if self.task(t).who_wants.is_empty() && self.task(t).active_dependents == 0 {
                    cx.to_check.push(t);
                }
            }
            TaskState::Erred { error } => {
                let error = error.clone();
                self.report_to_wanters(t, cx);
                // Dependents fail with the same cause; iterative, as chains can be long.
                let mut stack: Vec<TaskId> = self.task(t).dependents.to_vec();
                while let Some(d) = stack.pop() {
                    if self.task(d).state.is_active() {
                        self.transition(d, TaskState::Erred { error: error.clone() }, cx);
                        self.report_to_wanters(d, cx);
                        stack.extend(self.task(d).dependents.iter().copied());
                    }
                }
            }
            _ => {}
        }
    }

    pub(super) fn add_replica(&mut self, t: TaskId, w: WorkerId) {
        // The task's recorded size, whatever the new holder measured: `set_state` subtracts
        // this one when the value is released.
        let TaskState::Memory { who_has, nbytes } = &mut self.task_mut(t).state else {
            return;
        };
        let nbytes = *nbytes;
        if !who_has.contains(&w) {
            who_has.push(w);
            let worker = self.workers.get_mut(&w).expect("known worker");
            worker.has_what.insert(t);
            worker.nbytes += nbytes;
        }
    }

    pub(super) fn report_of(&self, t: TaskId, cx: &Cx<'_>) -> Option<Report> {
        match &self.task(t).state {
            TaskState::Memory { nbytes, who_has } => Some(Report::Memory {
                value: match &cx.inline {
                    Some((k, v)) if *k == self.task(t).key => Some(v.clone()),
                    _ => None,
                },
                nbytes: *nbytes,
                workers: who_has.iter().map(|w| self.workers[w].spec.address.clone()).collect(),
            }),
            TaskState::Erred { error } if error.kind == "lost" => Some(Report::Lost(error.message.clone())),
            TaskState::Erred { error } => Some(Report::Erred(error.clone())),
            _ => None,
        }
    }

    pub(super) fn report_to_wanters(&mut self, t: TaskId, cx: &mut Cx<'_>) {
        let task = self.task(t);
        if task.who_wants.is_empty() {
            return;
        }
        let mut forget = false;
        if let Some(report) = self.report_of(t, cx) {
            for &client in &task.who_wants {
                if client == FIRE_AND_FORGET {
                    forget = true;
                } else if !client.is_holder() {
                    cx.out.push(Command::Report { client, key: task.key.clone(), report: report.clone() });
                }
            }
        }
        if forget {
            self.client_release(FIRE_AND_FORGET, t, cx);
        }
    }

    /// Releases and forgets what is no longer needed, after an event's main work.
    pub(super) fn settle(&mut self, cx: &mut Cx<'_>) {
        while let Some(t) = cx.to_check.pop() {
            let Some(task) = self.tasks.slot(t.0).as_ref() else {
                continue;
            };
            if !task.who_wants.is_empty() || task.active_dependents > 0 {
                continue;
            }
            match task.state {
                TaskState::Memory { .. } => self.set_state(t, TaskState::Released, cx),
                ref s if s.is_active() => self.set_state(t, TaskState::Released, cx),
                _ => {}
            }
            if self.task(t).dependents.is_empty() {
                self.forget(t, cx);
            }
        }
    }

    pub(super) fn forget(&mut self, t: TaskId, cx: &mut Cx<'_>) {
        let task = self.tasks.slot_mut(t.0).take().expect("forget a live task");
        self.prefixes[task.prefix as usize].now[task.state.index()] -= 1;
        debug_assert!(!task.state.is_active() && !matches!(task.state, TaskState::Memory { .. }));
        if self.config.log_len > 0 {
            self.push_log(log_key(&task.key), task.state.name(), "forgotten", cx);
        }
        if self.feed {
            let (key, from) = (task.key.clone(), task.state.name());
            cx.out.push(Command::Feed(super::Feed::Transition { key, from, to: "forgotten" }));
        }
        self.keys.remove(&task.key);
        self.free_ids.push(t.0);
        self.positions.remove(&t);
        for &d in task.dependencies.iter() {
            if self.remove_dependent(d, t) {
                cx.to_check.push(d);
            }
        }
    }

    /// Adds `t` to `dep`'s dependents (indexed once the list is long).
    pub(super) fn add_dependent(&mut self, dep: TaskId, t: TaskId) {
        let list = &mut self.tasks.slot_mut(dep.0).as_mut().expect("live task").dependents;
        list.push(t);
        // A list that shrank to 33..=64 keeps its index (see `remove_dependent`): it must learn
        // of every new dependent too, not only of those past the threshold.
        if let Some(index) = self.positions.get_mut(&dep) {
            index.insert(t, (list.len() - 1) as u32);
        } else if list.len() > INDEX_OVER {
            self.positions.insert(dep, list.iter().enumerate().map(|(i, d)| (*d, i as u32)).collect());
        }
    }

    /// Takes `t` out of `dep`'s dependents; returns whether none are left.
    pub(super) fn remove_dependent(&mut self, dep: TaskId, t: TaskId) -> bool {
        let list = &mut self.tasks.slot_mut(dep.0).as_mut().expect("live task").dependents;
        let index = self.positions.get_mut(&dep);
        let pos = match &index {
            Some(index) => index.get(&t).map(|p| *p as usize),
            None => list.iter().position(|x| *x == t),
        };
        debug_assert!(pos.is_some(), "removing a dependent that is not in the list");
        if let Some(pos) = pos {
            list.swap_remove(pos);
            if let Some(index) = index {
                index.remove(&t);
                if let Some(moved) = list.get(pos) {
                    index.insert(*moved, pos as u32);
                }
            }
        }
        // Dropped well below the threshold only, so a list hovering at it is not re-indexed
        // on every change.
        if list.len() <= INDEX_OVER / 2 {
            self.positions.remove(&dep);
        }
        list.is_empty()
    }

    pub(super) fn insert(&mut self, task: Task) -> TaskId {
        let key = task.key.clone();
        self.prefixes[task.prefix as usize].now[task.state.index()] += 1;
        let id = match self.free_ids.pop() {
            Some(i) => {
                *self.tasks.slot_mut(i) = Some(task);
                TaskId(i)
            }
            None => TaskId(self.tasks.push(task)),
        };
        self.keys.insert(key, id);
        id
    }

    pub(super) fn task(&self, t: TaskId) -> &Task {
        self.tasks.slot(t.0).as_ref().expect("live task")
    }

    pub(super) fn task_mut(&mut self, t: TaskId) -> &mut Task {
        self.tasks.slot_mut(t.0).as_mut().expect("live task")
    }

    /// Whether `t` needs resources to run.
    pub(super) fn needs_resources(&self, t: TaskId) -> bool {
        self.task(t).restrictions.as_ref().is_some_and(|r| !r.resources.is_empty())
    }

    /// The resources `t` holds while it runs, if any.
    fn resources_of(&self, t: TaskId) -> Option<Needs> {
        self.task(t).restrictions.as_ref().filter(|r| !r.resources.is_empty()).map(|r| r.resources.clone())
    }

    /// Whether a connected worker that is not leaving could ever run `t` (its names allow, and
    /// it has what `t` needs, free or not).
    pub(super) fn could_run_somewhere(&self, t: TaskId) -> bool {
        let live = |w: &super::Worker| !w.closing;
        match &self.task(t).restrictions {
            None => self.workers.values().any(live),
            Some(r) if !r.resources.is_empty() => {
                let first = &r.resources[0].0;
                self.by_resource
                    .get(first)
                    .into_iter()
                    .flatten()
                    .filter_map(|id| self.workers.get(id))
                    .any(|w| live(w) && (!r.hard() || r.names(w)) && w.has_total(&r.resources))
            }
            Some(r) if r.hard() => self.named_workers(&r.workers).any(|id| self.workers.get(&id).is_some_and(live)),
            Some(_) => self.workers.values().any(live),
        }
    }

    /// What `t` needs, as `GPU=2 MEM=1e9`.
    pub(super) fn needs_text(&self, t: TaskId) -> String {
        let Some(r) = &self.task(t).restrictions else { return String::new() };
        r.resources.iter().map(|(n, a)| format!("{n}={a}")).collect::<Vec<_>>().join(" ")
    }

    /// Logs (once per set of needs until a worker joins) that no connected worker has what `t`
    /// needs: it waits until one that has joins.
    fn say_if_unrunnable(&mut self, t: TaskId, cx: &mut Cx<'_>) {
        if self.could_run_somewhere(t) {
            return;
        }
        let needs = self.needs_text(t);
        if self.unrunnable_said.insert(needs.clone()) {
            let message = format!(
                "task {} needs {needs}, which no connected worker has; it waits for a worker with those \
                 resources (dask-worker --resources \"{needs}\")",
                self.task(t).key
            );
            cx.out.push(Command::Notice { level: NoticeLevel::Warn, message });
        }
    }

    pub(super) fn queue_key(&self, t: TaskId) -> queue::QueueKey {
        let task = self.task(t);
        queue::QueueKey::new(task.priority, task.order, t)
    }
}

/// Which state changes make sense. Anything else is a bug.
fn allowed(old: &TaskState, new: &TaskState) -> bool {
    use TaskState::*;
    match (old, new) {
        (Released, Waiting { .. } | Queued | NoWorker | Processing { .. } | Erred { .. } | Memory { .. }) => true,
        (Waiting { .. }, Queued | NoWorker | Processing { .. } | Released | Erred { .. } | Memory { .. }) => true,
        (Queued, Processing { .. } | NoWorker | Waiting { .. } | Released | Erred { .. } | Memory { .. }) => true,
        (NoWorker, Processing { .. } | Queued | Waiting { .. } | Released | Erred { .. } | Memory { .. }) => true,
        (Processing { .. }, Memory { .. } | Released | Waiting { .. } | Erred { .. } | Queued | NoWorker) => true,
        (Processing { worker: a }, Processing { worker: b }) => a != b,
        (Memory { .. }, Released | Erred { .. }) => true,
        (Erred { .. }, Released | Memory { .. }) => true,
        _ => false,
    }
}
