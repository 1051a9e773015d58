//! The worker's side of data connections: peers and clients fetch values (`get`) and clients
//! put scattered values (`put`).
use std::sync::Arc;

use dask_protocol::codec::Value;
use dask_protocol::data::{DataStore, Received};
use tokio::sync::mpsc;

use super::Store;
use crate::state::Event;

pub struct DataService {
    pub store: Store,
    pub events: mpsc::UnboundedSender<Event>,
}

impl DataStore for DataService {
    fn get(&self, keys: Vec<String>) -> Vec<Received> {
        keys.into_iter()
            .map(|k| {
                let v = self.store.get(k.as_str()).map(|e| e.value().clone());
                (k, v)
            })
            .collect()
    }

    fn put(&self, values: Vec<(String, Value)>) -> Result<(), String> {
        let mut keys = Vec::with_capacity(values.len());
        for (k, v) in values {
            let key: Arc<str> = Arc::from(k);
            let n = v.data.len() as u64;
            self.store.insert(key.clone(), v);
            keys.push((key, n));
        }
        self.events.send(Event::Put { keys }).map_err(|_| "the worker is shutting down".to_string())
    }
}
