//! Published datasets (named futures the scheduler keeps alive for any client) and metadata
//! (a JSON tree on the scheduler), as dask's `publish_dataset` and `set_metadata`.
use dask_protocol::pb::{self, coord_reply::Kind, coord_request::Op};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Answer, Shared, Wait, future_item, unexpected};
use crate::{Client, Error, Future, Result};

impl Client {
    async fn dataset_op(&self, name: &str, op: Op, what: &str) -> Result<Kind> {
        match self.coord(name, Wait::No, op).await? {
            Answer::Said(k) => Ok(k),
            other => Err(unexpected(what, other)),
        }
    }

    /// Publishes `futures` under `name`: the scheduler keeps them alive, for any client, until
    /// [`unpublish_dataset`](Self::unpublish_dataset). A name in use is refused.
    pub fn publish_dataset<T>(&self, name: &str, futures: &[Future<T>]) -> Result<()> {
        self.publish_dataset_with(name, futures, false)
    }

    /// [`publish_dataset`](Self::publish_dataset); with `replace`, a dataset of that name is
    /// replaced (dask's `override=True`).
    pub fn publish_dataset_with<T>(&self, name: &str, futures: &[Future<T>], replace: bool) -> Result<()> {
        self.inner.block_on(self.publish_dataset_async(name, futures, replace))
    }

    pub async fn publish_dataset_async<T>(&self, name: &str, futures: &[Future<T>], replace: bool) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("a dataset needs a name".into()));
        }
        let items = futures.iter().map(future_item).collect();
        let op = Op::DatasetPublish(pb::DatasetPublish { items, replace });
        match self.dataset_op(name, op, "publish_dataset").await? {
            Kind::Done(_) => Ok(()),
            k => Err(unexpected("publish_dataset", Answer::Said(k))),
        }
    }

    /// The futures published as `name` (this client holds them from now on). An unknown name
    /// is an error listing the names there are.
    pub fn get_dataset<T: DeserializeOwned + 'static>(&self, name: &str) -> Result<Vec<Future<T>>> {
        self.inner.block_on(self.get_dataset_async(name))
    }

    pub async fn get_dataset_async<T: DeserializeOwned + 'static>(&self, name: &str) -> Result<Vec<Future<T>>> {
        match self.coord(name, Wait::No, Op::DatasetGet(pb::Empty {})).await? {
            Answer::Items(items, id) => {
                Ok(self.items_to_shared::<T>(items, id)?.into_iter().filter_map(Shared::into_future).collect())
            }
            other => Err(unexpected("get_dataset", other)),
        }
    }

    /// Names of the published datasets, sorted.
    pub fn list_datasets(&self) -> Result<Vec<String>> {
        self.inner.block_on(async {
            match self.dataset_op("", Op::DatasetList(pb::Empty {}), "list_datasets").await? {
                Kind::Names(n) => Ok(n.names),
                k => Err(unexpected("list_datasets", Answer::Said(k))),
            }
        })
    }

    /// Removes a published dataset (its futures are let go unless someone else holds them).
    pub fn unpublish_dataset(&self, name: &str) -> Result<()> {
        self.inner.block_on(async {
            match self.dataset_op(name, Op::DatasetUnpublish(pb::Empty {}), "unpublish_dataset").await? {
                Kind::Done(_) => Ok(()),
                k => Err(unexpected("unpublish_dataset", Answer::Said(k))),
            }
        })
    }

    /// The published datasets as a map-like view (dask's `client.datasets`).
    pub fn datasets(&self) -> Datasets<'_> {
        Datasets { client: self }
    }

    /// Sets metadata at `path` on the scheduler (dask's `set_metadata`): `["x", "w", "z"]` sets
    /// `x.w.z`, making maps on the way and keeping what else `x` holds.
    pub fn set_metadata<V: Serialize + ?Sized>(&self, path: &[&str], value: &V) -> Result<()> {
        if path.is_empty() {
            return Err(Error::InvalidArgument("set_metadata needs a key (or a path of keys)".into()));
        }
        let json = serde_json::to_string(value)
            .map_err(|e| Error::InvalidArgument(format!("metadata must be representable as JSON: {e}")))?;
        let op = Op::MetaSet(pb::MetaSet { path: path.iter().map(|s| s.to_string()).collect(), json });
        self.inner.block_on(async {
            match self.dataset_op("", op, "set_metadata").await? {
                Kind::Done(_) => Ok(()),
                k => Err(unexpected("set_metadata", Answer::Said(k))),
            }
        })
    }

    /// The metadata at `path` (all of it for an empty path); an error if there is none.
    pub fn get_metadata<V: DeserializeOwned>(&self, path: &[&str]) -> Result<V> {
        self.metadata_at(path)?.ok_or_else(|| Error::Refused(format!("no metadata at {path:?}")))
    }

    /// The metadata at `path`, or `default` if there is none there.
    pub fn get_metadata_or<V: DeserializeOwned>(&self, path: &[&str], default: V) -> Result<V> {
        Ok(self.metadata_at(path)?.unwrap_or(default))
    }

    fn metadata_at<V: DeserializeOwned>(&self, path: &[&str]) -> Result<Option<V>> {
        let op = Op::MetaGet(pb::MetaPath { path: path.iter().map(|s| s.to_string()).collect() });
        let json = self.inner.block_on(async {
            match self.dataset_op("", op, "get_metadata").await? {
                Kind::Json(j) => Ok(j),
                k => Err(unexpected("get_metadata", Answer::Said(k))),
            }
        })?;
        if json.is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&json).map(Some).map_err(|e| {
            Error::InvalidArgument(format!("the metadata at {path:?} ({json}) is not of the type asked: {e}"))
        })
    }
}

/// The published datasets, as a map (dask's `client.datasets`).
#[derive(Debug)]
pub struct Datasets<'a> {
    client: &'a Client,
}

impl Datasets<'_> {
    pub fn names(&self) -> Result<Vec<String>> {
        self.client.list_datasets()
    }

    pub fn len(&self) -> Result<usize> {
        Ok(self.names()?.len())
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    pub fn contains(&self, name: &str) -> Result<bool> {
        Ok(self.names()?.iter().any(|n| n == name))
    }

    pub fn get<T: DeserializeOwned + 'static>(&self, name: &str) -> Result<Vec<Future<T>>> {
        self.client.get_dataset(name)
    }

    /// Publishes, replacing a dataset of the same name (as assigning to a dict does).
    pub fn insert<T>(&self, name: &str, futures: &[Future<T>]) -> Result<()> {
        self.client.publish_dataset_with(name, futures, true)
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        self.client.unpublish_dataset(name)
    }
}
