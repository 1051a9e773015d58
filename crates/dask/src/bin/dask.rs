//! `dask scheduler ...`, `dask worker ...` and `dask nanny ...`: current dask's spelling of
//! `dask-scheduler`, `dask-worker` and `dask-nanny`, with the same flags.

/// mimalloc: faster than glibc's malloc for many small allocations across threads, and it
/// gives freed memory back to the system (see docs/choices.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::ffi::OsString;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let sub = args.get(1).and_then(|a| a.to_str()).map(str::to_string);
    match sub.as_deref() {
        Some("scheduler") => {
            args.remove(0);
            args[0] = "dask scheduler".into();
            dask_scheduler::cli::scheduler_main_from(args)
        }
        Some("worker") => {
            args.remove(0);
            args[0] = "dask worker".into();
            dask_worker::cli::worker_main_as(args, &["worker"], false)
        }
        Some("nanny") => {
            args.remove(0);
            args[0] = "dask nanny".into();
            dask_worker::cli::worker_main_as(args, &["nanny"], true)
        }
        Some("--version" | "-V") => {
            println!("dask {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        other => {
            let usage = "usage: dask scheduler [OPTIONS] | dask worker [SCHEDULER] [OPTIONS] | dask nanny [SCHEDULER] [OPTIONS]\n\
                         (the same as dask-scheduler, dask-worker and dask-nanny; add --help for their options)";
            if matches!(other, Some("--help" | "-h" | "help")) {
                println!("{usage}");
                ExitCode::SUCCESS
            } else {
                eprintln!("dask: unknown command {:?}\n{usage}", other.unwrap_or(""));
                ExitCode::FAILURE
            }
        }
    }
}
