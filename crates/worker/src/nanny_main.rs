//! `dask-nanny`: a nanny and its worker (the same flags as `dask-worker`), for deployments that
//! run one nanny per unit (systemd, containers). The worker is this program started again.

/// mimalloc: see docs/choices.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    dask_worker::cli::nanny_main()
}
