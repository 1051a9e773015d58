//! The scheduler's state machine alone, driven in-process: no network, no workers, every
//! task "finished" as soon as it is handed out. Reports the core's cost per task.
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dask_scheduler::core::{ClientId, Command, Config, Event, Key, NewTask, SchedulerCore, WorkerId, WorkerSpec};

/// Microseconds per task to submit `n` independent tasks (in batches of 10,000, all wanted by
/// one client) to `workers` simulated workers and take each one's completion.
pub fn run(n: usize, workers: usize) -> f64 {
    let now = Instant::now();
    let config = Config { log_len: 0, ..Default::default() };
    let mut core = SchedulerCore::new(config, now);
    let mut out = Vec::new();
    for w in 0..workers {
        let spec = WorkerSpec {
            address: Arc::from(format!("tcp://10.0.{}.{}:1", w / 250, w % 250)),
            name: Arc::from(format!("w{w}")),
            nthreads: 1,
            memory_limit: 0,
            pid: 0,
            resources: Vec::new(),
        };
        core.handle(Event::WorkerJoined { worker: WorkerId(w as u32), spec }, now, &mut out);
    }
    let client = ClientId(1);
    core.handle(Event::ClientConnected { client }, now, &mut out);
    out.clear();
    let spec: Box<[u8]> = Box::from(&b"spec"[..]);
    let keys: Vec<Key> = (0..n).map(|i| Arc::from(format!("inc-{i:032x}"))).collect();
    let mut in_flight: VecDeque<(WorkerId, Key)> = VecDeque::new();
    let mut done = 0usize;
    let t = Instant::now();
    for batch in keys.chunks(10_000) {
        let tasks =
            batch.iter().map(|k| NewTask { key: k.clone(), spec: spec.clone(), ..Default::default() }).collect();
        core.handle(
            Event::UpdateGraph { client, tasks, wants: batch.to_vec(), fifo_timeout: Duration::ZERO },
            now,
            &mut out,
        );
        take(&mut out, &mut in_flight, &mut done);
        while let Some((worker, key)) = in_flight.pop_front() {
            let finished =
                Event::TaskFinished { worker, key, nbytes: 8, duration: Duration::from_micros(1), value: None };
            core.handle(finished, now, &mut out);
            take(&mut out, &mut in_flight, &mut done);
        }
    }
    let per_task = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    assert_eq!(done, n, "every task reported in memory");
    per_task
}

fn take(out: &mut Vec<Command>, in_flight: &mut VecDeque<(WorkerId, Key)>, done: &mut usize) {
    for c in out.drain(..) {
        match c {
            Command::Compute { worker, key, .. } => in_flight.push_back((worker, key)),
            Command::Report { .. } => *done += 1,
            _ => {}
        }
    }
}
