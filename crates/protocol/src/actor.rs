//! Actors (dask's `submit(cls, actor=True)`): a stateful object that lives on one worker; its
//! calls run there one at a time, in the order they arrive, on a thread of its own.
//!
//! An actor type implements [`Actor`] (a constructor from `Init`, a handler from `Msg` to
//! `Reply`) and `Serialize` (so its attributes can be read by name), and is registered with
//! `dask::register_actor!(Type)` in every binary that may host it, as tasks are.
use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec;

/// A stateful object a worker keeps and calls.
pub trait Actor: Serialize + Send + 'static {
    /// The name it is registered under.
    const NAME: &'static str;
    /// What it is made from.
    type Init: Serialize + DeserializeOwned;
    /// A call to it (usually an enum of its methods).
    type Msg: Serialize + DeserializeOwned;
    /// What a call returns.
    type Reply: Serialize + DeserializeOwned + 'static;
    fn new(init: Self::Init) -> Self;
    /// Handles one call; `Err` is the call's error.
    fn handle(&mut self, msg: Self::Msg) -> Result<Self::Reply, String>;
}

/// An actor, as a worker holds it: calls and attributes in encoded form.
pub trait ActorObject: Send {
    fn call(&mut self, msg: &[u8]) -> Result<Vec<u8>, String>;
    /// The attribute `name` (a field of its serialized form), msgpack-encoded.
    fn attribute(&self, name: &str) -> Result<Vec<u8>, String>;
}

impl<A: Actor> ActorObject for A {
    fn call(&mut self, msg: &[u8]) -> Result<Vec<u8>, String> {
        let msg: A::Msg =
            codec::decode(codec::MSGPACK, msg).map_err(|e| format!("a call {} cannot take: {e}", A::NAME))?;
        let reply = self.handle(msg)?;
        codec::to_msgpack(&reply).map_err(|e| e.to_string())
    }

    fn attribute(&self, name: &str) -> Result<Vec<u8>, String> {
        let all = serde_json::to_value(self).map_err(|e| format!("actor {} cannot be read: {e}", A::NAME))?;
        let field = all.get(name).ok_or_else(|| format!("actor {} has no attribute {name:?}", A::NAME))?;
        codec::to_msgpack(field).map_err(|e| e.to_string())
    }
}

/// Makes an actor from its msgpack-encoded `Init`.
pub type MakeActor = fn(&[u8]) -> Result<Box<dyn ActorObject>, String>;

/// How a registered actor type is made from its encoded `Init`.
pub struct ActorRegistration {
    pub name: &'static str,
    pub create: MakeActor,
}

inventory::collect!(ActorRegistration);

impl ActorRegistration {
    pub const fn of<A: Actor>() -> ActorRegistration {
        ActorRegistration {
            name: A::NAME,
            create: |init| {
                let init: A::Init = codec::decode(codec::MSGPACK, init)
                    .map_err(|e| format!("{} cannot be made from that: {e}", A::NAME))?;
                Ok(Box::new(A::new(init)))
            },
        }
    }
}

/// The actor types linked into this program, by name.
pub fn actor_types() -> &'static HashMap<&'static str, &'static ActorRegistration> {
    static TYPES: OnceLock<HashMap<&'static str, &'static ActorRegistration>> = OnceLock::new();
    TYPES.get_or_init(|| inventory::iter::<ActorRegistration>.into_iter().map(|r| (r.name, r)).collect())
}

/// Registers an actor type (see [`Actor`]) so workers of this program can host it.
#[macro_export]
macro_rules! register_actor {
    ($t:ty) => {
        $crate::__private::inventory::submit! {
            $crate::actor::ActorRegistration::of::<$t>()
        }
    };
}
