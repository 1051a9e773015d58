//! A user's own worker binary: their task functions plus the stock CLI, in one line of main.
use dask_system_tests as _; // links `triple`

fn main() -> std::process::ExitCode {
    dask::worker_main()
}
