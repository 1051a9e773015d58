//! A plugin library as a user would write one: task functions, and `plugin_library!()` once.
//! It depends on `dask-protocol` and `dask-macros` only (not the `dask` facade), so the
//! library stays small; a user's library may depend on `dask` and write `#[dask::task]`.
use dask_macros::task;

dask_protocol::plugin_library!();

/// Known to no stock worker until the library is uploaded.
#[task(crate = dask_protocol)]
pub fn quadruple(x: i64) -> i64 {
    x * 4
}

/// Takes another task's result: dependencies cross into the library as bytes.
#[task(crate = dask_protocol)]
pub fn total(xs: Vec<i64>) -> i64 {
    xs.iter().sum()
}

/// Fails in the library: the error and its message come back.
#[task(crate = dask_protocol)]
pub fn refuse(why: String) -> Result<i64, String> {
    Err(why)
}

/// Panics in the library: caught there, reported as a panic with its backtrace.
#[task(crate = dask_protocol)]
pub fn explode(x: i64) -> i64 {
    if x >= 0 {
        panic!("exploded on {x}");
    }
    x
}
