//! The thread pool that runs tasks: `nthreads` OS threads, never the async runtime's.
//! Each job decodes its spec, reads its inputs from the store in place, runs the function
//! (panics are caught by `dask_protocol::task::execute`), stores the result and reports back.
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;
use dask_protocol::pb;
use dask_protocol::task::{ExecErrorKind, execute};
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::mpsc;

use crate::server::Store;
use crate::state::{Event, ExecOutcome, Key};

pub struct Executor {
    jobs: Option<std_mpsc::Sender<(Key, Bytes)>>,
    threads: Vec<JoinHandle<()>>,
}

impl Executor {
    pub fn new(nthreads: usize, store: Store, events: mpsc::UnboundedSender<Event>, worker: String) -> Self {
        let (tx, rx) = std_mpsc::channel::<(Key, Bytes)>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..nthreads.max(1))
            .map(|i| {
                let rx = rx.clone();
                let store = store.clone();
                let events = events.clone();
                let worker = worker.clone();
                std::thread::Builder::new()
                    .name(format!("dask-exec-{i}"))
                    .spawn(move || {
                        loop {
                            let job = rx.lock().recv();
                            let Ok((key, spec)) = job else { return };
                            let (outcome, duration) = run_one(&key, &spec, &store, &worker);
                            if events.send(Event::ExecDone { key, outcome, duration }).is_err() {
                                return;
                            }
                        }
                    })
                    .expect("spawn executor thread")
            })
            .collect();
        Executor { jobs: Some(tx), threads }
    }

    pub fn submit(&self, key: Key, spec: Bytes) {
        if let Some(tx) = &self.jobs {
            let _ = tx.send((key, spec));
        }
    }

    /// Stops taking jobs; running tasks finish on their own (threads are detached).
    pub fn shutdown(&mut self) {
        self.jobs = None;
        self.threads.clear();
    }
}

fn run_one(key: &Key, spec: &Bytes, store: &Store, worker: &str) -> (ExecOutcome, std::time::Duration) {
    let start = Instant::now();
    let (function, result) = match pb::TaskSpec::decode(spec.clone()) {
        Ok(spec) => {
            let r = execute(&spec, &|k: &str| store.get(k).map(|v| v.value().clone()));
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
        }),
    };
    (outcome, duration)
}
