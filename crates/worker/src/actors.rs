//! The actors this worker hosts (`Client::submit_actor`): each on a thread of its own, which
//! takes its calls one at a time in the order they came. They go with the worker.
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;

use dask_protocol::actor::{ActorObject, actor_types};
use dask_protocol::pb;
use dask_protocol::task::panic_message;
use parking_lot::Mutex;
use tokio::sync::mpsc::UnboundedSender;

enum Job {
    Call(u64, Vec<u8>),
    Attribute(u64, String),
}

/// Where answers go: the worker's stream to the scheduler.
type Out = UnboundedSender<pb::WorkerToScheduler>;

#[derive(Default)]
pub(crate) struct Actors {
    live: Mutex<HashMap<String, mpsc::Sender<Job>>>,
}

fn answer(out: &Out, worker: &str, id: u64, r: Result<Vec<u8>, String>) {
    let result = match r {
        Ok(v) => pb::RunResult {
            worker: worker.to_string(),
            ok: true,
            codec: dask_protocol::codec::MSGPACK.into(),
            value: v.into(),
            error: None,
        },
        Err(message) => pb::RunResult {
            worker: worker.to_string(),
            ok: false,
            error: Some(pb::TaskError {
                message,
                kind: "actor".into(),
                worker: worker.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        },
    };
    let done = pb::RunDone { id, result: Some(result) };
    let _ = out.send(pb::WorkerToScheduler {
        events: vec![pb::WorkerEvent { kind: Some(pb::worker_event::Kind::RunDone(done)) }],
    });
}

/// Runs `f` on the actor, a panic turned into the call's error.
fn guarded<R>(what: &str, f: impl FnOnce() -> Result<R, String>) -> Result<R, String> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(format!("{what} panicked: {}", panic_message(&*p))))
}

impl Actors {
    /// One actor operation (`id` is the scheduler's run id, answered with RunDone).
    pub(crate) fn handle(&self, id: u64, op: pb::ActorOp, worker: &str, out: &Out) {
        use pb::actor_op::Op;
        let key = op.key;
        match op.op {
            Some(Op::Create(c)) => {
                let Some(reg) = actor_types().get(c.kind.as_str()).copied() else {
                    return answer(
                        out,
                        worker,
                        id,
                        Err(format!(
                            "no actor type {:?} is registered in this worker: build it from the crate that \
                             registers it (dask::register_actor!)",
                            c.kind
                        )),
                    );
                };
                if self.live.lock().contains_key(&key) {
                    return answer(out, worker, id, Err(format!("an actor {key:?} lives here already")));
                }
                let (tx, rx) = mpsc::channel::<Job>();
                self.live.lock().insert(key.clone(), tx);
                let (to, at) = (out.clone(), worker.to_string());
                let spawned = std::thread::Builder::new().name(format!("dask-actor-{}", c.kind)).spawn(move || {
                    let made = guarded("making the actor", || (reg.create)(&c.init));
                    let mut actor: Box<dyn ActorObject> = match made {
                        Ok(a) => {
                            answer(&to, &at, id, Ok(Vec::new()));
                            a
                        }
                        Err(e) => return answer(&to, &at, id, Err(e)),
                    };
                    // One call at a time, in order, until the actor is dropped.
                    while let Ok(job) = rx.recv() {
                        match job {
                            Job::Call(id, msg) => answer(&to, &at, id, guarded("the call", || actor.call(&msg))),
                            Job::Attribute(id, name) => {
                                answer(&to, &at, id, guarded("reading it", || actor.attribute(&name)))
                            }
                        }
                    }
                });
                if let Err(e) = spawned {
                    self.live.lock().remove(&key);
                    answer(out, worker, id, Err(format!("could not start the actor's thread: {e}")));
                }
            }
            Some(Op::Call(msg)) => self.send(&key, Job::Call(id, msg.to_vec()), id, worker, out),
            Some(Op::Attribute(name)) => self.send(&key, Job::Attribute(id, name), id, worker, out),
            Some(Op::Release(_)) => {
                // Its thread ends once the calls queued before are done.
                self.live.lock().remove(&key);
                answer(out, worker, id, Ok(Vec::new()));
            }
            None => answer(out, worker, id, Err("an actor request without an operation".into())),
        }
    }

    fn send(&self, key: &str, job: Job, id: u64, worker: &str, out: &Out) {
        let mut live = self.live.lock();
        let sent = live.get(key).map(|tx| tx.send(job).is_ok());
        if sent == Some(false) {
            live.remove(key); // its making failed: the thread is gone
        }
        drop(live);
        if sent != Some(true) {
            answer(
                out,
                worker,
                id,
                Err(format!("no actor {key:?} lives on {worker} (dropped, or its worker restarted)")),
            );
        }
    }
}
