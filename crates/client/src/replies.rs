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
    waiting: Mutex<FxHashMap<u64, oneshot::Sender<pb::CoordReply>>>,
    /// Local subscribers of each topic (a `Sub` each), fed by the reader.
    topics: Mutex<FxHashMap<String, Vec<Subscriber>>>,
}

/// One `Sub`: its number and where its messages go.
type Subscriber = (u64, mpsc::UnboundedSender<pb::Item>);

impl Replies {
    /// A new request id, and where its answer will arrive.
    pub(crate) fn expect(&self) -> (u64, oneshot::Receiver<pb::CoordReply>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().insert(id, tx);
        (id, rx)
    }

    /// The request will not be answered (it was never sent).
    pub(crate) fn forget(&self, id: u64) {
        self.waiting.lock().remove(&id);
    }

    pub(crate) fn answer(&self, reply: pb::CoordReply) {
        if let Some(tx) = self.waiting.lock().remove(&reply.id) {
            let _ = tx.send(reply);
        }
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
