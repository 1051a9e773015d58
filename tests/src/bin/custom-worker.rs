//! A user's own worker binary: their task functions plus the stock CLI, in one line of main.
use dask_system_tests as _; // links `triple` and the fault-test functions

/// As the docs advise for a worker binary of one's own (freed memory goes back to the system).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    dask::worker_main()
}
