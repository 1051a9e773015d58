//! `dask config get KEY` and `dask config list` (the `dask` binary, as a process).
use std::process::Command;

fn dask(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = std::env::temp_dir().join(format!("dask-rs-config-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dask"))
        .args(args)
        // Only what the test gives: no machine or user configuration.
        .env("DASK_ROOT_CONFIG", &dir)
        .env("HOME", &dir)
        .env_remove("DASK_CONFIG")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_get_and_list_show_what_the_programs_read() {
    assert_eq!(dask(&["config", "get", "distributed.worker.memory.target"], &[]), (0, "0.6\n".into(), String::new()));
    // A DASK_* variable wins over the default; dashes and underscores alike.
    let (code, out, _) = dask(
        &["config", "get", "distributed.worker.memory.target"],
        &[("DASK_DISTRIBUTED__WORKER__MEMORY__TARGET", "0.5")],
    );
    assert_eq!((code, out.as_str()), (0, "0.5\n"));
    let (_, out, _) = dask(&["config", "get", "distributed.scheduler.allowed_failures"], &[]);
    assert_eq!(out, "3\n");
    // A section prints as a tree; the whole list too.
    let (_, section, _) = dask(&["config", "get", "distributed.worker.memory"], &[]);
    assert!(section.contains("pause: 0.8") && section.contains("terminate: 0.95"), "{section}");
    let (code, all, _) = dask(&["config", "list"], &[]);
    assert_eq!(code, 0);
    assert!(all.starts_with("distributed:\n") && all.contains("    memory:\n"), "{all}");
    // Unknown keys and bad usage say so.
    let (code, _, err) = dask(&["config", "get", "distributed.no-such-key"], &[]);
    assert_eq!((code, err.trim()), (1, "Section not found: distributed.no-such-key"));
    let (code, _, err) = dask(&["config", "frobnicate"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("usage: dask config get KEY"), "{err}");
}
