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
        Some("config") => config(&args[2..]),
        Some("security") => security(&args[2..]),
        Some("--version" | "-V") => {
            println!("dask {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        other => {
            let usage = "usage: dask scheduler [OPTIONS] | dask worker [SCHEDULER] [OPTIONS] | dask nanny [SCHEDULER] [OPTIONS]\n\
                         | dask config get KEY | dask config list | dask security temporary DIR\n\
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

/// `dask config get KEY` and `dask config list`: the configuration as this machine's programs
/// read it (defaults, YAML files, `DASK_*` variables), in dask's key names.
fn config(args: &[OsString]) -> ExitCode {
    let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let loaded = match dask_protocol::config::Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dask config: {e}");
            return ExitCode::FAILURE;
        }
    };
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["get", key] => match loaded.get_yaml(key) {
            Some(v) => {
                print!("{v}");
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("Section not found: {key}");
                ExitCode::FAILURE
            }
        },
        ["list"] => {
            print!("{}", loaded.to_yaml());
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: dask config get KEY | dask config list");
            ExitCode::FAILURE
        }
    }
}

/// `dask security temporary DIR`: throw-away TLS credentials for one cluster (dask's
/// `Security.temporary()`), written as `DIR/ca.pem`, `DIR/cert.pem` and `DIR/key.pem` (the key
/// readable by its owner only), for `--tls-ca-file`, `--tls-cert` and `--tls-key`.
fn security(args: &[OsString]) -> ExitCode {
    let usage = "usage: dask security temporary DIR (writes ca.pem, cert.pem and key.pem there)";
    let [cmd, dir] = args else {
        eprintln!("{usage}");
        return ExitCode::FAILURE;
    };
    if cmd != "temporary" {
        eprintln!("dask security: unknown command {cmd:?}\n{usage}");
        return ExitCode::FAILURE;
    }
    let dir = std::path::Path::new(dir);
    let written = dask_protocol::tls::Security::temporary()
        .map_err(|e| e.to_string())
        .and_then(|s| s.files(dir).map_err(|e| format!("failed to write to {}: {e}", dir.display())));
    match written {
        Ok(f) => {
            println!("--tls-ca-file {} --tls-cert {} --tls-key {}", f.ca.display(), f.cert.display(), f.key.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dask security: {e}");
            ExitCode::FAILURE
        }
    }
}
