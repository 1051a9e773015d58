//! `dask-worker`: the stock worker, with the built-in task functions.
fn main() -> std::process::ExitCode {
    dask_worker::worker_main()
}
