//! Coordination state machine: every test checks the invariants after each request.
use std::sync::Arc;

use super::*;

const A: ClientId = ClientId(1);
const B: ClientId = ClientId(2);
const C: ClientId = ClientId(3);

#[derive(Default)]
struct H {
    c: Coordination,
    next: u64,
}

impl H {
    /// Sends a request; returns its id and everything that came out.
    fn send(&mut self, client: ClientId, name: &str, wait: Wait, op: Op) -> (u64, Vec<Out>) {
        self.next += 1;
        let mut out = Vec::new();
        self.c.handle(Request { client, id: self.next, name: name.into(), wait, op }, &mut out);
        self.c.validate();
        (self.next, out)
    }

    fn timeout(&mut self, client: ClientId, id: u64) -> Vec<Out> {
        let mut out = Vec::new();
        self.c.timeout(client, id, &mut out);
        self.c.validate();
        out
    }

    fn gone(&mut self, client: ClientId) -> Vec<Out> {
        let mut out = Vec::new();
        self.c.client_gone(client, &mut out);
        self.c.validate();
        out
    }
}

fn reply(client: ClientId, id: u64, reply: Reply) -> Out {
    Out::Reply { client, id, reply }
}

fn data(s: &str) -> Item {
    Item::Data { codec: "msgpack".into(), data: bytes::Bytes::copy_from_slice(s.as_bytes()) }
}

fn fut(k: &str) -> Item {
    Item::Future(Arc::from(k))
}

fn key(k: &str) -> Key {
    Arc::from(k)
}

const ACQ: Op = Op::Acquire { lease: 7, max_leases: 1 };

#[test]
fn a_lock_is_granted_in_order_and_released_by_its_holder_only() {
    let mut h = H::default();
    let (a, out) = h.send(A, "l", Wait::Forever, ACQ);
    assert_eq!(out, vec![reply(A, a, Reply::Flag(true))]);
    let (b, out) = h.send(B, "l", Wait::Forever, ACQ);
    assert!(out.is_empty(), "B waits");
    let (c, out) = h.send(C, "l", Wait::No, ACQ);
    assert_eq!(out, vec![reply(C, c, Reply::Flag(false))], "blocking=False fails at once");
    // C's release of a lease it does not hold is refused, and changes nothing.
    let (r, out) = h.send(C, "l", Wait::No, Op::Release { lease: 7 });
    assert!(
        matches!(&out[..], [Out::Reply { id, reply: Reply::Error(e), .. }] if *id == r && e.contains("released more often"))
    );
    let (r, out) = h.send(A, "l", Wait::No, Op::Release { lease: 7 });
    assert_eq!(out, vec![reply(A, r, Reply::Done), reply(B, b, Reply::Flag(true))]);
    let (r, out) = h.send(A, "l", Wait::No, Op::Leases);
    assert_eq!(out, vec![reply(A, r, Reply::Count(1))]);
}

#[test]
fn a_lock_wait_times_out_and_a_gone_holder_releases() {
    let mut h = H::default();
    h.send(A, "l", Wait::Forever, ACQ);
    let (b, _) = h.send(B, "l", Wait::Limited, ACQ);
    assert_eq!(h.timeout(B, b), vec![reply(B, b, Reply::Flag(false))]);
    assert!(h.timeout(B, b).is_empty(), "a second timeout is a no-op");
    let (c, _) = h.send(C, "l", Wait::Forever, ACQ);
    // A dies holding the lock: C gets it.
    assert_eq!(h.gone(A), vec![reply(C, c, Reply::Flag(true))]);
}

#[test]
fn a_semaphore_gives_max_leases_and_a_gone_waiter_is_skipped() {
    let mut h = H::default();
    let sem = |lease| Op::Acquire { lease, max_leases: 2 };
    h.send(A, "s", Wait::Forever, sem(1));
    h.send(A, "s", Wait::Forever, sem(2));
    let (_, out) = h.send(B, "s", Wait::Forever, sem(1));
    assert!(out.is_empty());
    let (c, _) = h.send(C, "s", Wait::Forever, sem(1));
    assert!(h.gone(B).is_empty(), "B only waited");
    let (r, out) = h.send(A, "s", Wait::No, Op::Release { lease: 1 });
    assert_eq!(out, vec![reply(A, r, Reply::Done), reply(C, c, Reply::Flag(true))]);
}

#[test]
fn a_queue_serves_getters_in_order_and_holds_futures() {
    let mut h = H::default();
    let (g, out) = h.send(B, "q", Wait::Forever, Op::QueueGet { count: 1, batch: false, maxsize: 0 });
    assert!(out.is_empty(), "an empty queue makes a get wait");
    let (p, out) = h.send(A, "q", Wait::Forever, Op::QueuePut { item: fut("x"), maxsize: 0 });
    // Held, then given to B (who wants it from then on, and holds it as a gift until it
    // acknowledges), then let go by the queue.
    assert_eq!(
        out,
        vec![
            Out::Hold(key("x")),
            reply(A, p, Reply::Done),
            Out::Give { client: B, key: key("x") },
            reply(B, g, Reply::Items(vec![fut("x")])),
        ]
    );
    let (a, out) = h.send(B, "", Wait::No, Op::Ack(g));
    assert_eq!(out, vec![Out::Unhold(key("x")), reply(B, a, Reply::Done)], "the gift ends with the ack");
    h.send(A, "q", Wait::Forever, Op::QueuePut { item: data("1"), maxsize: 0 });
    h.send(A, "q", Wait::Forever, Op::QueuePut { item: data("2"), maxsize: 0 });
    let (r, out) = h.send(A, "q", Wait::No, Op::QueueSize);
    assert_eq!(out, vec![reply(A, r, Reply::Count(2))]);
    let (r, out) = h.send(B, "q", Wait::No, Op::QueueGet { count: 0, batch: true, maxsize: 0 });
    assert_eq!(out, vec![reply(B, r, Reply::Items(vec![data("1"), data("2")]))]);
    let (r, out) = h.send(B, "q", Wait::No, Op::QueueGet { count: 0, batch: true, maxsize: 0 });
    assert_eq!(out, vec![reply(B, r, Reply::Items(vec![]))], "a batch get of nothing does not wait");
    let (r, out) = h.send(B, "q", Wait::No, Op::QueueGet { count: 1, batch: false, maxsize: 0 });
    assert_eq!(out, vec![reply(B, r, Reply::TimedOut)]);
}

#[test]
fn a_bounded_queue_makes_puts_wait_for_room() {
    let mut h = H::default();
    h.send(A, "q", Wait::Forever, Op::QueuePut { item: data("1"), maxsize: 1 });
    let (p, out) = h.send(A, "q", Wait::Forever, Op::QueuePut { item: fut("y"), maxsize: 1 });
    assert_eq!(out, vec![Out::Hold(key("y"))], "held while it waits");
    let (r, out) = h.send(B, "q", Wait::No, Op::QueuePut { item: data("3"), maxsize: 1 });
    assert!(matches!(&out[..], [Out::Reply { id, reply: Reply::Error(e), .. }] if *id == r && e.contains("full")));
    let (g, out) = h.send(B, "q", Wait::Forever, Op::QueueGet { count: 1, batch: false, maxsize: 0 });
    assert_eq!(out, vec![reply(B, g, Reply::Items(vec![data("1")])), reply(A, p, Reply::Done)]);
    // A second waiting put that times out lets its future go.
    let (p2, _) = h.send(A, "q", Wait::Limited, Op::QueuePut { item: fut("z"), maxsize: 1 });
    assert_eq!(h.timeout(A, p2), vec![Out::Unhold(key("z")), reply(A, p2, Reply::TimedOut)]);
}

#[test]
fn a_getter_of_several_items_waits_for_all_and_blocks_those_behind() {
    let mut h = H::default();
    let (g1, _) = h.send(A, "q", Wait::Forever, Op::QueueGet { count: 2, batch: true, maxsize: 0 });
    let (g2, _) = h.send(B, "q", Wait::Limited, Op::QueueGet { count: 1, batch: false, maxsize: 0 });
    let (_, out) = h.send(C, "q", Wait::No, Op::QueuePut { item: data("1"), maxsize: 0 });
    assert_eq!(out.len(), 1, "one item: nobody served yet");
    // The first getter times out: the item goes to the one behind it.
    let out = h.timeout(A, g1);
    assert_eq!(out, vec![reply(B, g2, Reply::Items(vec![data("1")])), reply(A, g1, Reply::TimedOut)]);
}

#[test]
fn a_variable_holds_its_future_until_replaced_or_deleted() {
    let mut h = H::default();
    let (g, out) = h.send(B, "v", Wait::Limited, Op::VariableGet);
    assert!(out.is_empty(), "an unset variable makes get wait");
    let (s, out) = h.send(A, "v", Wait::No, Op::VariableSet(fut("x")));
    assert_eq!(
        out,
        vec![
            Out::Hold(key("x")),
            reply(A, s, Reply::Done),
            Out::Give { client: B, key: key("x") },
            reply(B, g, Reply::Items(vec![fut("x")]))
        ]
    );
    let (s, out) = h.send(A, "v", Wait::No, Op::VariableSet(fut("y")));
    assert_eq!(out, vec![Out::Hold(key("y")), reply(A, s, Reply::Done)], "x is B's gift still");
    let (a, out) = h.send(B, "", Wait::No, Op::Ack(g));
    assert_eq!(out, vec![Out::Unhold(key("x")), reply(B, a, Reply::Done)]);
    let (s, out) = h.send(A, "v", Wait::No, Op::VariableSet(fut("y")));
    assert_eq!(out, vec![reply(A, s, Reply::Done)], "the same key again: still one hold");
    let (d, out) = h.send(A, "v", Wait::No, Op::VariableDelete);
    assert_eq!(out, vec![Out::Unhold(key("y")), reply(A, d, Reply::Done)]);
    let (g, out) = h.send(A, "v", Wait::No, Op::VariableGet);
    assert_eq!(out, vec![reply(A, g, Reply::TimedOut)]);
}

#[test]
fn an_event_wakes_every_waiter_and_clear_resets_it() {
    let mut h = H::default();
    let (w1, _) = h.send(A, "e", Wait::Forever, Op::EventWait);
    let (w2, _) = h.send(B, "e", Wait::Limited, Op::EventWait);
    let (s, out) = h.send(C, "e", Wait::No, Op::EventSet);
    assert_eq!(out, vec![reply(C, s, Reply::Done), reply(A, w1, Reply::Flag(true)), reply(B, w2, Reply::Flag(true))]);
    let (w, out) = h.send(A, "e", Wait::Forever, Op::EventWait);
    assert_eq!(out, vec![reply(A, w, Reply::Flag(true))], "set: no wait");
    h.send(A, "e", Wait::No, Op::EventClear);
    let (w, _) = h.send(A, "e", Wait::Limited, Op::EventWait);
    assert_eq!(h.timeout(A, w), vec![reply(A, w, Reply::Flag(false))]);
    let (r, out) = h.send(A, "e", Wait::No, Op::EventIsSet);
    assert_eq!(out, vec![reply(A, r, Reply::Flag(false))]);
}

#[test]
fn topics_reach_their_subscribers_only() {
    let mut h = H::default();
    h.send(A, "t", Wait::No, Op::Subscribe);
    h.send(B, "t", Wait::No, Op::Subscribe);
    let (p, out) = h.send(C, "t", Wait::No, Op::Publish(data("m")));
    assert_eq!(
        out,
        vec![
            Out::Deliver { client: A, topic: "t".into(), item: data("m") },
            Out::Deliver { client: B, topic: "t".into(), item: data("m") },
            reply(C, p, Reply::Done)
        ]
    );
    h.send(A, "t", Wait::No, Op::Unsubscribe);
    h.gone(B);
    let (p, out) = h.send(C, "t", Wait::No, Op::Publish(data("m")));
    assert_eq!(out, vec![reply(C, p, Reply::Done)], "nobody listens");
}

#[test]
fn datasets_are_named_refused_twice_and_hold_their_keys() {
    let mut h = H::default();
    let publish = |replace| Op::DatasetPublish { items: vec![fut("x"), data("1")], replace };
    let (_, out) = h.send(A, "d", Wait::No, publish(false));
    assert_eq!(out[0], Out::Hold(key("x")));
    let (r, out) = h.send(A, "d", Wait::No, publish(false));
    assert!(
        matches!(&out[..], [Out::Reply { id, reply: Reply::Error(e), .. }] if *id == r && e.contains("published already"))
    );
    let (_, out) = h.send(A, "d", Wait::No, publish(true));
    assert!(!out.iter().any(|o| matches!(o, Out::Hold(_) | Out::Unhold(_))), "replaced by the same keys");
    let (r, out) = h.send(B, "", Wait::No, Op::DatasetList);
    assert_eq!(out, vec![reply(B, r, Reply::Names(vec!["d".into()]))]);
    let (g, out) = h.send(B, "d", Wait::No, Op::DatasetGet);
    assert_eq!(out, vec![Out::Give { client: B, key: key("x") }, reply(B, g, Reply::Items(vec![fut("x"), data("1")]))]);
    let (r, out) = h.send(B, "nope", Wait::No, Op::DatasetGet);
    assert!(
        matches!(&out[..], [Out::Reply { id, reply: Reply::Error(e), .. }] if *id == r && e.contains("no dataset named \"nope\""))
    );
    let (r, out) = h.send(B, "d", Wait::No, Op::DatasetUnpublish);
    assert_eq!(out, vec![reply(B, r, Reply::Done)], "B's gift holds x still");
    assert_eq!(h.gone(B), vec![Out::Unhold(key("x"))], "a client that goes ends its gifts");
    h.gone(A);
}

#[test]
fn metadata_paths_merge_into_maps() {
    let mut h = H::default();
    let set = |path: &[&str], v: serde_json::Value| Op::MetaSet {
        path: path.iter().map(|s| s.to_string()).collect(),
        value: v,
    };
    let get = |path: &[&str]| Op::MetaGet { path: path.iter().map(|s| s.to_string()).collect() };
    h.send(A, "", Wait::No, set(&["x"], serde_json::json!(1)));
    h.send(A, "", Wait::No, set(&["x", "w", "z"], serde_json::json!(2)));
    h.send(A, "", Wait::No, set(&["x", "w", "y"], serde_json::json!([3])));
    let (r, out) = h.send(B, "", Wait::No, get(&["x"]));
    assert_eq!(out, vec![reply(B, r, Reply::Json(r#"{"w":{"y":[3],"z":2}}"#.into()))]);
    let (r, out) = h.send(B, "", Wait::No, get(&["x", "w", "z"]));
    assert_eq!(out, vec![reply(B, r, Reply::Json("2".into()))]);
    let (r, out) = h.send(B, "", Wait::No, get(&["x", "q"]));
    assert_eq!(out, vec![reply(B, r, Reply::Json(String::new()))], "nothing there");
    let (r, out) = h.send(B, "", Wait::No, set(&[], serde_json::json!(1)));
    assert!(matches!(&out[..], [Out::Reply { id, reply: Reply::Error(_), .. }] if *id == r));
}

#[test]
fn a_restart_drops_futures_and_keeps_values() {
    let mut h = H::default();
    h.send(A, "q", Wait::No, Op::QueuePut { item: fut("x"), maxsize: 2 });
    h.send(A, "q", Wait::No, Op::QueuePut { item: data("1"), maxsize: 2 });
    let (p, _) = h.send(A, "q", Wait::Forever, Op::QueuePut { item: fut("y"), maxsize: 2 });
    h.send(A, "v", Wait::No, Op::VariableSet(fut("z")));
    h.send(A, "w", Wait::No, Op::VariableSet(data("2")));
    h.send(A, "d", Wait::No, Op::DatasetPublish { items: vec![fut("x")], replace: false });
    let mut out = Vec::new();
    h.c.restarted(&mut out);
    h.c.validate();
    assert!(matches!(&out[..], [Out::Reply { id, reply: Reply::Error(e), .. }] if *id == p && e.contains("restarted")));
    let (r, out) = h.send(A, "q", Wait::No, Op::QueueSize);
    assert_eq!(out, vec![reply(A, r, Reply::Count(1))]);
    let (r, out) = h.send(A, "w", Wait::No, Op::VariableGet);
    assert_eq!(out, vec![reply(A, r, Reply::Items(vec![data("2")]))]);
    assert_eq!(h.c.held_keys().count(), 0);
}

#[test]
fn a_request_id_in_use_is_refused() {
    let mut h = H::default();
    h.send(A, "l", Wait::Forever, ACQ);
    let mut out = Vec::new();
    h.c.handle(Request { client: B, id: 50, name: "l".into(), wait: Wait::Forever, op: ACQ }, &mut out);
    h.c.handle(Request { client: B, id: 50, name: "e".into(), wait: Wait::Forever, op: Op::EventWait }, &mut out);
    h.c.validate();
    assert!(matches!(&out[..], [Out::Reply { id: 50, reply: Reply::Error(_), .. }]));
}

/// A random step: a request, a timeout of some earlier request, or a client going.
fn step() -> impl proptest::strategy::Strategy<Value = (u8, u8, u8, u8, u8)> {
    (0u8..22, 0u8..3, 0u8..2, 0u8..3, 0u8..4)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 300, ..Default::default() })]
    /// Any mix of requests, timeouts and departures keeps every invariant, and every request
    /// is answered at most once.
    #[test]
    fn random_requests_keep_the_invariants(steps in proptest::collection::vec(step(), 1..80)) {
        let mut h = H::default();
        let mut answered: std::collections::HashSet<(ClientId, u64)> = Default::default();
        let mut sent: Vec<(ClientId, u64)> = Vec::new();
        for (what, c, n, k, w) in steps {
            let client = ClientId(c as u32 + 1);
            let name = ["a", "b"][n as usize];
            let item = if k == 0 { data("v") } else { fut(["x", "y"][k as usize - 1]) };
            let wait = [Wait::No, Wait::Forever, Wait::Limited, Wait::Limited][w as usize];
            let op = match what {
                0 | 1 => Op::Acquire { lease: k as u64, max_leases: 2 },
                2 => Op::Release { lease: k as u64 },
                3 | 4 => Op::QueuePut { item, maxsize: 2 },
                5 | 6 => Op::QueueGet { count: k as u32, batch: w == 0, maxsize: 2 },
                7 => Op::VariableSet(item),
                8 => Op::VariableGet,
                9 => Op::VariableDelete,
                10 => Op::EventSet,
                11 => Op::EventClear,
                12 => Op::EventWait,
                13 => Op::Subscribe,
                14 => Op::Publish(item),
                15 => Op::DatasetPublish { items: vec![item], replace: w > 1 },
                16 => Op::DatasetUnpublish,
                17 | 18 => {
                    // Time out an earlier request.
                    if let Some(&(c, i)) = sent.get((k as usize * 7 + w as usize) % sent.len().max(1)) {
                        for o in h.timeout(c, i) {
                            if let Out::Reply { client, id, .. } = o {
                                proptest::prop_assert!(answered.insert((client, id)), "answered twice");
                            }
                        }
                    }
                    continue;
                }
                19 => {
                    h.gone(client);
                    continue;
                }
                21 => Op::Ack(sent.get(k as usize * 5 % sent.len().max(1)).map_or(0, |s| s.1)),
                20 => {
                    let mut out = Vec::new();
                    h.c.restarted(&mut out);
                    h.c.validate();
                    continue;
                }
                _ => Op::QueueSize,
            };
            let (id, out) = h.send(client, name, wait, op);
            sent.push((client, id));
            for o in out {
                if let Out::Reply { client, id, .. } = o {
                    proptest::prop_assert!(answered.insert((client, id)), "answered twice");
                }
            }
        }
    }
}

#[test]
fn a_client_that_goes_is_not_served_on_its_way_out() {
    let mut h = H::default();
    h.send(B, "q", Wait::No, Op::QueuePut { item: fut("x"), maxsize: 0 });
    // A waits for two items, then for one; one is there.
    h.send(A, "q", Wait::Forever, Op::QueueGet { count: 2, batch: true, maxsize: 0 });
    h.send(A, "q", Wait::Forever, Op::QueueGet { count: 1, batch: false, maxsize: 0 });
    let out = h.gone(A);
    assert!(out.is_empty(), "the item stays held in the queue: {out:?}");
    let (r, out) = h.send(B, "q", Wait::No, Op::QueueSize);
    assert_eq!(out, vec![reply(B, r, Reply::Count(1))]);
}

#[test]
fn a_get_larger_than_a_bounded_queue_is_refused() {
    let mut h = H::default();
    h.send(A, "q", Wait::No, Op::QueuePut { item: data("1"), maxsize: 2 });
    let (r, out) = h.send(B, "q", Wait::Forever, Op::QueueGet { count: 3, batch: true, maxsize: 0 });
    assert!(
        matches!(&out[..], [Out::Reply { id, reply: Reply::Error(e), .. }] if *id == r && e.contains("never be served"))
    );
    // A queue made by a get takes its bound.
    h.send(B, "r", Wait::Limited, Op::QueueGet { count: 1, batch: false, maxsize: 1 });
    h.send(A, "r", Wait::No, Op::QueuePut { item: data("1"), maxsize: 0 });
    h.send(A, "r", Wait::No, Op::QueuePut { item: data("2"), maxsize: 0 });
    let (r, out) = h.send(A, "r", Wait::No, Op::QueuePut { item: data("3"), maxsize: 0 });
    assert!(matches!(&out[..], [Out::Reply { id, reply: Reply::Error(e), .. }] if *id == r && e.contains("full")));
}

#[test]
fn a_metadata_path_too_deep_is_refused() {
    let mut h = H::default();
    let path: Vec<String> = (0..100_000).map(|i| i.to_string()).collect();
    let (r, out) = h.send(A, "", Wait::No, Op::MetaSet { path, value: serde_json::json!(1) });
    assert!(matches!(&out[..], [Out::Reply { id, reply: Reply::Error(e), .. }] if *id == r && e.contains("too deep")));
}

#[test]
fn a_topic_carries_values_not_futures() {
    let mut h = H::default();
    h.send(A, "t", Wait::No, Op::Subscribe);
    let (p, out) = h.send(B, "t", Wait::No, Op::Publish(fut("x")));
    assert!(matches!(&out[..], [Out::Reply { id, reply: Reply::Error(e), .. }] if *id == p && e.contains("Queue")));
}

#[test]
fn empty_unbounded_queues_and_clear_events_are_forgotten() {
    let mut h = H::default();
    for i in 0..100 {
        let name = format!("q{i}");
        h.send(A, &name, Wait::No, Op::QueuePut { item: data("1"), maxsize: 0 });
        h.send(A, &name, Wait::No, Op::QueueGet { count: 1, batch: false, maxsize: 0 });
        h.send(A, &name, Wait::No, Op::EventWait);
    }
    assert!(h.c.queues.is_empty() && h.c.events.is_empty(), "nothing kept for names no longer used");
    // A set event and a bounded queue keep their state.
    h.send(A, "e", Wait::No, Op::EventSet);
    h.send(A, "b", Wait::Limited, Op::QueueGet { count: 0, batch: true, maxsize: 3 });
    assert_eq!((h.c.events.len(), h.c.queues.len()), (1, 1));
}
