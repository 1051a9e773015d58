//! A user's own worker binary: their task functions plus the stock CLI, in one line of main.
//! The fault tests use it as their test worker (it has `dask_system_tests`' crashing and
//! memory-hungry functions).
use dask_system_tests as _; // links `triple` and the fault-test functions

/// As the docs advise for a worker binary of one's own (freed memory goes back to the system).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // For the fault tests: a worker that exits at once with code 3, when a nanny starts it.
    if std::env::var_os("DASK_TEST_WORKER_EXITS_AT_ONCE").is_some() && std::env::var_os("DASK_RS_NANNY").is_some() {
        eprintln!("custom-worker: exiting at once, as asked");
        return std::process::ExitCode::from(3);
    }
    dask::worker_main()
}
