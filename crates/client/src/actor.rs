//! Actors on the client side (dask's `submit(cls, actor=True)`): [`Client::submit_actor`] makes
//! one on a worker; [`ActorHandle::call`] runs a call there (one at a time, in order) and
//! returns its reply; [`ActorHandle::attribute`] reads a field. Calls travel through the
//! scheduler to the actor's worker. The actor dies with its worker, and calls then say so;
//! dropping the last handle drops the actor.
use std::marker::PhantomData;
use std::sync::Arc;

use dask_protocol::actor::Actor;
use dask_protocol::codec::to_msgpack;
use dask_protocol::pb::{self, coord_request::Op};
use serde::de::DeserializeOwned;

use crate::run::decode;
use crate::{Client, Error, Result};

/// A handle to an actor of type `A` on one worker. Clones share it.
pub struct ActorHandle<A: Actor> {
    inner: Arc<Held>,
    _a: PhantomData<fn() -> A>,
}

impl<A: Actor> Clone for ActorHandle<A> {
    fn clone(&self) -> Self {
        ActorHandle { inner: self.inner.clone(), _a: PhantomData }
    }
}

impl<A: Actor> std::fmt::Debug for ActorHandle<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<Actor: {} on {}>", self.inner.key, self.inner.worker)
    }
}

struct Held {
    client: Client,
    key: String,
    worker: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        // The actor goes too (no answer awaited).
        let op = pb::ActorOp { key: self.key.clone(), op: Some(pb::actor_op::Op::Release(pb::Empty {})) };
        let run =
            pb::RunRequest { workers: vec![self.worker.clone()], wait: true, actor: Some(op), ..Default::default() };
        self.client.inner.send(self.client.inner.link.replies.request(String::new(), Op::Run(run)));
    }
}

impl Client {
    /// Makes an actor of type `A` from `init` on a worker (round-robin across calls) and
    /// returns a handle to it (dask's `submit(A, ..., actor=True)`).
    pub fn submit_actor<A: Actor>(&self, init: A::Init) -> Result<ActorHandle<A>> {
        let mut workers: Vec<String> = self.scheduler_info()?.workers.into_iter().map(|w| w.address).collect();
        if workers.is_empty() {
            return Err(Error::InvalidArgument("no workers to host an actor: start some first".into()));
        }
        workers.sort();
        let n = self.inner.scatter_next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.submit_actor_on::<A>(init, &workers[n % workers.len()])
    }

    /// [`submit_actor`](Self::submit_actor) on the worker at this address.
    pub fn submit_actor_on<A: Actor>(&self, init: A::Init, worker: &str) -> Result<ActorHandle<A>> {
        let init = to_msgpack(&init)?;
        let key = self.inner.unique_key(A::NAME);
        let create = pb::actor_op::Op::Create(pb::ActorCreate { kind: A::NAME.to_string(), init: init.into() });
        let held = Held { client: self.clone(), key: key.clone(), worker: worker.to_string() };
        // Made (or refused) before the handle is given out.
        let handle = ActorHandle { inner: Arc::new(held), _a: PhantomData };
        handle.op::<()>(create)?;
        Ok(handle)
    }
}

impl<A: Actor> ActorHandle<A> {
    pub fn key(&self) -> &str {
        &self.inner.key
    }

    /// The worker it lives on.
    pub fn worker(&self) -> &str {
        &self.inner.worker
    }

    async fn op_async<T: DeserializeOwned + 'static>(&self, op: pb::actor_op::Op) -> Result<T> {
        let req = pb::RunRequest {
            workers: vec![self.inner.worker.clone()],
            wait: true,
            actor: Some(pb::ActorOp { key: self.inner.key.clone(), op: Some(op) }),
            ..Default::default()
        };
        let mut results = self.inner.client.run_request(req).await?;
        let r = results.pop().ok_or_else(|| Error::Refused(format!("no answer from actor {}", self.inner.key)))?;
        if r.ok && r.value.is_empty() {
            // A creation: nothing comes back; `()` reads msgpack nil.
            return Ok(dask_protocol::codec::decode::<T>(dask_protocol::codec::MSGPACK, &[0xc0])?);
        }
        decode(r)
    }

    fn op<T: DeserializeOwned + 'static>(&self, op: pb::actor_op::Op) -> Result<T> {
        self.inner.client.inner.block_on(self.op_async(op))
    }

    /// Calls the actor and waits for its reply (calls run one at a time, in order).
    pub fn call(&self, msg: A::Msg) -> Result<A::Reply> {
        self.op(pb::actor_op::Op::Call(to_msgpack(&msg)?.into()))
    }

    pub async fn call_async(&self, msg: A::Msg) -> Result<A::Reply> {
        self.op_async(pb::actor_op::Op::Call(to_msgpack(&msg)?.into())).await
    }

    /// Reads the attribute `name` (a field of the actor's serialized form).
    pub fn attribute<T: DeserializeOwned + 'static>(&self, name: &str) -> Result<T> {
        self.op(pb::actor_op::Op::Attribute(name.to_string()))
    }
}
