//! Memory: `--memory-limit` as dask reads it, and the memory policy (pure: samples in,
//! decisions out).
//!
//! The limit: bytes, `0` (no limit), a fraction of system memory (`0.5`), a size with a unit
//! (`4GB`, `4GiB`, `500MB`, `10e9`), or `auto` (system memory divided among the worker
//! processes).
//!
//! The thresholds are dask's, as fractions of the limit (`distributed.worker.memory.*`):
//! * `target` (0.6): managed memory (the values in the store) above it spills least recently
//!   used values to disk, at once, in the thread that stored a value;
//! * `spill` (0.7): process memory above it spills until process memory is below `target`;
//! * `pause` (0.8): process memory above it pauses the worker (no task starts, no fetches)
//!   until it is below again;
//! * `terminate` (0.95): the nanny restarts the worker (see `dask-nanny`).
//!
//! Each may be turned off (`false`); a limit of 0 turns them all off.

#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "failed to parse memory limit {input:?}: {why}; use bytes (4000000000), a size (4GB, 4GiB), a fraction of system memory (0.5), 0 for no limit, or auto"
)]
pub struct MemoryLimitError {
    pub input: String,
    pub why: String,
}

pub use dask_protocol::sys::system_memory;

/// dask's memory thresholds, as fractions of the limit; `None` turns one off.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    pub target: Option<f64>,
    pub spill: Option<f64>,
    pub pause: Option<f64>,
    pub terminate: Option<f64>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { target: Some(0.6), spill: Some(0.7), pause: Some(0.8), terminate: Some(0.95) }
    }
}

impl Thresholds {
    /// From `distributed.worker.memory.*`.
    pub fn from_config(c: &dask_protocol::config::Config) -> Result<Thresholds, String> {
        let get = |k: &str| {
            let key = format!("distributed.worker.memory.{k}");
            match c.fraction(&key).map_err(|e| e.to_string())? {
                Some(x) if !(0.0..=1.0).contains(&x) => Err(format!("{key} = {x} must be a fraction from 0 to 1")),
                x => Ok(x),
            }
        };
        Ok(Thresholds {
            target: get("target")?,
            spill: get("spill")?,
            pause: get("pause")?,
            terminate: get("terminate")?,
        })
    }
}

/// What the memory monitor should do after a sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorDecision {
    /// The worker pauses (`Some(true)`) or resumes (`Some(false)`).
    pub pause: Option<bool>,
    /// Spill least recently used values until process memory is below this many bytes.
    pub spill_until: Option<u64>,
}

/// The worker's memory policy: process memory samples in, spill and pause decisions out.
#[derive(Clone, Debug)]
pub struct MemoryPolicy {
    limit: u64,
    thresholds: Thresholds,
    paused: bool,
}

impl MemoryPolicy {
    /// `limit` 0: no limit, no decisions.
    pub fn new(limit: u64, thresholds: Thresholds) -> Self {
        MemoryPolicy { limit, thresholds, paused: false }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    fn bytes(&self, fraction: Option<f64>) -> Option<u64> {
        (self.limit > 0).then_some(())?;
        fraction.map(|f| (f * self.limit as f64) as u64)
    }

    /// Managed bytes above which stored values spill at once (`target`).
    pub fn target_bytes(&self) -> Option<u64> {
        self.bytes(self.thresholds.target)
    }

    /// Process bytes at which the nanny restarts the worker (`terminate`).
    pub fn terminate_bytes(&self) -> Option<u64> {
        self.bytes(self.thresholds.terminate)
    }

    /// Whether `process` bytes are over the `pause` threshold.
    pub fn over_pause(&self, process: u64) -> bool {
        self.bytes(self.thresholds.pause).is_some_and(|p| process > p)
    }

    /// Whether values may spill at all (any spilling threshold on, and a limit).
    pub fn spills(&self) -> bool {
        self.limit > 0 && (self.thresholds.target.is_some() || self.thresholds.spill.is_some())
    }

    /// One sample of the process's resident memory. Pauses above `pause` and resumes below it
    /// (as dask: no band between); above `spill`, asks to spill down to `target` (or to `spill`
    /// when `target` is off).
    pub fn on_sample(&mut self, process: u64) -> MonitorDecision {
        let mut d = MonitorDecision::default();
        if self.limit == 0 {
            return d;
        }
        if let Some(pause) = self.bytes(self.thresholds.pause) {
            let over = process > pause;
            if over != self.paused {
                self.paused = over;
                d.pause = Some(over);
            }
        } else if self.paused {
            self.paused = false;
            d.pause = Some(false);
        }
        if let Some(spill) = self.bytes(self.thresholds.spill)
            && process > spill
        {
            d.spill_until = self.bytes(self.thresholds.target.or(self.thresholds.spill));
        }
        d
    }
}

/// A worker's memory limit as dask reads `--memory-limit` (its `parse_memory_limit`): `auto` is
/// the system's memory × the worker's threads / the cores (at most all of it); a bare number up
/// to 1 is a fraction of the system's memory (`1` is all of it, `0` no limit); otherwise bytes
/// (`4GB`, `4GiB`, `10e9`). A limit above the system's memory is capped at it: the second value
/// is the warning to log then. `total`: the system's memory.
pub fn memory_limit_for(
    input: &str,
    total: u64,
    nthreads: usize,
    cores: usize,
) -> Result<(u64, Option<String>), MemoryLimitError> {
    let limit = if input.trim().eq_ignore_ascii_case("auto") {
        (total as f64 * (nthreads as f64 / cores.max(1) as f64).min(1.0)) as u64
    } else {
        parse_memory_limit(input, total)?
    };
    if limit > total && total > 0 {
        let why = format!(
            "--memory-limit {input} is more than this machine's memory ({total} bytes): using {total} bytes instead"
        );
        return Ok((total, Some(why)));
    }
    Ok((limit, None))
}

/// Parses a memory limit in bytes, or as a fraction (up to 1) of `total`, the system's memory.
pub fn parse_memory_limit(input: &str, total: u64) -> Result<u64, MemoryLimitError> {
    let err = |why: &str| MemoryLimitError { input: input.to_string(), why: why.to_string() };
    let s = input.trim().to_ascii_lowercase();
    if s.is_empty() {
        return Err(err("it is empty"));
    }
    let split = s.find(|c: char| c.is_ascii_alphabetic() && c != 'e').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.trim().parse().map_err(|_| err("the number part is not a number"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(err("it must not be negative"));
    }
    let factor: f64 = match unit.trim() {
        "" => {
            // A bare number up to 1 is a fraction of the system's memory (dask: `1` is all of it).
            if value <= 1.0 {
                return Ok((value * total as f64) as u64);
            }
            1.0
        }
        "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        _ => return Err(err("unknown unit (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)")),
    };
    Ok((value * factor) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    #[test]
    fn dasks_thresholds_pause_resume_and_spill() {
        let mut p = MemoryPolicy::new(1000 * MB, Thresholds::default());
        assert_eq!(p.target_bytes(), Some(600 * MB));
        assert_eq!(p.terminate_bytes(), Some(950 * MB));
        assert_eq!(p.on_sample(500 * MB), MonitorDecision::default());
        // Over spill: spill down to target.
        assert_eq!(p.on_sample(750 * MB), MonitorDecision { pause: None, spill_until: Some(600 * MB) });
        // Over pause: pause once, and keep spilling.
        assert_eq!(p.on_sample(850 * MB), MonitorDecision { pause: Some(true), spill_until: Some(600 * MB) });
        assert!(p.paused());
        assert_eq!(p.on_sample(820 * MB).pause, None, "already paused");
        // Below pause again: resume.
        assert_eq!(p.on_sample(790 * MB), MonitorDecision { pause: Some(false), spill_until: Some(600 * MB) });
        assert!(!p.paused());
    }

    #[test]
    fn thresholds_turn_off_one_by_one_and_all_without_a_limit() {
        let off = Thresholds { target: None, spill: Some(0.7), pause: None, terminate: None };
        let mut p = MemoryPolicy::new(1000 * MB, off);
        assert_eq!(p.target_bytes(), None);
        assert_eq!(p.terminate_bytes(), None);
        // No target: spill down to the spill threshold itself.
        assert_eq!(p.on_sample(990 * MB), MonitorDecision { pause: None, spill_until: Some(700 * MB) });
        let mut none = MemoryPolicy::new(0, Thresholds::default());
        assert_eq!(none.on_sample(u64::MAX), MonitorDecision::default());
        assert!(!none.spills() && none.target_bytes().is_none());
    }

    #[test]
    fn thresholds_come_from_dask_config_keys() {
        let c = dask_protocol::config::Config::from_sources(
            &[],
            [
                ("DASK_DISTRIBUTED__WORKER__MEMORY__TARGET".to_string(), "0.5".to_string()),
                ("DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE".to_string(), "false".to_string()),
            ],
        )
        .unwrap();
        let t = Thresholds::from_config(&c).unwrap();
        assert_eq!(t, Thresholds { target: Some(0.5), spill: Some(0.7), pause: None, terminate: Some(0.95) });
        let c = dask_protocol::config::Config::from_sources(
            &[],
            [("DASK_DISTRIBUTED__WORKER__MEMORY__SPILL".to_string(), "7".to_string())],
        )
        .unwrap();
        assert!(Thresholds::from_config(&c).unwrap_err().contains("fraction"));
    }

    #[test]
    fn dask_spellings() {
        let total = 16_000_000_000;
        assert_eq!(parse_memory_limit("4GB", total), Ok(4_000_000_000));
        assert_eq!(parse_memory_limit("4GiB", total), Ok(4 * 1024 * 1024 * 1024));
        assert_eq!(parse_memory_limit("500 MB", total), Ok(500_000_000));
        assert_eq!(parse_memory_limit("10e9", total), Ok(10_000_000_000));
        assert_eq!(parse_memory_limit("0", total), Ok(0));
        assert_eq!(parse_memory_limit("0.5", total), Ok(8_000_000_000));
        assert_eq!(parse_memory_limit("1", total), Ok(total), "1 is all of it, as in dask (not one byte)");
        assert_eq!(parse_memory_limit("1234", total), Ok(1234));
        for bad in ["", "lots", "4XB", "-1GB"] {
            let e = parse_memory_limit(bad, total).unwrap_err();
            assert!(e.to_string().contains("use bytes"), "{e}");
        }
        // auto: the system's memory times threads over cores, not divided among workers.
        assert_eq!(memory_limit_for("auto", total, 2, 8), Ok((4_000_000_000, None)));
        assert_eq!(memory_limit_for("auto", total, 16, 8), Ok((total, None)));
        // Above the machine's memory: capped, with a warning.
        let (limit, warning) = memory_limit_for("64GB", total, 1, 8).unwrap();
        assert_eq!(limit, total);
        assert!(warning.unwrap().contains("more than this machine's memory"));
    }
}
