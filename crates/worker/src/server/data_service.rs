//! The worker's data service: peers and clients fetch values (`GetData`) and clients put
//! scattered values (`PutData`), in chunks.
use std::pin::Pin;
use std::sync::Arc;

use dask_protocol::data::{Assembler, frames};
use dask_protocol::pb::{self, worker_data_server::WorkerData};
use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::Store;
use crate::state::Event;

pub struct DataService {
    pub store: Store,
    pub events: mpsc::UnboundedSender<Event>,
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<pb::DataFrame, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerData for DataService {
    type GetDataStream = FrameStream;

    async fn get_data(&self, request: Request<pb::DataRequest>) -> Result<Response<FrameStream>, Status> {
        let keys = request.into_inner().keys;
        let values = keys
            .into_iter()
            .map(|k| {
                let v = self.store.get(k.as_str()).map(|e| e.value().clone());
                (k, v)
            })
            .collect();
        let stream = futures_util::stream::iter(frames(values).into_iter().map(Ok));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn put_data(&self, request: Request<Streaming<pb::DataFrame>>) -> Result<Response<pb::PutReply>, Status> {
        let mut stream = request.into_inner();
        let mut asm = Assembler::default();
        while let Some(frame) = stream.message().await? {
            asm.push(frame).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let values = asm.finish().map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut keys = Vec::with_capacity(values.len());
        let mut total = 0;
        for (k, v) in values {
            let Some(v) = v else { continue };
            let key: Arc<str> = Arc::from(k);
            let n = v.data.len() as u64;
            total += n;
            self.store.insert(key.clone(), v);
            keys.push((key, n));
        }
        let count = keys.len() as u32;
        self.events.send(Event::Put { keys }).map_err(|_| Status::unavailable("the worker is shutting down"))?;
        Ok(Response::new(pb::PutReply { nbytes: total, keys: count }))
    }
}
