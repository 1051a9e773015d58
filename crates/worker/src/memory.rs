//! `--memory-limit` as dask reads it: bytes, `0` (no limit), a fraction of system memory
//! (`0.5`), a size with a unit (`4GB`, `4GiB`, `500MB`, `10e9`), or `auto` (system memory
//! divided among the worker processes).

#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "failed to parse memory limit {input:?}: {why}; use bytes (4000000000), a size (4GB, 4GiB), a fraction of system memory (0.5), 0 for no limit, or auto"
)]
pub struct MemoryLimitError {
    pub input: String,
    pub why: String,
}

/// Total system memory in bytes.
pub fn system_memory() -> u64 {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    sys.total_memory()
}

/// Parses a memory limit. `total` is the system's memory, `nworkers` the processes sharing it.
pub fn parse_memory_limit(input: &str, total: u64, nworkers: u64) -> Result<u64, MemoryLimitError> {
    let err = |why: &str| MemoryLimitError { input: input.to_string(), why: why.to_string() };
    let s = input.trim().to_ascii_lowercase();
    if s == "auto" {
        return Ok(total / nworkers.max(1));
    }
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
            // A bare number <= 1 (other than 0) is a fraction of system memory.
            if value > 0.0 && value <= 1.0 && num.contains('.') || value > 0.0 && value < 1.0 {
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

    #[test]
    fn dask_spellings() {
        let total = 16_000_000_000;
        assert_eq!(parse_memory_limit("4GB", total, 1), Ok(4_000_000_000));
        assert_eq!(parse_memory_limit("4GiB", total, 1), Ok(4 * 1024 * 1024 * 1024));
        assert_eq!(parse_memory_limit("500 MB", total, 1), Ok(500_000_000));
        assert_eq!(parse_memory_limit("10e9", total, 1), Ok(10_000_000_000));
        assert_eq!(parse_memory_limit("0", total, 1), Ok(0));
        assert_eq!(parse_memory_limit("0.5", total, 1), Ok(8_000_000_000));
        assert_eq!(parse_memory_limit("auto", total, 2), Ok(8_000_000_000));
        assert_eq!(parse_memory_limit("1234", total, 1), Ok(1234));
        for bad in ["", "lots", "4XB", "-1GB"] {
            let e = parse_memory_limit(bad, total, 1).unwrap_err();
            assert!(e.to_string().contains("use bytes"), "{e}");
        }
    }
}
