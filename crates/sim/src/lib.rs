//! A deterministic simulator of a dask-rs cluster: the real scheduler core
//! ([`dask_scheduler::core::SchedulerCore`], nothing mocked inside it) driven by simulated
//! workers, network and clock. The same seed gives the same schedule.
//!
//! Workers follow the scheduler's commands as real ones do (`crates/worker/src/state`): a task's
//! missing inputs are fetched from a holder (one inbound link per worker: transfers into a worker
//! queue behind each other, each costing latency plus bytes over bandwidth), then it waits for a
//! thread (highest priority, then oldest), runs for its duration over the worker's speed, and is
//! reported; starts are reported with the worker's next message, as real workers do; a steal is
//! granted only for a task not yet running. Messages take `latency` each way. Workers join and die
//! at given times. See docs/scheduler.md for what the figures mean.
pub mod graphs;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dask_scheduler::core::{
    ClientId, Command, Config, Event, Key, NewTask, Report, SchedulerCore, StealStats, WorkerId, WorkerSpec,
};
use rustc_hash::FxHashMap;

pub use graphs::{Dist, Graph, SimTask};

/// Deterministic pseudo-random numbers (splitmix64).
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// A simulated worker as it starts.
#[derive(Clone, Copy, Debug)]
pub struct WorkerKind {
    pub nthreads: u32,
    /// 1.0: tasks take their duration; 0.5: twice as long.
    pub speed: f64,
}

/// The cluster and what happens to it.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub workers: Vec<WorkerKind>,
    /// Bytes per second into each worker.
    pub bandwidth: f64,
    /// One way, seconds, for every message and each fetch.
    pub latency: f64,
    /// Workers that join at these times (seconds).
    pub joins: Vec<(f64, WorkerKind)>,
    /// At these times a worker dies (a seeded choice among the live ones, never the last).
    pub deaths: Vec<f64>,
    pub work_stealing: bool,
    pub seed: u64,
}

impl Cluster {
    /// `n` equal workers of `nthreads`, 1 GB/s, 100 µs latency, no faults, stealing on.
    pub fn uniform(n: usize, nthreads: u32) -> Self {
        Cluster {
            workers: vec![WorkerKind { nthreads, speed: 1.0 }; n],
            bandwidth: 1e9,
            latency: 100e-6,
            joins: Vec::new(),
            deaths: Vec::new(),
            work_stealing: true,
            seed: 1,
        }
    }
}

/// What a simulation measured.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Seconds until the client held every output.
    pub makespan: f64,
    /// The larger of the critical path (at the fastest speed) and the total work over all the
    /// threads there ever were (at their speeds); transfers not counted.
    pub lower_bound: f64,
    pub bytes_moved: u64,
    pub steals: StealStats,
    /// Wall time the scheduler core spent handling events from the graph's submission on, per
    /// task of the graph (µs; this machine's time, the only figure that is not simulated).
    pub sched_us_per_task: f64,
    /// The most bytes any worker held at once.
    pub peak_worker_bytes: u64,
    /// Task runs started (deaths make some run again).
    pub executions: u64,
    /// Outputs the client got (erred ones not counted).
    pub outputs_done: usize,
    pub outputs: usize,
    pub events: u64,
}

impl Outcome {
    pub fn ratio(&self) -> f64 {
        self.makespan / self.lower_bound.max(1e-12)
    }
}

const CLIENT: ClientId = ClientId(1);
const TICK: f64 = 1.0;

#[derive(Debug)]
enum Ev {
    ToScheduler(Event),
    ToWorker(u32, Command),
    FetchDone { w: u32, task: usize, attempt: u64 },
    RunDone { w: u32, task: usize, attempt: u64 },
    Join(WorkerKind),
    Kill,
    Tick,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    Fetching,
    Ready,
    Running,
    /// Freed while running: its result is dropped.
    Cancelled,
}

struct WTask {
    state: St,
    attempt: u64,
    priority: i32,
    /// Copies of inputs it holds a reference on (released when it leaves).
    fetched: Vec<usize>,
    /// Inputs still to fetch, and the workers the scheduler said hold each.
    missing: Vec<(usize, Vec<u32>)>,
}

struct SimWorker {
    kind: WorkerKind,
    alive: bool,
    free_threads: u32,
    queue: BinaryHeap<(i32, Reverse<u64>, usize)>,
    tasks: FxHashMap<usize, WTask>,
    /// Values held: own results (until freed) and fetched copies (counted by local users).
    own: FxHashMap<usize, u64>,
    copies: FxHashMap<usize, (u64, u32)>,
    bytes: u64,
    peak: u64,
    link_free: f64,
    unreported: Vec<usize>,
}

/// Runs `graph` on `cluster`; `check` asserts the simulator's own invariants as it goes (a
/// task never runs on two live workers at once; without deaths, every task runs once).
pub fn simulate(graph: &Graph, cluster: &Cluster, check: bool) -> Outcome {
    Sim::new(graph, cluster, check).run()
}

struct Sim<'a> {
    graph: &'a Graph,
    cluster: &'a Cluster,
    check: bool,
    core: SchedulerCore,
    base: Instant,
    now: f64,
    seq: u64,
    heap: BinaryHeap<Reverse<(Time, u64)>>,
    pending: FxHashMap<u64, Ev>,
    workers: Vec<SimWorker>,
    by_addr: FxHashMap<Arc<str>, u32>,
    index: FxHashMap<Key, usize>,
    rng: Rng,
    outputs: Vec<usize>,
    outputs_left: usize,
    /// Outputs the client has heard of (a value lost and made again is reported again).
    heard: Vec<bool>,
    /// Live workers running each task right now.
    running: FxHashMap<usize, u32>,
    next_attempt: u64,
    out: Outcome,
    sched: Duration,
    order: u64,
}

/// Seconds, ordered (never NaN here).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Time(f64);
impl Eq for Time {}
impl PartialOrd for Time {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Time {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl<'a> Sim<'a> {
    fn new(graph: &'a Graph, cluster: &'a Cluster, check: bool) -> Self {
        let config = Config {
            work_stealing: cluster.work_stealing,
            bandwidth: cluster.bandwidth as u64,
            worker_ttl: Duration::from_secs(1 << 30),
            log_len: 0,
            ..Config::default()
        };
        let base = Instant::now();
        let outputs = graph.outputs();
        Sim {
            graph,
            cluster,
            check,
            core: SchedulerCore::new(config, base),
            base,
            now: 0.0,
            seq: 0,
            heap: BinaryHeap::new(),
            pending: FxHashMap::default(),
            workers: Vec::new(),
            by_addr: FxHashMap::default(),
            index: graph.tasks.iter().enumerate().map(|(i, t)| (t.key.clone(), i)).collect(),
            rng: Rng(cluster.seed),
            outputs_left: outputs.len(),
            heard: vec![false; outputs.len()],
            outputs,
            running: FxHashMap::default(),
            next_attempt: 0,
            out: Outcome::default(),
            sched: Duration::ZERO,
            order: 0,
        }
    }

    fn at(&mut self, t: f64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse((Time(t), self.seq)));
        self.pending.insert(self.seq, ev);
    }

    fn run(mut self) -> Outcome {
        for kind in self.cluster.workers.clone() {
            self.join(kind);
        }
        for (t, kind) in self.cluster.joins.clone() {
            self.at(t, Ev::Join(kind));
        }
        for t in self.cluster.deaths.clone() {
            self.at(t, Ev::Kill);
        }
        self.at(TICK, Ev::Tick);
        let tasks = self
            .graph
            .tasks
            .iter()
            .map(|t| NewTask {
                key: t.key.clone(),
                spec: Box::from(&b"s"[..]),
                dependencies: t.deps.iter().map(|d| self.graph.tasks[*d].key.clone()).collect(),
                ..NewTask::default()
            })
            .collect();
        let wants = self.outputs.iter().map(|i| self.graph.tasks[*i].key.clone()).collect();
        self.scheduler(Event::ClientConnected { client: CLIENT });
        // The cluster's start (workers joining) is not the graph's cost.
        self.sched = Duration::ZERO;
        self.scheduler(Event::UpdateGraph { client: CLIENT, tasks, wants, fifo_timeout: Duration::ZERO });
        while self.outputs_left > 0 {
            let Some(Reverse((Time(t), seq))) = self.heap.pop() else { break };
            self.now = t;
            let ev = self.pending.remove(&seq).expect("scheduled");
            self.step(ev);
        }
        self.out.makespan = self.now;
        self.out.outputs = self.outputs.len();
        self.out.steals = self.core.steal_stats();
        self.out.sched_us_per_task = self.sched.as_secs_f64() * 1e6 / self.graph.tasks.len().max(1) as f64;
        self.out.peak_worker_bytes = self.workers.iter().map(|w| w.peak).max().unwrap_or(0);
        let fastest = self
            .cluster
            .workers
            .iter()
            .chain(self.cluster.joins.iter().map(|(_, k)| k))
            .map(|k| k.speed)
            .fold(0.0, f64::max);
        let capacity: f64 = self
            .cluster
            .workers
            .iter()
            .chain(self.cluster.joins.iter().map(|(_, k)| k))
            .map(|k| k.nthreads as f64 * k.speed)
            .sum();
        self.out.lower_bound =
            (self.graph.critical_path() / fastest.max(1e-9)).max(self.graph.total_work() / capacity.max(1e-9));
        if self.check && self.cluster.deaths.is_empty() {
            assert_eq!(self.out.executions, self.graph.tasks.len() as u64, "a task ran twice without a death");
        }
        self.out
    }

    fn scheduler(&mut self, event: Event) {
        let mut cmds = Vec::new();
        let t = Instant::now();
        self.core.handle(event, self.base + Duration::from_secs_f64(self.now), &mut cmds);
        self.sched += t.elapsed();
        self.out.events += 1;
        if self.check {
            self.core.validate();
        }
        let lat = self.cluster.latency;
        for c in cmds {
            match c {
                Command::Compute { worker, .. } | Command::Free { worker, .. } | Command::Steal { worker, .. } => {
                    self.at(self.now + lat, Ev::ToWorker(worker.0, c))
                }
                Command::Report { key, report, .. } => {
                    let Some(pos) = self.index.get(&key).and_then(|i| self.outputs.binary_search(i).ok()) else {
                        continue;
                    };
                    if !std::mem::replace(&mut self.heard[pos], true) {
                        self.outputs_left -= 1;
                        if matches!(report, Report::Memory { .. }) {
                            self.out.outputs_done += 1;
                        }
                    }
                }
                Command::CloseWorker { worker, .. } => self.kill(worker.0, false),
                Command::AcquireReplicas { .. }
                | Command::Retired { .. }
                | Command::Notice { .. }
                | Command::Feed(_)
                | Command::CopiesDone { .. } => {}
            }
        }
    }

    fn send_to_scheduler(&mut self, event: Event) {
        self.at(self.now + self.cluster.latency, Ev::ToScheduler(event));
    }

    fn join(&mut self, kind: WorkerKind) {
        let id = self.workers.len() as u32;
        let addr: Arc<str> = Arc::from(format!("sim://w{id}"));
        self.by_addr.insert(addr.clone(), id);
        self.workers.push(SimWorker {
            kind,
            alive: true,
            free_threads: kind.nthreads,
            queue: BinaryHeap::new(),
            tasks: FxHashMap::default(),
            own: FxHashMap::default(),
            copies: FxHashMap::default(),
            bytes: 0,
            peak: 0,
            link_free: 0.0,
            unreported: Vec::new(),
        });
        let spec = WorkerSpec {
            address: addr.clone(),
            name: addr,
            nthreads: kind.nthreads,
            memory_limit: 0,
            pid: 0,
            resources: Vec::new(),
        };
        self.scheduler(Event::WorkerJoined { worker: WorkerId(id), spec });
    }

    fn kill(&mut self, w: u32, tell: bool) {
        let worker = &mut self.workers[w as usize];
        if !worker.alive {
            return;
        }
        worker.alive = false;
        for (t, task) in &worker.tasks {
            if matches!(task.state, St::Running | St::Cancelled) && self.running.get(t) == Some(&w) {
                self.running.remove(t);
            }
        }
        if tell {
            self.scheduler(Event::WorkerLost {
                worker: WorkerId(w),
                reason: "killed by the simulation".into(),
                expected: false,
            });
        }
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::ToScheduler(e) => {
                let from = match &e {
                    Event::TaskFinished { worker, .. }
                    | Event::TasksStarted { worker, .. }
                    | Event::MissingData { worker, .. }
                    | Event::StealResponse { worker, .. } => Some(worker.0),
                    _ => None,
                };
                // A dead worker's messages in flight are lost with its connection.
                if from.is_none_or(|w| self.workers[w as usize].alive) {
                    self.scheduler(e);
                }
            }
            Ev::ToWorker(w, cmd) => {
                if self.workers[w as usize].alive {
                    self.command(w, cmd);
                }
            }
            Ev::FetchDone { w, task, attempt } => self.fetched(w, task, attempt),
            Ev::RunDone { w, task, attempt } => self.ran(w, task, attempt),
            Ev::Join(kind) => self.join(kind),
            Ev::Kill => {
                let alive: Vec<u32> =
                    (0..self.workers.len() as u32).filter(|w| self.workers[*w as usize].alive).collect();
                if alive.len() > 1 {
                    let victim = alive[self.rng.below(alive.len())];
                    self.kill(victim, true);
                }
            }
            Ev::Tick => {
                self.scheduler(Event::Tick);
                self.at(self.now + TICK, Ev::Tick);
            }
        }
    }

    fn command(&mut self, w: u32, cmd: Command) {
        match cmd {
            Command::Compute { key, deps, priority, .. } => {
                let t = self.index[&key];
                let worker = &mut self.workers[w as usize];
                if worker.tasks.contains_key(&t) {
                    if let Some(task) = worker.tasks.get_mut(&t)
                        && task.state == St::Cancelled
                    {
                        task.state = St::Running; // resumed
                        if self.check
                            && let Some(other) = self.running.insert(t, w)
                        {
                            panic!("{key} resumed on w{w} while it runs on w{other}");
                        }
                    }
                    return;
                }
                if worker.own.contains_key(&t) {
                    let nbytes = worker.own[&t];
                    self.send_to_scheduler(Event::TaskFinished {
                        worker: WorkerId(w),
                        key,
                        nbytes,
                        duration: Duration::ZERO,
                        value: None,
                    });
                    return;
                }
                self.next_attempt += 1;
                let attempt = self.next_attempt;
                // Missing inputs come over this worker's link, one after another.
                let mut bytes = 0u64;
                let (mut fetched, mut missing) = (Vec::new(), Vec::new());
                let worker = &mut self.workers[w as usize];
                for d in deps.iter() {
                    let di = self.index[&d.key];
                    if let Some(c) = worker.copies.get_mut(&di) {
                        c.1 += 1;
                        fetched.push(di);
                    } else if !worker.own.contains_key(&di) {
                        bytes += d.nbytes;
                        let holders = d.workers.iter().filter_map(|a| self.by_addr.get(a).copied()).collect();
                        missing.push((di, holders));
                    }
                }
                let now_ready = missing.is_empty();
                worker.tasks.insert(t, WTask { state: St::Fetching, attempt, priority, fetched, missing });
                if now_ready {
                    self.ready(w, t);
                } else {
                    let start = self.now.max(worker.link_free);
                    let done = start + self.cluster.latency + bytes as f64 / self.cluster.bandwidth;
                    worker.link_free = done;
                    self.out.bytes_moved += bytes;
                    self.at(done, Ev::FetchDone { w, task: t, attempt });
                }
            }
            Command::Free { key, .. } => {
                let t = self.index[&key];
                let worker = &mut self.workers[w as usize];
                if let Some(task) = worker.tasks.get_mut(&t) {
                    match task.state {
                        St::Running => {
                            // It cannot be stopped; its result will be dropped. A run elsewhere
                            // may start meanwhile (as with real workers): not a double run.
                            task.state = St::Cancelled;
                            if self.running.get(&t) == Some(&w) {
                                self.running.remove(&t);
                            }
                        }
                        St::Cancelled => {}
                        St::Fetching | St::Ready => self.leave(w, t),
                    }
                }
                let worker = &mut self.workers[w as usize];
                if let Some(n) = worker.own.remove(&t) {
                    worker.bytes -= n;
                }
            }
            Command::Steal { key, id, .. } => {
                let t = self.index[&key];
                let stolen =
                    matches!(self.workers[w as usize].tasks.get(&t).map(|x| x.state), Some(St::Fetching | St::Ready));
                if stolen {
                    self.leave(w, t);
                }
                self.send_to_scheduler(Event::StealResponse { worker: WorkerId(w), key, id, stolen });
            }
            _ => {}
        }
    }

    /// The task leaves the worker (done, freed, stolen): its fetched copies are let go.
    fn leave(&mut self, w: u32, t: usize) {
        let worker = &mut self.workers[w as usize];
        let Some(task) = worker.tasks.remove(&t) else { return };
        for d in task.fetched {
            if let Some(c) = worker.copies.get_mut(&d) {
                c.1 -= 1;
                if c.1 == 0 {
                    let (n, _) = worker.copies.remove(&d).expect("present");
                    worker.bytes -= n;
                }
            }
        }
    }

    fn fetched(&mut self, w: u32, t: usize, attempt: u64) {
        if !self.workers[w as usize].alive {
            return;
        }
        let Some(task) = self.workers[w as usize].tasks.get(&t) else { return };
        if task.attempt != attempt || task.state != St::Fetching {
            return;
        }
        // Each input from a live holder (any will do: the scheduler named them).
        let missing = task.missing.clone();
        for (d, holders) in missing {
            let worker = &mut self.workers[w as usize];
            if worker.own.contains_key(&d) {
                continue;
            }
            if let Some(c) = worker.copies.get_mut(&d) {
                // Fetched meanwhile for another task here.
                c.1 += 1;
                worker.tasks.get_mut(&t).expect("present").fetched.push(d);
                continue;
            }
            let holder = holders.iter().find(|h| {
                let x = &self.workers[**h as usize];
                x.alive && x.own.contains_key(&d)
            });
            match holder {
                Some(_) => {
                    let n = self.graph.tasks[d].nbytes;
                    let worker = &mut self.workers[w as usize];
                    worker.copies.insert(d, (n, 1));
                    worker.tasks.get_mut(&t).expect("present").fetched.push(d);
                    worker.bytes += n;
                    worker.peak = worker.peak.max(worker.bytes);
                }
                None => {
                    // Nobody has it any more: the scheduler places the task again.
                    self.leave(w, t);
                    let key = self.graph.tasks[t].key.clone();
                    let dependency = self.graph.tasks[d].key.clone();
                    self.send_to_scheduler(Event::MissingData {
                        worker: WorkerId(w),
                        key,
                        dependency,
                        from: Vec::new(),
                    });
                    return;
                }
            }
        }
        self.ready(w, t);
    }

    fn ready(&mut self, w: u32, t: usize) {
        self.order += 1;
        let order = self.order;
        let worker = &mut self.workers[w as usize];
        let task = worker.tasks.get_mut(&t).expect("present");
        task.state = St::Ready;
        worker.queue.push((task.priority, Reverse(order), t));
        self.start(w);
    }

    fn start(&mut self, w: u32) {
        loop {
            let worker = &mut self.workers[w as usize];
            if worker.free_threads == 0 {
                return;
            }
            let Some((_, _, t)) = worker.queue.pop() else { return };
            let Some(task) = worker.tasks.get_mut(&t) else { continue };
            if task.state != St::Ready {
                continue;
            }
            task.state = St::Running;
            let attempt = task.attempt;
            worker.free_threads -= 1;
            worker.unreported.push(t);
            let d = self.graph.tasks[t].duration / worker.kind.speed;
            self.out.executions += 1;
            if self.check
                && let Some(other) = self.running.insert(t, w)
            {
                panic!("{} runs on w{w} while it runs on w{other}", self.graph.tasks[t].key);
            }
            self.at(self.now + d, Ev::RunDone { w, task: t, attempt });
        }
    }

    fn ran(&mut self, w: u32, t: usize, attempt: u64) {
        if !self.workers[w as usize].alive {
            return;
        }
        let Some(task) = self.workers[w as usize].tasks.get(&t) else { return };
        if task.attempt != attempt {
            return;
        }
        let cancelled = task.state == St::Cancelled;
        if self.running.get(&t) == Some(&w) {
            self.running.remove(&t);
        }
        self.workers[w as usize].free_threads += 1;
        self.leave(w, t);
        // Starts of tasks still running go out with this message, as a real worker's batch.
        let worker = &mut self.workers[w as usize];
        let started: Vec<Key> = std::mem::take(&mut worker.unreported)
            .into_iter()
            .filter(|x| worker.tasks.get(x).is_some_and(|y| y.state == St::Running))
            .map(|x| self.graph.tasks[x].key.clone())
            .collect();
        if !started.is_empty() {
            self.send_to_scheduler(Event::TasksStarted { worker: WorkerId(w), keys: started, ack: false });
        }
        if !cancelled {
            let n = self.graph.tasks[t].nbytes;
            let worker = &mut self.workers[w as usize];
            if worker.own.insert(t, n).is_none() {
                worker.bytes += n;
                worker.peak = worker.peak.max(worker.bytes);
            }
            let duration = Duration::from_secs_f64(self.graph.tasks[t].duration / worker.kind.speed);
            let key = self.graph.tasks[t].key.clone();
            self.send_to_scheduler(Event::TaskFinished { worker: WorkerId(w), key, nbytes: n, duration, value: None });
        }
        self.start(w);
    }
}
