//! Task graphs for `client.get`: a map from key to task, where arguments may reference other
//! keys of the graph (or keys of futures the client holds).
use std::marker::PhantomData;

use bytes::Bytes;
use dask_protocol::pb;
use dask_protocol::task::Task;
use prost::Message;

use crate::Result;
use crate::args::IntoArgs;

/// A typed reference to a key, usable as an argument: `graph.add("y", inc, (Ref::<i64>::new("x"),))`.
pub struct Ref<T> {
    pub(crate) key: String,
    _t: PhantomData<fn() -> T>,
}

impl<T> Ref<T> {
    pub fn new(key: impl Into<String>) -> Self {
        Ref { key: key.into(), _t: PhantomData }
    }
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl<T> Clone for Ref<T> {
    fn clone(&self) -> Self {
        Ref::new(self.key.clone())
    }
}

/// A graph of tasks, in the order added.
#[derive(Default, Clone)]
pub struct Graph {
    tasks: Vec<pb::TaskDef>,
    index: rustc_hash::FxHashMap<String, usize>,
}

impl Graph {
    pub fn new() -> Self {
        Graph::default()
    }

    /// Adds `key = f(args...)` and returns a typed reference to it. Adding a key twice
    /// replaces the first definition.
    pub fn add<T: Task, A: IntoArgs<T::Args>>(
        &mut self,
        key: impl Into<String>,
        _f: T,
        args: A,
    ) -> Result<Ref<T::Output>> {
        let key = key.into();
        let mut deps = Vec::new();
        let arg = args.into_args(&mut deps)?;
        let spec = pb::TaskSpec { function: T::NAME.to_string(), args: Some(arg) }.encode_to_vec();
        let def = pb::TaskDef { key: key.clone(), spec: Bytes::from(spec), dependencies: deps, ..Default::default() };
        match self.index.get(&key) {
            Some(&i) => self.tasks[i] = def,
            None => {
                self.index.insert(key.clone(), self.tasks.len());
                self.tasks.push(def);
            }
        }
        Ok(Ref::new(key))
    }

    /// Gives the task of `key` a priority (higher runs first, as `SubmitOptions::priority` and
    /// dask's `priority=`); tasks of equal priority run depth first towards the graph's
    /// outputs. Returns false if the graph has no such key.
    pub fn set_priority(&mut self, key: &str, priority: i32) -> bool {
        match self.index.get(key) {
            Some(&i) => {
                self.tasks[i].priority = priority;
                true
            }
            None => false,
        }
    }

    /// Gives the task of `key` dask's per-task options: priority, retries, workers (with
    /// allow_other_workers) and resources (the key, pure and fifo options do not apply).
    /// Returns false if the graph has no such key.
    pub fn set_options(&mut self, key: &str, opts: &crate::SubmitOptions) -> Result<bool> {
        match self.index.get(key) {
            Some(&i) => {
                opts.apply_to(&mut self.tasks[i])?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    pub(crate) fn task_defs(&self) -> Vec<pb::TaskDef> {
        self.tasks.clone()
    }
}

/// Keys to fetch from a graph, nested like dask's `get(dsk, [["x", "y"], "z"])`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyTree {
    Key(String),
    List(Vec<KeyTree>),
}

impl KeyTree {
    pub(crate) fn flatten<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            KeyTree::Key(k) => out.push(k),
            KeyTree::List(items) => items.iter().for_each(|t| t.flatten(out)),
        }
    }

    pub(crate) fn fill<T>(&self, values: &mut std::vec::IntoIter<T>) -> Nested<T> {
        match self {
            KeyTree::Key(_) => Nested::Value(values.next().expect("one value per key")),
            KeyTree::List(items) => Nested::List(items.iter().map(|t| t.fill(values)).collect()),
        }
    }
}

impl From<&str> for KeyTree {
    fn from(k: &str) -> Self {
        KeyTree::Key(k.to_string())
    }
}

impl From<String> for KeyTree {
    fn from(k: String) -> Self {
        KeyTree::Key(k)
    }
}

impl<K: Into<KeyTree>> From<Vec<K>> for KeyTree {
    fn from(items: Vec<K>) -> Self {
        KeyTree::List(items.into_iter().map(Into::into).collect())
    }
}

/// Values shaped like the [`KeyTree`] that asked for them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Nested<T> {
    Value(T),
    List(Vec<Nested<T>>),
}
