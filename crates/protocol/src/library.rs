//! Plugin libraries (`Client::upload_file`): a `cdylib` that defines `#[task]` functions and
//! says `dask::plugin_library!();` once, loaded by running workers so its functions can be
//! submitted without restarting them.
//!
//! # The boundary
//! A loaded library is a second copy of this crate with its own statics: its own task registry,
//! its own thread-locals, possibly its own allocator and a different compiler. So nothing Rust-
//! shaped crosses: the library exports one symbol ([`SYMBOL_PREFIX`] and its crate name), a pointer to a `#[repr(C)]`
//! [`Vtable`] of plain C functions and integers, and every call passes bytes in (borrowed for
//! the call) and gets bytes back in a [`Buf`] the library allocated and the caller hands back to
//! the library's own `free`. Requests and answers are protobuf messages (`LibraryCall`,
//! `LibraryResult`), so both sides only need to agree on the wire, which [`ABI`] and the
//! crate version (checked before anything else is called) pin down.
//!
//! This module is the library's side; the worker's side (loading, checks) is
//! `dask_worker::library`.
#![allow(unsafe_code)]

use std::panic::{AssertUnwindSafe, catch_unwind};

use prost::Message;

use crate::codec::{Value, codec_name};
use crate::pb;
use crate::task::{ExecErrorKind, execute, registered_names, take_panic_backtrace};

/// The exported symbol is this followed by the library's crate name (`_my_tasks` for
/// `libmy_tasks.so`): a `&'static Vtable`. Named per crate so that a program linking several
/// plugin crates as rlibs (for their typed handles) has no two symbols of one name.
pub const SYMBOL_PREFIX: &str = "DASK_PLUGIN_LIBRARY_V1_";
/// The layout of [`Vtable`] and [`Buf`] and the meaning of their calls. Changes with them.
pub const ABI: u32 = 1;
/// The version of the wire both sides must share: this crate's.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Bytes allocated by the library; give them back with [`Vtable::free`].
#[repr(C)]
#[derive(Debug)]
pub struct Buf {
    pub ptr: *mut u8,
    pub len: usize,
    pub cap: usize,
}

/// What a plugin library exports. `abi` comes first and is read before anything else.
#[repr(C)]
#[derive(Debug)]
pub struct Vtable {
    pub abi: u32,
    /// [`VERSION`] of the library's copy of this crate (UTF-8, not NUL-terminated).
    pub version_ptr: *const u8,
    pub version_len: usize,
    /// The names of its task functions, msgpack-encoded (`Vec<String>`).
    pub functions: extern "C" fn() -> Buf,
    /// Runs one task: `input` is an encoded `LibraryCall`; returns an encoded `LibraryResult`.
    pub call: unsafe extern "C" fn(input: *const u8, len: usize) -> Buf,
    /// Frees a [`Buf`] this library returned.
    pub free: unsafe extern "C" fn(buf: Buf),
}

// SAFETY: the table is immutable and its pointers point at `'static` data (a string literal)
// and functions; sharing it between threads is sharing constants.
unsafe impl Sync for Vtable {}

/// The table a library built with this crate exports (see [`plugin_library!`](crate::plugin_library)).
pub static VTABLE: Vtable = Vtable {
    abi: ABI,
    version_ptr: VERSION.as_ptr(),
    version_len: VERSION.len(),
    functions: functions_ffi,
    call: call_ffi,
    free: free_ffi,
};

fn into_buf(v: Vec<u8>) -> Buf {
    let mut v = std::mem::ManuallyDrop::new(v);
    Buf { ptr: v.as_mut_ptr(), len: v.len(), cap: v.capacity() }
}

extern "C" fn functions_ffi() -> Buf {
    let names: Vec<&str> = registered_names();
    into_buf(crate::codec::to_msgpack(&names).unwrap_or_default())
}

/// # Safety
/// `input` points at `len` readable bytes that stay valid for the call.
unsafe extern "C" fn call_ffi(input: *const u8, len: usize) -> Buf {
    // SAFETY: the caller's contract.
    let input = if len == 0 { &[][..] } else { unsafe { std::slice::from_raw_parts(input, len) } };
    // Nothing may unwind out of an `extern "C"` function.
    let result = catch_unwind(AssertUnwindSafe(|| call(input)))
        .unwrap_or_else(|p| failure(ExecErrorKind::Panic(crate::task::panic_message(&*p)), ""));
    into_buf(result.encode_to_vec())
}

/// # Safety
/// `buf` was returned by this library's `call` or `functions` and is freed once.
unsafe extern "C" fn free_ffi(buf: Buf) {
    // SAFETY: the caller's contract: the parts of a Vec this library's allocator made.
    drop(unsafe { Vec::from_raw_parts(buf.ptr, buf.len, buf.cap) });
}

fn failure(e: ExecErrorKind, function: &str) -> pb::LibraryResult {
    let traceback = if matches!(e, ExecErrorKind::Panic(_)) { take_panic_backtrace() } else { String::new() };
    // The message as the worker rebuilds its error from (not the formatted one).
    let message = match &e {
        ExecErrorKind::Error(m)
        | ExecErrorKind::Panic(m)
        | ExecErrorKind::BadArguments(m)
        | ExecErrorKind::UnknownFunction(m)
        | ExecErrorKind::MissingDependency(m) => m.clone(),
        ExecErrorKind::Reschedule => String::new(),
    };
    pb::LibraryResult {
        ok: false,
        error: Some(pb::TaskError {
            message,
            kind: e.kind().to_string(),
            function: function.to_string(),
            traceback,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Runs a `LibraryCall` with this copy's registry.
fn call(input: &[u8]) -> pb::LibraryResult {
    let req = match pb::LibraryCall::decode(input) {
        Ok(r) => r,
        Err(e) => return failure(ExecErrorKind::BadArguments(format!("a malformed library call: {e}")), ""),
    };
    let spec = req.spec.unwrap_or_default();
    let mut deps = std::collections::HashMap::with_capacity(req.deps.len());
    for d in req.deps {
        match codec_name(&d.codec) {
            Ok(codec) => {
                deps.insert(d.key, Value { codec, data: d.data });
            }
            Err(e) => return failure(ExecErrorKind::BadArguments(e.to_string()), &spec.function),
        }
    }
    match execute(&spec, &|k| deps.get(k).cloned()) {
        Ok(v) => pb::LibraryResult { ok: true, codec: v.codec.to_string(), data: v.data, error: None },
        Err(e) => failure(e, &spec.function),
    }
}

/// Exports this crate's functions as a plugin library: put `dask::plugin_library!();` once in
/// a crate built with `crate-type = ["cdylib"]` (and `"rlib"` if clients link it for the
/// typed function handles). A crate that forbids `unsafe_code` cannot: the export needs
/// `#[unsafe(no_mangle)]`.
#[macro_export]
macro_rules! plugin_library {
    () => {
        #[allow(unsafe_code)]
        #[unsafe(export_name = concat!("DASK_PLUGIN_LIBRARY_V1_", env!("CARGO_CRATE_NAME")))]
        #[doc(hidden)]
        pub static DASK_PLUGIN_LIBRARY_V1: &$crate::library::Vtable = &$crate::library::VTABLE;
    };
}
