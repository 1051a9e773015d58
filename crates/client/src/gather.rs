//! What `gather` accepts: one future, slices and `Vec`s of futures, maps of futures, nested.
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::Arc;

use dask_protocol::codec::Value;
use rustc_hash::FxHashMap;
use serde::de::DeserializeOwned;

use crate::future::{Future, FutureRef};
use crate::{Error, Result};

/// dask's `errors=`: `Raise` returns the first failure; `Skip` leaves failed entries out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Errors {
    #[default]
    Raise,
    Skip,
}

/// Fetched values by key.
pub struct ValueMap {
    pub(crate) values: FxHashMap<Arc<str>, Value>,
    pub(crate) skip: bool,
}

/// A container of futures whose values `gather` can return.
pub trait Gatherable {
    type Output;
    #[doc(hidden)]
    fn collect(&self, out: &mut Vec<Arc<FutureRef>>);
    /// `Ok(None)`: this entry failed and is skipped.
    #[doc(hidden)]
    fn build(&self, values: &mut ValueMap) -> Result<Option<Self::Output>>;
}

impl<T: DeserializeOwned + 'static> Gatherable for Future<T> {
    type Output = T;
    fn collect(&self, out: &mut Vec<Arc<FutureRef>>) {
        out.push(self.inner.clone());
    }
    fn build(&self, values: &mut ValueMap) -> Result<Option<T>> {
        match values.values.get(&self.inner.key) {
            Some(v) => Ok(Some(v.decode()?)),
            None if values.skip => Ok(None),
            None => Err(Error::Lost { key: self.key().to_string(), why: "no value was fetched".into() }),
        }
    }
}

impl<G: Gatherable> Gatherable for [G] {
    type Output = Vec<G::Output>;
    fn collect(&self, out: &mut Vec<Arc<FutureRef>>) {
        self.iter().for_each(|g| g.collect(out));
    }
    fn build(&self, values: &mut ValueMap) -> Result<Option<Self::Output>> {
        let mut v = Vec::with_capacity(self.len());
        for g in self {
            if let Some(x) = g.build(values)? {
                v.push(x);
            }
        }
        Ok(Some(v))
    }
}

impl<G: Gatherable> Gatherable for Vec<G> {
    type Output = Vec<G::Output>;
    fn collect(&self, out: &mut Vec<Arc<FutureRef>>) {
        self.as_slice().collect(out)
    }
    fn build(&self, values: &mut ValueMap) -> Result<Option<Self::Output>> {
        self.as_slice().build(values)
    }
}

impl<K: Eq + Hash + Clone, G: Gatherable> Gatherable for HashMap<K, G> {
    type Output = HashMap<K, G::Output>;
    fn collect(&self, out: &mut Vec<Arc<FutureRef>>) {
        self.values().for_each(|g| g.collect(out));
    }
    fn build(&self, values: &mut ValueMap) -> Result<Option<Self::Output>> {
        let mut m = HashMap::with_capacity(self.len());
        for (k, g) in self {
            if let Some(x) = g.build(values)? {
                m.insert(k.clone(), x);
            }
        }
        Ok(Some(m))
    }
}

impl<K: Ord + Clone, G: Gatherable> Gatherable for BTreeMap<K, G> {
    type Output = BTreeMap<K, G::Output>;
    fn collect(&self, out: &mut Vec<Arc<FutureRef>>) {
        self.values().for_each(|g| g.collect(out));
    }
    fn build(&self, values: &mut ValueMap) -> Result<Option<Self::Output>> {
        let mut m = BTreeMap::new();
        for (k, g) in self {
            if let Some(x) = g.build(values)? {
                m.insert(k.clone(), x);
            }
        }
        Ok(Some(m))
    }
}

/// dask's `futures_of`: the futures in a (nested) collection of futures, in order, with their
/// result type erased (for `wait`, `as_completed`, `cancel`).
pub fn futures_of<G: Gatherable + ?Sized>(collection: &G) -> Vec<Future<()>> {
    let mut refs = Vec::new();
    collection.collect(&mut refs);
    refs.into_iter().map(Future::from_ref).collect()
}
