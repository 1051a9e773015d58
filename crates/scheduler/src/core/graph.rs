//! What clients ask: new graphs, wanting and releasing keys, scattered values; and
//! `compute`, which sets a released task (and what it needs) on its way.

use std::sync::Arc;
use std::time::Duration;

use rustc_hash::{FxHashMap, FxHashSet};
use smallvec::SmallVec;
use thin_vec::ThinVec;

use super::{
    ClientId, Command, Cx, FIRE_AND_FORGET, Key, NewTask, Report, Restrictions, SchedulerCore, Task, TaskError, TaskId,
    TaskState, WorkerId,
};

/// Where each task of a batch sits in it.
enum BatchIndex {
    Dense { first: u32, pos: Vec<u32> },
    Sparse(FxHashMap<TaskId, usize>),
}

impl BatchIndex {
    fn new(ids: impl Iterator<Item = TaskId> + Clone) -> Self {
        let (mut lo, mut hi, mut n) = (u32::MAX, 0u32, 0usize);
        for t in ids.clone() {
            lo = lo.min(t.0);
            hi = hi.max(t.0);
            n += 1;
        }
        if n > 0 && ((hi - lo) as usize) < 4 * n {
            let mut pos = vec![u32::MAX; (hi - lo) as usize + 1];
            for (i, t) in ids.enumerate() {
                pos[(t.0 - lo) as usize] = i as u32;
            }
            BatchIndex::Dense { first: lo, pos }
        } else {
            BatchIndex::Sparse(ids.enumerate().map(|(i, t)| (t, i)).collect())
        }
    }

    fn get(&self, t: TaskId) -> Option<usize> {
        match self {
            BatchIndex::Dense { first, pos } => {
                let p = *pos.get(t.0.checked_sub(*first)? as usize)?;
                (p != u32::MAX).then_some(p as usize)
            }
            BatchIndex::Sparse(m) => m.get(&t).copied(),
        }
    }
}

/// Amounts of a resource named twice are added up (`GPU=1 GPU=1` is `GPU=2`).
pub(super) fn merge_resources(mut r: Vec<(Arc<str>, f64)>) -> Vec<(Arc<str>, f64)> {
    let mut merged: Vec<(Arc<str>, f64)> = Vec::with_capacity(r.len());
    for (n, a) in r.drain(..) {
        match merged.iter_mut().find(|(m, _)| *m == n) {
            Some((_, total)) => *total += a,
            None => merged.push((n, a)),
        }
    }
    merged
}

impl SchedulerCore {
    pub(super) fn update_graph(
        &mut self,
        client: ClientId,
        tasks: Vec<NewTask>,
        wants: Vec<Key>,
        fifo_timeout: Duration,
        cx: &mut Cx<'_>,
    ) {
        // dask's generations: graphs a client sends within `fifo_timeout` of the start of its
        // current generation are ordered within it (first in, first out); later, a new
        // generation begins, after everything submitted before by anyone. A client submitting
        // without pause still moves on every `fifo_timeout` (as dask's does), so it cannot keep
        // others' later work waiting.
        let c = self.clients.entry(client).or_default();
        let n = tasks.len() as u64;
        if c.generation_began.is_none_or(|t| cx.now.saturating_duration_since(t) > fifo_timeout)
            || c.next_position + n >= 1 << 32
        {
            self.next_generation += 1;
            c.generation = self.next_generation;
            c.generation_began = Some(cx.now);
            c.next_position = 0;
        }
        let base = (c.generation << 32) | c.next_position;
        c.next_position += n;
        // Pass 1: records for the keys we do not know yet.
        let mut created: Vec<(TaskId, Vec<Key>)> = Vec::new();
        let mut bad_resources: Vec<(TaskId, String)> = Vec::new();
        for nt in tasks {
            if self.keys.contains_key(&nt.key) {
                continue; // same key: pure submissions share one task
            }
            let prefix = self.prefix_of(&nt.key);
            let mut resources = merge_resources(nt.resources);
            let bad_amount = resources
                .iter()
                .find(|(_, a)| !(a.is_finite() && *a >= 0.0))
                .map(|(n, a)| format!("resource {n} = {a} is not a number of zero or more"));
            resources.retain(|(_, amount)| *amount > 0.0);
            let restrictions = (!nt.workers.is_empty() || !resources.is_empty()).then(|| {
                Box::new(Restrictions {
                    workers: nt.workers.into_boxed_slice(),
                    loose: nt.allow_other_workers,
                    resources: resources.into_boxed_slice(),
                })
            });
            let order = self.next_order;
            self.next_order += 1;
            let id = self.insert(Task {
                key: nt.key,
                state: TaskState::Released,
                spec: nt.spec,
                dependencies: Box::new([]),
                dependents: ThinVec::new(),
                active_dependents: 0,
                who_wants: SmallVec::new(),
                priority: nt.priority,
                order,
                prefix,
                retries: nt.retries,
                suspicious: 0,
                started: false,
                orphaned: false,
                restrictions,
            });
            if let Some(why) = bad_amount {
                bad_resources.push((id, why));
            }
            created.push((id, nt.dependencies));
        }
        // Pass 2: link dependencies (they may come later in the batch).
        let mut bad: Vec<(TaskId, String)> = bad_resources;
        for (id, deps) in &created {
            if self.task(*id).spec.is_empty() {
                bad.push((*id, "the task has no function (empty spec); submit it with a registered function".into()));
            }
            let mut ids: Vec<TaskId> = Vec::with_capacity(deps.len());
            for d in deps {
                match self.keys.get(d) {
                    Some(&dep) if dep != *id => ids.push(dep),
                    Some(_) => bad.push((*id, format!("task depends on itself ({d:?})"))),
                    None => bad.push((
                        *id,
                        format!(
                            "dependency {d:?} is not a known key: submit it in the same graph, or keep its future alive"
                        ),
                    )),
                }
            }
            // A key listed twice is one dependency (sorting keeps this linear-ish for huge fan-ins).
            ids.sort_unstable();
            ids.dedup();
            for &dep in &ids {
                self.add_dependent(dep, *id);
            }
            self.task_mut(*id).dependencies = ids.into_boxed_slice();
        }
        self.order_depth_first(&created, base);
        // Cycles can only run through new tasks (old ones cannot depend on new ones).
        for id in self.find_cycles(created.iter().map(|(id, _)| *id)) {
            bad.push((id, "the graph has a cycle through this task".to_string()));
        }
        // An invalid task errs once (it may both miss a dependency and lie on a cycle), and
        // drops its dependency edges: otherwise the members of a cycle would keep each other
        // alive (each has a dependent) after every client released them.
        let mut seen: FxHashSet<TaskId> = FxHashSet::default();
        for (id, why) in bad {
            if !seen.insert(id) {
                continue;
            }
            // Still released, so no `active_dependents` counts change.
            let deps = std::mem::take(&mut self.task_mut(id).dependencies);
            for &d in deps.iter() {
                if self.remove_dependent(d, id) {
                    cx.to_check.push(d);
                }
            }
            let err = TaskError::raised_here(&self.task(id).key, "invalid-graph", why, "");
            self.set_state(id, TaskState::Erred { error: err }, cx);
        }
        // Everything wanted is set on its way in one walk, so that free slots go to the most
        // urgent tasks of the whole batch, not to those of the first key wanted.
        let mut roots = Vec::new();
        for key in wants {
            match self.keys.get(&key) {
                Some(&t) => {
                    if self.want_only(t, client, cx) {
                        roots.push(t);
                    }
                }
                None => cx.out.push(Command::Report {
                    client,
                    key,
                    report: Report::Lost("the scheduler does not know this key".into()),
                }),
            }
        }
        self.compute_all(roots, cx);
        // Cull what nobody asked for.
        for (id, _) in created {
            if self.tasks.slot(id.0).is_some() {
                cx.to_check.push(id);
            }
        }
    }

    /// Orders a batch of new tasks depth first towards its outputs, as `dask.order` aims: each
    /// output's inputs come just before it (post-order from the outputs, inputs in submission
    /// order), so a reduction consumes its inputs as they are made instead of every leaf being
    /// made first. Orders are `base` (the generation) plus the position: ties of user priority
    /// are broken by generation, then by this order.
    fn order_depth_first(&mut self, created: &[(TaskId, Vec<Key>)], base: u64) {
        // Independent tasks (a `map`) keep their submission order: nothing to walk.
        if created.iter().all(|(_, deps)| deps.is_empty()) {
            for (i, (t, _)) in created.iter().enumerate() {
                self.task_mut(*t).order = base + i as u64;
            }
            return;
        }
        // Position in the batch by task id: a dense table over the ids' range (a fresh batch's
        // ids are mostly consecutive slots), else a map.
        let index = BatchIndex::new(created.iter().map(|(t, _)| *t));
        // Outputs: new tasks no new task depends on.
        let mut used = vec![false; created.len()];
        for (t, _) in created {
            for d in self.task(*t).dependencies.iter() {
                if let Some(i) = index.get(*d) {
                    used[i] = true;
                }
            }
        }
        let mut visited = vec![false; created.len()];
        let mut order: Vec<TaskId> = Vec::with_capacity(created.len());
        let mut stack: Vec<(TaskId, usize)> = Vec::new();
        for (i, (root, _)) in created.iter().enumerate() {
            if used[i] || visited[i] {
                continue;
            }
            visited[i] = true;
            stack.push((*root, 0));
            while let Some((t, next)) = stack.last_mut() {
                let deps = &self.task(*t).dependencies;
                // The next new, unvisited input (dependencies are sorted by id; submission order
                // among them is their index in the batch).
                let mut found = None;
                while *next < deps.len() {
                    let d = deps[*next];
                    *next += 1;
                    if let Some(j) = index.get(d)
                        && !visited[j]
                    {
                        found = Some((d, j));
                        break;
                    }
                }
                match found {
                    Some((d, j)) => {
                        visited[j] = true;
                        stack.push((d, 0));
                    }
                    None => {
                        order.push(*t);
                        stack.pop();
                    }
                }
            }
        }
        // Members of a cycle (erred below) keep their submission order, after the rest.
        order.extend(created.iter().enumerate().filter(|(i, _)| !visited[*i]).map(|(_, (t, _))| *t));
        for (i, t) in order.into_iter().enumerate() {
            self.task_mut(t).order = base + i as u64;
        }
    }

    /// Tasks among `new` that lie on a cycle (Kahn's algorithm over the new tasks only).
    pub(super) fn find_cycles(&self, new: impl Iterator<Item = TaskId>) -> Vec<TaskId> {
        let new: Vec<TaskId> = new.collect();
        let set: FxHashSet<TaskId> = new.iter().copied().collect();
        let mut indeg: FxHashMap<TaskId, u32> = FxHashMap::default();
        for &t in &new {
            let n = self.task(t).dependencies.iter().filter(|d| set.contains(d)).count();
            indeg.insert(t, n as u32);
        }
        let mut stack: Vec<TaskId> = indeg.iter().filter(|(_, n)| **n == 0).map(|(t, _)| *t).collect();
        while let Some(t) = stack.pop() {
            indeg.remove(&t);
            for d in &self.task(t).dependents {
                if let Some(n) = indeg.get_mut(d) {
                    *n -= 1;
                    if *n == 0 {
                        stack.push(*d);
                    }
                }
            }
        }
        indeg.into_keys().collect()
    }

    pub(super) fn want(&mut self, t: TaskId, client: ClientId, cx: &mut Cx<'_>) {
        if self.want_only(t, client, cx) {
            self.compute(t, cx);
        }
    }

    /// Records that `client` wants `t` and tells it what is known; returns whether `t` is
    /// released (to be computed).
    fn want_only(&mut self, t: TaskId, client: ClientId, cx: &mut Cx<'_>) -> bool {
        if client == FIRE_AND_FORGET && matches!(self.task(t).state, TaskState::Memory { .. } | TaskState::Erred { .. })
        {
            return false; // already done: nothing to keep alive
        }
        let c = self.clients.entry(client).or_default();
        // Wanting a key again is how a client asks where it is now (its holder may have gone):
        // it gets the current report.
        if c.wants.insert(t) {
            self.task_mut(t).who_wants.push(client);
        }
        match &self.task(t).state {
            TaskState::Memory { .. } | TaskState::Erred { .. } => {
                if !client.is_holder()
                    && let Some(report) = self.report_of(t, cx)
                {
                    cx.out.push(Command::Report { client, key: self.task(t).key.clone(), report });
                }
                false
            }
            TaskState::Released => true,
            _ => false,
        }
    }

    pub(super) fn client_release(&mut self, client: ClientId, t: TaskId, cx: &mut Cx<'_>) {
        if let Some(c) = self.clients.get_mut(&client)
            && c.wants.remove(&t)
        {
            self.unwant(t, client, cx);
        }
    }

    /// dask's `cancel`: each key is released for `client`, which hears `cancelled`. If no other
    /// client wants it (or with `force`), everything downstream of it is cancelled too: each
    /// wanted dependent is released for the clients that want it (all of them with `force`;
    /// otherwise only `client`, and only if no one else wants it), and they hear why.
    pub(super) fn cancel(
        &mut self,
        client: ClientId,
        keys: Vec<Key>,
        force: bool,
        reason: Option<String>,
        cx: &mut Cx<'_>,
    ) {
        let mut downstream: Vec<TaskId> = Vec::new();
        let mut seen: FxHashSet<TaskId> = FxHashSet::default();
        for key in keys {
            if let Some(&t) = self.keys.get(&key) {
                let others = self.task(t).who_wants.iter().any(|c| *c != client && !c.is_holder());
                if force || !others {
                    // The whole cone below it, once.
                    let mut stack: Vec<TaskId> = self.task(t).dependents.iter().copied().collect();
                    while let Some(d) = stack.pop() {
                        if seen.insert(d) {
                            downstream.push(d);
                            stack.extend(self.task(d).dependents.iter().copied());
                        }
                    }
                }
                if force {
                    let why: Arc<str> = Arc::from(reason.clone().unwrap_or_else(|| format!("{key} was cancelled")));
                    for c in self.task(t).who_wants.clone() {
                        if c != client && !c.is_holder() {
                            self.client_release(c, t, cx);
                            cx.out.push(Command::Report {
                                client: c,
                                key: key.clone(),
                                report: Report::Cancelled(Some(why.clone())),
                            });
                        }
                    }
                }
                if self.task(t).who_wants.contains(&client) {
                    self.client_release(client, t, cx);
                }
            }
            cx.out.push(Command::Report { client, key, report: Report::Cancelled(None) });
        }
        downstream.sort_by_key(|d| self.task(*d).order);
        for d in downstream {
            let task = self.task(d);
            let wanters: Vec<ClientId> = task.who_wants.iter().copied().filter(|c| !c.is_holder()).collect();
            let others = wanters.iter().any(|c| *c != client);
            let cancel_for: Vec<ClientId> = match (force, others) {
                (true, _) => wanters,
                (false, false) => wanters, // only `client`, or nobody
                (false, true) => continue, // another client still wants it: it runs on
            };
            let key = task.key.clone();
            let why: Arc<str> = Arc::from(match &reason {
                Some(r) => format!("{r} (it depends on a cancelled task)"),
                None => "a task it depends on was cancelled".to_string(),
            });
            for c in cancel_for {
                self.client_release(c, d, cx);
                cx.out.push(Command::Report {
                    client: c,
                    key: key.clone(),
                    report: Report::Cancelled(Some(why.clone())),
                });
            }
        }
    }

    /// dask's `retry`: the erred tasks these keys depend on (through erred tasks) are released,
    /// and so are the erred tasks that depend on those; the wanted ones among them run again.
    pub(super) fn retry(&mut self, keys: Vec<Key>, cx: &mut Cx<'_>) {
        let mut up: Vec<TaskId> = Vec::new();
        // A client retries keys it holds, so they are known; others are no one's.
        for key in &keys {
            if let Some(&t) = self.keys.get(key)
                && matches!(self.task(t).state, TaskState::Erred { .. })
            {
                up.push(t);
            }
        }
        // Up through erred inputs to the roots of the failure...
        let mut seen: FxHashSet<TaskId> = FxHashSet::default();
        let mut roots: Vec<TaskId> = Vec::new();
        while let Some(t) = up.pop() {
            if !seen.insert(t) {
                continue;
            }
            let erred: Vec<TaskId> = self
                .task(t)
                .dependencies
                .iter()
                .copied()
                .filter(|d| matches!(self.task(*d).state, TaskState::Erred { .. }))
                .collect();
            if erred.is_empty() {
                roots.push(t);
            }
            up.extend(erred);
        }
        // ... then down through everything that erred because of them.
        let mut down = roots;
        let mut released: Vec<TaskId> = Vec::new();
        let mut done: FxHashSet<TaskId> = FxHashSet::default();
        while let Some(t) = down.pop() {
            if !done.insert(t) || !matches!(self.task(t).state, TaskState::Erred { .. }) {
                continue;
            }
            self.set_state(t, TaskState::Released, cx);
            released.push(t);
            down.extend(self.task(t).dependents.iter().copied());
        }
        released.sort_by_key(|t| self.task(*t).order);
        let wanted: Vec<TaskId> = released.iter().copied().filter(|t| !self.task(*t).who_wants.is_empty()).collect();
        // What no one needs any more is forgotten at the event's end.
        cx.to_check.extend(released.iter().copied());
        self.compute_all(wanted, cx);
    }

    pub(super) fn unwant(&mut self, t: TaskId, client: ClientId, cx: &mut Cx<'_>) {
        let task = self.task_mut(t);
        task.who_wants.retain(|c| *c != client);
        if task.who_wants.is_empty() {
            cx.to_check.push(t);
        }
    }

    pub(super) fn scattered(&mut self, client: ClientId, keys: Vec<(Key, Vec<Arc<str>>, u64)>, cx: &mut Cx<'_>) {
        for (key, addrs, nbytes) in keys {
            let holders: SmallVec<[WorkerId; 1]> =
                addrs.iter().filter_map(|a| self.by_address.get(a).copied()).collect();
            let id = match self.keys.get(&key) {
                Some(&id) => id,
                None => {
                    let prefix = self.prefix_of(&key);
                    let order = self.next_order;
                    self.next_order += 1;
                    self.insert(Task {
                        key: key.clone(),
                        state: TaskState::Released,
                        spec: Box::new([]),
                        dependencies: Box::new([]),
                        dependents: ThinVec::new(),
                        active_dependents: 0,
                        who_wants: SmallVec::new(),
                        priority: 0,
                        order,
                        prefix,
                        retries: 0,
                        suspicious: 0,
                        started: false,
                        orphaned: false,
                        restrictions: None,
                    })
                }
            };
            if holders.is_empty() {
                let err = TaskError::raised_here(&key, "lost", format!("scattered to unknown workers {addrs:?}"), "");
                if !matches!(self.task(id).state, TaskState::Memory { .. } | TaskState::Erred { .. }) {
                    self.set_state(id, TaskState::Erred { error: err }, cx);
                }
            } else {
                match &self.task(id).state {
                    TaskState::Memory { .. } => {
                        for w in holders {
                            self.add_replica(id, w);
                        }
                    }
                    _ => {
                        self.set_state(id, TaskState::Memory { nbytes, who_has: holders }, cx);
                    }
                }
            }
            self.want(id, client, cx);
        }
    }

    /// Makes a Released task (and, recursively, its released dependencies) head for Memory.
    pub(super) fn compute(&mut self, root: TaskId, cx: &mut Cx<'_>) {
        self.compute_all(vec![root], cx);
    }

    /// [`Self::compute`] of several tasks in one walk.
    pub(super) fn compute_all(&mut self, roots: Vec<TaskId>, cx: &mut Cx<'_>) {
        let mut stack = roots;
        // Those ready to run are placed once all are known, most urgent first: free slots go
        // to the first in the graph's order, not to whichever the walk reached first.
        let mut ready: Vec<TaskId> = Vec::new();
        while let Some(t) = stack.pop() {
            if !matches!(self.task(t).state, TaskState::Released) {
                continue;
            }
            if self.task(t).spec.is_empty() {
                // A key without a spec (scattered, then lost) cannot be recomputed.
                let message = "this value was scattered and is lost; it cannot be recomputed";
                let err = TaskError::raised_here(&self.task(t).key, "lost", message.into(), "");
                self.set_state(t, TaskState::Erred { error: err }, cx);
                continue;
            }
            let mut remaining = 0;
            let mut erred = None;
            let mut released: SmallVec<[TaskId; 8]> = SmallVec::new();
            for &d in self.task(t).dependencies.iter() {
                match &self.task(d).state {
                    TaskState::Memory { .. } => {}
                    TaskState::Erred { error } => erred = Some(error.clone()),
                    TaskState::Released => {
                        remaining += 1;
                        released.push(d);
                    }
                    _ => remaining += 1,
                }
            }
            if let Some(error) = erred {
                self.set_state(t, TaskState::Erred { error }, cx);
            } else if remaining > 0 {
                // Our released dependencies become active below, after we count on them.
                self.set_state(t, TaskState::Waiting { remaining }, cx);
                stack.extend(released);
            } else {
                ready.push(t);
            }
        }
        // (A task the walk reached twice, through two dependents, is listed twice.)
        ready.sort_by_cached_key(|t| self.queue_key(*t));
        ready.dedup();
        for t in ready {
            if matches!(self.task(t).state, TaskState::Released) {
                self.schedule(t, cx);
            }
        }
    }
}
