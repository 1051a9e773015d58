//! `dask-scheduler`.

/// mimalloc: faster than glibc's malloc for many small allocations across threads, and it
/// gives freed memory back to the system (see docs/choices.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    dask_scheduler::cli::scheduler_main()
}
