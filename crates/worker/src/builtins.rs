//! Task functions every `dask-worker` knows: enough for the README example, the tests and the
//! benchmarks. Users add their own with `#[dask::task]` in their own worker binary.
use dask_macros::task;

/// `x + 1`.
#[task(crate = dask_protocol)]
pub fn inc(x: i64) -> i64 {
    x + 1
}

/// `x - 1`.
#[task(crate = dask_protocol)]
pub fn dec(x: i64) -> i64 {
    x - 1
}

/// `x + y`.
#[task(crate = dask_protocol)]
pub fn add(x: i64, y: i64) -> i64 {
    x + y
}

/// `x * 2`.
#[task(crate = dask_protocol)]
pub fn double(x: i64) -> i64 {
    x * 2
}

/// Sum of a list (futures inside a list are fine).
#[task(crate = dask_protocol, name = "sum")]
pub fn sum_list(xs: Vec<i64>) -> i64 {
    xs.iter().sum()
}

/// Does nothing, returns nothing: the scheduling-overhead benchmark's task.
#[task(crate = dask_protocol)]
pub fn noop() {}

/// Returns its argument.
#[task(crate = dask_protocol)]
pub fn identity(x: i64) -> i64 {
    x
}

/// Sleeps `ms` milliseconds, then returns `x + 1` (dask's `slowinc`).
#[task(crate = dask_protocol)]
pub fn slowinc(x: i64, ms: u64) -> i64 {
    std::thread::sleep(std::time::Duration::from_millis(ms));
    x + 1
}

/// Fails with `message` (for tests of error paths).
#[task(crate = dask_protocol)]
pub fn fail(message: String) -> Result<i64, String> {
    Err(message)
}

/// Panics with `message` (for tests: a panic is a task error, not a dead worker).
#[task(crate = dask_protocol, name = "panic")]
pub fn panic_task(message: String) -> i64 {
    panic!("{message}")
}

/// What runs on this worker now (of `keys`; all if empty): `(key, executor thread, seconds since
/// the Unix epoch it started, seconds it has run)`. `Client::call_stack` runs it on workers.
#[task(crate = dask_protocol, name = "dask-call-stack")]
pub fn call_stack(keys: Vec<String>) -> Result<Vec<(String, u32, f64, f64)>, String> {
    let worker = crate::context::current_worker().ok_or("call_stack runs on a worker, through Client::run")?;
    let now = dask_protocol::sys::epoch_secs();
    let mut out: Vec<(String, u32, f64, f64)> = worker
        .running
        .lock()
        .iter()
        .filter(|(_, (k, _))| keys.is_empty() || keys.iter().any(|w| **w == **k))
        .map(|(t, (k, start))| (k.to_string(), *t, *start, (now - start).max(0.0)))
        .collect();
    out.sort_by_key(|t| t.1);
    Ok(out)
}
