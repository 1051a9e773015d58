//! Loading plugin libraries (`Client::upload_file`, later `--preload`): the worker's side of
//! the boundary described in `dask_protocol::library`. The only `unsafe` of the worker.
//!
//! # Why it is sound
//! * `dlopen` runs the library's initialisers (its `inventory` registrations, which only link
//!   nodes into the library's own lists). Loading a file is trusting it, as dask's
//!   `upload_file` trusts the Python it imports; only a client of the cluster can upload.
//! * The symbol is read as `&'static Vtable` only after its name, which carries the layout's
//!   version (`..._V1`), was found; its first field, `abi`, is checked before any other field is
//!   used, and the crate version before any function is called. A library built by
//!   `plugin_library!` of this crate's version has exactly this layout.
//! * Calls pass only pointers to bytes borrowed for the call, and get back a `Buf` that goes back
//!   to the library's own `free` (its allocator, not ours). Nothing unwinds across: the library
//!   catches panics in its functions.
//! * A library is never unloaded: its functions may be running on any executor thread, and its
//!   thread-locals may have destructors registered; leaking the handle keeps the `'static`
//!   table valid for the life of the process. Uploading a new build loads it under a new file
//!   name (the content's hash), and its functions replace the old ones for new tasks.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use dask_protocol::codec::{Value, codec_name};
use dask_protocol::library::{ABI, Buf, SYMBOL_PREFIX, VERSION, Vtable};
use dask_protocol::pb;
use dask_protocol::task::{ExecErrorKind, ExternalTask, register_external, set_panic_backtrace};
use prost::Message;

/// A loaded library's functions.
struct Loaded {
    table: &'static Vtable,
    file: String,
}

impl Loaded {
    /// Copies a `Buf` the library returned and gives it back to the library.
    fn take(&self, buf: Buf) -> Vec<u8> {
        if buf.ptr.is_null() {
            // Nothing was allocated (a library that does not follow the contract).
            return Vec::new();
        }
        let v = if buf.len == 0 {
            Vec::new()
        } else {
            // SAFETY: the library returned `len` initialised bytes at `ptr`, valid until freed.
            unsafe { std::slice::from_raw_parts(buf.ptr, buf.len) }.to_vec()
        };
        // SAFETY: returned by this library, freed once, by its own allocator.
        unsafe { (self.table.free)(buf) };
        v
    }
}

impl ExternalTask for Loaded {
    fn call(&self, spec: &pb::TaskSpec, deps: &HashMap<String, Value>) -> Result<Value, ExecErrorKind> {
        let req = pb::LibraryCall {
            spec: Some(spec.clone()),
            deps: deps
                .iter()
                .map(|(k, v)| pb::LibraryValue { key: k.clone(), codec: v.codec.to_string(), data: v.data.clone() })
                .collect(),
        };
        let input = req.encode_to_vec();
        // SAFETY: `input` is valid for the call; the table was checked at load.
        let out = self.take(unsafe { (self.table.call)(input.as_ptr(), input.len()) });
        let r = pb::LibraryResult::decode(&out[..])
            .map_err(|e| ExecErrorKind::Error(format!("plugin library {} gave a malformed answer: {e}", self.file)))?;
        if r.ok {
            let codec = codec_name(&r.codec).map_err(|e| ExecErrorKind::Error(e.to_string()))?;
            return Ok(Value { codec, data: r.data });
        }
        let e = r.error.unwrap_or_default();
        Err(match e.kind.as_str() {
            "panic" => {
                set_panic_backtrace(e.traceback);
                ExecErrorKind::Panic(e.message)
            }
            "bad-arguments" => ExecErrorKind::BadArguments(e.message),
            "unknown-function" => ExecErrorKind::UnknownFunction(e.message),
            "missing-dependency" => ExecErrorKind::MissingDependency(e.message),
            dask_protocol::task::RESCHEDULE => ExecErrorKind::Reschedule,
            _ => ExecErrorKind::Error(e.message),
        })
    }
}

/// Whether a library built with version `theirs` of dask-protocol speaks this worker's wire.
/// Before 1.0 every minor version may change it; after, the major.
pub fn compatible(theirs: &str, ours: &str) -> bool {
    let parts = |v: &str| -> Option<(u64, u64)> {
        let mut it = v.split(['.', '-', '+']);
        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    };
    match (parts(theirs), parts(ours)) {
        (Some((0, a)), Some((0, b))) => a == b,
        (Some((a, _)), Some((b, _))) => a == b,
        _ => false,
    }
}

/// The crate a library file is named after (`libmy_tasks.so`, `my_tasks.dll` → `my_tasks`).
pub fn crate_name(file_name: &str) -> String {
    let stem = file_name.strip_suffix(std::env::consts::DLL_SUFFIX).unwrap_or(file_name);
    let stem = stem.rsplit_once('.').map_or(stem, |(s, _)| s);
    let stem = stem.strip_prefix(std::env::consts::DLL_PREFIX).unwrap_or(stem);
    stem.replace('-', "_")
}

/// Loads the plugin library at `path`, built from crate `krate`, and adds its functions to
/// this process's tasks; returns their names. Loading the same file twice is harmless.
pub fn load(path: &Path, krate: &str) -> Result<Vec<String>, String> {
    let file = path.display().to_string();
    let symbol = format!("{SYMBOL_PREFIX}{krate}");
    // SAFETY: see the module: loading runs the library's initialisers, which we trust as
    // dask trusts uploaded code.
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| format!("could not load {file} as a plugin library: {}", dask_protocol::error_chain(&e)))?;
    // SAFETY: the symbol's name fixes its type (`&'static Vtable`); read as a pointer to it.
    let table: &'static Vtable = match unsafe { lib.get::<*const &'static Vtable>(symbol.as_bytes()) } {
        Ok(sym) => unsafe { **sym },
        Err(_) => {
            return Err(format!(
                "{file} is not a dask plugin library of crate {krate:?}: it exports no {symbol}; build \
                 it as a cdylib that calls dask::plugin_library!(), and keep the file name cargo gives \
                 it (lib<crate>{})",
                std::env::consts::DLL_SUFFIX
            ));
        }
    };
    if table.abi != ABI {
        return Err(format!(
            "{file} was built for plugin interface {} and this worker speaks {ABI}: rebuild it \
             against dask {VERSION}",
            table.abi
        ));
    }
    // SAFETY: `abi` matched, so these are a pointer and length of a 'static UTF-8 string.
    let version = unsafe { std::slice::from_raw_parts(table.version_ptr, table.version_len) };
    let version = String::from_utf8_lossy(version).into_owned();
    if !compatible(&version, VERSION) {
        return Err(format!(
            "{file} was built with dask {version}, and this worker runs dask {VERSION}: rebuild \
             the library against dask {VERSION}"
        ));
    }
    // Never unloaded (see the module).
    std::mem::forget(lib);
    let loaded = Arc::new(Loaded { table, file: file.clone() });
    let names: Vec<String> =
        dask_protocol::codec::decode(dask_protocol::codec::MSGPACK, &loaded.take((table.functions)()))
            .map_err(|e| format!("{file} listed its functions in a form this worker cannot read: {e}"))?;
    let shadowed = register_external(&names, loaded);
    if !shadowed.is_empty() {
        tracing::warn!(library = %file, functions = ?shadowed, "these functions of the library are built into this worker already: the worker's own run");
    }
    tracing::info!(library = %file, functions = names.len(), "plugin library loaded");
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_is_named_after_its_crate() {
        assert_eq!(crate_name("libmy_tasks.so"), "my_tasks");
        assert_eq!(crate_name("libmy-tasks.so"), "my_tasks");
        assert_eq!(crate_name("tasks.so"), "tasks");
    }

    #[test]
    fn versions_are_compatible_within_a_minor_before_one_and_a_major_after() {
        assert!(compatible("0.1.0", "0.1.7"));
        assert!(!compatible("0.2.0", "0.1.0"));
        assert!(compatible("1.2.0", "1.9.1"));
        assert!(!compatible("2.0.0", "1.9.1"));
        assert!(!compatible("garbage", "0.1.0"));
    }

    #[test]
    fn a_file_that_is_not_a_library_is_refused_clearly() {
        let dir = std::env::temp_dir().join(format!("dask-lib-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("not-a-library.so");
        std::fs::write(&path, b"this is text").unwrap();
        let err = load(&path, "not_a_library").unwrap_err();
        assert!(err.contains("could not load") && err.contains("not-a-library.so"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
