//! Answers to this client's coordination requests, and messages on the topics it subscribed to:
//! the reader hands them over here, the calls waiting for them take them from here.
use std::sync::atomic::{AtomicU64, Ordering};

use dask_protocol::pb;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, oneshot};

#[derive(Default)]
pub(crate) struct Replies {
    next_id: AtomicU64,
    waiting: Mutex<FxHashMap<u64, (oneshot::Sender<pb::CoordReply>, Orphan)>>,
    /// Local subscribers of each topic (a `Sub` each), fed by the reader.
    topics: Mutex<FxHashMap<String, Vec<Subscriber>>>,
}

/// What to undo if a request's answer comes to no one.
#[derive(Debug)]
pub(crate) enum Orphan {
    Nothing,
    /// An acquire: a granted lease is released.
    Lease {
        name: String,
        lease: u64,
    },
}

/// One `Sub`: its number and where its messages go.
type Subscriber = (u64, mpsc::UnboundedSender<pb::Item>);

impl Replies {
    /// A new request id, and where its answer will arrive.
    pub(crate) fn expect(&self) -> (u64, oneshot::Receiver<pb::CoordReply>) {
        self.expect_or(Orphan::Nothing)
    }

    /// [`expect`](Self::expect), saying what to undo if the answer comes to no one.
    pub(crate) fn expect_or(&self, orphan: Orphan) -> (u64, oneshot::Receiver<pb::CoordReply>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().insert(id, (tx, orphan));
        (id, rx)
    }

    /// Hands an answer to its caller; one whose caller gave up (its call was dropped, e.g. by
    /// a timeout around an `_async` call) comes back with what to undo, so nothing it granted
    /// stays held: a lease, or keys given.
    pub(crate) fn answer(&self, reply: pb::CoordReply) -> Vec<pb::client_op::Kind> {
        use pb::coord_reply::Kind;
        let Some((tx, orphan)) = self.waiting.lock().remove(&reply.id) else { return Vec::new() };
        let Err(reply) = tx.send(reply) else { return Vec::new() };
        let mut undo = Vec::new();
        match (reply.kind, orphan) {
            (Some(Kind::Flag(true)), Orphan::Lease { name, lease }) => {
                undo.push(self.request(name, pb::coord_request::Op::Release(lease)))
            }
            (Some(Kind::Items(list)), _) => {
                let keys: Vec<String> = list.items.into_iter().map(|i| i.key).filter(|k| !k.is_empty()).collect();
                if !keys.is_empty() {
                    undo.push(pb::client_op::Kind::Release(pb::KeyList { keys }));
                    undo.push(self.request(String::new(), pb::coord_request::Op::Ack(reply.id)));
                }
            }
            _ => {}
        }
        undo
    }

    /// A request whose answer no one waits for (its id is never expected).
    pub(crate) fn request(&self, name: String, op: pb::coord_request::Op) -> pb::client_op::Kind {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        pb::client_op::Kind::Coord(pb::CoordRequest { id, name, timeout_s: 0.0, op: Some(op) })
    }

    pub(crate) fn deliver(&self, m: pb::TopicMessage) {
        let mut topics = self.topics.lock();
        if let (Some(subs), Some(item)) = (topics.get_mut(&m.topic), m.item) {
            subs.retain(|(_, tx)| tx.send(item.clone()).is_ok());
        }
    }

    /// The connection is gone: nothing waiting will be answered (each call sees its channel
    /// closed and says why).
    pub(crate) fn fail_all(&self) {
        self.waiting.lock().clear();
    }

    /// Adds a local subscriber; if it is the topic's first, `tell` tells the scheduler, under
    /// the same lock as [`unsubscribe`](Self::unsubscribe)'s, so a subscribe and an unsubscribe
    /// of one topic reach the scheduler in the order they happened here.
    pub(crate) fn subscribe<R>(
        &self,
        topic: &str,
        id: u64,
        tx: mpsc::UnboundedSender<pb::Item>,
        tell: impl FnOnce() -> R,
    ) -> Option<R> {
        let mut topics = self.topics.lock();
        let subs = topics.entry(topic.to_string()).or_default();
        subs.push((id, tx));
        (subs.len() == 1).then(tell)
    }

    /// Removes a local subscriber; if it was the topic's last, `tell` tells the scheduler.
    pub(crate) fn unsubscribe(&self, topic: &str, id: u64, tell: impl FnOnce()) {
        let mut topics = self.topics.lock();
        let Some(subs) = topics.get_mut(topic) else { return };
        subs.retain(|(i, _)| *i != id);
        if subs.is_empty() {
            topics.remove(topic);
            tell();
        }
    }

    /// Topics with local subscribers (to subscribe again after a reconnection).
    pub(crate) fn topics(&self) -> Vec<String> {
        self.topics.lock().keys().cloned().collect()
    }
}
