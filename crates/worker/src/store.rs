//! The worker's values: in memory, or spilled to disk when memory runs short (dask's
//! `SpillBuffer`). Shared by the event loop, the executor threads and the data service.
//!
//! * Values in memory are *managed memory*. When it passes the `target` fraction of the memory
//!   limit, the thread that stored a value spills the least recently used ones to disk until it
//!   is below again ([`Store::insert`]); a value as large as the target itself goes to disk at
//!   once (as dask's). The memory monitor spills too when the whole process is over `spill`
//!   ([`Store::spill_one`]).
//! * A spilled value is one file under the worker's directory, named by a number (keys may hold
//!   any character). Reading it back reads the file into one buffer of its exact size (the
//!   kernel's copy is the only one) and keeps the file: the value is then *clean* in memory, and
//!   spilling it again costs no write. `max-spill` caps every byte on disk, clean copies
//!   included.
//! * Least recently used is approximate (second chance): reads stamp a value with the time; the
//!   spiller takes values in the order they were stored and passes over, once, those read since.
//!   A read costs one relaxed atomic store, no lock. Entries of values gone are dropped when the
//!   queue grows past twice the values held.
//! * Counters change before a value enters the map and after it leaves, or under its slot's
//!   lock: a concurrent remove never takes them below zero.
//! * The worker's directory holds a `.lock` file locked for the worker's life: a new worker
//!   removes the directories whose lock nobody holds (left by a crash), and only those.
//! * With a memory limit of 0 nothing spills and the store is a map.
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use dashmap::DashMap;
use dask_protocol::codec::Value;
use parking_lot::Mutex;

use crate::state::Key;

/// Where and how values spill.
#[derive(Clone, Debug)]
pub struct SpillConfig {
    /// The worker's own directory (created with the store, removed on close).
    pub dir: PathBuf,
    /// Managed bytes above which values spill at once (`target` × limit); `None`: only the
    /// monitor spills.
    pub target: Option<u64>,
    /// Bytes kept on disk at most (dask's `max-spill`); `None`: no cap.
    pub max_spill: Option<u64>,
    /// Compress spilled values with LZ4.
    pub compress: bool,
}

/// A value spilled to disk.
#[derive(Clone, Debug)]
struct OnDisk {
    file: u64,
    /// Bytes on disk (compressed or not).
    stored: u64,
    codec: &'static str,
    compressed: bool,
}

enum Slot {
    Memory {
        value: Value,
        /// Identifies this stored value (a key stored again gets a new one).
        id: u64,
        /// When it was last read, on the store's clock.
        used: AtomicU64,
        /// A copy on disk, when it was read back: spilling it again writes nothing.
        disk: Option<OnDisk>,
    },
    Disk {
        disk: OnDisk,
        /// Bytes in memory when read back.
        len: u64,
    },
}

/// What the memory monitor and `scheduler_info` report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Bytes of values in memory.
    pub managed: u64,
    /// Bytes of values on disk (as they are in memory, before compression).
    pub spilled: u64,
    /// Values on disk.
    pub spilled_count: u64,
    /// Bytes in files on disk (compressed; clean copies of values read back included).
    pub disk: u64,
    /// Bytes written to disk since the start (for benchmarks).
    pub spilled_total: u64,
    /// Bytes read back from disk since the start.
    pub unspilled_total: u64,
}

/// A value is on disk: reading it blocks (see [`Store::get_in_memory`]).
#[derive(Debug, Clone, Copy)]
pub struct OnDiskError;

/// Why a value could not be spilled.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    #[error("failed to write a spilled value to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("max-spill reached: {disk} bytes are on disk and the cap is {cap} (distributed.worker.memory.max-spill)")]
    Full { disk: u64, cap: u64 },
}

#[derive(Debug, thiserror::Error)]
#[error("failed to read back spilled value {key:?} from {path}: {why}")]
pub struct UnspillError {
    pub key: String,
    pub path: PathBuf,
    pub why: String,
}

pub struct Store {
    map: DashMap<Key, Slot, rustc_hash::FxBuildHasher>,
    spill: Option<SpillConfig>,
    /// Values in storing order, with the time they were queued (second chance LRU).
    lru: Mutex<VecDeque<(Key, u64, u64)>>,
    /// One spiller at a time: the disk writes one file at a time anyway.
    spilling: Mutex<()>,
    clock: AtomicU64,
    managed: AtomicU64,
    spilled: AtomicU64,
    spilled_count: AtomicU64,
    disk: AtomicU64,
    spilled_total: AtomicU64,
    unspilled_total: AtomicU64,
    /// Closed: nothing spills any more (the directory is gone).
    closed: AtomicBool,
    /// Entries queued for spilling since the queue was last compacted.
    queued: AtomicU64,
    /// Held (locked) for the store's life: the directory is in use.
    _lock: Option<std::fs::File>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({} values, {:?})", self.map.len(), self.stats())
    }
}

/// The lock file of a worker's directory.
const LOCK: &str = ".lock";

impl Store {
    /// A store that never spills.
    pub fn in_memory() -> Arc<Store> {
        Store::new(None).expect("no directory to make")
    }

    /// A store; with `spill`, its directory is made and locked now.
    pub fn new(spill: Option<SpillConfig>) -> std::io::Result<Arc<Store>> {
        let lock = match &spill {
            Some(s) => {
                std::fs::create_dir_all(&s.dir)?;
                let f = std::fs::File::create(s.dir.join(LOCK))?;
                f.try_lock().map_err(|e| std::io::Error::other(format!("{}: {e}", s.dir.display())))?;
                Some(f)
            }
            None => None,
        };
        Ok(Arc::new(Store {
            map: DashMap::with_hasher(rustc_hash::FxBuildHasher),
            spill,
            lru: Mutex::new(VecDeque::new()),
            spilling: Mutex::new(()),
            clock: AtomicU64::new(1),
            managed: AtomicU64::new(0),
            spilled: AtomicU64::new(0),
            spilled_count: AtomicU64::new(0),
            disk: AtomicU64::new(0),
            spilled_total: AtomicU64::new(0),
            unspilled_total: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            queued: AtomicU64::new(0),
            _lock: lock,
        }))
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            managed: self.managed.load(Ordering::Relaxed),
            spilled: self.spilled.load(Ordering::Relaxed),
            spilled_count: self.spilled_count.load(Ordering::Relaxed),
            disk: self.disk.load(Ordering::Relaxed),
            spilled_total: self.spilled_total.load(Ordering::Relaxed),
            unspilled_total: self.unspilled_total.load(Ordering::Relaxed),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// The spill settings, if values may spill.
    pub fn spill_config(&self) -> Option<&SpillConfig> {
        self.spill.as_ref()
    }

    /// Whether reads and writes may touch the disk (callers on async threads then step aside).
    pub fn spills(&self) -> bool {
        self.spill.is_some()
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Stores a value (replacing any other under its key); then, if managed memory is over
    /// `target`, spills least recently used values until it is not. A value as large as the
    /// target goes to disk at once: never dropped, and never pushing every other value out
    /// first.
    pub fn insert(&self, key: Key, value: Value) {
        let len = value.data.len() as u64;
        let id = self.tick();
        self.managed.fetch_add(len, Ordering::Relaxed);
        let old = self.map.insert(key.clone(), Slot::Memory { value, id, used: AtomicU64::new(id), disk: None });
        if let Some(old) = old {
            self.forget_slot(old);
        }
        let Some(spill) = &self.spill else { return };
        if spill.target.is_some_and(|t| len >= t) && !self.closed.load(Ordering::Relaxed) {
            let _one = self.spilling.lock();
            match self.spill_entry(spill, &key, id, id) {
                Ok(Some(_)) => return,
                Ok(None) => return, // gone or replaced meanwhile
                Err(e) => tracing::warn!("{e}; keeping a value of {len} bytes in memory"),
            }
        }
        self.enqueue(key, id);
        if let Some(target) = spill.target
            && self.managed.load(Ordering::Relaxed) > target
        {
            self.spill_down_to(target);
        }
    }

    /// Queues a value for spilling, dropping entries of values gone when the queue has grown
    /// past twice the values held.
    fn enqueue(&self, key: Key, id: u64) {
        let mut lru = self.lru.lock();
        lru.push_back((key, id, id));
        // Counting the map's values locks every shard: look only every 4096 values queued.
        if self.queued.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 && lru.len() > 2 * self.map.len() + 1024 {
            lru.retain(|(k, i, _)| matches!(self.map.get(k).as_deref(), Some(Slot::Memory { id, .. }) if id == i));
        }
    }

    /// The value of `key` if it is in memory; `Err` if it is on disk (reading it blocks).
    pub fn get_in_memory(&self, key: &str) -> Result<Option<Value>, OnDiskError> {
        match self.map.get(key).as_deref() {
            None => Ok(None),
            Some(Slot::Memory { value, used, .. }) => {
                used.store(self.tick(), Ordering::Relaxed);
                Ok(Some(value.clone()))
            }
            Some(Slot::Disk { .. }) => Err(OnDiskError),
        }
    }

    /// Whether storing `len` more bytes may write to disk (a spill).
    pub fn may_spill(&self, len: u64) -> bool {
        self.spill.as_ref().and_then(|s| s.target).is_some_and(|t| self.managed.load(Ordering::Relaxed) + len > t)
    }

    /// Stores a value that arrived as a file already in the spill directory (a value too large
    /// for memory, streamed to disk as it came). The file is moved into place.
    pub fn insert_spilled(&self, key: Key, codec: &'static str, file: &Path, len: u64) -> std::io::Result<()> {
        let id = self.tick();
        let target = self.file_path(id);
        if let Err(e) = std::fs::rename(file, &target) {
            let _ = std::fs::remove_file(file);
            return Err(e);
        }
        let disk = OnDisk { file: id, stored: len, codec, compressed: false };
        self.spilled.fetch_add(len, Ordering::Relaxed);
        self.spilled_count.fetch_add(1, Ordering::Relaxed);
        self.disk.fetch_add(len, Ordering::Relaxed);
        let old = self.map.insert(key, Slot::Disk { disk, len });
        if let Some(old) = old {
            self.forget_slot(old);
        }
        Ok(())
    }

    /// A fresh file name in the spill directory for a value arriving from the network.
    pub fn incoming_file(&self) -> Option<PathBuf> {
        let spill = self.spill.as_ref()?;
        (!self.closed.load(Ordering::Relaxed)).then(|| spill.dir.join(format!("incoming-{:016x}", self.tick())))
    }

    /// Room on disk for more spilled bytes: `max-spill` minus what is there, or (without a cap)
    /// the free space of the disk.
    pub fn spill_room(&self) -> u64 {
        let Some(spill) = &self.spill else { return 0 };
        match spill.max_spill {
            Some(cap) => cap.saturating_sub(self.disk.load(Ordering::Relaxed)),
            None => dask_protocol::sys::free_disk_space(&spill.dir).unwrap_or(u64::MAX),
        }
    }

    /// The value of `key`, read back from disk if it was spilled (and kept in memory after).
    pub fn get(&self, key: &str) -> Option<Value> {
        let disk = {
            let slot = self.map.get(key)?;
            match &*slot {
                Slot::Memory { value, used, .. } => {
                    used.store(self.tick(), Ordering::Relaxed);
                    return Some(value.clone());
                }
                Slot::Disk { disk, .. } => disk.clone(),
            }
        };
        match self.unspill(key, &disk) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!("{e}");
                None
            }
        }
    }

    /// Reads a spilled value back and keeps it in memory (with its file, as a clean copy).
    fn unspill(&self, key: &str, disk: &OnDisk) -> Result<Value, UnspillError> {
        let path = self.file_path(disk.file);
        let err = |why: String| UnspillError { key: key.to_string(), path: path.clone(), why };
        let raw = std::fs::read(&path).map_err(|e| err(e.to_string()))?;
        let data = if disk.compressed {
            lz4_flex::decompress_size_prepended(&raw).map_err(|e| err(e.to_string()))?
        } else {
            raw
        };
        let value = Value { codec: disk.codec, data: Bytes::from(data) };
        let len = value.data.len() as u64;
        self.unspilled_total.fetch_add(len, Ordering::Relaxed);
        // Back in memory, unless it changed meanwhile.
        let mut requeue = None;
        if let Some(mut slot) = self.map.get_mut(key)
            && matches!(&*slot, Slot::Disk { disk: d, .. } if d.file == disk.file)
        {
            let id = self.tick();
            self.managed.fetch_add(len, Ordering::Relaxed);
            *slot = Slot::Memory { value: value.clone(), id, used: AtomicU64::new(id), disk: Some(disk.clone()) };
            self.spilled.fetch_sub(len, Ordering::Relaxed);
            self.spilled_count.fetch_sub(1, Ordering::Relaxed);
            requeue = Some(id);
        }
        if let Some(id) = requeue {
            self.enqueue(Arc::from(key), id);
            if let Some(target) = self.spill.as_ref().and_then(|s| s.target)
                && self.managed.load(Ordering::Relaxed) > target
            {
                self.spill_down_to(target);
            }
        }
        Ok(value)
    }

    /// Removes the value of `key`, in memory or on disk.
    pub fn remove(&self, key: &str) {
        if let Some((_, slot)) = self.map.remove(key) {
            self.forget_slot(slot);
        }
    }

    /// Takes a slot's bytes off the counters and removes its file (the slot left the map).
    fn forget_slot(&self, slot: Slot) {
        let disk = match slot {
            Slot::Memory { value, disk, .. } => {
                self.managed.fetch_sub(value.data.len() as u64, Ordering::Relaxed);
                disk
            }
            Slot::Disk { disk, len } => {
                self.spilled.fetch_sub(len, Ordering::Relaxed);
                self.spilled_count.fetch_sub(1, Ordering::Relaxed);
                Some(disk)
            }
        };
        if let Some(d) = disk {
            self.remove_file(&d);
        }
    }

    fn remove_file(&self, d: &OnDisk) {
        let _ = std::fs::remove_file(self.file_path(d.file));
        self.disk.fetch_sub(d.stored, Ordering::Relaxed);
    }

    /// Spills least recently used values until managed memory is at most `target`.
    fn spill_down_to(&self, target: u64) {
        while self.managed.load(Ordering::Relaxed) > target {
            match self.spill_one() {
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!("{e}; keeping values in memory");
                    return;
                }
            }
        }
    }

    /// Spills the least recently used value in memory; returns its size, or `None` when
    /// nothing is left to spill (or the store is closed). A value that does not fit under
    /// `max-spill` keeps its place and the next one is tried.
    pub fn spill_one(&self) -> Result<Option<u64>, SpillError> {
        let Some(spill) = &self.spill else { return Ok(None) };
        let _one = self.spilling.lock();
        let mut budget = self.lru.lock().len() * 2 + 1;
        let mut refused = None;
        while budget > 0 && !self.closed.load(Ordering::Relaxed) {
            budget -= 1;
            let Some((key, id, queued)) = self.lru.lock().pop_front() else { break };
            let used = match self.map.get(&key).as_deref() {
                Some(Slot::Memory { id: i, used, .. }) if *i == id => used.load(Ordering::Relaxed),
                _ => continue, // gone, spilled, or stored again (queued anew then)
            };
            if used > queued {
                // Read since it was queued: a second chance.
                self.lru.lock().push_back((key, id, used));
                continue;
            }
            match self.spill_entry(spill, &key, id, queued) {
                Ok(Some(len)) => return Ok(Some(len)),
                Ok(None) => continue,
                Err(e @ SpillError::Full { .. }) => {
                    self.lru.lock().push_back((key, id, queued));
                    refused = Some(e);
                }
                Err(e) => {
                    self.lru.lock().push_front((key, id, queued));
                    return Err(e);
                }
            }
        }
        match refused {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    /// Moves one value (still stored under `id`) to disk. The caller holds `spilling`.
    fn spill_entry(&self, spill: &SpillConfig, key: &Key, id: u64, _queued: u64) -> Result<Option<u64>, SpillError> {
        let (value, clean) = match self.map.get(key).as_deref() {
            Some(Slot::Memory { value, id: i, disk, .. }) if *i == id => (value.clone(), disk.clone()),
            _ => return Ok(None),
        };
        let len = value.data.len() as u64;
        let disk = match clean {
            Some(d) => d,
            None => self.write(spill, id, &value)?,
        };
        let mut stored = false;
        if let Some(mut slot) = self.map.get_mut(key)
            && matches!(&*slot, Slot::Memory { id: i, .. } if *i == id)
        {
            self.spilled.fetch_add(len, Ordering::Relaxed);
            self.spilled_count.fetch_add(1, Ordering::Relaxed);
            *slot = Slot::Disk { disk: disk.clone(), len };
            self.managed.fetch_sub(len, Ordering::Relaxed);
            stored = true;
        }
        if stored {
            return Ok(Some(len));
        }
        // Replaced or removed while we wrote: the file is nobody's.
        self.remove_file(&disk);
        Ok(None)
    }

    fn write(&self, spill: &SpillConfig, id: u64, value: &Value) -> Result<OnDisk, SpillError> {
        let (bytes, compressed): (std::borrow::Cow<'_, [u8]>, bool) = if spill.compress {
            (lz4_flex::compress_prepend_size(&value.data).into(), true)
        } else {
            (value.data[..].into(), false)
        };
        let stored = bytes.len() as u64;
        if let Some(cap) = spill.max_spill {
            let disk = self.disk.load(Ordering::Relaxed);
            if disk + stored > cap {
                return Err(SpillError::Full { disk, cap });
            }
        }
        let path = self.file_path(id);
        std::fs::write(&path, &bytes).map_err(|source| SpillError::Write { path: path.clone(), source })?;
        self.disk.fetch_add(stored, Ordering::Relaxed);
        self.spilled_total.fetch_add(value.data.len() as u64, Ordering::Relaxed);
        Ok(OnDisk { file: id, stored, codec: value.codec, compressed })
    }

    fn file_path(&self, id: u64) -> PathBuf {
        let dir = self.spill.as_ref().map_or_else(std::env::temp_dir, |s| s.dir.clone());
        dir.join(format!("{id:016x}"))
    }

    /// Bytes of a spilled value on disk (for tests).
    #[doc(hidden)]
    pub fn stored_bytes(&self, key: &str) -> Option<u64> {
        match self.map.get(key).as_deref() {
            Some(Slot::Disk { disk, .. }) => Some(disk.stored),
            _ => None,
        }
    }

    /// Stops spilling and removes the spill directory and everything in it (on a clean exit).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        let _wait = self.spilling.lock();
        if let Some(spill) = &self.spill
            && spill.dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&spill.dir)
        {
            tracing::warn!(dir = %spill.dir.display(), error = %e, "failed to remove the spill directory");
        }
    }
}

/// Removes the directories (under `scratch`) of workers that are gone: those whose lock file
/// nobody holds. A crash leaves its spilled values behind; dask's nanny cleans them up the
/// same way. Directories of live workers, here or on other hosts sharing the disk, are locked.
pub fn remove_stale_dirs(scratch: &Path) {
    let Ok(dir) = std::fs::read_dir(scratch) else { return };
    for entry in dir.flatten() {
        let path = entry.path();
        if !entry.file_name().to_str().is_some_and(|n| n.starts_with("worker-")) {
            continue;
        }
        let Ok(lock) = std::fs::OpenOptions::new().write(true).open(path.join(LOCK)) else { continue };
        if lock.try_lock().is_ok() {
            tracing::info!(dir = %path.display(), "removing the files of a worker that is gone");
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dask_protocol::codec::RAW;

    fn dir(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("dask-rs-store-{tag}-{}", std::process::id()))
    }

    fn value(n: usize, fill: u8) -> Value {
        Value { codec: RAW, data: Bytes::from(vec![fill; n]) }
    }

    fn store(tag: &str, target: u64, max_spill: Option<u64>, compress: bool) -> Arc<Store> {
        let _ = std::fs::remove_dir_all(dir(tag));
        Store::new(Some(SpillConfig { dir: dir(tag), target: Some(target), max_spill, compress })).unwrap()
    }

    #[test]
    fn over_target_the_least_recently_used_values_spill_and_come_back() {
        let s = store("lru", 250, None, false);
        s.insert(Arc::from("a"), value(100, 1));
        s.insert(Arc::from("b"), value(100, 2));
        // Reading `a` makes `b` the least recently used.
        assert_eq!(s.get("a").unwrap().data[0], 1);
        s.insert(Arc::from("c"), value(100, 3));
        let st = s.stats();
        assert_eq!((st.managed, st.spilled, st.spilled_count), (200, 100, 1));
        assert!(s.stored_bytes("b").is_some(), "b spilled");
        assert!(s.stored_bytes("a").is_none() && s.stored_bytes("c").is_none());
        // Read back: right bytes, in memory again; the other LRU value goes out instead.
        let b = s.get("b").unwrap();
        assert_eq!((b.data.len(), b.data[99], b.codec), (100, 2, RAW));
        assert_eq!(s.stats().managed, 200);
        assert_eq!(s.stats().spilled_count, 1);
        // Removing a spilled value removes its file; close removes the directory.
        for k in ["a", "b", "c"] {
            s.remove(k);
        }
        assert_eq!(s.stats(), StoreStats { spilled_total: 200, unspilled_total: 100, ..Default::default() });
        assert_eq!(std::fs::read_dir(dir("lru")).unwrap().count(), 1, "no files left but the lock");
        s.close();
        assert!(!dir("lru").exists());
    }

    #[test]
    fn a_value_larger_than_the_target_is_spilled_not_dropped() {
        let s = store("huge", 50, None, false);
        s.insert(Arc::from("big"), value(1000, 7));
        assert_eq!(s.stats().managed, 0);
        assert_eq!(s.stats().spilled, 1000);
        assert_eq!(s.get("big").unwrap().data.len(), 1000);
        s.close();
    }

    #[test]
    fn max_spill_keeps_values_in_memory_rather_than_lose_them() {
        let s = store("cap", 50, Some(150), false);
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            s.insert(Arc::from(*k), value(100, i as u8));
        }
        // One fits on disk; the rest stay in memory.
        let st = s.stats();
        assert_eq!((st.spilled, st.managed), (100, 200));
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            assert_eq!(s.get(k).unwrap().data[0], i as u8);
        }
        s.close();
    }

    #[test]
    fn compressed_spill_reads_back_the_same_bytes() {
        let s = store("lz4", 10, None, true);
        s.insert(Arc::from("z"), value(10_000, 0));
        let stored = s.stored_bytes("z").unwrap();
        assert!(stored < 1000, "zeros compress: {stored}");
        assert_eq!(s.get("z").unwrap().data, Bytes::from(vec![0u8; 10_000]));
        s.close();
    }

    #[test]
    fn a_clean_copy_spills_again_without_a_write() {
        let s = store("clean", 150, None, false);
        s.insert(Arc::from("a"), value(100, 1));
        s.insert(Arc::from("b"), value(100, 2)); // a spills
        assert!(s.get("a").is_some()); // a back, b spills
        assert!(s.get("b").is_some()); // b back, a spills again: its file is still there
        assert_eq!(s.stats().spilled_total, 200, "a written once, b once");
        s.close();
    }

    #[test]
    fn without_a_target_only_the_monitor_spills_oldest_first() {
        let _ = std::fs::remove_dir_all(dir("monitor"));
        let cfg = SpillConfig { dir: dir("monitor"), target: None, max_spill: None, compress: false };
        let s = Store::new(Some(cfg)).unwrap();
        s.insert(Arc::from("old"), value(100, 1));
        s.insert(Arc::from("new"), value(100, 2));
        assert_eq!(s.stats().spilled, 0, "nothing spills by itself");
        assert_eq!(s.spill_one().unwrap(), Some(100));
        assert!(s.stored_bytes("old").is_some() && s.stored_bytes("new").is_none());
        s.close();
    }

    #[test]
    fn max_spill_counts_clean_copies_too() {
        let s = store("cap-clean", 150, Some(250), false);
        s.insert(Arc::from("a"), value(100, 1));
        s.insert(Arc::from("b"), value(100, 2)); // a spills: 100 on disk
        assert!(s.get("a").is_some()); // a back (its file stays), b spills: 200 on disk
        assert_eq!(s.stats().disk, 200);
        s.insert(Arc::from("c"), value(100, 3)); // a spills again (clean): still 200
        assert_eq!(s.stats().disk, 200);
        s.insert(Arc::from("d"), value(100, 4)); // c would make 300 > 250: refused, kept
        assert_eq!(s.stats().disk, 200);
        assert_eq!(s.stats().managed, 200);
        s.close();
    }

    #[test]
    fn stale_directories_go_and_live_ones_stay() {
        let scratch = dir("scratch");
        let _ = std::fs::remove_dir_all(&scratch);
        let live = Store::new(Some(SpillConfig {
            dir: scratch.join("worker-live"),
            target: Some(10),
            max_spill: None,
            compress: false,
        }))
        .unwrap();
        live.insert(Arc::from("x"), value(100, 1));
        // A crashed worker's directory: a lock file nobody holds, and a spilled value.
        let dead = scratch.join("worker-dead");
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::write(dead.join(LOCK), b"").unwrap();
        std::fs::write(dead.join("0000000000000001"), b"old").unwrap();
        remove_stale_dirs(&scratch);
        assert!(!dead.exists(), "the dead worker's files are gone");
        assert!(scratch.join("worker-live").exists() && live.get("x").is_some(), "the live one is untouched");
        live.close();
        let _ = std::fs::remove_dir_all(&scratch);
    }
}
