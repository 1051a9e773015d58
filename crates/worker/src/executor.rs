//! The thread pool that runs tasks: `nthreads` OS threads, never the async runtime's.
//!
//! Tasks wait in one shared queue, highest priority first, then oldest. A thread needs one of
//! the `nthreads` slots to run a task: a task that secedes (`dask::secede`, `worker_client`)
//! gives its slot back and the pool starts another thread to use it; a task that rejoins waits
//! for a free slot before it goes on (ahead of queued tasks); surplus threads end once their
//! task is done. A thread takes the next task, decodes its spec, reads its inputs from the store in place, runs the function
//! (panics are caught by `dask_protocol::task::execute`), stores the result, and reports it.
//! Reports coalesce: they go into one shared buffer, and only the report that finds the buffer
//! empty wakes the event loop, which then takes everything. A busy loop is never woken once
//! per task, and an idle one is woken at once.
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dask_protocol::pb;
use dask_protocol::task::{ExecErrorKind, execute};
use parking_lot::{Condvar, Mutex};
use prost::Message;
use tokio::sync::Notify;

use crate::context::{TaskScope, WorkerContext, with_scope};
use crate::state::{ExecOutcome, Key};
use crate::store::Store;

/// One finished (or skipped) task.
pub type ExecResult = (Key, ExecOutcome, Duration, Timing);

/// When and where a task ran: for the task stream.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timing {
    /// Seconds since the Unix epoch.
    pub start_s: f64,
    /// The executor thread's number.
    pub thread: u32,
}

struct Job {
    priority: i32,
    order: u64,
    key: Key,
    spec: Bytes,
    /// Wait until the event loop has sent this task's start before running it.
    announce: bool,
}

impl PartialEq for Job {
    fn eq(&self, other: &Self) -> bool {
        (self.priority, self.order) == (other.priority, other.order)
    }
}
impl Eq for Job {}
impl PartialOrd for Job {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Job {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.priority, Reverse(self.order)).cmp(&(other.priority, Reverse(other.order)))
    }
}

#[derive(Default)]
struct Queue {
    jobs: BinaryHeap<Job>,
    closed: bool,
    /// Over the memory's pause threshold: no job starts (running ones finish).
    paused: bool,
    /// Thread slots not taken by a running (not seceded) task.
    free_slots: usize,
    /// Threads of the pool, alive.
    threads: usize,
    /// Tasks running seceded (each on a thread beyond the slots).
    seceded: usize,
    /// Tasks waiting to rejoin: they take the next free slot before any queued task.
    rejoining: usize,
    /// Numbers the threads' names.
    spawned: usize,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    nthreads: usize,
    store: Arc<Store>,
    results: Arc<Results>,
    context: Arc<WorkerContext>,
}

/// Started and finished tasks waiting for the event loop.
#[derive(Default)]
pub struct Results {
    batch: Mutex<Batch>,
    pub wake: Notify,
    /// Announced starts the scheduler has acknowledged (see [`Results::wait_ack`]).
    acks: Mutex<Acks>,
    ack_cv: Condvar,
}

#[derive(Default)]
struct Acks {
    /// Keys whose thread waits for the scheduler's acknowledgement.
    awaiting: rustc_hash::FxHashSet<Key>,
    acked: rustc_hash::FxHashSet<Key>,
    closing: bool,
}

/// What the executor threads reported since the event loop last looked.
#[derive(Default)]
pub struct Batch {
    pub done: Vec<ExecResult>,
    /// Tasks that started running (most finish before the loop sends anything: those are
    /// reported finished only).
    pub started: Vec<Key>,
    /// Tasks that seceded: the scheduler stops counting them against this worker's threads.
    pub seceded: Vec<Key>,
}

/// How long a thread waits for the scheduler to acknowledge an announced start before running
/// the task anyway (the scheduler is unreachable; the worker is about to go).
const ANNOUNCE_WAIT: Duration = Duration::from_secs(30);

impl Results {
    fn push(&self, r: ExecResult) {
        // Only the first result since the loop last looked wakes it (lazy starts do not count).
        let first = {
            let mut b = self.batch.lock();
            b.done.push(r);
            b.done.len() == 1
        };
        if first {
            self.wake.notify_one();
        }
    }

    /// Records a start; an announced one is also registered as awaiting its acknowledgement.
    /// A lazy start does not wake the event loop: it goes out with the loop's next batch (a
    /// result, a heartbeat), if the task is still running then. Waking the loop for each start
    /// sent a report and its acknowledgement for most tasks, halving a tree's tasks per second.
    fn started(&self, key: Key, announce: bool) {
        if announce {
            self.acks.lock().awaiting.insert(key.clone());
        }
        self.batch.lock().started.push(key);
        if announce {
            self.wake.notify_one();
        }
    }

    /// Blocks until the scheduler has acknowledged the start of `key` (bounded): the
    /// scheduler then knows it runs here, before it can kill this worker.
    fn wait_ack(&self, key: &Key) {
        let deadline = Instant::now() + ANNOUNCE_WAIT;
        let mut a = self.acks.lock();
        loop {
            if a.acked.remove(key) || a.closing {
                a.awaiting.remove(key);
                return;
            }
            if self.ack_cv.wait_until(&mut a, deadline).timed_out() {
                a.awaiting.remove(key);
                tracing::warn!(key = %key, "no acknowledgement of an announced start from the scheduler; running it anyway");
                return;
            }
        }
    }

    /// The scheduler acknowledged these starts (or they need none: no longer running).
    pub fn acknowledge(&self, keys: impl IntoIterator<Item = Key>) {
        let mut a = self.acks.lock();
        let mut any = false;
        for k in keys {
            if a.awaiting.remove(&k) {
                a.acked.insert(k);
                any = true;
            }
        }
        if any {
            self.ack_cv.notify_all();
        }
    }

    fn seceded(&self, key: Key) {
        self.batch.lock().seceded.push(key);
        self.wake.notify_one();
    }

    /// Everything reported so far.
    pub fn take(&self) -> Batch {
        std::mem::take(&mut *self.batch.lock())
    }

    fn close(&self) {
        self.acks.lock().closing = true;
        self.ack_cv.notify_all();
    }
}

pub struct Executor {
    shared: Arc<Shared>,
    results: Arc<Results>,
    threads: Vec<JoinHandle<()>>,
}

impl Executor {
    pub fn new(nthreads: usize, store: Arc<Store>, context: Arc<WorkerContext>) -> Self {
        let nthreads = nthreads.max(1);
        let results = Arc::new(Results::default());
        let queue = Queue { free_slots: nthreads, threads: nthreads, spawned: nthreads, ..Default::default() };
        let shared = Arc::new(Shared {
            queue: Mutex::new(queue),
            ready: Condvar::new(),
            nthreads,
            store,
            results: results.clone(),
            context,
        });
        let threads = (0..nthreads).map(|i| spawn_thread(&shared, i)).collect();
        Executor { shared, results, threads }
    }

    /// Where finished tasks are reported.
    pub fn results(&self) -> Arc<Results> {
        self.results.clone()
    }

    pub fn submit(&self, key: Key, spec: Bytes, priority: i32, order: u64, announce: bool) {
        let mut q = self.shared.queue.lock();
        q.jobs.push(Job { priority, order, key, spec, announce });
        drop(q);
        self.shared.ready.notify_one();
    }

    /// Takes `key` off the queue if no thread has started it; it is reported as skipped.
    pub fn cancel(&self, key: &Key) {
        let mut q = self.shared.queue.lock();
        let before = q.jobs.len();
        q.jobs.retain(|j| j.key != *key);
        if q.jobs.len() < before {
            drop(q);
            self.results.push((key.clone(), ExecOutcome::Skipped, Duration::ZERO, Timing::default()));
        }
    }

    /// Takes `key` off the queue if no thread has started it; returns whether it did. Unlike
    /// [`Self::cancel`], nothing is reported for it.
    pub fn unqueue(&self, key: &Key) -> bool {
        let mut q = self.shared.queue.lock();
        let before = q.jobs.len();
        q.jobs.retain(|j| j.key != *key);
        q.jobs.len() < before
    }

    /// Pauses (no job starts) or resumes.
    pub fn pause(&self, paused: bool) {
        self.shared.queue.lock().paused = paused;
        if !paused {
            self.shared.ready.notify_all();
        }
    }

    /// Stops taking jobs; running tasks finish on their own (threads are detached).
    pub fn shutdown(&mut self) {
        self.results.close();
        self.shared.queue.lock().closed = true;
        self.shared.ready.notify_all();
        self.threads.clear();
    }
}

fn spawn_thread(shared: &Arc<Shared>, i: usize) -> JoinHandle<()> {
    let shared = shared.clone();
    std::thread::Builder::new()
        .name(format!("dask-exec-{i}"))
        .spawn(move || thread_main(&shared, i as u32))
        .expect("spawn executor thread")
}

fn thread_main(shared: &Arc<Shared>, thread: u32) {
    loop {
        let job = {
            let mut q = shared.queue.lock();
            loop {
                // Closing, or a surplus thread (a seceded task ended or rejoined): it ends.
                if q.closed || q.threads > shared.nthreads + q.seceded {
                    q.threads -= 1;
                    return;
                }
                if !q.paused
                    && q.free_slots > 0
                    && q.rejoining == 0
                    && let Some(job) = q.jobs.pop()
                {
                    q.free_slots -= 1;
                    break job;
                }
                shared.ready.wait(&mut q);
            }
        };
        let results = &shared.results;
        results.started(job.key.clone(), job.announce);
        if job.announce {
            results.wait_ack(&job.key);
        }
        // Whether this task holds a slot now (it may secede and rejoin while it runs).
        let holds = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let scope = TaskScope {
            worker: shared.context.clone(),
            key: job.key.to_string(),
            slots: {
                let (shared, holds, key) = (shared.clone(), holds.clone(), job.key.clone());
                Arc::new(
                    move |give_back: bool| {
                        if give_back { secede(&shared, &holds, &key) } else { rejoin(&shared, &holds) }
                    },
                )
            },
        };
        let start_s = dask_protocol::sys::epoch_secs();
        shared.context.running.lock().insert(thread, (job.key.clone(), start_s));
        let (outcome, duration) =
            with_scope(scope, || run_one(&job.key, &job.spec, &shared.store, &shared.context.address));
        shared.context.running.lock().remove(&thread);
        results.push((job.key, outcome, duration, Timing { start_s, thread }));
        let mut q = shared.queue.lock();
        if holds.load(std::sync::atomic::Ordering::SeqCst) {
            q.free_slots += 1;
        } else {
            q.seceded -= 1;
        }
        drop(q);
        shared.ready.notify_all();
    }
}

/// The task on this thread gives its slot back; a thread is started to use it if none is idle.
fn secede(shared: &Arc<Shared>, holds: &std::sync::atomic::AtomicBool, key: &Key) -> bool {
    if !holds.swap(false, std::sync::atomic::Ordering::SeqCst) {
        return false; // seceded already
    }
    let mut q = shared.queue.lock();
    q.free_slots += 1;
    q.seceded += 1;
    let spawn = q.threads < shared.nthreads + q.seceded && !q.closed;
    if spawn {
        q.threads += 1;
        q.spawned += 1;
    }
    let i = q.spawned;
    drop(q);
    if spawn {
        // Detached, like the others: it ends when it is surplus.
        let _ = spawn_thread(shared, i);
    }
    shared.ready.notify_all();
    shared.results.seceded(key.clone());
    true
}

/// The task on this thread waits for a free slot and takes it.
fn rejoin(shared: &Shared, holds: &std::sync::atomic::AtomicBool) -> bool {
    if holds.load(std::sync::atomic::Ordering::SeqCst) {
        return false; // holds one
    }
    let mut q = shared.queue.lock();
    q.rejoining += 1;
    while q.free_slots == 0 && !q.closed {
        shared.ready.wait(&mut q);
    }
    q.rejoining -= 1;
    if q.closed {
        return false; // closing: the task ends seceded
    }
    q.free_slots -= 1;
    q.seceded -= 1;
    holds.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(q);
    // A surplus thread may end now; queued tasks may start if slots remain.
    shared.ready.notify_all();
    true
}

fn run_one(key: &Key, spec: &Bytes, store: &Store, worker: &str) -> (ExecOutcome, Duration) {
    let start = Instant::now();
    let (function, result) = match pb::TaskSpec::decode(spec.clone()) {
        Ok(spec) => {
            let r = execute(&spec, &|k: &str| store.get(k));
            (spec.function, r)
        }
        Err(e) => (String::new(), Err(ExecErrorKind::BadArguments(format!("malformed task spec: {e}")))),
    };
    let duration = start.elapsed();
    let outcome = match result {
        Ok(value) => {
            let nbytes = value.data.len() as u64;
            store.insert(key.clone(), value);
            ExecOutcome::Ok { nbytes, type_name: String::new() }
        }
        Err(e) => ExecOutcome::Err(pb::TaskError {
            message: e.message(),
            kind: e.kind().to_string(),
            function,
            key: key.to_string(),
            worker: worker.to_string(),
            traceback: match e {
                dask_protocol::task::ExecErrorKind::Panic(_) => dask_protocol::task::take_panic_backtrace(),
                _ => String::new(),
            },
        }),
    };
    (outcome, duration)
}
