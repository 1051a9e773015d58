//! Coordination: the state the scheduler keeps for every client and every task to share — named
//! locks and semaphores, queues, variables, events, pub/sub topics, published datasets and
//! metadata (dask's `Lock`, `Semaphore`, `Queue`, `Variable`, `Event`, `Pub`/`Sub`,
//! `publish_dataset`, `set_metadata`).
//!
//! Like the core, this is a pure state machine: requests in, replies and key holds out, no clock.
//! A request that must wait (a lock held by another, an empty queue, an unset event) is parked;
//! it is answered when what it waits for happens, or when the shell says its time ran out
//! ([`Coordination::timeout`]), or dropped when its client goes ([`Coordination::client_gone`]).
//!
//! Futures can be put in queues, variables and datasets: while one holds a key the scheduler's
//! holder ([`crate::core::HOLDER`]) wants it ([`Out::Hold`] / [`Out::Unhold`], counted here), and a
//! client that receives a key wants it before the holder lets go ([`Out::Give`] comes first).
//!
//! As in dask, a client that goes releases its leases and stops waiting; queues, variables,
//! events, datasets and metadata persist until deleted.
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use rustc_hash::FxHashMap;

use crate::core::{ClientId, Key};

#[cfg(test)]
mod tests;

/// A shared value: bytes encoded by a client (opaque here), or a future's key.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Data { codec: String, data: Bytes },
    Future(Key),
}

impl Item {
    fn key(&self) -> Option<&Key> {
        match self {
            Item::Future(k) => Some(k),
            Item::Data { .. } => None,
        }
    }
}

/// Whether a request may wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Answer at once (dask's `blocking=False`, `timeout=0`).
    No,
    /// Until it can be answered (or the client goes).
    Forever,
    /// Until it can be answered or the shell sends [`Coordination::timeout`].
    Limited,
}

#[derive(Clone, Debug)]
pub struct Request {
    pub client: ClientId,
    /// Chosen by the client, unique among its requests.
    pub id: u64,
    /// The primitive's name.
    pub name: String,
    pub wait: Wait,
    pub op: Op,
}

#[derive(Clone, Debug)]
pub enum Op {
    /// Take a lease of a semaphore of `max_leases` (a `Lock` has one).
    Acquire {
        lease: u64,
        max_leases: u32,
    },
    Release {
        lease: u64,
    },
    /// Leases in use.
    Leases,
    QueuePut {
        item: Item,
        maxsize: u32,
    },
    /// `count` items (waiting for them); with `batch` and `count` 0, every item there now.
    /// `maxsize` bounds a queue this makes.
    QueueGet {
        count: u32,
        batch: bool,
        maxsize: u32,
    },
    QueueSize,
    VariableSet(Item),
    VariableGet,
    VariableDelete,
    EventSet,
    EventClear,
    EventWait,
    EventIsSet,
    Publish(Item),
    Subscribe,
    Unsubscribe,
    DatasetPublish {
        items: Vec<Item>,
        replace: bool,
    },
    DatasetGet,
    DatasetList,
    DatasetUnpublish,
    MetaSet {
        path: Vec<String>,
        value: serde_json::Value,
    },
    MetaGet {
        path: Vec<String>,
    },
    /// The client made its futures of the keys in the answer to its request `id`.
    Ack(u64),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Done,
    Flag(bool),
    Count(u64),
    Items(Vec<Item>),
    Names(Vec<String>),
    Json(String),
    /// Refused: what is wrong and what to do.
    Error(String),
    TimedOut,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Out {
    Reply {
        client: ClientId,
        id: u64,
        reply: Reply,
    },
    /// A message on a topic `client` subscribed to.
    Deliver {
        client: ClientId,
        topic: String,
        item: Item,
    },
    /// Keep this key alive: something here holds it now.
    Hold(Key),
    /// Nothing here holds this key any more.
    Unhold(Key),
    /// `client` receives this key in a reply: it wants it from now on.
    Give {
        client: ClientId,
        key: Key,
    },
}

/// Keys in a metadata path, at most: the tree is freed and printed recursively, so a path of a
/// hundred thousand keys would overflow the scheduler's stack.
pub const MAX_META_DEPTH: usize = 64;

/// A request waiting, by (client, id): where to find it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Parked {
    Semaphore(String),
    QueueGet(String),
    QueuePut(String),
    Variable(String),
    Event(String),
}

impl Parked {
    fn name(&self) -> &str {
        match self {
            Parked::Semaphore(n)
            | Parked::QueueGet(n)
            | Parked::QueuePut(n)
            | Parked::Variable(n)
            | Parked::Event(n) => n,
        }
    }
}

#[derive(Debug, Default)]
struct Semaphore {
    max_leases: u32,
    leases: BTreeSet<(ClientId, u64)>,
    /// (client, request id, lease), first come first served.
    waiting: VecDeque<(ClientId, u64, u64)>,
}

#[derive(Debug, Default)]
struct Queue {
    maxsize: u32,
    items: VecDeque<Item>,
    /// (client, request id, count): the first is served first.
    getters: VecDeque<(ClientId, u64, u32)>,
    /// Puts waiting for room: (client, request id, item), the item already held.
    putters: VecDeque<(ClientId, u64, Item)>,
}

#[derive(Debug, Default)]
struct Variable {
    value: Option<Item>,
    waiting: Vec<(ClientId, u64)>,
}

#[derive(Debug, Default)]
struct Flag {
    set: bool,
    waiting: Vec<(ClientId, u64)>,
}

/// All coordination state.
#[derive(Debug, Default)]
pub struct Coordination {
    semaphores: FxHashMap<String, Semaphore>,
    queues: FxHashMap<String, Queue>,
    variables: FxHashMap<String, Variable>,
    events: FxHashMap<String, Flag>,
    /// Subscribers of each topic.
    topics: BTreeMap<String, BTreeSet<ClientId>>,
    datasets: BTreeMap<String, Vec<Item>>,
    metadata: serde_json::Map<String, serde_json::Value>,
    /// How many places here hold each key (queue items, parked puts, variables, datasets,
    /// gifts).
    held: FxHashMap<Key, u32>,
    /// Keys given in an answer and not yet acknowledged, by (client, request id).
    gifts: FxHashMap<(ClientId, u64), Vec<Key>>,
    parked: FxHashMap<(ClientId, u64), Parked>,
}

impl Coordination {
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles one request; replies (now or later) and key holds go to `out`.
    pub fn handle(&mut self, req: Request, out: &mut Vec<Out>) {
        let name = req.name.clone();
        self.handle_inner(req, out);
        self.tidy(&name);
    }

    /// Forgets an unbounded queue or an event of that name that holds nothing and has no one
    /// waiting: a client naming many of them does not grow the scheduler's memory (a later use
    /// makes it again, alike). A bounded queue keeps its bound, so it stays.
    fn tidy(&mut self, name: &str) {
        if self
            .queues
            .get(name)
            .is_some_and(|q| q.maxsize == 0 && q.items.is_empty() && q.getters.is_empty() && q.putters.is_empty())
        {
            self.queues.remove(name);
        }
        if self.events.get(name).is_some_and(|e| !e.set && e.waiting.is_empty()) {
            self.events.remove(name);
        }
    }

    fn handle_inner(&mut self, req: Request, out: &mut Vec<Out>) {
        let Request { client, id, name, wait, op } = req;
        let reply = |out: &mut Vec<Out>, reply| out.push(Out::Reply { client, id, reply });
        if self.parked.contains_key(&(client, id)) {
            return reply(out, Reply::Error(format!("request {id} of this client is already waiting")));
        }
        match op {
            Op::Acquire { lease, max_leases } => {
                if max_leases == 0 {
                    return reply(out, Reply::Error(format!("semaphore {name:?}: max_leases must be at least 1")));
                }
                let s = self
                    .semaphores
                    .entry(name.clone())
                    .or_insert_with(|| Semaphore { max_leases, ..Default::default() });
                if s.leases.contains(&(client, lease)) {
                    return reply(out, Reply::Error(format!("lease {lease} of {name:?} is held already")));
                }
                // First come, first served: nobody overtakes a waiter.
                if s.waiting.is_empty() && (s.leases.len() as u32) < s.max_leases {
                    s.leases.insert((client, lease));
                    reply(out, Reply::Flag(true));
                } else if wait == Wait::No {
                    reply(out, Reply::Flag(false));
                } else {
                    s.waiting.push_back((client, id, lease));
                    self.parked.insert((client, id), Parked::Semaphore(name));
                }
            }
            Op::Release { lease } => {
                let held = self.semaphores.get_mut(&name).is_some_and(|s| s.leases.remove(&(client, lease)));
                if !held {
                    return reply(
                        out,
                        Reply::Error(format!(
                            "{name:?} is not held by this lease: released more often than acquired (or its \
                             holder's connection was lost, which releases it)"
                        )),
                    );
                }
                reply(out, Reply::Done);
                self.grant(&name, out);
            }
            Op::Leases => {
                let n = self.semaphores.get(&name).map_or(0, |s| s.leases.len());
                reply(out, Reply::Count(n as u64));
            }
            Op::QueuePut { item, maxsize } => {
                let q = self.queues.entry(name.clone()).or_insert_with(|| Queue { maxsize, ..Default::default() });
                let full = q.maxsize > 0 && q.items.len() + q.putters.len() >= q.maxsize as usize;
                if full && wait == Wait::No {
                    return reply(out, Reply::Error(format!("queue {name:?} is full ({} items)", q.maxsize)));
                }
                if let Some(k) = item.key() {
                    let k = k.clone();
                    self.hold(k, out);
                }
                let q = self.queues.get_mut(&name).expect("made above");
                if full {
                    q.putters.push_back((client, id, item));
                    self.parked.insert((client, id), Parked::QueuePut(name));
                } else {
                    q.items.push_back(item);
                    reply(out, Reply::Done);
                    self.serve_queue(&name, out);
                }
            }
            Op::QueueGet { count, batch, maxsize } => {
                let q = self.queues.entry(name.clone()).or_insert_with(|| Queue { maxsize, ..Default::default() });
                if q.maxsize > 0 && count > q.maxsize {
                    let max = q.maxsize;
                    return reply(
                        out,
                        Reply::Error(format!(
                            "a get of {count} items from queue {name:?}, which holds at most {max}, would never be served"
                        )),
                    );
                }
                if batch && count == 0 {
                    let items: Vec<Item> = q.items.drain(..).collect();
                    self.take(client, id, items, out);
                    self.serve_queue(&name, out);
                    return;
                }
                let count = count.max(1);
                if q.getters.is_empty() && q.items.len() >= count as usize {
                    let items: Vec<Item> = q.items.drain(..count as usize).collect();
                    self.take(client, id, items, out);
                    self.serve_queue(&name, out);
                } else if wait == Wait::No {
                    reply(out, Reply::TimedOut);
                } else {
                    q.getters.push_back((client, id, count));
                    self.parked.insert((client, id), Parked::QueueGet(name));
                }
            }
            Op::QueueSize => {
                let n = self.queues.get(&name).map_or(0, |q| q.items.len());
                reply(out, Reply::Count(n as u64));
            }
            Op::VariableSet(item) => {
                if let Some(k) = item.key() {
                    self.hold(k.clone(), out);
                }
                let v = self.variables.entry(name).or_default();
                let old = v.value.replace(item.clone());
                let waiting = std::mem::take(&mut v.waiting);
                reply(out, Reply::Done);
                for (c, i) in waiting {
                    self.parked.remove(&(c, i));
                    self.give(c, i, vec![item.clone()], out);
                }
                if let Some(k) = old.as_ref().and_then(Item::key) {
                    self.unhold(k.clone(), out);
                }
            }
            Op::VariableGet => match self.variables.get(&name).and_then(|v| v.value.clone()) {
                Some(item) => self.give(client, id, vec![item], out),
                None if wait == Wait::No => reply(out, Reply::TimedOut),
                None => {
                    self.variables.entry(name.clone()).or_default().waiting.push((client, id));
                    self.parked.insert((client, id), Parked::Variable(name));
                }
            },
            Op::VariableDelete => {
                if let Some(v) = self.variables.get_mut(&name) {
                    let old = v.value.take();
                    if v.waiting.is_empty() {
                        self.variables.remove(&name);
                    }
                    if let Some(k) = old.as_ref().and_then(Item::key) {
                        self.unhold(k.clone(), out);
                    }
                }
                reply(out, Reply::Done);
            }
            Op::EventSet => {
                let e = self.events.entry(name).or_default();
                e.set = true;
                let waiting = std::mem::take(&mut e.waiting);
                reply(out, Reply::Done);
                for (c, i) in waiting {
                    self.parked.remove(&(c, i));
                    out.push(Out::Reply { client: c, id: i, reply: Reply::Flag(true) });
                }
            }
            Op::EventClear => {
                if let Some(e) = self.events.get_mut(&name) {
                    e.set = false;
                }
                reply(out, Reply::Done);
            }
            Op::EventWait => {
                let e = self.events.entry(name.clone()).or_default();
                if e.set {
                    reply(out, Reply::Flag(true));
                } else if wait == Wait::No {
                    reply(out, Reply::Flag(false));
                } else {
                    e.waiting.push((client, id));
                    self.parked.insert((client, id), Parked::Event(name));
                }
            }
            Op::EventIsSet => {
                let set = self.events.get(&name).is_some_and(|e| e.set);
                reply(out, Reply::Flag(set));
            }
            Op::Ack(answered) => {
                self.acknowledged(client, answered, out);
                reply(out, Reply::Done);
            }
            Op::Publish(Item::Future(_)) => {
                reply(out, Reply::Error("a topic carries values, not futures: put the future in a Queue".into()))
            }
            Op::Publish(item) => {
                let subscribers = self.topics.get(&name).cloned().unwrap_or_default();
                for c in subscribers {
                    out.push(Out::Deliver { client: c, topic: name.clone(), item: item.clone() });
                }
                reply(out, Reply::Done);
            }
            Op::Subscribe => {
                self.topics.entry(name).or_default().insert(client);
                reply(out, Reply::Done);
            }
            Op::Unsubscribe => {
                if let Some(s) = self.topics.get_mut(&name) {
                    s.remove(&client);
                    if s.is_empty() {
                        self.topics.remove(&name);
                    }
                }
                reply(out, Reply::Done);
            }
            Op::DatasetPublish { items, replace } => {
                if name.is_empty() {
                    return reply(out, Reply::Error("a dataset needs a name".into()));
                }
                if !replace && self.datasets.contains_key(&name) {
                    return reply(
                        out,
                        Reply::Error(format!(
                            "a dataset named {name:?} is published already: unpublish_dataset({name:?}) first, \
                             or publish with override"
                        )),
                    );
                }
                for k in items.iter().filter_map(Item::key) {
                    self.hold(k.clone(), out);
                }
                let old = self.datasets.insert(name, items).unwrap_or_default();
                for k in old.iter().filter_map(Item::key) {
                    self.unhold(k.clone(), out);
                }
                reply(out, Reply::Done);
            }
            Op::DatasetGet => match self.datasets.get(&name) {
                Some(items) => {
                    let items = items.clone();
                    self.give(client, id, items, out);
                }
                None => reply(out, Reply::Error(self.no_dataset(&name))),
            },
            Op::DatasetList => reply(out, Reply::Names(self.datasets.keys().cloned().collect())),
            Op::DatasetUnpublish => match self.datasets.remove(&name) {
                Some(items) => {
                    for k in items.iter().filter_map(Item::key) {
                        self.unhold(k.clone(), out);
                    }
                    reply(out, Reply::Done);
                }
                None => reply(out, Reply::Error(self.no_dataset(&name))),
            },
            Op::MetaSet { path, .. } | Op::MetaGet { path } if path.len() > MAX_META_DEPTH => reply(
                out,
                Reply::Error(format!("a metadata path of {} keys is too deep (at most {MAX_META_DEPTH})", path.len())),
            ),
            Op::MetaSet { path, value } => {
                let r = self.set_metadata(&path, value);
                reply(out, r);
            }
            Op::MetaGet { path } => {
                let r = self.get_metadata(&path);
                reply(out, r);
            }
        }
    }

    /// Whether request `id` of `client` is waiting.
    pub fn is_waiting(&self, client: ClientId, id: u64) -> bool {
        self.parked.contains_key(&(client, id))
    }

    /// The wait of request `id` of `client` ran out: if it still waits, it is answered so.
    pub fn timeout(&mut self, client: ClientId, id: u64, out: &mut Vec<Out>) {
        let Some(parked) = self.parked.remove(&(client, id)) else {
            return; // answered already
        };
        let name = parked.name().to_string();
        let (reply, serve) = self.withdraw(client, id, parked, out);
        if let Some(q) = serve {
            // The next getter may be served now that this one is out of the way.
            self.serve_queue(&q, out);
        }
        self.tidy(&name);
        out.push(Out::Reply { client, id, reply });
    }

    /// Takes a waiting request out of where it waits; returns how a timeout answers it, and the
    /// queue whose next getter may be served now.
    fn withdraw(&mut self, client: ClientId, id: u64, parked: Parked, out: &mut Vec<Out>) -> (Reply, Option<String>) {
        let mine = |c: ClientId, i: u64| c == client && i == id;
        match parked {
            Parked::Semaphore(name) => {
                let s = self.semaphores.get_mut(&name).expect("parked on it");
                s.waiting.retain(|&(c, i, _)| !mine(c, i));
                if s.leases.is_empty() && s.waiting.is_empty() {
                    self.semaphores.remove(&name);
                }
                (Reply::Flag(false), None)
            }
            Parked::QueueGet(name) => {
                self.queues.get_mut(&name).expect("parked on it").getters.retain(|&(c, i, _)| !mine(c, i));
                (Reply::TimedOut, Some(name))
            }
            Parked::QueuePut(name) => {
                let q = self.queues.get_mut(&name).expect("parked on it");
                let pos = q.putters.iter().position(|(c, i, _)| mine(*c, *i)).expect("parked");
                let (_, _, item) = q.putters.remove(pos).expect("present");
                if let Some(k) = item.key() {
                    self.unhold(k.clone(), out);
                }
                (Reply::TimedOut, None)
            }
            Parked::Variable(name) => {
                let v = self.variables.get_mut(&name).expect("parked on it");
                v.waiting.retain(|&(c, i)| !mine(c, i));
                if v.value.is_none() && v.waiting.is_empty() {
                    self.variables.remove(&name);
                }
                (Reply::TimedOut, None)
            }
            Parked::Event(name) => {
                self.events.get_mut(&name).expect("parked on it").waiting.retain(|&(c, i)| !mine(c, i));
                (Reply::Flag(false), None)
            }
        }
    }

    /// `client` is gone: its leases are released, its waits end (unanswered), its
    /// subscriptions end. What it put in queues, variables and datasets stays. Its waits are all
    /// taken out before anyone is served, so none of them is served on its way out.
    pub fn client_gone(&mut self, client: ClientId, out: &mut Vec<Out>) {
        let mut waits: Vec<u64> = self.parked.keys().filter(|(c, _)| *c == client).map(|(_, i)| *i).collect();
        waits.sort_unstable();
        let mut queues: BTreeSet<String> = BTreeSet::new();
        let mut touched: BTreeSet<String> = BTreeSet::new();
        for id in waits {
            let parked = self.parked.remove(&(client, id)).expect("listed");
            touched.insert(parked.name().to_string());
            let (_, serve) = self.withdraw(client, id, parked, out);
            queues.extend(serve);
        }
        let mut freed: Vec<String> = Vec::new();
        for (name, s) in &mut self.semaphores {
            let before = s.leases.len();
            s.leases.retain(|(c, _)| *c != client);
            if s.leases.len() != before {
                freed.push(name.clone());
            }
        }
        freed.sort();
        for name in freed {
            self.grant(&name, out);
        }
        for q in queues {
            self.serve_queue(&q, out);
        }
        for name in touched {
            self.tidy(&name);
        }
        let mut gifts: Vec<u64> = self.gifts.keys().filter(|(c, _)| *c == client).map(|(_, i)| *i).collect();
        gifts.sort_unstable();
        for id in gifts {
            self.acknowledged(client, id, out);
        }
        self.topics.retain(|_, subs| {
            subs.remove(&client);
            !subs.is_empty()
        });
    }

    /// The cluster restarted: every task and value is gone, so every future put here goes too
    /// (its items leave queues, variables and datasets; puts of futures still waiting are
    /// refused). Plain values stay.
    pub fn restarted(&mut self, out: &mut Vec<Out>) {
        const WHY: &str = "the cluster was restarted, which releases every future: put it again";
        let mut names: Vec<String> = self.queues.keys().cloned().collect();
        names.sort();
        for name in &names {
            let q = self.queues.get_mut(name).expect("listed");
            q.items.retain(|i| i.key().is_none());
            let (gone, keep): (VecDeque<_>, VecDeque<_>) = q.putters.drain(..).partition(|(_, _, i)| i.key().is_some());
            q.putters = keep;
            for (c, i, _) in gone {
                self.parked.remove(&(c, i));
                out.push(Out::Reply { client: c, id: i, reply: Reply::Error(WHY.into()) });
            }
        }
        self.variables.retain(|_, v| {
            if v.value.as_ref().is_some_and(|i| i.key().is_some()) {
                v.value = None;
            }
            v.value.is_some() || !v.waiting.is_empty()
        });
        self.datasets.retain(|_, items| items.iter().all(|i| i.key().is_none()));
        self.held.clear();
        self.gifts.clear();
        for name in &names {
            self.serve_queue(name, out);
            self.tidy(name);
        }
    }

    /// Keys held here now (for `validate` beside the core).
    pub fn held_keys(&self) -> impl Iterator<Item = &Key> {
        self.held.keys()
    }

    /// Gives free leases to waiters, first come first served.
    fn grant(&mut self, name: &str, out: &mut Vec<Out>) {
        let Some(s) = self.semaphores.get_mut(name) else { return };
        while (s.leases.len() as u32) < s.max_leases
            && let Some((c, i, lease)) = s.waiting.pop_front()
        {
            s.leases.insert((c, lease));
            self.parked.remove(&(c, i));
            out.push(Out::Reply { client: c, id: i, reply: Reply::Flag(true) });
        }
        if s.leases.is_empty() && s.waiting.is_empty() {
            self.semaphores.remove(name);
        }
    }

    /// Serves waiting getters in order, then lets waiting puts in while there is room.
    fn serve_queue(&mut self, name: &str, out: &mut Vec<Out>) {
        loop {
            let Some(q) = self.queues.get_mut(name) else { return };
            if let Some(&(c, i, count)) = q.getters.front()
                && q.items.len() >= count as usize
            {
                q.getters.pop_front();
                let items: Vec<Item> = q.items.drain(..count as usize).collect();
                self.parked.remove(&(c, i));
                self.take(c, i, items, out);
                continue;
            }
            if (q.maxsize == 0 || q.items.len() < q.maxsize as usize)
                && let Some((c, i, item)) = q.putters.pop_front()
            {
                q.items.push_back(item);
                self.parked.remove(&(c, i));
                out.push(Out::Reply { client: c, id: i, reply: Reply::Done });
                continue;
            }
            return;
        }
    }

    /// Answers with `items` taken out of a queue: given to the client, then no longer held here.
    fn take(&mut self, client: ClientId, id: u64, items: Vec<Item>, out: &mut Vec<Out>) {
        let keys: Vec<Key> = items.iter().filter_map(Item::key).cloned().collect();
        self.give(client, id, items, out);
        for k in keys {
            self.unhold(k, out);
        }
    }

    /// Answers with `items` (read from a variable or a dataset, or taken from a queue). The
    /// client wants their keys from now on, and they are also held here as a gift until the
    /// client acknowledges the answer ([`Op::Ack`]), once it has made its futures: a future of
    /// the same key it drops meanwhile cannot release them.
    fn give(&mut self, client: ClientId, id: u64, items: Vec<Item>, out: &mut Vec<Out>) {
        let keys: Vec<Key> = items.iter().filter_map(Item::key).cloned().collect();
        for k in &keys {
            out.push(Out::Give { client, key: k.clone() });
            self.hold(k.clone(), out);
        }
        if !keys.is_empty() {
            self.gifts.insert((client, id), keys);
        }
        out.push(Out::Reply { client, id, reply: Reply::Items(items) });
    }

    /// The client made its futures of an answer's keys: the gift's holds end.
    fn acknowledged(&mut self, client: ClientId, id: u64, out: &mut Vec<Out>) {
        for k in self.gifts.remove(&(client, id)).unwrap_or_default() {
            self.unhold(k, out);
        }
    }

    fn hold(&mut self, key: Key, out: &mut Vec<Out>) {
        let n = self.held.entry(key.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            out.push(Out::Hold(key));
        }
    }

    fn unhold(&mut self, key: Key, out: &mut Vec<Out>) {
        if let Some(n) = self.held.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&key);
                out.push(Out::Unhold(key));
            }
        }
    }

    fn no_dataset(&self, name: &str) -> String {
        let names: Vec<&str> = self.datasets.keys().map(String::as_str).collect();
        format!("no dataset named {name:?} (published: {names:?}); publish it first, or see list_datasets()")
    }

    /// dask's `set_metadata`: `["x", "w", "z"]` sets `x.w.z`, making (or replacing with) maps on
    /// the way.
    fn set_metadata(&mut self, path: &[String], value: serde_json::Value) -> Reply {
        let Some((last, parents)) = path.split_last() else {
            return Reply::Error("set_metadata needs a key (or a path of keys)".into());
        };
        let mut map = &mut self.metadata;
        for k in parents {
            let slot = map.entry(k.clone()).or_insert_with(|| serde_json::Value::Object(Default::default()));
            if !slot.is_object() {
                *slot = serde_json::Value::Object(Default::default());
            }
            map = slot.as_object_mut().expect("made a map");
        }
        map.insert(last.clone(), value);
        Reply::Done
    }

    /// dask's `get_metadata`: the value at `path` (all metadata for an empty path), as JSON;
    /// empty if there is none.
    fn get_metadata(&self, path: &[String]) -> Reply {
        let mut v = None::<&serde_json::Value>;
        let mut map = Some(&self.metadata);
        for k in path {
            match map.and_then(|m| m.get(k)) {
                Some(x) => {
                    v = Some(x);
                    map = x.as_object();
                }
                // Nothing there (not an error: the client may have a default).
                None => return Reply::Json(String::new()),
            }
        }
        let json = match v {
            Some(v) => v.to_string(),
            None => serde_json::Value::Object(self.metadata.clone()).to_string(),
        };
        Reply::Json(json)
    }

    /// Checks every invariant; panics naming the first that fails.
    pub fn validate(&self) {
        let mut holds: FxHashMap<Key, u32> = FxHashMap::default();
        let mut count = |k: Option<&Key>| {
            if let Some(k) = k {
                *holds.entry(k.clone()).or_insert(0) += 1;
            }
        };
        let mut parked: FxHashMap<(ClientId, u64), Parked> = FxHashMap::default();
        for (name, q) in &self.queues {
            q.items.iter().for_each(|i| count(i.key()));
            for (c, i, item) in &q.putters {
                count(item.key());
                parked.insert((*c, *i), Parked::QueuePut(name.clone()));
            }
            for (c, i, n) in &q.getters {
                assert!(*n >= 1, "queue {name}: a getter waits for {n} items");
                parked.insert((*c, *i), Parked::QueueGet(name.clone()));
            }
            if let Some(&(_, _, n)) = q.getters.front() {
                assert!(q.items.len() < n as usize, "queue {name}: the first getter could be served");
            }
            if !q.putters.is_empty() {
                assert!(q.maxsize > 0 && q.items.len() >= q.maxsize as usize, "queue {name}: a put waits with room");
            }
        }
        for (name, v) in &self.variables {
            count(v.value.as_ref().and_then(Item::key));
            assert!(v.value.is_none() || v.waiting.is_empty(), "variable {name} is set and has waiters");
            assert!(v.value.is_some() || !v.waiting.is_empty(), "variable {name} is empty and kept");
            for (c, i) in &v.waiting {
                parked.insert((*c, *i), Parked::Variable(name.clone()));
            }
        }
        for items in self.datasets.values() {
            items.iter().for_each(|i| count(i.key()));
        }
        for keys in self.gifts.values() {
            keys.iter().for_each(|k| count(Some(k)));
        }
        for (k, n) in &self.held {
            assert_eq!(holds.get(k).copied().unwrap_or(0), *n, "key {k}: held count");
        }
        assert_eq!(holds.len(), self.held.len(), "held keys");
        for (name, s) in &self.semaphores {
            assert!(s.leases.len() as u32 <= s.max_leases, "semaphore {name}: too many leases");
            assert!(
                s.waiting.is_empty() || s.leases.len() as u32 == s.max_leases,
                "semaphore {name}: a waiter while leases are free"
            );
            assert!(!s.leases.is_empty() || !s.waiting.is_empty(), "semaphore {name}: unused and kept");
            for (c, i, _) in &s.waiting {
                parked.insert((*c, *i), Parked::Semaphore(name.clone()));
            }
        }
        for (name, e) in &self.events {
            assert!(!e.set || e.waiting.is_empty(), "event {name} is set and has waiters");
            for (c, i) in &e.waiting {
                parked.insert((*c, *i), Parked::Event(name.clone()));
            }
        }
        assert_eq!(parked, self.parked, "parked requests");
        assert!(self.topics.values().all(|s| !s.is_empty()), "a topic without subscribers is kept");
        for (name, q) in &self.queues {
            let empty = q.items.is_empty() && q.getters.is_empty() && q.putters.is_empty();
            assert!(q.maxsize > 0 || !empty, "queue {name}: unbounded, empty and kept");
        }
        for (name, e) in &self.events {
            assert!(e.set || !e.waiting.is_empty(), "event {name}: clear, unwaited and kept");
        }
    }
}
