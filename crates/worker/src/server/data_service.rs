//! The worker's side of data connections: peers and clients fetch values (`get`) and clients
//! put scattered values (`put`).
use std::path::PathBuf;
use std::sync::Arc;

use dask_protocol::codec::Value;
use dask_protocol::data::{Admit, DataStore, Received};
use dask_protocol::pb;
use tokio::sync::mpsc;

use crate::state::Event;
use crate::store::Store;

pub struct DataService {
    pub store: Arc<Store>,
    pub events: mpsc::UnboundedSender<Event>,
    /// The worker's memory limit (0: none).
    pub memory_limit: u64,
    /// `distributed.worker.max-value-size`, if set.
    pub max_value_size: Option<u64>,
    /// This worker's address, as tickets name it.
    pub address: String,
    /// The scheduler's secret that put tickets are made with (set on registering): a put
    /// without a good ticket is refused (`dask_protocol::ticket`).
    pub put_secret: parking_lot::RwLock<Option<dask_protocol::ticket::Secret>>,
}

impl DataService {
    /// Every announced value needs the scheduler's ticket for its key on this worker.
    fn check_tickets(&self, headers: &[pb::ValueHeader]) -> Result<(), String> {
        use dask_protocol::ticket;
        let Some(secret) = *self.put_secret.read() else {
            return Err("this worker is not registered with a scheduler yet, and takes no puts".into());
        };
        let now = ticket::now_s();
        match headers
            .iter()
            .find(|h| !h.missing && !ticket::check(&secret, &h.key, &self.address, h.expires_s, &h.ticket, now))
        {
            None => Ok(()),
            Some(h) => Err(format!(
                "put of {:?} refused: the scheduler did not announce that key to this worker, or its ticket \
                 expired (values are put with Client::scatter, which asks the scheduler first)",
                h.key
            )),
        }
    }
}

impl DataStore for DataService {
    fn get(&self, keys: Vec<String>) -> Vec<Received> {
        keys.into_iter()
            .map(|k| {
                let v = super::get_value(&self.store, &k);
                (k, v)
            })
            .collect()
    }

    /// A put is refused, before a byte of it is read, if it announces more than the worker can
    /// take: a value over `max-value-size`, or more in all than the memory limit plus the room
    /// left for spilled values. A value larger than the memory limit goes straight to disk.
    fn admit(&self, headers: &[pb::ValueHeader]) -> Result<Vec<Admit>, String> {
        self.check_tickets(headers)?;
        let present = || headers.iter().filter(|h| !h.missing);
        if let Some(max) = self.max_value_size
            && let Some(h) = present().find(|h| h.len > max)
        {
            return Err(format!(
                "value {:?} of {} bytes is over this worker's max-value-size of {max} bytes \
                 (distributed.worker.max-value-size)",
                h.key, h.len
            ));
        }
        if self.memory_limit == 0 {
            return Ok(vec![Admit::Memory; headers.len()]);
        }
        // Values go to memory while they fit under the spill target (less what is held), the
        // rest straight to disk: a put of many large values never fills memory first.
        let target = self.store.spill_config().and_then(|s| s.target).unwrap_or(self.memory_limit);
        let mut budget = target.saturating_sub(self.store.stats().managed);
        let total = present().fold(0u64, |a, h| a.saturating_add(h.len));
        let room = self.store.spill_room();
        let can_take = self.memory_limit.saturating_add(room);
        if total > can_take {
            return Err(format!(
                "{total} bytes announced, more than this worker can hold: its memory limit is {} bytes and \
                 {room} bytes of spill room are left; scatter less at once, or to workers with more memory",
                self.memory_limit
            ));
        }
        headers
            .iter()
            .map(|h| {
                let spills = self.store.spill_config().is_some();
                // Small values go to memory regardless: the store spills others for them.
                if h.missing || h.len <= budget || (spills && h.len <= target / 16) {
                    budget = budget.saturating_sub(h.len);
                    return Ok(Admit::Memory);
                }
                if !spills {
                    return if h.len > self.memory_limit {
                        Err(format!(
                            "value {:?} of {} bytes is over this worker's memory limit of {} bytes and it cannot \
                             spill to disk (spilling is turned off)",
                            h.key, h.len, self.memory_limit
                        ))
                    } else {
                        Ok(Admit::Memory)
                    };
                }
                self.store.incoming_file().map(Admit::File).ok_or_else(|| "the worker is closing".to_string())
            })
            .collect()
    }

    /// A key held already keeps its value: a put never replaces a stored value (a computed
    /// result, or an earlier scatter of the same key), so a put cannot forge what tasks read.
    fn put(&self, values: Vec<(String, Value)>) -> Result<(), String> {
        let mut keys = Vec::with_capacity(values.len());
        for (k, v) in values {
            if self.store.contains(&k) {
                tracing::debug!(key = %k, "a put of a key held already is ignored");
                continue;
            }
            let key: Arc<str> = Arc::from(k);
            let n = v.data.len() as u64;
            super::put_value(&self.store, key.clone(), v);
            keys.push((key, n));
        }
        self.announce(keys)
    }

    fn put_file(&self, key: String, codec: &'static str, file: PathBuf, len: u64) -> Result<(), String> {
        if self.store.contains(&key) {
            let _ = std::fs::remove_file(&file);
            return Ok(());
        }
        let key: Arc<str> = Arc::from(key);
        self.store
            .insert_spilled(key.clone(), codec, &file, len)
            .map_err(|e| format!("failed to keep value {key:?} on disk: {e}"))?;
        self.announce(vec![(key, len)])
    }
}

impl DataService {
    fn announce(&self, keys: Vec<(Arc<str>, u64)>) -> Result<(), String> {
        self.events.send(Event::Put { keys }).map_err(|_| "the worker is shutting down".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dask_protocol::data::{self, DataPool};
    use dask_protocol::pb::data_message::Kind;

    const SECRET: dask_protocol::ticket::Secret = [7; 32];

    /// Puts with the tickets the scheduler would give.
    async fn put_with_tickets(
        pool: &DataPool,
        addr: &str,
        values: Vec<(String, Value)>,
    ) -> Result<pb::PutReply, dask_protocol::data::DataError> {
        let expires = dask_protocol::ticket::now_s() + 60;
        let tickets = values.iter().map(|(k, _)| dask_protocol::ticket::ticket(&SECRET, k, addr, expires)).collect();
        pool.put_data(addr, values, tickets, expires).await
    }

    async fn serve(memory_limit: u64, max_value_size: Option<u64>, tag: &str) -> (String, Arc<Store>) {
        let dir = std::env::temp_dir().join(format!("dask-rs-admit-{tag}-{}", std::process::id()));
        let store = Store::new(Some(crate::store::SpillConfig {
            dir,
            target: Some(memory_limit * 6 / 10),
            max_spill: Some(1 << 30),
            compress: false,
        }))
        .unwrap();
        let (events, _rx) = mpsc::unbounded_channel();
        std::mem::forget(_rx);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("tcp://{}", listener.local_addr().unwrap());
        let service = Arc::new(DataService {
            store: store.clone(),
            events,
            memory_limit,
            max_value_size,
            address: addr.clone(),
            put_secret: parking_lot::RwLock::new(Some(SECRET)),
        });
        tokio::spawn(data::serve(listener, service, Default::default(), None));
        (addr, store)
    }

    #[tokio::test]
    async fn a_put_the_worker_cannot_hold_is_refused_before_a_byte_is_read() {
        let (addr, store) = serve(1_000_000, None, "refuse").await;
        // A header announcing a terabyte: refused with the reason, nothing reserved.
        let mut c = data::connect(&addr, None).await.unwrap();
        let expires = dask_protocol::ticket::now_s() + 60;
        let header = pb::ValueHeader {
            key: "tb".into(),
            codec: "bytes".into(),
            len: 1 << 40,
            ticket: dask_protocol::ticket::ticket(&SECRET, "tb", &addr, expires).into(),
            expires_s: expires,
            ..Default::default()
        };
        let put = pb::DataMessage { kind: Some(Kind::Put(pb::ValueList { values: vec![header] })) };
        data::write_message(&mut c, &put).await.unwrap();
        let reply = data::read_message(&mut c, false).await.unwrap().unwrap();
        assert!(
            matches!(&reply.kind, Some(Kind::Error(e)) if e.contains("more than this worker can hold") && e.contains("memory limit")),
            "{reply:?}"
        );
        assert!(store.is_empty());
        // A real sender gets the reason too (it listens while it writes).
        let big = Value { codec: "bytes", data: bytes::Bytes::from(vec![0u8; 3 << 20]) };
        let (small_addr, _s) = serve(1_000_000, Some(1 << 20), "max").await;
        let e = put_with_tickets(&DataPool::default(), &small_addr, vec![("big".into(), big)]).await.unwrap_err();
        assert!(e.to_string().contains("max-value-size"), "{e}");
        store.close();
    }

    #[tokio::test]
    async fn a_value_over_the_memory_limit_goes_straight_to_disk() {
        let (addr, store) = serve(100_000, None, "stream").await;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let v = Value { codec: "bytes", data: bytes::Bytes::from(data.clone()) };
        let pool = DataPool::default();
        let small = Value { codec: "bytes", data: bytes::Bytes::from_static(b"tiny") };
        put_with_tickets(&pool, &addr, vec![("small".into(), small), ("big".into(), v)]).await.unwrap();
        assert_eq!(store.stored_bytes("big"), Some(300_000), "on disk as it came");
        assert_eq!(store.stats().managed, 4);
        let got = pool.get_data(&addr, vec!["big".into(), "small".into()]).await.unwrap();
        assert_eq!(got[0].1.as_ref().unwrap().data, bytes::Bytes::from(data));
        assert_eq!(&got[1].1.as_ref().unwrap().data[..], b"tiny");
        store.close();
    }

    #[tokio::test]
    async fn a_put_never_replaces_a_value_held() {
        let (addr, store) = serve(0, None, "forge").await;
        let pool = DataPool::default();
        let real = Value { codec: "bytes", data: bytes::Bytes::from_static(b"computed") };
        put_with_tickets(&pool, &addr, vec![("x".into(), real)]).await.unwrap();
        let forged = Value { codec: "bytes", data: bytes::Bytes::from_static(b"forged!!") };
        put_with_tickets(
            &pool,
            &addr,
            vec![("x".into(), forged), ("y".into(), Value::raw(bytes::Bytes::from_static(b"new")))],
        )
        .await
        .unwrap();
        let got = pool.get_data(&addr, vec!["x".into(), "y".into()]).await.unwrap();
        assert_eq!(&got[0].1.as_ref().unwrap().data[..], b"computed", "the first value stays");
        assert_eq!(&got[1].1.as_ref().unwrap().data[..], b"new", "new keys are taken");
        store.close();
    }

    #[tokio::test]
    async fn a_put_without_the_schedulers_ticket_is_refused() {
        let (addr, store) = serve(0, None, "ticket").await;
        let pool = DataPool::default();
        let v = || vec![("k".to_string(), Value::raw(bytes::Bytes::from_static(b"v")))];
        let e = pool.put_data(&addr, v(), Vec::new(), 0).await.unwrap_err();
        assert!(e.to_string().contains("did not announce that key to this worker"), "{e}");
        // A ticket for another worker, another key, or past its time.
        let later = dask_protocol::ticket::now_s() + 60;
        let elsewhere = dask_protocol::ticket::ticket(&SECRET, "k", "tcp://127.0.0.1:1", later);
        assert!(pool.put_data(&addr, v(), vec![elsewhere], later).await.is_err());
        let other_key = dask_protocol::ticket::ticket(&SECRET, "j", &addr, later);
        assert!(pool.put_data(&addr, v(), vec![other_key], later).await.is_err());
        let past = dask_protocol::ticket::now_s() - 1;
        let expired = dask_protocol::ticket::ticket(&SECRET, "k", &addr, past);
        assert!(pool.put_data(&addr, v(), vec![expired], past).await.is_err());
        assert!(store.is_empty(), "nothing refused was kept");
        // The scheduler's ticket opens the door.
        put_with_tickets(&pool, &addr, v()).await.unwrap();
        assert!(!store.is_empty());
        store.close();
    }
}
