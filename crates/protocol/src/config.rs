//! Configuration as dask reads it: dask's key names (`distributed.worker.memory.target`), YAML
//! files, `DASK_*` environment variables, and the same precedence.
//!
//! Sources, lowest first (a later one overrides an earlier one key by key):
//! 1. the defaults in `defaults.yaml` (dask's defaults for every key dask-rs reads);
//! 2. YAML files: `*.yaml`/`*.yml` in `$DASK_ROOT_CONFIG` (default `/etc/dask`), then in
//!    `~/.config/dask`, then in `$DASK_CONFIG` (a directory, or one file), each directory's files
//!    in name order;
//! 3. environment variables `DASK_A__B__C=value` for key `a.b.c` (values are read as YAML
//!    scalars: `0.7`, `true`, `"30s"`);
//! 4. command-line flags, which each program applies on top (`Option` flags left unset keep the
//!    configured value).
//!
//! Key names are canonical as in dask: case does not matter, and `_` equals `-`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use yaml_rust2::{Yaml, YamlLoader};

/// dask-rs's defaults, in dask's layout.
pub const DEFAULTS: &str = include_str!("defaults.yaml");

/// The keys dask.distributed knows, one per line (`SECTION.*`: any key may go under it).
const DASK_KEYS: &str = include_str!("dask_keys.txt");

/// The keys dask or dask-rs reads, built once per process.
struct KnownKeys {
    /// dask's keys and sections, and ours (from the defaults) with every section above them.
    exact: std::collections::HashSet<String>,
    /// dask's sections that take any key (`SECTION.*`).
    open: std::collections::HashSet<&'static str>,
}

impl KnownKeys {
    fn get() -> &'static KnownKeys {
        static KNOWN: std::sync::OnceLock<KnownKeys> = std::sync::OnceLock::new();
        KNOWN.get_or_init(|| {
            let mut ours = Vec::new();
            leaves("", &parse_yaml(DEFAULTS, Path::new("defaults.yaml")).unwrap_or_default(), &mut ours);
            let mut exact: std::collections::HashSet<String> =
                DASK_KEYS.lines().filter(|l| !l.ends_with(".*")).map(str::to_string).collect();
            for key in ours {
                let mut k = key.as_str();
                while let Some((parent, _)) = k.rsplit_once('.') {
                    exact.insert(parent.to_string());
                    k = parent;
                }
                exact.insert(key);
            }
            let open = DASK_KEYS.lines().filter_map(|l| l.strip_suffix(".*")).collect();
            KnownKeys { exact, open }
        })
    }

    /// The key, or a section it is under that takes any key.
    fn knows(&self, key: &str) -> bool {
        if self.exact.contains(key) {
            return true;
        }
        let mut k = key;
        while let Some((parent, _)) = k.rsplit_once('.') {
            if self.open.contains(parent) {
                return true;
            }
            k = parent;
        }
        false
    }
}

/// A configuration value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    Map(BTreeMap<String, Value>),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Null => write!(f, "null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::List(l) => write!(f, "a list of {}", l.len()),
            Value::Map(_) => write!(f, "a mapping"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to parse config file {path}: {why}; fix the YAML or move the file away")]
    Parse { path: PathBuf, why: String },
    #[error("config {key} = {value} (from {source_of}) {why}")]
    Bad { key: String, value: String, why: String, source_of: String },
}

/// The merged configuration tree.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    root: BTreeMap<String, Value>,
    /// Where each key set by a file or a variable came from (canonical dotted key → the file's
    /// path or `$VARIABLE`), for errors.
    sources: BTreeMap<String, String>,
}

impl Default for Config {
    /// The defaults alone.
    fn default() -> Self {
        let mut c = Config { root: BTreeMap::new(), sources: BTreeMap::new() };
        let defaults = parse_yaml(DEFAULTS, Path::new("defaults.yaml")).expect("the built-in defaults parse");
        c.merge(defaults);
        c
    }
}

fn scalar_yaml(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(x) => x.to_string(),
        Value::Str(s) if s.is_empty() || s.contains([':', '#', '\'', '"', '[', ']', '{', '}']) || s.trim() != s => {
            format!("{s:?}")
        }
        Value::Str(s) => s.clone(),
        Value::List(l) => format!("[{}]", l.iter().map(scalar_yaml).collect::<Vec<_>>().join(", ")),
        Value::Map(m) if m.is_empty() => "{}".into(),
        Value::Map(_) => "{...}".into(),
    }
}

fn write_yaml(m: &BTreeMap<String, Value>, depth: usize, out: &mut String) {
    for (k, v) in m {
        let pad = "  ".repeat(depth);
        match v {
            Value::Map(inner) if !inner.is_empty() => {
                out.push_str(&format!("{pad}{k}:\n"));
                write_yaml(inner, depth + 1, out);
            }
            v => out.push_str(&format!("{pad}{k}: {}\n", scalar_yaml(v))),
        }
    }
}

/// dask's canonical form of a key: lower case, `-` for `_`.
pub fn canonical(key: &str) -> String {
    key.trim().to_ascii_lowercase().replace('_', "-")
}

impl Config {
    /// The defaults, the files and the environment of this process.
    pub fn load() -> Result<Config, ConfigError> {
        let c = Config::from_sources(&search_paths(), std::env::vars())?;
        c.warn_unknown_keys();
        Ok(c)
    }

    /// Keys under `distributed.` set by a file or a variable that neither dask nor dask-rs
    /// knows (a misspelling, most likely), each with where it was set.
    pub fn unknown_keys(&self) -> Vec<(String, String)> {
        self.sources
            .iter()
            .filter(|(k, _)| k.starts_with("distributed.") && !KnownKeys::get().knows(k))
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect()
    }

    /// Warns once per process about each of [`Config::unknown_keys`].
    fn warn_unknown_keys(&self) {
        static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
        for (key, source) in self.unknown_keys() {
            if !warned.contains(&key) {
                tracing::warn!(
                    key = %key,
                    set_in = %source,
                    "unknown configuration key {key} (set in {source}): neither dask nor dask-rs reads it; misspelled? \
                     (`dask config list` shows what is read; docs/configuration.md lists every setting)"
                );
                warned.push(key);
            }
        }
    }

    /// The defaults, then the YAML files in `paths` (directories or files, lowest first), then
    /// the `DASK_*` variables among `env`.
    pub fn from_sources(
        paths: &[PathBuf],
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        for p in paths {
            for file in yaml_files(p)? {
                // A file that cannot be read is passed over, as dask does; one that cannot be
                // parsed is an error (it was meant to say something).
                let text = match std::fs::read_to_string(&file) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!(file = %file.display(), error = %e, "skipping a config file that cannot be read");
                        continue;
                    }
                };
                let parsed = parse_yaml(&text, &file)?;
                let mut keys = Vec::new();
                leaves("", &parsed, &mut keys);
                for k in keys {
                    c.sources.insert(k, file.display().to_string());
                }
                c.merge(parsed);
            }
        }
        let mut vars: Vec<(String, String)> = env.into_iter().filter(|(k, _)| k.starts_with("DASK_")).collect();
        vars.sort();
        for (k, v) in vars {
            let Some(path) = env_key(&k) else { continue };
            c.set(&path, scalar(&v));
            let dotted: Vec<String> = path.split('.').map(canonical).collect();
            c.sources.insert(dotted.join("."), format!("${k}"));
        }
        Ok(c)
    }

    /// Merges `other` over this one, key by key (mappings merge, anything else replaces).
    pub fn merge(&mut self, other: BTreeMap<String, Value>) {
        merge_maps(&mut self.root, other);
    }

    /// Sets one dotted key.
    pub fn set(&mut self, key: &str, value: Value) {
        let parts: Vec<String> = key.split('.').map(canonical).collect();
        let mut map = &mut self.root;
        for p in &parts[..parts.len() - 1] {
            let entry = map.entry(p.clone()).or_insert_with(|| Value::Map(BTreeMap::new()));
            if !matches!(entry, Value::Map(_)) {
                *entry = Value::Map(BTreeMap::new());
            }
            let Value::Map(m) = entry else { unreachable!("made a map above") };
            map = m;
        }
        map.insert(parts[parts.len() - 1].clone(), value);
    }

    /// The value of a dotted key (`distributed.worker.memory.target`), if set.
    pub fn get(&self, key: &str) -> Option<&Value> {
        let mut parts = key.split('.').map(canonical);
        let mut cur = self.root.get(&parts.next()?)?;
        for p in parts {
            match cur {
                Value::Map(m) => cur = m.get(&p)?,
                _ => return None,
            }
        }
        Some(cur)
    }

    /// The whole tree as YAML (`dask config list`).
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        write_yaml(&self.root, 0, &mut out);
        out
    }

    /// `key`'s value as YAML (`dask config get KEY`): a scalar on one line, a section as a tree.
    pub fn get_yaml(&self, key: &str) -> Option<String> {
        Some(match self.get(key)? {
            Value::Map(m) => {
                let mut out = String::new();
                write_yaml(m, 0, &mut out);
                out
            }
            v => format!("{}\n", scalar_yaml(v)),
        })
    }

    fn bad(&self, key: &str, why: &str) -> ConfigError {
        let value = self.get(key).map_or("(unset)".to_string(), |v| v.to_string());
        let dotted: Vec<String> = key.split('.').map(canonical).collect();
        let source_of = self.sources.get(&dotted.join(".")).cloned().unwrap_or_else(|| "the defaults".into());
        ConfigError::Bad { key: key.to_string(), value, why: why.to_string(), source_of }
    }

    /// A number; `None` when unset, null or `false` (dask's way of turning a threshold off).
    pub fn fraction(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(key) {
            None | Some(Value::Null | Value::Bool(false)) => Ok(None),
            Some(Value::Int(i)) => Ok(Some(*i as f64)),
            Some(Value::Float(x)) if x.is_finite() => Ok(Some(*x)),
            Some(Value::Str(s)) => match s.trim().parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(self.bad(key, "is not a number (use e.g. 0.7, or false to turn it off)")),
            },
            _ => Err(self.bad(key, "is not a number (use e.g. 0.7, or false to turn it off)")),
        }
    }

    /// A whole number.
    pub fn uint(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Int(i)) if *i >= 0 => Ok(Some(*i as u64)),
            Some(Value::Str(s)) => s.trim().parse().map(Some).map_err(|_| self.bad(key, "is not a whole number ≥ 0")),
            _ => Err(self.bad(key, "is not a whole number ≥ 0")),
        }
    }

    /// A boolean.
    pub fn boolean(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::Str(s)) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => Ok(Some(true)),
                "false" | "no" | "off" | "0" => Ok(Some(false)),
                _ => Err(self.bad(key, "is not true or false")),
            },
            _ => Err(self.bad(key, "is not true or false")),
        }
    }

    /// A string (`None` when unset, null or false).
    pub fn string(&self, key: &str) -> Option<String> {
        match self.get(key)? {
            Value::Null | Value::Bool(false) => None,
            Value::Str(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    }

    /// A duration in dask's spellings (`30s`, `5 minutes`, `100ms`, a number of seconds);
    /// `None` when unset, null or false.
    pub fn duration(&self, key: &str) -> Result<Option<Duration>, ConfigError> {
        match self.get(key) {
            None | Some(Value::Null | Value::Bool(false)) => Ok(None),
            Some(Value::Int(i)) if *i >= 0 => Ok(Some(Duration::from_secs(*i as u64))),
            Some(Value::Float(x)) if *x >= 0.0 && x.is_finite() => Ok(Some(Duration::from_secs_f64(*x))),
            Some(Value::Str(s)) => parse_duration(s).map(Some).map_err(|why| self.bad(key, &why)),
            _ => Err(self.bad(key, "is not a duration (use e.g. 30s, 100ms, 5 minutes)")),
        }
    }

    /// A size in bytes in dask's spellings (`10GB`, `4GiB`, a number); `None` when unset, null
    /// or false.
    pub fn bytes(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.get(key) {
            None | Some(Value::Null | Value::Bool(false)) => Ok(None),
            Some(Value::Int(i)) if *i >= 0 => Ok(Some(*i as u64)),
            Some(Value::Float(x)) if *x >= 0.0 && x.is_finite() => Ok(Some(*x as u64)),
            Some(Value::Str(s)) => parse_bytes(s).map(Some).map_err(|why| self.bad(key, &why)),
            _ => Err(self.bad(key, "is not a size (use e.g. 10GB, 4GiB, or a number of bytes)")),
        }
    }
}

/// Where dask looks for YAML files, lowest precedence first.
pub fn search_paths() -> Vec<PathBuf> {
    let mut paths = vec![PathBuf::from(std::env::var("DASK_ROOT_CONFIG").unwrap_or_else(|_| "/etc/dask".into()))];
    if let Some(home) = std::env::var_os("HOME") {
        paths.push(Path::new(&home).join(".config").join("dask"));
    }
    if let Some(p) = std::env::var_os("DASK_CONFIG") {
        paths.push(PathBuf::from(p));
    }
    paths
}

/// The YAML (and JSON, which YAML reads) files of a directory in name order, or the path itself
/// if it is a file. A missing path has none.
fn yaml_files(p: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    if p.is_file() {
        return Ok(vec![p.to_path_buf()]);
    }
    let Ok(dir) = std::fs::read_dir(p) else { return Ok(Vec::new()) };
    let mut files: Vec<PathBuf> = dir
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| f.is_file() && f.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "json"))
        .collect();
    files.sort();
    Ok(files)
}

/// `DASK_DISTRIBUTED__WORKER__MEMORY__TARGET` -> `distributed.worker.memory.target`. Variables
/// that name no key (`DASK_CONFIG`, `DASK_SCHEDULER_ADDRESS`, ...) have no `__`.
fn env_key(var: &str) -> Option<String> {
    let rest = var.strip_prefix("DASK_")?;
    if !rest.contains("__") {
        return None;
    }
    Some(rest.split("__").map(canonical).collect::<Vec<_>>().join("."))
}

/// An environment variable's value, read as a YAML scalar (dask reads it as a Python literal:
/// numbers, booleans, None, quoted strings).
fn scalar(s: &str) -> Value {
    let t = s.trim();
    match t {
        "None" | "null" | "~" => return Value::Null,
        "True" | "true" => return Value::Bool(true),
        "False" | "false" => return Value::Bool(false),
        _ => {}
    }
    if let Ok(i) = t.parse::<i64>() {
        return Value::Int(i);
    }
    if let Ok(x) = t.parse::<f64>() {
        return Value::Float(x);
    }
    let unquoted = t
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .or_else(|| t.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')));
    Value::Str(unquoted.unwrap_or(t).to_string())
}

fn parse_yaml(text: &str, path: &Path) -> Result<BTreeMap<String, Value>, ConfigError> {
    let docs = YamlLoader::load_from_str(text)
        .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), why: e.to_string() })?;
    let mut out = BTreeMap::new();
    for doc in docs {
        match convert(doc) {
            Value::Map(m) => merge_maps(&mut out, m),
            Value::Null => {}
            _ => {
                return Err(ConfigError::Parse {
                    path: path.to_path_buf(),
                    why: "the top level is not a mapping (expected e.g. `distributed:`)".into(),
                });
            }
        }
    }
    Ok(out)
}

fn convert(y: Yaml) -> Value {
    match y {
        Yaml::Real(s) => s.parse().map(Value::Float).unwrap_or(Value::Str(s)),
        Yaml::Integer(i) => Value::Int(i),
        Yaml::String(s) => Value::Str(s),
        Yaml::Boolean(b) => Value::Bool(b),
        Yaml::Array(a) => Value::List(a.into_iter().map(convert).collect()),
        Yaml::Hash(h) => Value::Map(
            h.into_iter()
                .map(|(k, v)| {
                    let k = match k {
                        Yaml::String(s) => s,
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Real(s) => s,
                        Yaml::Boolean(b) => b.to_string(),
                        _ => String::new(),
                    };
                    (canonical(&k), convert(v))
                })
                .collect(),
        ),
        Yaml::Null | Yaml::Alias(_) | Yaml::BadValue => Value::Null,
    }
}

/// The dotted keys of the leaves of `m`.
fn leaves(prefix: &str, m: &BTreeMap<String, Value>, out: &mut Vec<String>) {
    for (k, v) in m {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            Value::Map(inner) if !inner.is_empty() => leaves(&key, inner, out),
            _ => out.push(key),
        }
    }
}

fn merge_maps(into: &mut BTreeMap<String, Value>, from: BTreeMap<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Map(a)), Value::Map(b)) => merge_maps(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// dask's `parse_timedelta`: `30s`, `100ms`, `5 minutes`, `1.5h`, `2 days`, or a bare number of
/// seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.trim().parse().map_err(|_| "is not a duration (use e.g. 30s, 100ms, 5 minutes)".to_string())?;
    if !(n.is_finite() && n >= 0.0) {
        return Err("must be a duration of zero or more".into());
    }
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
        "ms" | "millisecond" | "milliseconds" => 1e-3,
        "us" | "µs" | "microsecond" | "microseconds" => 1e-6,
        "ns" | "nanosecond" | "nanoseconds" => 1e-9,
        "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
        "h" | "hr" | "hrs" | "hour" | "hours" => 3600.0,
        "d" | "day" | "days" => 86400.0,
        "w" | "wk" | "week" | "weeks" => 7.0 * 86400.0,
        _ => return Err("has an unknown time unit (use ms, s, minutes, hours, days)".into()),
    };
    Ok(Duration::from_secs_f64(n * secs))
}

/// dask's `parse_bytes`: `10GB`, `4GiB`, `500 MB`, `1e9`, or a number of bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t.find(|c: char| c.is_ascii_alphabetic() && c != 'e').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.trim().parse().map_err(|_| "is not a size (use e.g. 10GB, 4GiB, 500MB)".to_string())?;
    if !(n.is_finite() && n >= 0.0) {
        return Err("must be a size of zero or more".into());
    }
    let factor: f64 = match unit.trim() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "p" | "pb" => 1e15,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0f64.powi(3),
        "ti" | "tib" => 1024.0f64.powi(4),
        _ => return Err("has an unknown unit (use B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)".into()),
    };
    Ok((n * factor) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn unknown_distributed_keys_are_named_with_where_they_were_set() {
        let dir = std::env::temp_dir().join(format!("dask-rs-config-unknown-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A dask file: keys dask knows, keys only dask-rs knows, free-form sections, a typo.
        std::fs::write(
            dir.join("dask.yaml"),
            "distributed:\n  scheduler:\n    work-stealing-interval: 1s\n    max-connections: 100\n  \
             worker:\n    memory:\n      targt: 0.5\n    resources:\n      GPU: 2\n  \
             nanny:\n    pre-spawn-environ:\n      OMP_NUM_THREADS: 1\n  comm:\n    tls:\n      ca-file: ca.pem\n\
             array:\n  chunk-size: 128MiB\n",
        )
        .unwrap();
        let env = env(&[("DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL", "60s"), ("DASK_DISTRIBUTED__SCHEDULR__X", "1")]);
        let c = Config::from_sources(std::slice::from_ref(&dir), env).unwrap();
        let unknown = c.unknown_keys();
        let file = dir.join("dask.yaml").display().to_string();
        assert_eq!(
            unknown,
            vec![
                ("distributed.schedulr.x".to_string(), "$DASK_DISTRIBUTED__SCHEDULR__X".to_string()),
                ("distributed.worker.memory.targt".to_string(), file),
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn defaults_are_dasks() {
        let c = Config::default();
        assert_eq!(c.fraction("distributed.worker.memory.target").unwrap(), Some(0.6));
        assert_eq!(c.fraction("distributed.worker.memory.spill").unwrap(), Some(0.7));
        assert_eq!(c.fraction("distributed.worker.memory.pause").unwrap(), Some(0.8));
        assert_eq!(c.fraction("distributed.worker.memory.terminate").unwrap(), Some(0.95));
        assert_eq!(c.uint("distributed.scheduler.allowed-failures").unwrap(), Some(3));
        assert_eq!(c.duration("distributed.scheduler.worker-ttl").unwrap(), Some(Duration::from_secs(300)));
        assert_eq!(c.duration("distributed.worker.memory.monitor-interval").unwrap(), Some(Duration::from_millis(100)));
        assert_eq!(c.bytes("distributed.worker.memory.max-spill").unwrap(), None);
        assert_eq!(c.duration("distributed.worker.lifetime.duration").unwrap(), None);
    }

    #[test]
    fn files_then_environment_override_in_order_and_keys_are_canonical() {
        let dir = std::env::temp_dir().join(format!("dask-rs-config-test-{}", std::process::id()));
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(
            a.join("1.yaml"),
            "distributed:\n  worker:\n    memory:\n      target: 0.5\n      spill: 0.65\n",
        )
        .unwrap();
        // A later directory wins; `_` and `-` are one key.
        std::fs::write(
            b.join("x.yml"),
            "distributed:\n  scheduler:\n    allowed_failures: 7\n  worker:\n    memory:\n      spill: 0.75\n",
        )
        .unwrap();
        std::fs::write(b.join("ignored.txt"), "not: yaml: at: all:").unwrap();
        let c = Config::from_sources(
            &[a.clone(), b.clone(), dir.join("missing")],
            env(&[
                ("DASK_DISTRIBUTED__WORKER__MEMORY__TARGET", "0.55"),
                ("DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE", "False"),
                ("DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL", "\"2s\""),
                ("DASK_SCHEDULER_ADDRESS", "tcp://x:1"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.fraction("distributed.worker.memory.target").unwrap(), Some(0.55));
        assert_eq!(c.fraction("distributed.worker.memory.spill").unwrap(), Some(0.75));
        assert_eq!(c.fraction("distributed.worker.memory.pause").unwrap(), None, "false turns it off");
        assert_eq!(c.fraction("distributed.worker.memory.terminate").unwrap(), Some(0.95), "default kept");
        assert_eq!(c.uint("distributed.scheduler.allowed-failures").unwrap(), Some(7));
        assert_eq!(c.uint("DISTRIBUTED.SCHEDULER.ALLOWED_FAILURES").unwrap(), Some(7));
        assert_eq!(c.duration("distributed.scheduler.worker-ttl").unwrap(), Some(Duration::from_secs(2)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_files_and_values_say_what_is_wrong() {
        let dir = std::env::temp_dir().join(format!("dask-rs-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bad.yaml"), "distributed:\n  worker: [unclosed\n").unwrap();
        let e = Config::from_sources(std::slice::from_ref(&dir), env(&[])).unwrap_err().to_string();
        assert!(e.contains("bad.yaml") && e.contains("failed to parse"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();

        let c = Config::from_sources(&[], env(&[("DASK_DISTRIBUTED__WORKER__MEMORY__TARGET", "lots")])).unwrap();
        let e = c.fraction("distributed.worker.memory.target").unwrap_err().to_string();
        assert!(e.contains("distributed.worker.memory.target") && e.contains("not a number"), "{e}");
        let c = Config::from_sources(&[], env(&[("DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL", "soon")])).unwrap();
        let e = c.duration("distributed.scheduler.worker-ttl").unwrap_err().to_string();
        assert!(e.contains("worker-ttl") && e.contains("duration"), "{e}");
        assert!(e.contains("(from $DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL)"), "the variable is named: {e}");

        // A bad value in a file names the file.
        let dir = std::env::temp_dir().join(format!("dask-rs-config-bad-value-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("site.yaml"), "distributed:\n  worker:\n    memory:\n      pause: lots\n").unwrap();
        let c = Config::from_sources(std::slice::from_ref(&dir), env(&[])).unwrap();
        let e = c.fraction("distributed.worker.memory.pause").unwrap_err().to_string();
        assert!(e.contains("site.yaml") && e.contains("distributed.worker.memory.pause"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        // A default is said to be one.
        let mut c = Config::default();
        c.set("distributed.worker.memory.spill", Value::Str("x".into()));
        assert!(c.fraction("distributed.worker.memory.spill").unwrap_err().to_string().contains("(from the defaults)"));
    }

    #[test]
    fn dask_spellings_of_durations_and_sizes() {
        assert_eq!(parse_duration("5 minutes"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("fast").is_err());
        assert_eq!(parse_bytes("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_bytes("4 GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("1e9"), Ok(1_000_000_000));
        assert!(parse_bytes("4XB").is_err());
    }
}
