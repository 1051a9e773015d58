//! Facts about this machine and its processes (through `sysinfo`): system memory, a process's
//! resident memory, free disk space.
use std::path::Path;

use sysinfo::{DiskRefreshKind, Disks, Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// Now, in seconds since the Unix epoch (0 before it): the time the task stream, metrics and
/// worker reports carry.
pub fn epoch_secs() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Total system memory in bytes.
pub fn system_memory() -> u64 {
    let mut sys = System::new();
    sys.refresh_memory();
    let total = sys.total_memory();
    // In a container the cgroup's limit is what there is (dask takes the smaller too).
    match sys.cgroup_limits() {
        Some(c) if c.total_memory > 0 && c.total_memory < total => c.total_memory,
        _ => total,
    }
}

/// Returns memory that mimalloc (the allocator of our binaries) holds freed but mapped, as it
/// does after a burst of work until the threads that freed it allocate again: the decoded
/// batches of a 100k-task graph stayed in the scheduler's RSS, and spilled values in a worker's.
/// A no-op costing a few µs when mimalloc is not the global allocator (its heaps are then empty).
#[allow(unsafe_code)]
pub fn release_free_memory() {
    // SAFETY: `mi_collect` takes no pointers and may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Samples one process's resident memory (RSS), as dask's memory monitor does with psutil.
pub struct ProcessMemory {
    sys: System,
    pid: Pid,
}

impl std::fmt::Debug for ProcessMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProcessMemory({})", self.pid)
    }
}

impl ProcessMemory {
    /// This process.
    pub fn this_process() -> ProcessMemory {
        ProcessMemory::of(std::process::id())
    }

    pub fn of(pid: u32) -> ProcessMemory {
        ProcessMemory { sys: System::new(), pid: Pid::from_u32(pid) }
    }

    /// Resident bytes now; `None` if the process is gone.
    pub fn sample(&mut self) -> Option<u64> {
        self.sys.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[self.pid]),
            true,
            ProcessRefreshKind::nothing().with_memory(),
        );
        self.sys.process(self.pid).map(|p| p.memory())
    }
}

/// Bytes free for unprivileged users on the disk holding `path` (or its nearest existing
/// parent); `None` if no disk is found.
pub fn free_disk_space(path: &Path) -> Option<u64> {
    let mut p = path.to_path_buf();
    while !p.exists() {
        p = p.parent()?.to_path_buf();
    }
    let p = p.canonicalize().ok()?;
    let disks = Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing().with_storage());
    disks
        .list()
        .iter()
        .filter(|d| p.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| d.available_space())
}

/// CPU time this process has used so far, user and system.
#[cfg(unix)]
pub fn process_cpu() -> std::time::Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let secs = |t: nix::sys::time::TimeVal| {
                std::time::Duration::new(t.tv_sec().max(0) as u64, (t.tv_usec().max(0) as u32) * 1000)
            };
            secs(u.user_time()) + secs(u.system_time())
        }
        Err(_) => std::time::Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_and_the_temp_disk_has_room() {
        assert!(system_memory() > 0);
        let rss = ProcessMemory::this_process().sample().unwrap();
        assert!(rss > 1 << 20, "{rss}");
        assert!(free_disk_space(&std::env::temp_dir().join("not-there-yet")).unwrap() > 0);
        assert_eq!(ProcessMemory::of(u32::MAX - 1).sample(), None);
    }
}
