//! `Client::run` and `Client::run_on_scheduler` (dask's `run`, `run_on_scheduler`): a registered
//! function, as tasks are, run now on every (chosen) worker beside its task pool, or in the
//! scheduler. In a worker, `dask::get_worker()` and `dask::get_client()` work inside it; in the
//! scheduler, `dask::get_scheduler()` gives a read-only snapshot.
use std::collections::HashMap;

use dask_protocol::codec::Value;
use dask_protocol::pb::{self, coord_reply::Kind, coord_request::Op};
use dask_protocol::task::Task;
use prost::Message;

use crate::args::IntoArgs;
use crate::coord::{Answer, Wait, unexpected};
use crate::error::TaskFailure;
use crate::{Client, Error, Result};

/// What `run` does with a worker whose function failed (dask's `on_error`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnError {
    /// The call fails with the first error (dask's default).
    #[default]
    Raise,
    /// The worker's entry holds its error.
    Return,
    /// The worker is left out.
    Ignore,
}

/// Options of [`Client::run_with`].
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Addresses or names; empty: every worker.
    pub workers: Vec<String>,
    /// `false`: return once the workers were asked (an empty map), not when they are done.
    pub wait: bool,
    pub on_error: OnError,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { workers: Vec::new(), wait: true, on_error: OnError::Raise }
    }
}

pub(crate) fn spec_of<T: Task, A: IntoArgs<T::Args>>(args: A) -> Result<bytes::Bytes> {
    let mut deps = Vec::new();
    let arg = args.into_args(&mut deps)?;
    if !deps.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "run takes values, not futures ({} given): gather them first",
            deps.len()
        )));
    }
    Ok(pb::TaskSpec { function: T::NAME.to_string(), args: Some(arg) }.encode_to_vec().into())
}

pub(crate) fn decode<T: serde::de::DeserializeOwned + 'static>(r: pb::RunResult) -> Result<T> {
    if r.ok {
        let codec = dask_protocol::codec::codec_name(&r.codec)?;
        Ok(Value { codec, data: r.value }.decode()?)
    } else {
        let e = r.error.unwrap_or_default();
        Err(Error::Task(Box::new(TaskFailure::from(e))))
    }
}

impl Client {
    pub(crate) async fn run_request(&self, req: pb::RunRequest) -> Result<Vec<pb::RunResult>> {
        match self.coord("", Wait::No, Op::Run(req)).await? {
            Answer::Said(Kind::Run(r)) => Ok(r.results),
            other => Err(unexpected("run", other)),
        }
    }

    /// Runs `f(args...)` on every worker now (beside their tasks) and returns each worker's
    /// result by address; the first failure fails the call.
    pub fn run<T: Task, A: IntoArgs<T::Args>>(&self, f: T, args: A) -> Result<HashMap<String, T::Output>> {
        self.run_with(f, args, RunOptions::default())?.into_iter().map(|(w, r)| Ok((w, r?))).collect()
    }

    /// [`run`](Self::run) on chosen workers, without waiting, or keeping each worker's error
    /// ([`OnError`]).
    pub fn run_with<T: Task, A: IntoArgs<T::Args>>(
        &self,
        _f: T,
        args: A,
        opts: RunOptions,
    ) -> Result<HashMap<String, Result<T::Output>>> {
        let req = pb::RunRequest {
            spec: spec_of::<T, A>(args)?,
            workers: opts.workers,
            wait: opts.wait,
            ..Default::default()
        };
        let results = self.inner.block_on(self.run_request(req))?;
        let mut out = HashMap::new();
        for r in results {
            let worker = r.worker.clone();
            match (decode::<T::Output>(r), opts.on_error) {
                (Ok(v), _) => {
                    out.insert(worker, Ok(v));
                }
                (Err(e), OnError::Raise) => return Err(e),
                (Err(e), OnError::Return) => {
                    out.insert(worker, Err(e));
                }
                (Err(_), OnError::Ignore) => {}
            }
        }
        Ok(out)
    }

    /// Runs `f(args...)` in the scheduler, on a thread of its own (the scheduler's program must
    /// know `f`: a LocalCluster runs this program's functions; a stock `dask-scheduler` its
    /// built-ins). `dask::get_scheduler()` inside gives a snapshot of the scheduler.
    pub fn run_on_scheduler<T: Task, A: IntoArgs<T::Args>>(&self, _f: T, args: A) -> Result<T::Output> {
        let req = pb::RunRequest { spec: spec_of::<T, A>(args)?, wait: true, on_scheduler: true, ..Default::default() };
        let mut results = self.inner.block_on(self.run_request(req))?;
        let r = results.pop().ok_or_else(|| Error::Refused("the scheduler gave no result".into()))?;
        decode(r)
    }
}

impl Client {
    /// The scheduler's last `n` log lines, `(level, text)`, oldest first (dask's
    /// `get_scheduler_logs`). The binaries keep their last 10,000; a program running an
    /// in-process cluster keeps them if its subscriber has `dask_protocol::logs::layer()`.
    pub fn get_scheduler_logs(&self, n: usize) -> Result<Vec<(String, String)>> {
        self.run_on_scheduler(dask_protocol::logs::recent_logs, (n as u64, "dask_scheduler".to_string()))
    }

    /// The last `n` log lines of each worker (all, or those named), by address (dask's
    /// `get_worker_logs`).
    pub fn get_worker_logs<S: AsRef<str>>(
        &self,
        n: usize,
        workers: &[S],
    ) -> Result<HashMap<String, Vec<(String, String)>>> {
        let opts =
            RunOptions { workers: workers.iter().map(|w| w.as_ref().to_string()).collect(), ..Default::default() };
        self.run_with(dask_protocol::logs::recent_logs, (n as u64, "dask_worker".to_string()), opts)?
            .into_iter()
            .map(|(w, r)| Ok((w, r?)))
            .collect()
    }
}

impl Client {
    /// The last `n` log lines of the nanny of each worker (all, or those named), by worker
    /// address (dask's `get_worker_logs(nanny=True)`); workers without a nanny are left out.
    pub fn get_nanny_logs<S: AsRef<str>>(
        &self,
        n: usize,
        workers: &[S],
    ) -> Result<HashMap<String, Vec<(String, String)>>> {
        let info = self.scheduler_info()?;
        let chosen = |w: &pb::WorkerInfo| {
            workers.is_empty() || workers.iter().any(|x| x.as_ref() == w.address || x.as_ref() == w.name)
        };
        let nannies: Vec<(String, String)> = info
            .workers
            .iter()
            .filter(|w| !w.nanny.is_empty() && chosen(w))
            .map(|w| (w.address.clone(), w.nanny.clone()))
            .collect();
        let security = self.inner.security.clone();
        self.inner.block_on(async move {
            let mut out = HashMap::new();
            for (worker, nanny) in nannies {
                let addr = dask_protocol::addr::Address::parse(&nanny, None)
                    .map_err(|e| Error::Refused(format!("the scheduler names nanny {nanny:?}: {e}")))?;
                let endpoint = dask_protocol::serve::endpoint(&addr, crate::CONNECT_TIMEOUT)
                    .map_err(|e| Error::Refused(format!("nanny {nanny}: {e}")))?;
                let channel = dask_protocol::serve::connect(&endpoint, &addr, security.as_ref())
                    .await
                    .map_err(|e| Error::Refused(format!("nanny {nanny}: {}", dask_protocol::error_chain(&e))))?;
                let reply = pb::nanny_client::NannyClient::new(channel)
                    .logs(pb::LogsRequest { n: n as u64 })
                    .await
                    .map_err(|s| Error::Refused(format!("nanny {nanny}: {}", s.message())))?;
                let lines = reply.into_inner().lines.into_iter().map(|l| (l.level, l.text)).collect();
                out.insert(worker, lines);
            }
            Ok(out)
        })
    }
}

/// A task running on a worker now (`Client::call_stack`).
#[derive(Clone, Debug, PartialEq)]
pub struct RunningTask {
    pub key: String,
    /// The worker's executor thread.
    pub thread: u32,
    pub started: std::time::SystemTime,
    /// How long it has run, by the worker's clock.
    pub running_for: std::time::Duration,
}

/// The stock workers' `dask-call-stack` function, named for `run` (it runs on workers only).
struct CallStack;

impl Task for CallStack {
    const NAME: &'static str = "dask-call-stack";
    type Args = (Vec<String>,);
    type Output = Vec<(String, u32, f64, f64)>;
    fn run(_: Self::Args) -> std::result::Result<Self::Output, String> {
        Err("call_stack runs on workers".into())
    }
}

impl Client {
    /// What runs where, and for how long (dask's `call_stack`): each worker's running tasks,
    /// of `keys` only if any are given. (dask returns each task's Python stack; a Rust thread's
    /// stack cannot be read from outside it, so this says which task runs on which thread.)
    pub fn call_stack<S: AsRef<str>>(&self, keys: &[S]) -> Result<HashMap<String, Vec<RunningTask>>> {
        let keys: Vec<String> = keys.iter().map(|k| k.as_ref().to_string()).collect();
        let all = self.run(CallStack, (keys,))?;
        Ok(all
            .into_iter()
            .map(|(w, tasks)| {
                let tasks = tasks
                    .into_iter()
                    .map(|(key, thread, start_s, ran_s)| RunningTask {
                        key,
                        thread,
                        started: std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(start_s.max(0.0)),
                        running_for: std::time::Duration::from_secs_f64(ran_s.max(0.0)),
                    })
                    .collect();
                (w, tasks)
            })
            .collect())
    }
}
