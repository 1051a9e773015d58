//! Typed arguments: what `submit` accepts for each parameter of a task function.
//!
//! A parameter of type `T` takes a `T` (sent as a literal), a `Future<T>` or `&Future<T>` (a
//! dependency: the worker gets the value), or, for `Vec<T>`, a `Vec<Future<T>>` or
//! `&[Future<T>]`. Graph references ([`Ref`](crate::graph::Ref)) work the same way.
use dask_protocol::pb;
use dask_protocol::task::build;
use serde::Serialize;

use crate::future::Future;
use crate::{Error, Result};

/// A value usable where a task expects a `T`.
pub trait IntoArg<T> {
    /// The argument tree; every key referenced is pushed to `deps` (once).
    fn into_arg(self, deps: &mut Vec<String>) -> Result<pb::Arg>;
}

/// Duplicates are fine: the scheduler merges them (checking here would be quadratic for a
/// task over many futures).
fn push_dep(deps: &mut Vec<String>, key: &str) {
    deps.push(key.to_string());
}

impl<T: Serialize> IntoArg<T> for T {
    fn into_arg(self, _deps: &mut Vec<String>) -> Result<pb::Arg> {
        build::literal(&self).map_err(Error::from)
    }
}

/// `&str` where a `String` is expected.
impl IntoArg<String> for &str {
    fn into_arg(self, _deps: &mut Vec<String>) -> Result<pb::Arg> {
        build::literal(self).map_err(Error::from)
    }
}

impl<T> IntoArg<T> for &Future<T> {
    fn into_arg(self, deps: &mut Vec<String>) -> Result<pb::Arg> {
        // A cancelled input is gone: say so now (the scheduler would only find it unknown).
        if let Some(reason) = self.cancel_reason() {
            return Err(Error::Cancelled { key: self.key().to_string(), reason });
        }
        push_dep(deps, self.key());
        Ok(build::key(self.key()))
    }
}

impl<T> IntoArg<T> for Future<T> {
    fn into_arg(self, deps: &mut Vec<String>) -> Result<pb::Arg> {
        (&self).into_arg(deps)
    }
}

impl<T> IntoArg<Vec<T>> for &[Future<T>] {
    fn into_arg(self, deps: &mut Vec<String>) -> Result<pb::Arg> {
        let items = self.iter().map(|f| f.into_arg(deps)).collect::<Result<_>>()?;
        Ok(build::list(items))
    }
}

impl<T> IntoArg<Vec<T>> for &Vec<Future<T>> {
    fn into_arg(self, deps: &mut Vec<String>) -> Result<pb::Arg> {
        self.as_slice().into_arg(deps)
    }
}

impl<T> IntoArg<Vec<T>> for Vec<Future<T>> {
    fn into_arg(self, deps: &mut Vec<String>) -> Result<pb::Arg> {
        self.as_slice().into_arg(deps)
    }
}

impl<T> IntoArg<T> for crate::graph::Ref<T> {
    fn into_arg(self, deps: &mut Vec<String>) -> Result<pb::Arg> {
        push_dep(deps, &self.key);
        Ok(build::key(self.key))
    }
}

impl<T> IntoArg<Vec<T>> for Vec<crate::graph::Ref<T>> {
    fn into_arg(self, deps: &mut Vec<String>) -> Result<pb::Arg> {
        let items = self.into_iter().map(|r| r.into_arg(deps)).collect::<Result<_>>()?;
        Ok(build::list(items))
    }
}

/// A tuple of arguments for a function whose parameters are the tuple `A`.
pub trait IntoArgs<A> {
    fn into_args(self, deps: &mut Vec<String>) -> Result<pb::Arg>;
}

macro_rules! tuple_args {
    ($( ($($x:ident : $a:ident),*) ),* $(,)?) => {$(
        impl<$($x, $a),*> IntoArgs<($($a,)*)> for ($($x,)*)
        where $($x: IntoArg<$a>),*
        {
            #[allow(non_snake_case, unused_variables)]
            fn into_args(self, deps: &mut Vec<String>) -> Result<pb::Arg> {
                let ($($x,)*) = self;
                Ok(build::list(vec![$($x.into_arg(deps)?),*]))
            }
        }
    )*};
}

tuple_args! {
    (),
    (X0: A0),
    (X0: A0, X1: A1),
    (X0: A0, X1: A1, X2: A2),
    (X0: A0, X1: A1, X2: A2, X3: A3),
    (X0: A0, X1: A1, X2: A2, X3: A3, X4: A4),
    (X0: A0, X1: A1, X2: A2, X3: A3, X4: A4, X5: A5),
    (X0: A0, X1: A1, X2: A2, X3: A3, X4: A4, X5: A5, X6: A6),
    (X0: A0, X1: A1, X2: A2, X3: A3, X4: A4, X5: A5, X6: A6, X7: A7),
}

/// Functions of one parameter: `map` takes their argument directly (`client.map(inc, 0..10)`).
pub trait OneArg {
    type Arg;
}

impl<A> OneArg for (A,) {
    type Arg = A;
}
