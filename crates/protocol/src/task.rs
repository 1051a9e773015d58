//! Tasks: the [`Task`] trait that `#[task]` implements, the process-wide registry of task
//! functions, and [`execute`], which runs a [`TaskSpec`](crate::pb::TaskSpec) on this thread.
//!
//! Arguments travel as a tree ([`crate::pb::Arg`]): literals (msgpack), references to other
//! keys, lists and maps. [`ArgDeserializer`] reads that tree as the function's typed argument
//! tuple directly, pulling each dependency's bytes from the worker's store, so assembling
//! arguments copies nothing.
use std::collections::HashMap;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;

use bytes::Bytes;
use serde::Serialize;
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

use crate::codec::{RAW, RawDeserializer, Value};
use crate::pb::{self, arg::Kind};

/// A function that can run on a worker. Implemented by `#[task]`; rarely by hand.
pub trait Task: Send + Sync + 'static {
    /// Registered name; also the prefix of the task's keys (`inc-<token>`).
    const NAME: &'static str;
    /// The function's arguments as a tuple.
    type Args: DecodeArgs;
    /// What the function returns (the `T` of a `Result<T, E>`).
    type Output: Serialize + DeserializeOwned + 'static;
    /// Runs the function; `Err` carries the message of the function's error.
    fn run(args: Self::Args) -> Result<Self::Output, String>;
}

/// One registered function: its name and a type-erased runner.
pub struct Registration {
    pub name: &'static str,
    run: fn(ArgDeserializer<'_>) -> Result<Value, ExecErrorKind>,
}

inventory::collect!(Registration);

impl Registration {
    pub const fn new<T: Task>() -> Registration {
        Registration { name: T::NAME, run: run_erased::<T> }
    }
}

fn run_erased<T: Task>(args: ArgDeserializer<'_>) -> Result<Value, ExecErrorKind> {
    let args = T::Args::decode(args).map_err(|e| {
        ExecErrorKind::BadArguments(format!("{e} (the function takes {})", std::any::type_name::<T::Args>()))
    })?;
    let out = T::run(args).map_err(ExecErrorKind::Error)?;
    Value::from_owned(out).map_err(|e| ExecErrorKind::Error(e.to_string()))
}

/// A function's argument tuple, read from an argument tree one parameter at a time, so that a
/// `bytes::Bytes` parameter fed by a dependency is a view of the stored value, not a copy.
pub trait DecodeArgs: Sized {
    fn decode(args: ArgDeserializer<'_>) -> Result<Self, ArgError>;
}

/// One parameter: a `Bytes` from a dependency shares the dependency's buffer; a `Vec<u8>` or
/// `ByteBuf` from a raw dependency is one copy (serde would go byte by byte); anything else is
/// read by serde.
fn decode_arg<T: DeserializeOwned + 'static>(arg: ArgDeserializer<'_>) -> Result<T, ArgError> {
    if let Some(Kind::Key(k)) = &arg.arg.kind
        && let Some(t) = arg.deps.get(k).and_then(Value::as_byte_type)
    {
        return Ok(t);
    }
    T::deserialize(arg)
}

macro_rules! one {
    ($x:ident) => {
        1
    };
}

macro_rules! decode_args_for_tuples {
    ($( ($($name:ident),*) ),* $(,)?) => {$(
        impl<$($name: DeserializeOwned + 'static),*> DecodeArgs for ($($name,)*) {
            #[allow(non_snake_case, unused_mut, unused_variables)]
            fn decode(args: ArgDeserializer<'_>) -> Result<Self, ArgError> {
                const COUNT: usize = 0 $(+ one!($name))*;
                match &args.arg.kind {
                    Some(Kind::List(l)) => {
                        if l.items.len() != COUNT {
                            return Err(ArgError(format!(
                                "the function takes {COUNT} argument{}, {} {} given",
                                if COUNT == 1 { "" } else { "s" },
                                l.items.len(),
                                if l.items.len() == 1 { "was" } else { "were" }
                            )));
                        }
                        let mut items = l.items.iter();
                        $(let $name = decode_arg::<$name>(ArgDeserializer {
                            arg: items.next().expect("length checked"),
                            deps: args.deps,
                        })?;)*
                        Ok(($($name,)*))
                    }
                    // A whole argument tuple as one literal or one dependency.
                    _ => <Self as serde::Deserialize>::deserialize(args),
                }
            }
        }
    )*};
}

decode_args_for_tuples! {
    (), (A), (A, B), (A, B, C), (A, B, C, D), (A, B, C, D, E), (A, B, C, D, E, F), (A, B, C, D, E, F, G),
    (A, B, C, D, E, F, G, H), (A, B, C, D, E, F, G, H, I), (A, B, C, D, E, F, G, H, I, J),
    (A, B, C, D, E, F, G, H, I, J, K), (A, B, C, D, E, F, G, H, I, J, K, L),
    (A, B, C, D, E, F, G, H, I, J, K, L, M), (A, B, C, D, E, F, G, H, I, J, K, L, M, N),
    (A, B, C, D, E, F, G, H, I, J, K, L, M, N, O), (A, B, C, D, E, F, G, H, I, J, K, L, M, N, O, P),
}

/// Why a task did not produce a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecErrorKind {
    /// The function returned `Err`.
    Error(String),
    /// The function panicked.
    Panic(String),
    /// No function of that name is registered in this worker binary.
    UnknownFunction(String),
    /// The arguments could not be decoded as the function's parameter types.
    BadArguments(String),
    /// A dependency's value was not available to the executor.
    MissingDependency(String),
    /// The task asked to run elsewhere (`dask::reschedule()`, dask's `raise Reschedule()`).
    Reschedule,
}

/// What `dask::reschedule()` unwinds with; `execute` turns it into [`ExecErrorKind::Reschedule`].
#[derive(Debug)]
pub struct RescheduleRequest;

/// dask's `raise Reschedule()`: ends the running task at once; the scheduler runs it again,
/// wherever it places it then. Call it only from inside a task.
pub fn reschedule() -> ! {
    // `resume_unwind` skips the panic hook: nothing is printed for it.
    std::panic::resume_unwind(Box::new(RescheduleRequest))
}

impl ExecErrorKind {
    /// The `kind` string of [`pb::TaskError`].
    pub fn kind(&self) -> &'static str {
        match self {
            ExecErrorKind::Error(_) => "error",
            ExecErrorKind::Panic(_) => "panic",
            ExecErrorKind::UnknownFunction(_) => "unknown-function",
            ExecErrorKind::BadArguments(_) => "bad-arguments",
            ExecErrorKind::MissingDependency(_) => "missing-dependency",
            ExecErrorKind::Reschedule => RESCHEDULE,
        }
    }

    pub fn message(&self) -> String {
        match self {
            ExecErrorKind::Error(m) | ExecErrorKind::Panic(m) => m.clone(),
            ExecErrorKind::UnknownFunction(f) => format!(
                "no task function named {f:?} is registered in this worker; build the worker from \
                 the crate that defines it (its main calls dask::worker_main()), or upload a plugin \
                 library that defines it (Client::upload_file)"
            ),
            ExecErrorKind::BadArguments(m) => format!("wrong argument types: {m}"),
            ExecErrorKind::MissingDependency(k) => {
                format!("dependency {k:?} is not in memory here")
            }
            ExecErrorKind::Reschedule => "the task asked to be rescheduled".into(),
        }
    }
}

/// Looks up registered functions. Built once per process from every `#[task]` linked in.
pub fn registry() -> &'static HashMap<&'static str, &'static Registration> {
    static REGISTRY: OnceLock<HashMap<&'static str, &'static Registration>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut map = HashMap::new();
        for reg in inventory::iter::<Registration> {
            if map.insert(reg.name, reg).is_some() {
                // Two functions with one name: which one runs would depend on link order.
                eprintln!(
                    "dask: two task functions are registered as {:?}; give one of them \
                     #[task(name = \"...\")]. The first one found is used.",
                    reg.name
                );
            }
        }
        map
    })
}

/// A task function that lives outside this program's registry (in a loaded plugin library):
/// it gets the spec and the values of the keys it references.
pub trait ExternalTask: Send + Sync {
    fn call(&self, spec: &pb::TaskSpec, deps: &HashMap<String, Value>) -> Result<Value, ExecErrorKind>;
}

type External = std::sync::RwLock<HashMap<String, std::sync::Arc<dyn ExternalTask>>>;

fn externals() -> &'static External {
    static EXTERNAL: OnceLock<External> = OnceLock::new();
    EXTERNAL.get_or_init(Default::default)
}

/// Adds (or replaces) functions run by `f` under these names; a name this program registers
/// itself keeps running its own function. Returns the names that were already registered here.
pub fn register_external(names: &[String], f: std::sync::Arc<dyn ExternalTask>) -> Vec<String> {
    let mut map = externals().write().unwrap_or_else(|e| e.into_inner());
    let mut shadowed = Vec::new();
    for n in names {
        if registry().contains_key(n.as_str()) {
            shadowed.push(n.clone());
        } else {
            map.insert(n.clone(), f.clone());
        }
    }
    shadowed
}

fn external(name: &str) -> Option<std::sync::Arc<dyn ExternalTask>> {
    externals().read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
}

/// Names of every registered function, sorted (for error messages and `--help`).
pub fn registered_names() -> Vec<&'static str> {
    let mut v: Vec<_> = registry().keys().copied().collect();
    v.sort_unstable();
    v
}

/// Runs `spec` on the calling thread. `deps` gives the value of each referenced key.
/// A panic in the function is caught and returned as [`ExecErrorKind::Panic`].
pub fn execute(spec: &pb::TaskSpec, deps: &dyn Fn(&str) -> Option<Value>) -> Result<Value, ExecErrorKind> {
    let found = registry().get(spec.function.as_str());
    let outside = match found {
        Some(_) => None,
        None => Some(external(&spec.function).ok_or_else(|| ExecErrorKind::UnknownFunction(spec.function.clone()))?),
    };
    let lookup = dep_values(spec, deps)?;
    let Some(reg) = found else {
        return outside.expect("set when not found").call(spec, &lookup.0);
    };
    capture_panics();
    IN_TASK.with(|t| t.set(true));
    let r = catch_unwind(AssertUnwindSafe(|| run_registered(reg, spec, &lookup)));
    IN_TASK.with(|t| t.set(false));
    match r {
        Ok(r) => r,
        Err(payload) if payload.is::<RescheduleRequest>() => Err(ExecErrorKind::Reschedule),
        Err(payload) => Err(ExecErrorKind::Panic(panic_message(&*payload))),
    }
}

/// Runs `spec` on the calling thread as [`execute`] does, but a panic in the function is not
/// caught: it unwinds into the caller, where a debugger or `RUST_BACKTRACE` shows it (dask's
/// `recreate_error_locally`). Only this program's own functions run here.
pub fn execute_uncaught(spec: &pb::TaskSpec, deps: &dyn Fn(&str) -> Option<Value>) -> Result<Value, ExecErrorKind> {
    let reg =
        registry().get(spec.function.as_str()).ok_or_else(|| ExecErrorKind::UnknownFunction(spec.function.clone()))?;
    let lookup = dep_values(spec, deps)?;
    run_registered(reg, spec, &lookup)
}

/// Every referenced key's value, up front, so a missing one is reported as such.
fn dep_values(spec: &pb::TaskSpec, deps: &dyn Fn(&str) -> Option<Value>) -> Result<DepValues, ExecErrorKind> {
    let mut lookup = DepValues(HashMap::new());
    if let Some(args) = &spec.args {
        collect_refs(args, deps, &mut lookup)?;
    }
    Ok(lookup)
}

fn run_registered(reg: &Registration, spec: &pb::TaskSpec, lookup: &DepValues) -> Result<Value, ExecErrorKind> {
    let empty = pb::Arg { kind: Some(Kind::List(pb::ArgList { items: Vec::new() })) };
    let root = spec.args.as_ref().unwrap_or(&empty);
    (reg.run)(ArgDeserializer { arg: root, deps: lookup })
}

thread_local! {
    /// Set while a task function runs on this thread.
    static IN_TASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The backtrace of the last panic of a task on this thread.
    static LAST_BACKTRACE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Installs (once) a panic hook that keeps the backtrace of a task's panic for its error
/// (`Future::traceback`), then runs the hook that was there.
fn capture_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_TASK.with(|t| t.get()) {
                let bt = std::backtrace::Backtrace::force_capture().to_string();
                LAST_BACKTRACE.with(|b| *b.borrow_mut() = Some(bt));
            }
            previous(info);
        }));
    });
}

/// Sets the backtrace of a task's panic that happened elsewhere (in a plugin library), for
/// [`take_panic_backtrace`].
pub fn set_panic_backtrace(bt: String) {
    LAST_BACKTRACE.with(|b| *b.borrow_mut() = Some(bt));
}

/// The backtrace of the last task panic on this thread, taken.
pub fn take_panic_backtrace() -> String {
    LAST_BACKTRACE.with(|b| b.borrow_mut().take()).unwrap_or_default()
}

/// The `kind` of a task that asked to be rescheduled.
pub const RESCHEDULE: &str = "reschedule";

/// The outcome of running `spec` here or on a worker, as the wire carries it.
pub fn run_result(worker: &str, function: &str, r: Result<Value, ExecErrorKind>) -> pb::RunResult {
    match r {
        Ok(v) => pb::RunResult {
            worker: worker.to_string(),
            ok: true,
            codec: v.codec.to_string(),
            value: v.data,
            error: None,
        },
        Err(e) => pb::RunResult {
            worker: worker.to_string(),
            ok: false,
            error: Some(pb::TaskError {
                message: e.message(),
                kind: e.kind().to_string(),
                function: function.to_string(),
                key: String::new(),
                worker: worker.to_string(),
                traceback: match e {
                    ExecErrorKind::Panic(_) => take_panic_backtrace(),
                    _ => String::new(),
                },
            }),
            ..Default::default()
        },
    }
}

/// The message of a caught panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

fn collect_refs(arg: &pb::Arg, deps: &dyn Fn(&str) -> Option<Value>, out: &mut DepValues) -> Result<(), ExecErrorKind> {
    match &arg.kind {
        Some(Kind::Key(k)) => {
            if !out.0.contains_key(k.as_str()) {
                let v = deps(k).ok_or_else(|| ExecErrorKind::MissingDependency(k.clone()))?;
                out.0.insert(k.clone(), v);
            }
        }
        Some(Kind::List(l)) => {
            for a in &l.items {
                collect_refs(a, deps, out)?;
            }
        }
        Some(Kind::Map(m)) => {
            for e in &m.entries {
                if let Some(v) = &e.value {
                    collect_refs(v, deps, out)?;
                }
            }
        }
        Some(Kind::Literal(_)) | None => {}
    }
    Ok(())
}

/// Values of the keys a task references (a reduction may reference many thousands).
pub struct DepValues(HashMap<String, Value>);

impl DepValues {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }
}

// ------------------------------------------------------------------ the argument deserializer

/// Error of [`ArgDeserializer`].
#[derive(Debug)]
pub struct ArgError(pub String);

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for ArgError {}
impl de::Error for ArgError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ArgError(msg.to_string())
    }
}

fn rmp_err(e: rmp_serde::decode::Error) -> ArgError {
    ArgError(e.to_string())
}

/// Reads an argument tree as a serde value: literals and dependency values are read in place
/// by msgpack's deserializer, lists and maps are walked.
#[derive(Clone, Copy)]
pub struct ArgDeserializer<'a> {
    arg: &'a pb::Arg,
    deps: &'a DepValues,
}

/// A literal or a dependency's value: msgpack, or a raw byte buffer.
enum Leaf<'a> {
    Msgpack(&'a [u8]),
    Raw(&'a [u8]),
}

impl<'a> ArgDeserializer<'a> {
    fn leaf(&self) -> Result<Option<Leaf<'a>>, ArgError> {
        match &self.arg.kind {
            Some(Kind::Literal(b)) => Ok(Some(Leaf::Msgpack(b))),
            Some(Kind::Key(k)) => match self.deps.get(k) {
                Some(v) if v.codec == RAW => Ok(Some(Leaf::Raw(&v.data))),
                Some(v) => Ok(Some(Leaf::Msgpack(&v.data))),
                None => Err(ArgError(format!("dependency {k:?} is not available"))),
            },
            _ => Ok(None),
        }
    }
}

macro_rules! forward_leaf {
    ($($method:ident ( $($arg:ident : $ty:ty),* )),* $(,)?) => {$(
        fn $method<V: Visitor<'a>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, ArgError> {
            match self.leaf()? {
                Some(Leaf::Msgpack(bytes)) => {
                    let mut d = rmp_serde::Deserializer::from_read_ref(bytes);
                    serde::Deserializer::$method(&mut d, $($arg,)* visitor).map_err(rmp_err)
                }
                Some(Leaf::Raw(bytes)) => {
                    serde::Deserializer::$method(RawDeserializer(bytes), $($arg,)* visitor).map_err(|e| ArgError(e.to_string()))
                }
                None => self.deserialize_any(visitor),
            }
        }
    )*};
}

impl<'a> serde::Deserializer<'a> for ArgDeserializer<'a> {
    type Error = ArgError;

    fn deserialize_any<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, ArgError> {
        match &self.arg.kind {
            Some(Kind::List(l)) => visitor.visit_seq(ListAccess { items: l.items.iter(), deps: self.deps }),
            Some(Kind::Map(m)) => {
                visitor.visit_map(MapAccess { entries: m.entries.iter(), value: None, deps: self.deps })
            }
            None => visitor.visit_unit(),
            Some(Kind::Literal(_)) | Some(Kind::Key(_)) => match self.leaf()?.expect("leaf") {
                Leaf::Msgpack(bytes) => {
                    let mut d = rmp_serde::Deserializer::from_read_ref(bytes);
                    serde::Deserializer::deserialize_any(&mut d, visitor).map_err(rmp_err)
                }
                Leaf::Raw(bytes) => visitor.visit_bytes(bytes),
            },
        }
    }

    fn deserialize_unit<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, ArgError> {
        match (&self.arg.kind, self.leaf()?) {
            (_, Some(Leaf::Msgpack(bytes))) => {
                let mut d = rmp_serde::Deserializer::from_read_ref(bytes);
                serde::Deserializer::deserialize_unit(&mut d, visitor).map_err(rmp_err)
            }
            (_, Some(Leaf::Raw(_))) => Err(ArgError("a bytes value cannot be read as ()".into())),
            // A function without parameters gets an empty argument list.
            (Some(Kind::List(l)), None) if l.items.is_empty() => visitor.visit_unit(),
            _ => self.deserialize_any(visitor),
        }
    }

    forward_leaf! {
        deserialize_bool(), deserialize_i8(), deserialize_i16(), deserialize_i32(), deserialize_i64(),
        deserialize_i128(), deserialize_u8(), deserialize_u16(), deserialize_u32(), deserialize_u64(),
        deserialize_u128(), deserialize_f32(), deserialize_f64(), deserialize_char(), deserialize_str(),
        deserialize_string(), deserialize_bytes(), deserialize_byte_buf(), deserialize_option(),
        deserialize_unit_struct(name: &'static str),
        deserialize_newtype_struct(name: &'static str), deserialize_seq(),
        deserialize_tuple(len: usize), deserialize_tuple_struct(name: &'static str, len: usize),
        deserialize_map(), deserialize_struct(name: &'static str, fields: &'static [&'static str]),
        deserialize_enum(name: &'static str, variants: &'static [&'static str]),
        deserialize_identifier(), deserialize_ignored_any(),
    }
}

struct ListAccess<'a> {
    items: std::slice::Iter<'a, pb::Arg>,
    deps: &'a DepValues,
}

impl<'a> de::SeqAccess<'a> for ListAccess<'a> {
    type Error = ArgError;
    fn next_element_seed<T: DeserializeSeed<'a>>(&mut self, seed: T) -> Result<Option<T::Value>, ArgError> {
        match self.items.next() {
            Some(arg) => seed.deserialize(ArgDeserializer { arg, deps: self.deps }).map(Some),
            None => Ok(None),
        }
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapAccess<'a> {
    entries: std::slice::Iter<'a, pb::ArgMapEntry>,
    value: Option<&'a pb::Arg>,
    deps: &'a DepValues,
}

impl<'a> de::MapAccess<'a> for MapAccess<'a> {
    type Error = ArgError;
    fn next_key_seed<K: DeserializeSeed<'a>>(&mut self, seed: K) -> Result<Option<K::Value>, ArgError> {
        match self.entries.next() {
            Some(e) => {
                self.value = e.value.as_ref();
                let mut d = rmp_serde::Deserializer::from_read_ref(&e.key[..]);
                seed.deserialize(&mut d).map(Some).map_err(rmp_err)
            }
            None => Ok(None),
        }
    }
    fn next_value_seed<V: DeserializeSeed<'a>>(&mut self, seed: V) -> Result<V::Value, ArgError> {
        match self.value.take() {
            Some(arg) => seed.deserialize(ArgDeserializer { arg, deps: self.deps }),
            None => seed.deserialize(().into_deserializer()),
        }
    }
}

// ------------------------------------------------------------------ building argument trees

/// Builds argument trees on the client side.
pub mod build {
    use super::*;

    pub fn literal<T: Serialize + ?Sized>(v: &T) -> Result<pb::Arg, crate::codec::CodecError> {
        Ok(pb::Arg { kind: Some(Kind::Literal(Bytes::from(crate::codec::to_msgpack(v)?))) })
    }

    pub fn key(k: impl Into<String>) -> pb::Arg {
        pb::Arg { kind: Some(Kind::Key(k.into())) }
    }

    pub fn list(items: Vec<pb::Arg>) -> pb::Arg {
        pb::Arg { kind: Some(Kind::List(pb::ArgList { items })) }
    }

    pub fn map(entries: Vec<(Bytes, pb::Arg)>) -> pb::Arg {
        pb::Arg {
            kind: Some(Kind::Map(pb::ArgMap {
                entries: entries.into_iter().map(|(key, v)| pb::ArgMapEntry { key, value: Some(v) }).collect(),
            })),
        }
    }

    /// Every key the tree references, in order of first appearance, without repeats.
    pub fn references(arg: &pb::Arg, out: &mut Vec<String>) {
        match &arg.kind {
            Some(Kind::Key(k)) if !out.contains(k) => {
                out.push(k.clone());
            }
            Some(Kind::List(l)) => l.items.iter().for_each(|a| references(a, out)),
            Some(Kind::Map(m)) => m.entries.iter().filter_map(|e| e.value.as_ref()).for_each(|a| references(a, out)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dask_macros::task;

    #[task(crate = crate)]
    fn add(x: i64, y: i64) -> i64 {
        x + y
    }

    #[task(crate = crate)]
    fn total(xs: Vec<i64>, scale: std::collections::BTreeMap<String, i64>) -> i64 {
        xs.iter().sum::<i64>() * scale.get("k").copied().unwrap_or(1)
    }

    #[task(crate = crate, name = "checked-div")]
    fn div(a: i64, b: i64) -> Result<i64, String> {
        if b == 0 { Err("division by zero".into()) } else { Ok(a / b) }
    }

    #[task(crate = crate)]
    fn boom() -> u8 {
        panic!("kaboom")
    }

    fn spec(function: &str, args: Vec<pb::Arg>) -> pb::TaskSpec {
        pb::TaskSpec { function: function.into(), args: Some(build::list(args)) }
    }

    fn dep(v: i64) -> Value {
        Value::encode(&v).unwrap()
    }

    fn run(spec: &pb::TaskSpec) -> Result<Value, ExecErrorKind> {
        execute(spec, &|k: &str| k.strip_prefix("v").map(|n| dep(n.parse().unwrap())))
    }

    fn as_i64(v: Value) -> i64 {
        v.decode().unwrap()
    }

    #[test]
    fn literals_and_references() {
        let s = spec("add", vec![build::literal(&2i64).unwrap(), build::key("v40")]);
        assert_eq!(as_i64(run(&s).unwrap()), 42);
        assert_eq!(add::call(1, 2), 3);
    }

    #[test]
    fn nested_lists_and_maps() {
        let xs = build::list(vec![build::key("v1"), build::literal(&2i64).unwrap(), build::key("v3")]);
        let m = build::map(vec![(Bytes::from(rmp_serde::to_vec("k").unwrap()), build::key("v10"))]);
        assert_eq!(as_i64(run(&spec("total", vec![xs, m])).unwrap()), 60);
    }

    #[test]
    fn errors_have_kinds() {
        let e = run(&spec("checked-div", vec![build::literal(&1i64).unwrap(), build::literal(&0i64).unwrap()]));
        assert_eq!(e, Err(ExecErrorKind::Error("division by zero".into())));
        let e = run(&spec("boom", vec![])).unwrap_err();
        assert_eq!(e, ExecErrorKind::Panic("kaboom".into()));
        let e = run(&spec("nope", vec![])).unwrap_err();
        assert_eq!(e.kind(), "unknown-function");
        assert!(e.message().contains("\"nope\""));
        let e = run(&spec("add", vec![build::literal("x").unwrap(), build::literal(&1i64).unwrap()])).unwrap_err();
        assert_eq!(e.kind(), "bad-arguments", "{e:?}");
        let e = run(&spec("add", vec![build::literal(&1i64).unwrap()])).unwrap_err();
        assert_eq!(e.kind(), "bad-arguments", "{e:?}");
        let e = run(&spec("add", vec![build::key("missing"), build::key("v1")])).unwrap_err();
        assert_eq!(e.kind(), "missing-dependency");
    }

    #[task(crate = crate)]
    fn blob_addr(b: Bytes, copy: serde_bytes::ByteBuf, n: Vec<u8>) -> (u64, usize, usize) {
        (b.as_ptr() as usize as u64, copy.len(), n.len())
    }

    #[task(crate = crate)]
    fn make_blob(n: usize) -> Bytes {
        Bytes::from(vec![1u8; n])
    }

    #[test]
    fn bytes_arguments_share_the_dependency_buffer() {
        let blob = Value::raw(Bytes::from(vec![7u8; 10_000]));
        let packed = Value::encode(&serde_bytes::ByteBuf::from(vec![8u8; 300])).unwrap();
        let deps = |k: &str| match k {
            "raw" => Some(blob.clone()),
            "packed" => Some(packed.clone()),
            _ => Some(dep(1)),
        };
        let s = spec("blob_addr", vec![build::key("raw"), build::key("raw"), build::key("raw")]);
        let (addr, a, b): (u64, usize, usize) = execute(&s, &deps).unwrap().decode().unwrap();
        assert_eq!(addr, blob.data.as_ptr() as usize as u64, "a Bytes parameter is not a copy");
        assert_eq!((a, b), (10_000, 10_000));
        // A msgpack bin dependency is a Bytes too; a literal is decoded.
        let s =
            spec("blob_addr", vec![build::key("packed"), build::key("packed"), build::literal(&vec![1u8, 2]).unwrap()]);
        let (addr, a, b): (u64, usize, usize) = execute(&s, &deps).unwrap().decode().unwrap();
        assert_eq!(addr, packed.data[packed.len() - 300..].as_ptr() as usize as u64);
        assert_eq!((a, b), (300, 2));
        let s = spec("blob_addr", vec![build::key("v1"), build::key("raw"), build::key("raw")]);
        let e = execute(&s, &deps).unwrap_err();
        assert_eq!(e.kind(), "bad-arguments", "{e:?}");
        // A Bytes result is stored raw.
        let v = run(&spec("make_blob", vec![build::literal(&5usize).unwrap()])).unwrap();
        assert_eq!((v.codec, &v.data[..]), (crate::codec::RAW, &[1u8; 5][..]));
        let e = run(&spec("make_blob", vec![])).unwrap_err();
        assert!(e.message().contains("takes 1 argument, 0 were given"), "{e:?}");
    }

    #[test]
    fn references_are_collected_once() {
        let a = build::list(vec![build::key("a"), build::list(vec![build::key("b"), build::key("a")])]);
        let mut out = Vec::new();
        build::references(&a, &mut out);
        assert_eq!(out, ["a", "b"]);
    }
}
