//! `dask-scheduler`.
fn main() -> std::process::ExitCode {
    dask_scheduler::cli::scheduler_main()
}
